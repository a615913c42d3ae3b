"""QLoRA learns on every CPU: gradients pass the frozen 4-bit layers after an eval pass.

bitsandbytes 0.50.2 repacks a `Linear4bit` for CPU inference on its first eval-mode,
no-grad call on an AVX512-BF16 CPU, and no gradient flows through it afterwards (see
`workbench/methods/bnb_training.py`). The layer tests hold on any x86-64 CPU; the companion
test that shows the bug without the guard runs only where the repacking happens.

The real-model tests (QLoRA vs plain LoRA, reload, merge) share one run per base (8 steps,
batch 4, 96 tokens, 16 held-out examples), so the file stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench import finetune as ft
from workbench.methods.bnb_training import cpu_repacking_guarded, prepare_for_training
from workbench.sources import models


def _layer():
    """A 128x128 nf4 layer quantized as bitsandbytes does on CPU (moving it quantizes it), and its input."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    return torch.nn.Sequential(layer), torch.randn(4, 128)


def _dequantized(model):
    from bitsandbytes.functional import dequantize_4bit

    weight = model[0].weight
    return dequantize_4bit(weight.data, weight.quant_state)


def _input_grad_after_an_eval_pass(model, x):
    """Eval forward under no_grad (what evaluating before training does), then train, forward, backward."""
    import torch

    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    x = x.clone().requires_grad_()
    model(x).sum().backward()
    return x.grad


def _reference_grad(weight, x):
    x = x.clone().requires_grad_()
    (x @ weight.T).sum().backward()
    return x.grad


@pytest.mark.parametrize("packed_before_preparing", [False, True])
def test_prepared_4bit_layer_passes_the_right_input_gradient_after_eval(packed_before_preparing):
    import torch

    model, x = _layer()
    weight = _dequantized(model)
    if packed_before_preparing:  # an eval pass before preparing: packed where the CPU repacks, unchanged elsewhere
        model.eval()
        with torch.no_grad():
            model(x)
    model = prepare_for_training(model, gradient_checkpointing=False)
    assert cpu_repacking_guarded(model)
    unpacked = _dequantized(model)
    # Packing stores the block scales in bf16, so unpacking restores them only to bf16 precision.
    assert (
        torch.equal(unpacked, weight)
        if not packed_before_preparing
        else torch.allclose(unpacked, weight, rtol=1e-2, atol=1e-3)
    )
    grad = _input_grad_after_an_eval_pass(model, x)
    assert cpu_repacking_guarded(model)
    assert grad is not None and torch.allclose(grad, _reference_grad(unpacked, x), rtol=1e-4, atol=1e-4)


def test_without_the_guard_an_eval_pass_breaks_the_gradient():
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks and the bug cannot show")
    import torch

    model, x = _layer()
    weight = _dequantized(model)
    assert not cpu_repacking_guarded(model)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        grad = _input_grad_after_an_eval_pass(model, x)
    assert model[0].weight.quant_state.packing_format_for_cpu and not cpu_repacking_guarded(model)
    assert grad is None or not torch.allclose(grad, _reference_grad(weight, x), rtol=1e-4, atol=1e-4)


def test_prepared_nf4_base_of_the_tiny_model_stays_guarded_through_eval(tiny_folder):
    import bitsandbytes as bnb
    import torch

    model = ft.prepare_base(models.resolve(str(tiny_folder)), "bnb-nf4", "cpu")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14  # 7 per block, 2 blocks
    assert cpu_repacking_guarded(model)
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert cpu_repacking_guarded(model)


# ---------------------------------------------------------------------------- effects (real model)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """The bundled training set with 16 held-out examples and 2 fixed prompts (test speed)."""
    folder = tmp_path_factory.mktemp("finetune-data")
    _, heldout, prompts = ft.load_rows(None)
    (folder / "train.jsonl").write_bytes((ft.DATA_DIR / "train.jsonl").read_bytes())
    (folder / "heldout.jsonl").write_text("".join(json.dumps(row) + "\n" for row in heldout[:16]), encoding="utf-8")
    (folder / "prompts.json").write_text(json.dumps(prompts[:2]), encoding="utf-8")
    return str(folder)


