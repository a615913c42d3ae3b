"""Methods defined outside the package, as a user or a plug-in would: one module, `register()`.

`test-rtn8` is a real (fake-quantized) method; the others misbehave on purpose, to test
that a worker's crash, hang or NaN becomes an error row. Importing the module registers
them (so a spawned worker that imports it has them too); `unregister_all` removes them."""

from __future__ import annotations

import os
import signal
import time

from workbench import methods
from workbench.methods import Method, Param
from workbench.sources import models


def _rtn8(request):
    """Round every block-linear weight to 8-bit levels per output row, kept in fp32 (fake quantization)."""
    import torch

    model = models.load_model(request.source, request.device)
    with torch.no_grad():
        for _, layer in models.block_linears(model):
            scale = layer.weight.abs().amax(dim=1, keepdim=True) / 127
            layer.weight.copy_((layer.weight / scale).round().clamp(-127, 127) * scale)
    return model


def _crash(request):
    os.kill(os.getpid(), signal.SIGSEGV)


def _hang(request):
    time.sleep(request.params["seconds"])


def _nan(request):
    model = models.load_model(request.source, request.device)
    model.model.norm.weight.data.fill_(float("nan"))
    return model


METHODS = (
    Method(
        name="test-rtn8",
        family="test",
        bits=8,
        summary="8-bit round to nearest per row, fake-quantized in fp32.",
        quantize=_rtn8,
        storage=lambda method, params, device: (32, 32),
    ),
    Method(name="test-crash", family="test", bits=32, summary="Dies from SIGSEGV while quantizing.", quantize=_crash),
    Method(
        name="test-hang",
        family="test",
        bits=32,
        summary="Sleeps while quantizing.",
        quantize=_hang,
        params=(Param("seconds", 600.0, "How long to sleep.", minimum=0.0),),
    ),
    Method(name="test-nan", family="test", bits=32, summary="A model whose outputs are NaN.", quantize=_nan),
)


def register_all() -> None:
    for method in METHODS:
        if method.name not in methods.REGISTRY:
            methods.register(method)


def unregister_all() -> None:
    for method in METHODS:
        methods.unregister(method.name)


register_all()
