"""GPTQ and plain round-to-nearest (RTN) through gptqmodel's own API.

auto-gptq is unmaintained and does not import with transformers 5; transformers 5
runs GPTQ only through gptqmodel. Path used: `GPTQModel.load(folder, config)` ->
`quantize(calibration)` -> `save(workdir)` -> reload through transformers. The reload
is the path users ship, and gptqmodel's in-memory model after `quantize()` gave
garbage on CPU (loss ~1e34), so the reloaded model is what gets measured.

RTN writes the same format with no calibration: the baseline that shows what GPTQ's
error-correcting calibration buys at the same bits and group size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.methods.base import Method, Param, check_group_size, compute_bits
from workbench.sources import models

PIP = "pip install gptqmodel==7.6.* optimum==2.3.0"
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
"""The group sizes gptqmodel's kernels take (-1: one group per row)."""
GROUP = Param(
    "group_size",
    64,
    "Weights per scale group; must divide each layer's input width (-1: one group per row).",
    GROUP_SIZES,
)
SAMPLES = Param("samples", 16, "Calibration blocks (equal-length token blocks from the calibration text).", minimum=1)
BLOCK_TOKENS = Param("block_tokens", 256, "Tokens per calibration block.", minimum=16)
SERVE_INSTEAD = "serve the base with the adapter attached, or train on a bitsandbytes base (bnb-nf4) to merge"
NO_MERGE = f"PEFT cannot merge a LoRA adapter into packed int weights (it raises); {SERVE_INSTEAD}"


def packed_storage(method, params, device):
    """`bits`-wide packed weights; per group an fp16 scale and a packed `bits`-wide zero point;
    an int32 group index per input column (32 bits over a column of ~600-4k rows: ~0.05 bits).
    4 bits at group 64: 4 + 20/64 + 0.05 = ~4.36 bits per weight, which a reloaded checkpoint matches."""
    bits = method.bits_for(params)
    group = params["group_size"]
    return bits + ((16 + bits) / group if group > 0 else 0.03) + 0.05, compute_bits(device)


def quantize_with_gptqmodel(request, method: str, config, backend=None):
    """Quantize with gptqmodel, save to `request.workdir`, reload through transformers."""
    check_group_size(method, request.params["group_size"], request.source)
    quantize_and_save(request, config, backend)
    return reload_quantized(request.workdir, request)


def quantize_and_save(request, config, backend=None) -> None:
    """gptqmodel's quantize (with `request.calibration`, if any) and save to `request.workdir`."""
    # gptqmodel's CPU thread pool: one per core, but at least 2 (with 1 it refuses to start:
    # "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel

    with logs_outside_cwd():
        model = GPTQModel.load(
            request.source.location, config, device=request.device, trust_remote_code=request.source.trust_remote_code
        )
        calibration = None
        if request.calibration is not None:
            calibration = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in request.calibration]
        kwargs = {"backend": backend} if backend else {}
        model.quantize(calibration, batch_size=1, **kwargs)
        model.save(str(request.workdir))
        del model


_LOG_DIR_LOCK = threading.RLock()


@contextlib.contextmanager
def logs_outside_cwd():
    """gptqmodel 7.6 writes each processor's log to `logs/` in the working directory (the module
    constant `looper.loop_processor._PROJECT_LOG_DIR`; no option or environment variable sets it).
    Point it at a temporary folder, removed afterwards: what it logs also goes to its logger.
    The constant is process-wide, so one gptqmodel quantization runs at a time per process
    (two would compete for the same cores anyway)."""
    from gptqmodel.looper import loop_processor

    with _LOG_DIR_LOCK:
        previous = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
        folder = Path(tempfile.mkdtemp(prefix="workbench-gptqmodel-logs-"))
        loop_processor._PROJECT_LOG_DIR = folder / "logs"
        try:
            yield
        finally:
            loop_processor._PROJECT_LOG_DIR = previous
            shutil.rmtree(folder, ignore_errors=True)


def reload_quantized(folder, request):
    return models.load_model(request.source.saved_copy(folder), request.device)


