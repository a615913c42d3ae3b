"""AWQ's clip search as matrix products (workbench/methods/awq_clip.py) against gptqmodel's own."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gptqmodel")

from gptqmodel import QuantizeConfig  # noqa: E402
from gptqmodel.looper.awq_processor import AWQProcessor  # noqa: E402
from gptqmodel.quantization import FORMAT, METHOD  # noqa: E402

from workbench.methods import awq_clip  # noqa: E402

GROUP, TRIES, STEPS = 64, 10, 20


def _processor(sym: bool):
    processor = AWQProcessor.__new__(AWQProcessor)  # the clip search uses only the config and the quantizer
    processor.qcfg = QuantizeConfig(bits=4, group_size=GROUP, sym=sym, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
    return processor


def _layer(seed: int):
    """bf16 weights with a few large ones, and calibration inputs with outlier channels (as AWQ sees)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(128, 256, generator=generator) * 0.02
    weight[torch.rand(weight.shape, generator=generator) < 0.01] *= 8
    inputs = torch.randn(4, 300, 256, generator=generator)
    inputs[..., :8] *= 20
    return weight.bfloat16(), inputs.bfloat16()


def _exact_errors(processor, weight, inputs):
    """The search's objective in float64 for each of the 10 tries: tries x rows x groups."""
    rows, columns = weight.shape
    x = inputs.reshape(-1, columns)
    x = x[:: max(1, len(x) // 512)].double()
    x = x.reshape(len(x), -1, GROUP).transpose(0, 1)
    w = weight.reshape(rows, 1, -1, GROUP)
    largest = w.abs().amax(dim=-1, keepdim=True)
    original = torch.bmm(x, w[:, 0].permute(1, 2, 0).double())
    quantized, errors = torch.empty_like(w), []
    for shrink in range(TRIES):
        bound = largest * (1 - shrink / STEPS)
        processor._pseudo_quantize_tensor_into(torch.clamp(w, -bound, bound), quantized)
        out = torch.bmm(x, quantized[:, 0].permute(1, 2, 0).double())
        errors.append((out - original).pow(2).mean(dim=1).t())
    return torch.stack(errors), largest[:, 0, :, 0]


def _tries(bounds, largest):
    """Which try (0-9) each chosen bound is."""
    return torch.round((1 - bounds[..., 0].double() / largest.double()) * STEPS).long()


@pytest.mark.parametrize("sym", [True, False])
def test_the_matmul_search_picks_the_exact_best_try_and_mostly_agrees_with_gptqmodel(sym):
    processor = _processor(sym)
    for seed in range(3):
        weight, inputs = _layer(seed)
        errors, largest = _exact_errors(processor, weight, inputs)
        ours = awq_clip.compute_best_clip(processor, weight, inputs)
        upstream = AWQProcessor._compute_best_clip(processor, weight, inputs)
        assert ours.shape == upstream.shape == (128, 256 // GROUP, 1)
        best = errors.min(dim=0).values
        chosen = errors.gather(0, _tries(ours, largest)[None])[0]
        # the float64 optimum among the same tries, up to fp32 rounding (its order differs between CPUs);
        # gptqmodel's bf16 products miss it by up to 7.6 % on the bundled model
        assert torch.all(chosen <= best * (1 + 1e-4))
        # gptqmodel rounds each product to bf16: it differs only where that decides a near tie
        assert (ours == upstream).float().mean() >= 0.9


def test_the_choice_swaps_gptqmodel_s_search_only_inside_the_block():
    upstream = AWQProcessor._compute_best_clip
    with awq_clip.clip_search("matmul"):
        assert AWQProcessor._compute_best_clip is awq_clip.compute_best_clip
    assert AWQProcessor._compute_best_clip is upstream
    with awq_clip.clip_search("gptqmodel"):
        assert AWQProcessor._compute_best_clip is upstream
    with pytest.raises(RuntimeError), awq_clip.clip_search("matmul"):
        raise RuntimeError("a failed quantization")
    assert AWQProcessor._compute_best_clip is upstream
