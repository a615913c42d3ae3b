"""Notebook 01's by-hand formulas, each checked against an independent computation."""

from __future__ import annotations

import pytest
import torch

from workbench import teach
from workbench.teach import charts as teach_charts
from workbench.teach import gptq as teach_gptq
from workbench.teach.explorer import ErrorExplorer


def test_bit_fields_add_up_and_match_ieee():
    fields = teach.bit_fields()
    assert dict(fields["fp32"]) == {"sign": 1, "exponent": 8, "mantissa": 23}
    assert dict(fields["fp16"]) == {"sign": 1, "exponent": 5, "mantissa": 10}
    assert dict(fields["bf16"]) == {"sign": 1, "exponent": 8, "mantissa": 7}
    assert sum(bits for _, bits in fields["int8"]) == 8


def test_number_formats_columns_hold_one_meaning_each():
    rows = {row["format"]: row for row in teach.number_formats()}
    assert float(rows["fp16"]["largest"]) == 65504
    assert float(rows["fp16"]["step at the largest"]) == 32  # 65504 - 65472
    assert float(rows["bf16"]["step at 1.0"]) == 2**-7
    assert rows["int8"]["largest"] == "127" and rows["int8"]["smallest"] == "-128"
    assert len({tuple(row) for row in rows.values()}) == 1  # same columns in every row


def test_worked_example_codes_follow_the_formulas():
    weight = torch.tensor([[0.5, -1.0, 0.25, 0.0, 2.0, -0.35, 0.1, 0.7]])
    example = teach.worked_example(weight, count=8)
    assert example["absmax"].quantized.tolist() == [32, -64, 16, 0, 127, -22, 6, 44]  # round(127 / 2 * w)
    zeropoint = example["zeropoint"]
    scale = 255 / 3.0
    zero = round(scale * 1.0) - 128
    assert float(zeropoint.scale) == pytest.approx(scale) and int(zeropoint.zero_point) == zero
    assert zeropoint.quantized.tolist() == [max(-128, min(127, round(scale * w + zero))) for w in weight[0].tolist()]
    assert len(teach.worked_example_table(example)) == 8


def test_absmax_granularities():
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    weight[0, 0] = 20.0  # one outlier
    errors = {g: teach.absmax_quantize(weight, 4, g).mean_abs_error(weight) for g in ("tensor", "row", 8)}
    assert errors["tensor"] > errors["row"] > errors[8]
    grouped = teach.absmax_quantize(weight, 4, 8)
    block = weight[3, 8:16]
    expected = torch.round(block * 7 / block.abs().max()).clamp(-7, 7) * block.abs().max() / 7
    assert torch.allclose(grouped.restored[3, 8:16], expected)
    assert grouped.quantized.abs().max() <= 7
    with pytest.raises(ValueError):
        teach.absmax_quantize(weight, 4, 5)


