"""HQQ (Half-Quadratic Quantization) through the `hqq` library: no calibration, fast.

transformers' `HqqConfig` path is broken in 5.23 (NotImplementedError), so the library's
own `AutoHQQHFModel` quantizes, saves and reloads.
"""

from __future__ import annotations

from workbench.methods.base import Method, Param, check_group_size, compute_bits, per_group_bits
from workbench.sources import models


def _quantize(request):
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    check_group_size("hqq", request.params["group_size"], request.source)
    model = models.load_model(request.source, "cpu")
    config = BaseQuantizeConfig(nbits=request.params["bits"], group_size=request.params["group_size"])
    AutoHQQHFModel.quantize_model(
        model, quant_config=config, compute_dtype=models.compute_dtype(request.device), device=request.device
    )
    return model


def _reload(folder, request):
    from hqq.models.hf.base import AutoHQQHFModel

    return AutoHQQHFModel.from_quantized(
        str(folder), compute_dtype=models.compute_dtype(request.device), device=request.device
    )


def side_tensors(module):
    """HQQ keeps its scales and zero points in a `meta` dict on the layer."""
    import torch

    meta = getattr(module, "meta", None)
    if isinstance(meta, dict):
        yield from (v for v in meta.values() if isinstance(v, torch.Tensor))


def _storage(method, params, device):
    """A scale and a zero point per group, in the compute dtype."""
    return method.bits_for(params) + per_group_bits(params["group_size"], 2 * compute_bits(device)), compute_bits(
        device
    )


def _save(model, folder):
    from hqq.models.hf.base import AutoHQQHFModel

    AutoHQQHFModel.save_quantized(model, str(folder))


def hqq_dequantized(weight, bits: int, group_size: int):
    """hqq's own HQQLinear with the `hqq` method's config (BaseQuantizeConfig defaults), dequantized.
    Its optimizer is slow on CPU (seconds per weight matrix), so an hqq map of a small model
    takes minutes where an RTN map takes seconds."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.detach().clone().float()
    layer = HQQLinear(
        linear, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=torch.float32, device="cpu"
    )
    return layer.dequantize().reshape(weight.shape).to(weight.dtype)


METHODS = (
    Method(
        name="hqq",
        family="hqq",
        bits=4,
        summary="Half-quadratic optimisation of scales and zeros per group; no calibration data.",
        params=(
            Param("bits", 4, "Bits per weight.", (2, 3, 4, 8)),
            Param("group_size", 64, "Weights per scale/zero group; must divide each layer's input width.", minimum=8),
        ),
        quantize=_quantize,
        save=_save,
        reload=_reload,
        backend="hqq",
        pip="pip install hqq==0.2.8.post1",
        trainable=True,
        kernel="hqq (dequantize + torch matmul)",
        storage=_storage,
        side_tensors=side_tensors,
        fake_quantize=lambda params: lambda w: hqq_dequantized(w, params["bits"], params["group_size"]),
    ),
)