def rtn_dequantized(weight, bits: int, group_size: int, sym: bool = True):
    """gptqmodel's RTN (quantization/quantizer.py `find_params` + `quantize`, no smoothing, no
    MSE search), group by group along the input dimension: the grid's ends are the group's
    min/max (each clamped to include 0; symmetric: +-max|w| where the group has a negative
    weight), maxq = 2^bits - 1 steps, zero point (maxq+1)/2 when symmetric.

    gptqmodel loads the model in bf16 on CPU (`utils/model.py` auto dtype), so the weights
    are rounded to bf16 first; the grid is then computed in fp32, the checkpoint keeps the
    scales in fp16 and the reloaded layer multiplies the codes by those in fp16. From the fp32
    weights instead, about half of a layer's weights come out different."""
    import torch

    rows, columns = weight.shape
    group = group_size if group_size > 0 else columns
    w = weight.detach().to(torch.bfloat16).float().reshape(rows, columns // group, group)
    maxq = 2**bits - 1
    xmin = w.amin(-1).clamp(max=0)
    xmax = w.amax(-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.masked_fill(empty, -1), xmax.masked_fill(empty, 1)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return (scale.half() * (q - zero).half()).reshape(rows, columns).to(weight.dtype)


def _gptq_config(params):
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(
        bits=params["bits"],
        group_size=params["group_size"],
        desc_act=params["act_order"],
        damp_percent=params["damp"],
        offload_to_disk=False,
    )


def rtn_config(params):
    from gptqmodel import RTNConfig

    return RTNConfig(bits=params["bits"], group_size=params["group_size"], sym=params["sym"])


def save_checkpoint(model, folder):
    """Copy the checkpoint gptqmodel wrote: transformers' own save_pretrained of a reloaded
    GPTQ model writes a layout it cannot load back (qweight shape mismatch, measured)."""
    checkpoint = Path(model.name_or_path)
    if not (checkpoint / "config.json").is_file():
        raise WorkbenchError(f"the quantized checkpoint {checkpoint} is gone; quantize again, then save.")
    shutil.copytree(checkpoint, folder, dirs_exist_ok=True)


METHODS = (
    Method(
        name="gptq",
        family="gptq",
        bits=4,
        needs_calibration=True,
        backend="gptqmodel",
        pip=PIP,
        trainable=True,
        summary="GPTQ: rounds weights column by column and corrects the error with second-order calibration statistics.",
        params=(
            Param("bits", 4, "Bits per weight.", (2, 3, 4, 8)),
            GROUP,
            Param("act_order", False, "Quantize columns in order of decreasing activation size (desc_act)."),
            Param(
                "damp",
                0.05,
                "Dampening added to the Hessian diagonal, as a fraction of its mean.",
                minimum=0.0,
                maximum=1.0,
                exclusive=True,
            ),
            SAMPLES,
            BLOCK_TOKENS,
        ),
        quantize=lambda request: quantize_with_gptqmodel(request, "gptq", _gptq_config(request.params)),
        save=save_checkpoint,
        reload=reload_quantized,
        kernel="gptqmodel",
        storage=packed_storage,
        merge_refusal=NO_MERGE,
        limits=(
            "LoRA adapters train on it but cannot be merged into it.",
            "Slow on CPU: about 4 s per block of layers with 16 samples.",
        ),
    ),
    Method(
        name="rtn",
        family="gptq",
        bits=4,
        backend="gptqmodel",
        pip=PIP,
        trainable=True,
        summary="Round to nearest in GPTQ's format, no calibration: the baseline GPTQ improves on.",
        params=(
            Param("bits", 4, "Bits per weight.", (2, 3, 4, 8)),
            GROUP,
            Param("sym", True, "Symmetric (no zero point); False adds a zero point per group."),
        ),
        quantize=lambda request: quantize_with_gptqmodel(request, "rtn", rtn_config(request.params)),
        save=save_checkpoint,
        reload=reload_quantized,
        kernel="gptqmodel",
        storage=packed_storage,
        merge_refusal=NO_MERGE,
        fake_quantize=lambda params: lambda w: rtn_dequantized(w, params["bits"], params["group_size"], params["sym"]),
    ),
)
