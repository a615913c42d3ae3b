"""Will it fit? Weight memory of every registered method, from the model's config alone.

Answering before anything is downloaded saves a user from fetching 140 GB of weights
to learn that a 70B model does not fit a T4. The model is built on the meta device
(shapes, no weights), its parameters are counted once each (tied embeddings share one
tensor), and each method's storage is estimated from its bits per weight plus the
scales and zero points its format keeps. These are estimates, not measurements: the
workbench's results table reports the real bytes once a method has run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from workbench.core.errors import WorkbenchError
from workbench.run.results import MB
from workbench.sources.models import ModelSource, empty_model

GIB = 1024**3
MIB = 1024**2

GPUS = {"T4 16GB": 15360 * MIB, "L4 24GB": 23034 * MIB, "A100 40GB": 40960 * MIB, "A100 80GB": 81920 * MIB}
"""Common cards, at the total memory nvidia-smi reports (a T4 loses about 1 GiB to ECC)."""

RUNTIME_FACTOR = 1.2
"""Rule of thumb, not a measurement: weights x 1.2 covers activations, KV cache for short
prompts and the CUDA context. Long contexts and large batches need more."""


@dataclass(frozen=True)
class MethodEstimate:
    method: str
    bits: int
    """The method's nominal bits, as the registry declares them."""
    bits_per_weight: float
    """Estimated storage bits per block linear weight, scales and zeros included."""
    weight_bytes: int
    """On the estimate's device: on CPU the tensors a method leaves unquantized stay fp32."""
    gpu_weight_bytes: int
    """On a GPU (16-bit compute): what the `fits` columns use."""
    fits: dict[str, bool]
    """GPU name -> whether the GPU runtime (gpu_weight_bytes x RUNTIME_FACTOR) fits its memory."""

    @property
    def runtime_bytes(self) -> int:
        """GPU weights x RUNTIME_FACTOR: a rule of thumb for activations and CUDA overhead."""
        return int(self.gpu_weight_bytes * RUNTIME_FACTOR)


@dataclass(frozen=True)
class Estimate:
    model: str
    total_params: int
    """Every parameter counted once (tied input/output embeddings are one tensor)."""
    linear_params: int
    """Weights of the block linear layers: what quantization methods compress."""
    other_params: int
    """Embeddings, norms, biases and lm_head: kept at the compute dtype by quantized methods."""
    device: str
    """The device `weight_bytes` is estimated for."""
    rows: list[MethodEstimate]
    gpus: dict[str, int]
    """GPU name -> memory in bytes."""


def estimate(source: ModelSource, gpu_memory_bytes: int | None = None, device: str = "cuda") -> Estimate:
    """Estimate each registered method's weight memory (default parameters) and where it fits.

    `device` is where `weight_bytes` is meant (the `fits` columns are always for GPUs).
    `gpu_memory_bytes` adds a "your GPU" column; without it the attached CUDA GPU, if any, is added.
    """
    from workbench.methods import REGISTRY

    total, linear = count_params(empty_model(source))
    gpus = {**GPUS, **target_gpu(gpu_memory_bytes)}
    rows = [method_estimate(method, total, linear, gpus, device) for method in REGISTRY.values()]
    return Estimate(source.label, total, linear, total - linear, device, rows, gpus)


def count_params(model) -> tuple[int, int]:
    """(all parameters, block linear weights), each tensor once; the output head is not a block linear."""
    from workbench.sources.models import block_linears

    model.tie_weights()  # accelerate's init_empty_weights leaves tied embeddings as two meta tensors
    linear = {id(module.weight): module.weight.numel() for _, module in block_linears(model)}
    unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values()), sum(linear.values())


def target_gpu(gpu_memory_bytes: int | None) -> dict[str, int]:
    """The GPU the user named by its memory, else the attached one, else none."""
    if gpu_memory_bytes is not None:
        if gpu_memory_bytes <= 0:
            raise WorkbenchError(
                f"GPU memory {gpu_memory_bytes} bytes: give a positive number of bytes (e.g. {24 * GIB} for 24 GiB)."
            )
        return {"your GPU": gpu_memory_bytes}
    import torch

    if not torch.cuda.is_available():
        return {}
    return {f"this GPU ({torch.cuda.get_device_name(0)})": torch.cuda.get_device_properties(0).total_memory}


def method_estimate(
    method,
    total_params: int,
    linear_params: int,
    gpus: dict[str, int],
    device: str = "cuda",
    params: dict | None = None,
) -> MethodEstimate:
    """Block linears at the method's storage bits, everything else at the bits it keeps them in
    (both from the method's own declaration, `Method.storage_bits`)."""
    params = params if params is not None else method.resolve_params()

    def weight_bytes(where: str) -> tuple[float, int]:
        linear_bits, other_bits = method.storage_bits(params, where)
        return linear_bits, round((linear_params * linear_bits + (total_params - linear_params) * other_bits) / 8)

    bpw, here = weight_bytes(device)
    gpu = weight_bytes("cuda")[1]
    fits = {name: gpu * RUNTIME_FACTOR <= memory for name, memory in gpus.items()}
    return MethodEstimate(method.name, method.bits_for(params), bpw, here, gpu, fits)


def format_estimate(est: Estimate) -> str:
    """A fixed-width text table, one row per method, one yes/no column per GPU, then footnotes."""
    here = f"weight MB ({est.device})"
    rows = [
        {
            "method": r.method,
            "bits": str(r.bits),
            "bits/weight": f"{r.bits_per_weight:.2f}",
            here: f"{r.weight_bytes / MB:,.0f}",
            "GPU weight MB": f"{r.gpu_weight_bytes / MB:,.0f}",
            "GPU runtime MB": f"{r.runtime_bytes / MB:,.0f}",
            **{gpu: "yes" if fit else "no" for gpu, fit in r.fits.items()},
        }
        for r in est.rows
    ]
    columns = ["method", "bits", "bits/weight", here, "GPU weight MB", "GPU runtime MB", *est.gpus]
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    header = {c: c for c in columns}
    rule = {c: "-" * widths[c] for c in columns}
    lines = ["  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() for row in (header, rule, *rows)]
    return "\n".join(lines + [""] + footnotes(est))


def footnotes(est: Estimate) -> list[str]:
    gpus = ", ".join(f"{name} {memory / GIB:.1f} GiB" for name, memory in est.gpus.items())
    return [
        f"{est.model}: {est.total_params:,} parameters ({est.linear_params:,} in block linear layers, "
        f"{est.other_params:,} in embeddings, norms, biases and lm_head; tied weights counted once).",
        "Weight MB: estimated from the config (no weights read), methods at their default parameters. Quantized "
        "methods keep embeddings, norms and lm_head at the compute dtype: 16-bit on a GPU, fp32 on a CPU (that is "
        "why the CPU column is larger, and what a comparison on a CPU measures).",
        f"Fits: runtime MB = weight MB x {RUNTIME_FACTOR}, a rule of thumb for activations and CUDA context, "
        f"compared with the GPU's memory ({gpus}). Long contexts or large batches need more.",
    ]


def to_dict(est: Estimate) -> dict:
    """JSON-ready: the dataclasses as dicts, plus the runtime factor the `fits` columns assume."""
    return {**asdict(est), "runtime_factor": RUNTIME_FACTOR}
