"""torchao weight-only quantization through transformers' `TorchAoConfig`.

int8 works on CPU; int4 fails on CPU in every packing (measured), so it is GPU-only here.
"""

from __future__ import annotations

from workbench.methods.base import Method, Param, check_group_size, compute_bits, per_group_bits
from workbench.sources import models

PIP = "pip install torchao==0.18.0"


def _int8_config(params):
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4_config(params):
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=params["group_size"])


def _storage(method, params, device):
    """int8: one scale per row; int4: a 16-bit scale and zero per group."""
    if "group_size" in params:
        return method.bits + per_group_bits(params["group_size"], 32), compute_bits(device)
    return method.bits + per_group_bits(-1, 32), compute_bits(device)


def _torchao(name: str, bits: int, summary: str, make_config, params=(), devices=("cpu", "cuda")) -> Method:
    def load(source, request):
        from transformers import TorchAoConfig

        if "group_size" in request.params:
            check_group_size(name, request.params["group_size"], request.source)
        return models.load_model(
            source, request.device, quantization_config=TorchAoConfig(quant_type=make_config(request.params))
        )

    return Method(
        name=name,
        family="torchao",
        bits=bits,
        summary=summary,
        params=params,
        devices=devices,
        backend="torchao",
        pip=PIP,
        trainable=bits == 8,
        kernel="torchao",
        storage=_storage,
        quantize=lambda request: load(request.source, request),
        save=lambda model, folder: model.save_pretrained(folder, safe_serialization=False),
        reload=lambda folder, request: models.load_model(request.source.saved_copy(folder, name), request.device),
    )


METHODS = (
    _torchao("torchao-int8", 8, "int8 weight-only, one scale per output row.", _int8_config),
    _torchao(
        "torchao-int4",
        4,
        "int4 weight-only in groups (tinygemm kernel).",
        _int4_config,
        (Param("group_size", 64, "Weights per scale group.", (32, 64, 128, 256)),),
        devices=("cuda",),
    ),
)
