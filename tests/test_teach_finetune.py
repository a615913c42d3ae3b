"""LoRA shapes and counts against PEFT, hand NF4 against bitsandbytes, and the adapter update
against the NF4 grid on a tiny model whose answer is known."""

from __future__ import annotations

import pytest
import torch

from workbench.finetune import FinetuneConfig, attach_lora
from workbench.teach import finetune as tf
from workbench.teach import nf4_update as nf4u


def tiny_llama(layers: int = 2, seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("targets", [None, ("q_proj", "down_proj")])
def test_lora_plan_counts_what_peft_reports(targets):
    config = FinetuneConfig(base="fp32", r=4, alpha=8, target_modules=targets)
    plan = tf.lora_plan_of(tiny_llama(), config)
    trainable, total = attach_lora(tiny_llama(), config).get_nb_trainable_parameters()
    assert plan.trainable == trainable and plan.frozen == total - trainable
    shapes = {f.module: (f.d, f.k, f.layers) for f in plan.layers}
    assert shapes["q_proj"] == (128, 128, 2) and shapes["down_proj"] == (128, 192, 2)
    if targets is None:
        assert shapes["k_proj"] == (64, 128, 2) and shapes["gate_proj"] == (192, 128, 2)  # 2 kv heads of 32
    assert tf.lora_table(plan)[-1]["LoRA weights r(d+k)"] == f"{trainable:,}"


def test_lora_plan_from_a_model_folder_reads_the_config_only(tmp_path):
    from workbench.core.config import ModelSpec

    tiny_llama(tied=True).save_pretrained(tmp_path)
    config = FinetuneConfig(base="fp32", r=8)
    from_config, loaded = (
        tf.lora_plan(ModelSpec(str(tmp_path), device="cpu"), config),
        tf.lora_plan_of(tiny_llama(tied=True), config),
    )
    assert (from_config.trainable, from_config.frozen) == (
        loaded.trainable,
        loaded.frozen,
    )  # the tied head counted once
    fig = tf.lora_figure(tf.lora_plan_of(tiny_llama(), config), "down_proj")
    texts = " ".join(a.text for a in fig.layout.annotations)
    assert "W  128 x 192" in texts and "B  128 x 8" in texts and "A  8 x 192" in texts


def test_hand_nf4_rounding_gives_bitsandbytes_codes():
    import bitsandbytes.functional as F

    weight = torch.randn(3, 100) * 0.05  # 300 weights: the last of 5 blocks is padded
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    bnb_codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], dim=1).flatten()[: weight.numel()].long()
    codes, absmax = nf4u.nf4_round(weight, nf4u.nf4_levels())
    assert torch.equal(codes, bnb_codes)
    assert torch.allclose(absmax[::64], state.absmax)
    dequantized = F.dequantize_4bit(packed, state)
    assert torch.allclose(nf4u.nf4_levels()[codes] * absmax, dequantized.flatten(), atol=1e-6)
    delta = torch.randn_like(weight) * absmax.reshape(weight.shape) * 0.02  # some cross a rounding edge, most do not
    again, _ = F.quantize_4bit(dequantized + delta, blocksize=64, quant_type="nf4", compress_statistics=False)
    bnb_kept = (
        torch.stack([again.flatten() >> 4, again.flatten() & 15], dim=1).flatten()[: weight.numel()].long() == bnb_codes
    )
    _, _, kept = nf4u._update_of(weight, delta, nf4u.NF4Grid.of(nf4u.nf4_levels()))
    assert 0 < (~bnb_kept).sum() < weight.numel() // 2 and torch.equal(kept, bnb_kept)


def saved_adapter(model, folder, targets: list[str], set_weights) -> str:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        set_weights(peft_model)
    peft_model.save_pretrained(folder)
    return peft_model


def test_adapter_deltas_are_what_peft_merges(tmp_path):
    base = tiny_llama()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}

    def random_b(peft_model):
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)

    merged = saved_adapter(base, tmp_path, ["q_proj", "up_proj"], random_b).merge_and_unload()
    deltas = nf4u.adapter_deltas(tmp_path)
    assert len(deltas) == 4  # 2 layers x 2 targets
    for name, delta in deltas.items():
        change = merged.get_submodule(name).weight - before[name + ".weight"]
        assert change.abs().max() > 0 and torch.allclose(delta, change, atol=1e-6)


def test_update_against_the_nf4_grid_on_a_known_update(tmp_path):
    """W = 1 at columns 0 and 64 of every row (each block's absmax), 0 elsewhere, so every other
    weight sits on NF4's zero level, whose step up is the gap to the next level (0.0796).
    dW = +0.03 (0.38 of a step: kept) on 62 columns, +0.06 (0.75 of a step: moved up a code)
    on 64 columns, 0 on the two absmax columns."""
    base = tiny_llama(layers=1)
    q = base.model.layers[0].self_attn.q_proj.weight  # 128 x 128: two blocks of 64 per row
    with torch.no_grad():
        q.zero_()
        q[:, [0, 64]] = 1.0
    column = torch.zeros(128)
    column[list(range(1, 32)) + list(range(65, 96))] = 0.03
    column[list(range(32, 64)) + list(range(96, 128))] = 0.06
    step = (nf4u.nf4_levels()[8] - nf4u.nf4_levels()[7]).item()

    def rank_one(peft_model):
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        layer.lora_A["default"].weight.zero_()[0] = column
        layer.lora_B["default"].weight.zero_()[:, 0] = 0.5  # x alpha / r = 2: dW = 1 x column in every row

    reference = tiny_llama(layers=1)
    reference.load_state_dict(base.state_dict())
    saved_adapter(base, tmp_path, ["q_proj"], rank_one)
    study = nf4u.update_vs_nf4_of(reference, tmp_path)
    (layer,) = study.layers
    assert layer.module == "q_proj" and layer.weights == study.weights == 128 * 128
    assert study.below_half_step == pytest.approx(64 / 128) and study.same_code == pytest.approx(64 / 128)
    assert layer.median_of_absmax == pytest.approx(0.03) and layer.median_of_step == pytest.approx(0.03 / step)
    assert study.zero == 2 * 128 and sum(study.counts) == 126 * 128
    assert study.step_range[0] == pytest.approx(step, abs=1e-3) and study.step_range[1] > 0.25
    assert study.moved == layer.moved == 64 * 128
    assert nf4u.update_table(study)[-1]["same 4-bit code after re-rounding"] == "50.000 %"
    assert "50.000 % of weights are below" in " ".join(a.text for a in nf4u.update_figure(study).layout.annotations)