def _run(source, folder: Path, base: str, data_path: str, max_new_tokens: int):
    config = ft.FinetuneConfig(
        base=base,
        max_steps=8,
        batch_size=4,
        max_seq_len=96,
        max_new_tokens=max_new_tokens,
        output_dir=str(folder),
        data_path=data_path,
    )
    return ft.finetune(source, config, log=print)


@pytest.fixture(scope="module")
def real_run(bundled_source, small_data, tmp_path_factory):
    """QLoRA: LoRA on the bnb-nf4 base, evaluated before training as usual (the eval pass that used to break it)."""
    return _run(bundled_source, tmp_path_factory.mktemp("qlora"), "bnb-nf4", small_data, max_new_tokens=8)


@pytest.fixture(scope="module")
def reloaded(bundled_source, real_run):
    return ft.reload_adapter(bundled_source, real_run.report.adapter_dir, log=print)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two fine-tunes (its fixture's and its own): 3 minutes on 2 idle cores
def test_qlora_learns_at_least_half_as_much_as_lora_on_fp32(bundled_source, small_data, real_run, tmp_path):
    lora = _run(bundled_source, tmp_path / "lora", "fp32", small_data, max_new_tokens=0).report
    qlora = real_run.report
    lora_drop, qlora_drop = (
        lora.heldout_loss_before - lora.heldout_loss_after,
        qlora.heldout_loss_before - qlora.heldout_loss_after,
    )
    print(
        f"held-out loss: LoRA on fp32 {lora.heldout_loss_before:.4f} -> {lora.heldout_loss_after:.4f} (drop {lora_drop:.4f}); "
        f"QLoRA on nf4 {qlora.heldout_loss_before:.4f} -> {qlora.heldout_loss_after:.4f} (drop {qlora_drop:.4f}); "
        f"{qlora.s_per_step:.1f} vs {lora.s_per_step:.1f} s/step"
    )
    assert lora_drop > 0.1  # plain LoRA learns in these 8 steps, so the comparison means something
    assert qlora_drop >= 0.5 * lora_drop
    assert qlora.trainable_params == lora.trainable_params == 2_442_240  # r=8 on q/k/v/o/gate/up/down of 30 blocks
    assert len(qlora.losses) == 8 and qlora.peak_bytes > 0


@pytest.mark.slow
def test_adapter_reloads_to_the_same_heldout_loss(real_run, reloaded):
    _, loss = reloaded
    assert loss == pytest.approx(real_run.report.heldout_loss_after, rel=ft.RELOAD_RTOL)


@pytest.mark.slow
def test_exact_merge_matches_within_the_quantization_gap(bundled_source, real_run, reloaded, tmp_path):
    model, _ = reloaded
    merge = ft.merge_to_dequantized(
        bundled_source, real_run.report.adapter_dir, tmp_path / "merged", trained=model, log=print
    )
    print(
        f"trained (nf4 + adapter) {merge.adapter_loss:.4f}, merged fp {merge.merged_loss:.4f}, difference "
        f"{merge.difference:.4f}, nf4 vs fp base gap {merge.base_gap:.4f}, tolerance {merge.tolerance:.4f}"
    )
    assert merge.merged_loss == pytest.approx(merge.unmerged_loss, rel=ft.MERGE_RTOL)  # the merge itself is exact
    assert merge.within_tolerance and merge.difference <= ft.merge_tolerance(merge.base_gap)
    assert merge.base_gap > 0.01  # nf4 really differs from fp32 here, so the tolerance is not vacuous
    # The path users ship: the fp16 files, loaded again (fp32 compute on CPU).
    saved = models.load_model(models.ModelSource("merged", merge.merged_dir), "cpu")
    config = ft.saved_config(real_run.report.adapter_dir)
    heldout = ft.encode(real_run.tokenizer, None, ft.load_rows(config.data_path)[1], config.max_seq_len)
    assert ft.heldout_loss(saved, heldout, real_run.tokenizer.pad_token_id) == pytest.approx(
        merge.merged_loss, rel=1e-2
    )
