"""Unquantized baselines: the reference every quantized method is compared against."""

from __future__ import annotations

from workbench.methods.base import Method
from workbench.sources import models


def _baseline(name: str, dtype_name: str, bits: int, summary: str) -> Method:
    return Method(
        name=name,
        family="baseline",
        bits=bits,
        summary=summary,
        kernel="torch",
        trainable=True,
        quantize=lambda request: models.load_model(request.source, request.device, dtype=_dtype(dtype_name)),
        save=lambda model, folder: model.save_pretrained(folder),
        reload=lambda folder, request: models.load_model(
            request.source.saved_copy(folder, name), request.device, dtype=_dtype(dtype_name)
        ),
        storage=lambda method, params, device: (bits, bits),
        limits=()
        if bits == 32
        else ("10-15x slower than fp32 on CPU: half-precision matmuls are not accelerated there.",),
    )


def _dtype(dtype_name: str):
    import torch

    return getattr(torch, dtype_name)


METHODS = (
    _baseline("fp32", "float32", 32, "Full precision, 4 bytes per weight: the reference."),
    _baseline(
        "fp16", "float16", 16, "Half precision: 2 bytes per weight; range up to 65504, activations can overflow."
    ),
    _baseline("bf16", "bfloat16", 16, "bfloat16: fp32's range with an 8-bit mantissa; fast on Ampere GPUs and newer."),
)
