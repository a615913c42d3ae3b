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

from .errors import WorkbenchError
from .models import ModelSource, empty_model
from .results import MB

GIB = 1024 ** 3
MIB = 1024 ** 2

GPUS = {
    "T4 16GB": 15360 * MIB,
    "L4 24GB": 23034 * MIB,
    "A100 40GB": 40960 * MIB,
    "A100 80GB": 81920 * MIB,
}
"""Common cards, at the total memory nvidia-smi reports (a T4 loses about 1 GiB to ECC)."""

RUNTIME_FACTOR = 1.2
"""Rule of thumb, not a measurement: weights x 1.2 covers activations, KV cache for short
prompts and the CUDA context. Long contexts and large batches need more."""

PER_ROW_BITS = 0.03
"""One scale per output row costs 16-32 bits over a row of 1k-4k weights: about 0.01-0.03 bits."""

NON_LINEAR_BITS = 16
"""Quantized methods keep embeddings, norms, biases and lm_head in 16-bit."""


@dataclass(frozen=True)
class MethodEstimate:
    method: str
    bits: int
    """The method's nominal bits, as the registry declares them."""
    bits_per_weight: float
    """Estimated storage bits per block linear weight, scales and zeros included."""
    weight_bytes: int
    fits: dict[str, bool]
    """GPU name -> whether `runtime_bytes` fits its memory."""

    @property
    def runtime_bytes(self) -> int:
        """Weights x RUNTIME_FACTOR: a rule of thumb for activations and CUDA overhead."""
        return int(self.weight_bytes * RUNTIME_FACTOR)


@dataclass(frozen=True)
class Estimate:
    model: str
    total_params: int
    """Every parameter counted once (tied input/output embeddings are one tensor)."""
    linear_params: int
    """Weights of the block linear layers: what quantization methods compress."""
    other_params: int
    """Embeddings, norms, biases and lm_head: kept in 16-bit by quantized methods."""
    rows: list[MethodEstimate]
    gpus: dict[str, int]
    """GPU name -> memory in bytes."""


def estimate(source: ModelSource, gpu_memory_bytes: int | None = None) -> Estimate:
    """Estimate each registered method's weight memory (default parameters) and where it fits.

    `gpu_memory_bytes` adds a "your GPU" column; without it the attached CUDA GPU, if any, is added.
    """
    from .methods import REGISTRY

    total, linear = count_params(empty_model(source))
    gpus = {**GPUS, **target_gpu(gpu_memory_bytes)}
    rows = [method_estimate(method, total, linear, gpus) for method in REGISTRY.values()]
    return Estimate(source.label, total, linear, total - linear, rows, gpus)


def count_params(model) -> tuple[int, int]:
    """(all parameters, block linear weights), each tensor once; the output head is not a block linear."""
    import torch
    from transformers.pytorch_utils import Conv1D

    model.tie_weights()  # accelerate's init_empty_weights leaves tied embeddings as two meta tensors
    head = model.get_output_embeddings()
    linear = {id(module.weight): module.weight.numel() for module in model.modules()
              if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head}
    unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values()), sum(linear.values())


def target_gpu(gpu_memory_bytes: int | None) -> dict[str, int]:
    """The GPU the user named by its memory, else the attached one, else none."""
    if gpu_memory_bytes is not None:
        if gpu_memory_bytes <= 0:
            raise WorkbenchError(f"GPU memory {gpu_memory_bytes} bytes: give a positive number of bytes (e.g. {24 * GIB} for 24 GiB).")
        return {"your GPU": gpu_memory_bytes}
    import torch

    if not torch.cuda.is_available():
        return {}
    return {f"this GPU ({torch.cuda.get_device_name(0)})": torch.cuda.get_device_properties(0).total_memory}


def method_estimate(method, total_params: int, linear_params: int, gpus: dict[str, int]) -> MethodEstimate:
    """Baselines store every tensor at their own width; quantized methods compress the block linears only."""
    params = method.resolve_params()
    bits = method.bits_for(params)
    if method.family == "baseline":
        bpw, other_bits = float(bits), bits
    else:
        bpw, other_bits = bits_per_weight(method.family, bits, params), NON_LINEAR_BITS
    weight_bytes = round((linear_params * bpw + (total_params - linear_params) * other_bits) / 8)
    fits = {name: weight_bytes * RUNTIME_FACTOR <= memory for name, memory in gpus.items()}
    return MethodEstimate(method.name, bits, bpw, weight_bytes, fits)


def bits_per_weight(family: str, bits: int, params: dict) -> float:
    """Estimated storage bits per linear weight: the quantized value plus its share of scales and zeros.

    bitsandbytes 4-bit: blocks of 64 with an fp32 absmax (+0.5), or with double quant an
    8-bit absmax re-scaled per 256 blocks (+0.127). GPTQ/AWQ: an fp16 scale and a packed
    `bits`-wide zero point per group. HQQ, quanto int4/int2 (groups of 128) and torchao
    int4: a 16-bit scale and a 16-bit zero per group. 8-bit formats: one scale per row.
    A family not listed here is assumed to keep a 16-bit scale and zero per 64 weights.
    """
    if family == "bitsandbytes":
        if bits == 8:
            return bits + PER_ROW_BITS
        return bits + (8 / 64 + 32 / (64 * 256) if params["double_quant"] else 32 / 64)
    if family in ("gptq", "awq"):
        return bits + per_group(params["group_size"], 16 + bits)
    if family == "quanto":
        return bits + per_group(128 if bits < 8 else -1, 32)
    if family in ("hqq", "torchao"):
        return bits + per_group(params.get("group_size", -1), 32)
    return bits + per_group(64, 32)


def per_group(group_size: int, overhead_bits: int) -> float:
    """Bits per weight that a group's scale/zero costs; group_size <= 0 means one per row."""
    return overhead_bits / group_size if group_size > 0 else PER_ROW_BITS


def format_estimate(est: Estimate) -> str:
    """A fixed-width text table, one row per method, one yes/no column per GPU, then footnotes."""
    rows = [{
        "method": r.method,
        "bits": str(r.bits),
        "bits/weight": f"{r.bits_per_weight:.2f}",
        "weight MB": f"{r.weight_bytes / MB:,.0f}",
        "runtime MB": f"{r.runtime_bytes / MB:,.0f}",
        **{gpu: "yes" if fit else "no" for gpu, fit in r.fits.items()},
    } for r in est.rows]
    columns = ["method", "bits", "bits/weight", "weight MB", "runtime MB", *est.gpus]
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
        "Weight MB: estimated from the config (no weights read), methods at their default parameters; "
        "quantized methods keep the non-linear parameters in 16-bit.",
        f"Fits: runtime MB = weight MB x {RUNTIME_FACTOR}, a rule of thumb for activations and CUDA context, "
        f"compared with the GPU's memory ({gpus}). Long contexts or large batches need more.",
    ]


def to_dict(est: Estimate) -> dict:
    """JSON-ready: the dataclasses as dicts, plus the runtime factor the `fits` columns assume."""
    return {**asdict(est), "runtime_factor": RUNTIME_FACTOR}