def test_granularity_table_counts_scales():
    weight = torch.randn(32, 64)
    study = teach.granularity_study(weight, bits=4, group=16)
    rows = teach.granularity_table(weight, study)
    assert [row["scales in the whole matrix"] for row in rows] == [1, 32, 32 * 64 // 16]
    teach_charts.granularity_heatmaps(study)


def test_four_bit_round_trip_matches_bitsandbytes():
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    mine, original = teach.blockwise_round_trip(weight, teach.four_bit_levels()["nf4"], block=64)
    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
    theirs = dequantize_4bit(packed, state).flatten()
    assert torch.equal(original, weight.flatten())
    assert torch.allclose(mine, theirs, atol=1e-6)
    errors = {row["grid"]: row["mean |error|"] for row in teach.four_bit_errors(weight)}
    assert errors["nf4"] < errors["int4 (absmax)"]  # normal weights: NF4's grid fits best


def test_label_tiers_never_overlap():
    levels = [-1.0, -0.0052, 0.0, 0.0052, 0.1, 0.15, 0.9]
    tiers = teach_charts._label_tiers(levels, min_gap=0.11)
    for tier in set(tiers):
        xs = [x for x, t in zip(levels, tiers) if t == tier]
        assert all(b - a >= 0.11 for a, b in zip(xs, xs[1:]))


def _naive_obs(weight, hess, bits):
    """GPTQ's definition, one column at a time: round it, then apply the OBS correction
    -e / [H_F^-1]_qq * [H_F^-1]_q,: with the inverse of the REMAINING columns' Hessian."""
    w, top = weight.clone(), 2 ** (bits - 1) - 1
    scale = top / w.abs().amax(dim=1)
    restored = torch.zeros_like(w)
    for i in range(w.shape[1]):
        inverse = torch.linalg.inv(hess[i:, i:])
        restored[:, i] = torch.round(w[:, i] * scale).clamp(-top, top) / scale
        error = w[:, i] - restored[:, i]
        w[:, i:] -= torch.outer(error / inverse[0, 0], inverse[0])
    return restored


def test_gptq_is_the_exact_obs_update_on_a_tiny_case():
    torch.manual_seed(1)
    weight = torch.randn(4, 6, dtype=torch.float64)
    x = torch.randn(6, 20, dtype=torch.float64)
    hess = teach_gptq.hessian(x)
    damped = hess + 0.01 * torch.diag(hess).mean() * torch.eye(6, dtype=torch.float64)
    result = teach_gptq.gptq_quantize(weight, hess, bits=3, group=None, damp=0.01, record=2)
    assert torch.allclose(result.restored, _naive_obs(weight, damped, bits=3), atol=1e-9)
    assert result.step.column == 2 and result.step.update.shape == (4, 3)
    assert torch.allclose(result.step.error, result.step.before - result.step.quantized)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    features, tokens = 64, 512
    mixing = torch.randn(features, features) / features**0.5 + torch.eye(features)
    x = mixing @ torch.randn(features, tokens)  # correlated features
    weight = torch.randn(32, features)
    for group in (None, 16):
        rtn = teach.absmax_quantize(weight, 4, "row" if group is None else group).restored
        gptq = teach_gptq.gptq_quantize(weight, teach_gptq.hessian(x), bits=4, group=group).restored
        assert (
            teach_gptq.output_error(weight, gptq, x)["relative"]
            < 0.8 * teach_gptq.output_error(weight, rtn, x)["relative"]
        )


def test_output_error_per_feature():
    weight, restored = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    error = teach_gptq.output_error(weight, restored, x)
    assert error["per_feature"].tolist() == [0.0, 2.0]
    assert error["relative"] == pytest.approx(2.0 / 5.0)


def test_error_explorer_redraws_on_change():
    explorer = ErrorExplorer(torch.randn(8, 128))
    explorer.draw()
    first = explorer.figure.layout.title.text
    explorer.bits.value = 2
    explorer.group.value = "row"
    assert explorer.figure.layout.title.text != first and "2-bit absmax, per row" in explorer.figure.layout.title.text
    assert len(explorer.area.widget.outputs) == 1


def test_layer_inputs_and_gptq_study_on_a_tiny_model(tiny_folder):
    from workbench.sources import models

    source = models.resolve(str(tiny_folder))
    model, tokenizer = models.load_model(source, "cpu"), models.load_tokenizer(source)
    blocks = [list(range(10, 42)), list(range(50, 82))]
    mlp = model.model.layers[-1].mlp
    entering = []
    hook = mlp.register_forward_pre_hook(lambda module, args: entering.append(args[0]))
    try:
        inputs = teach.layer_inputs(model, -1, blocks)
    finally:
        hook.remove()
    with torch.no_grad():
        expected = (mlp.act_fn(mlp.gate_proj(entering[0])) * mlp.up_proj(entering[0])).reshape(-1, 256).T
    assert inputs.shape == (256, 64)  # (MLP width, tokens of both blocks)
    assert torch.allclose(inputs, expected, atol=1e-6)
    study = teach_gptq.gptq_vs_rtn(model, tokenizer, layer=-1, tokens=256, bits=4, group=64)
    assert study["tokens"] == 256 and study["layer"] == "model.layers[1].mlp.down_proj"
    assert study["gptq"]["calibration"]["relative"] < study["rtn"]["calibration"]["relative"]
    teach_gptq.gptq_error_figure(study)
    teach_gptq.gptq_step_figure(study)


def test_a_gguf_super_block_of_the_models_own_weights_in_llama_cpp_s_types(bundled_source):
    import numpy as np

    from workbench.teach import gguf_blocks

    view = gguf_blocks.super_block(bundled_source)
    assert view.layer == "model.layers.0.mlp.down_proj" and view.original.shape == (256,)
    assert view.bits == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_K": 4.5, "Q2_K": 2.625}  # scales included
    # Q8_0: each block of 32 rounds to a step of its largest weight / 127 (the fp16 scale adds a little).
    for block in range(8):
        part = slice(32 * block, 32 * block + 32)
        step = np.abs(view.original[part]).max() / 127
        assert np.abs(view.restored["Q8_0"][part] - view.original[part]).max() <= 0.51 * step
    rms = {row["type"]: row["RMS error, % of largest weight"] for row in gguf_blocks.block_table(view)}
    assert rms["Q8_0"] < rms["Q4_K"] < rms["Q4_0"] < rms["Q2_K"]  # Q4_K's sub-block minimums beat Q4_0 at equal bytes
    assert len(gguf_blocks.block_figure(view).data) == 5
    widths = {row["layer kind"]: row for row in gguf_blocks.row_widths(bundled_source)}
    assert widths["down_proj"]["row width"] == 1536 and widths["down_proj"]["multiple of 256"]
    assert widths["q_proj"]["row width"] == 576 and not widths["q_proj"]["multiple of 256"]
