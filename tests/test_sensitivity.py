"""The sensitivity map: fake quantization equal to each backend's own, the replayed KL equal to a
full forward's, the map's cache, its errors, and the heatmap. Mechanics on the tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench import methods
from workbench.core.errors import WorkbenchError
from workbench.methods import gptq
from workbench.metrics import sensitivity
from workbench.report.sensitivity import heatmap
from workbench.run import maps, runner


def stored_weight(layer) -> torch.Tensor:
    """The weight a quantized linear stores, dequantized by its backend: bitsandbytes' own
    dequantize_4bit of the quant state (before any forward: the first one repacks it for the
    CPU kernel, which computes at lower precision, about 3e-4 off); for gptqmodel and hqq
    layers their output on the identity matrix, which is exactly what they multiply by.
    gptqmodel's 4-bit CPU kernel (TorchAtenLinear) computes in bf16 (outputs ~3e-3 off) and
    cannot dequantize its codes on CPU, so the RTN cases use 3 and 8 bits (TorchLinear)."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as F

        return F.dequantize_4bit(layer.weight.data, state).float()
    with torch.inference_mode():
        return layer(torch.eye(layer.in_features)).T.float()


@pytest.mark.parametrize(
    "choice",
    [
        "rtn:bits=3:group_size=64",
        "rtn:bits=3:group_size=32:sym=False",
        "rtn:bits=8",
        "hqq:bits=3",
        "bnb-nf4",
        "bnb-fp4:double_quant=False",
    ],
)
def test_fake_quantization_equals_the_backends_dequantized_weight(tiny_session, tiny_model, choice):
    """The map is honest only if each cell's weight is what the real method stores."""
    name = "model.layers.1.mlp.down_proj"
    original = dict(tiny_model.named_modules())[name].weight
    fake = maps.fake_quantizer(methods.parse(choice))(original)
    with runner.build(tiny_session, choice, log=lambda m: None) as built:
        real = stored_weight(dict(built.model.named_modules())[name])
    assert not torch.equal(fake, original)  # it did quantize
    torch.testing.assert_close(fake, real, atol=1e-5, rtol=1e-4)


def test_replayed_kl_equals_a_full_forward(tiny_session, tiny_model):
    """Replaying blocks b.. from the saved input gives the KL a whole forward pass gives."""
    ids = torch.tensor([sensitivity.map_tokens(tiny_session.tokenizer, 128)[1]])
    layer = dict(tiny_model.named_modules())["model.layers.1.self_attn.v_proj"]
    with torch.inference_mode():
        replay = sensitivity.Replay(tiny_model, ids)
        assert abs(replay.kl(0)) < 1e-7 and abs(replay.kl(1)) < 1e-7
        base = torch.log_softmax(tiny_model(ids).logits[0], -1)
        original = layer.weight.data
        layer.weight.data = gptq.rtn_dequantized(original, 2, 64)
        try:
            replayed = replay.kl(1)
            changed = torch.log_softmax(tiny_model(ids).logits[0], -1)
        finally:
            layer.weight.data = original
    direct = float((base.exp() * (base - changed)).sum(-1).mean())
    assert direct > 1e-6
    assert replayed == pytest.approx(direct, rel=1e-3, abs=1e-7)


def test_map_cells_sums_and_cache(tiny_session, tmp_path):
    logs = []
    smap, path = maps.load_or_compute(
        tiny_session.source, "rtn:bits=2:group_size=64", tokens=128, folder=tmp_path, log=logs.append
    )
    assert len(smap.cells) == 14 and smap.blocks == [0, 1] and len(smap.kinds) == 7
    assert all(c.kl > 0 and c.proxy > 0 for c in smap.cells)
    assert sum(smap.sums("kl", by="block").values()) == pytest.approx(sum(c.kl for c in smap.cells))
    assert -1 <= smap.spearman() <= 1
    assert smap.text.endswith("(second half)")  # the calibration text, not the evaluation text
    assert json.loads(path.read_text())["method"] == "rtn:bits=2"
    again, _ = maps.load_or_compute(
        tiny_session.source, "rtn:bits=2:group_size=64", tokens=128, folder=tmp_path, log=logs.append
    )
    assert again == smap and any("reusing" in line for line in logs)
    other, other_path = maps.load_or_compute(
        tiny_session.source, "rtn:bits=2", tokens=128, unit="block", folder=tmp_path, end_to_end=False, log=logs.append
    )
    assert other_path != path and [c.kind for c in other.cells] == ["block", "block"]
    assert other.cells[0].kl is None and other.end_to_end_s is None and len(other.cells[0].layers) == 7


def test_map_errors_say_what_to_do(tiny_session):
    with pytest.raises(WorkbenchError, match="gptq.*not supported.*rtn, hqq"):
        maps.compute(tiny_session.source, "gptq:bits=3")
    with pytest.raises(WorkbenchError, match="group_size=256 does not divide"):
        maps.compute(tiny_session.source, "rtn:bits=3:group_size=256")
    with pytest.raises(WorkbenchError, match=r"block\(s\) \[5\] do not exist"):
        maps.compute(tiny_session.source, "rtn:bits=3", tokens=64, blocks=[5])
    with pytest.raises(WorkbenchError, match="unit 'row'"):
        maps.compute(tiny_session.source, "rtn:bits=3", tokens=64, unit="row")


def test_spearman_ranks():
    assert sensitivity.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert sensitivity.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert sensitivity.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9487, abs=1e-4)  # ties averaged


def test_heatmap_shows_cells_and_both_sums():
    cells = tuple(
        sensitivity.Cell(b, k, (f"model.layers.{b}.{k}",), 10, kl=(b + 1) * (i + 1) * 1e-3, proxy=0.1)
        for b in range(3)
        for i, k in enumerate(("q_proj", "down_proj"))
    )
    smap = sensitivity.SensitivityMap("smollm2-135m", "fp", "rtn:bits=3", "calib", "sha", 512, "layer", cells, 1.0, 2.0)
    fig = heatmap(smap)
    grid, by_block, by_kind = fig.data
    assert grid.type == "heatmap" and list(grid.y) == [0, 1, 2] and list(grid.x) == ["q_proj", "down_proj"]
    assert grid.z[2][1] == pytest.approx(math.log10(6e-3))  # log colour scale, raw value in the hover
    assert list(by_block.x) == pytest.approx([3e-3, 6e-3, 9e-3]) and list(by_kind.y) == pytest.approx([6e-3, 12e-3])
    assert "nats/token" in fig.layout.title.text and "512 tokens" in fig.layout.title.text
    assert heatmap(smap, log_color=False).data[0].z[2][1] == pytest.approx(6e-3)
