"""The fit estimate: parameter counts from the config alone, and method sizes that order as expected."""

from __future__ import annotations

import json

import pytest

from workbench.core.errors import WorkbenchError
from workbench.methods import REGISTRY
from workbench.run.estimate import GPUS, estimate, format_estimate, to_dict
from workbench.sources.models import ModelSource

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=1000,
    tie_word_embeddings=True,
)
LLAMA_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


def config_source(tmp_path, label, **config):
    from transformers import LlamaConfig

    LlamaConfig(**config).save_pretrained(tmp_path)
    return ModelSource(label, str(tmp_path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    source = config_source(tmp_path_factory.mktemp("tiny"), "tiny", **TINY)
    return source, estimate(source)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return estimate(config_source(tmp_path_factory.mktemp("70b"), "llama-70b", **LLAMA_70B))


def rows(est):
    return {row.method: row for row in est.rows}


def test_counts_match_a_real_model(tiny):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    linear = sum(
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"
    )
    est = tiny[1]
    assert est.total_params == sum(unique.values())
    assert est.linear_params == linear
    assert est.other_params == est.total_params - linear == 1000 * 64 + (2 * 2 + 1) * 64  # embedding + norms


def test_every_method_has_a_row(tiny):
    assert [row.method for row in tiny[1].rows] == list(REGISTRY)


def test_baselines_and_ordering(tiny, big):
    for est in (tiny[1], big):
        by_name = rows(est)
        assert by_name["fp32"].weight_bytes == 4 * est.total_params
        assert by_name["fp16"].weight_bytes == by_name["bf16"].weight_bytes == 2 * est.total_params
        assert (
            by_name["bnb-nf4"].weight_bytes
            < by_name["bnb-int8"].weight_bytes
            < by_name["fp16"].weight_bytes
            < by_name["fp32"].weight_bytes
        )


def test_quantized_methods_count_scales(big):
    by_name = rows(big)
    assert by_name["bnb-nf4"].bits_per_weight == pytest.approx(4.127, abs=1e-3)
    assert by_name["gptq"].bits_per_weight == pytest.approx(4 + 20 / 64 + 0.05)  # + the int32 group index per column
    assert by_name["hqq"].bits_per_weight == pytest.approx(4.5)
    expected = big.linear_params * 4.5 / 8 + big.other_params * 2
    assert by_name["hqq"].weight_bytes == pytest.approx(expected, abs=1)


def test_70b_fits_only_where_it_should(big):
    assert big.total_params == pytest.approx(70.55e9, rel=1e-3)
    by_name = rows(big)
    assert not any(by_name["fp16"].fits.values())  # ~135 GB of weights
    assert by_name["bnb-nf4"].fits["A100 80GB"]  # ~38 GB of weights, ~45 GB with the rule of thumb
    assert not by_name["bnb-nf4"].fits["A100 40GB"]
    assert not by_name["bnb-nf4"].fits["T4 16GB"]


def test_tiny_fits_everywhere(tiny):
    for row in tiny[1].rows:
        assert all(row.fits.values()), row.method
        assert set(row.fits) >= set(GPUS)


def test_given_gpu_memory_is_a_column(tiny):
    est = estimate(tiny[0], gpu_memory_bytes=1000)
    assert est.gpus["your GPU"] == 1000
    assert not rows(est)["fp32"].fits["your GPU"]
    with pytest.raises(WorkbenchError, match="positive"):
        estimate(tiny[0], gpu_memory_bytes=0)


def test_format_and_json(tiny):
    est = tiny[1]
    text = format_estimate(est)
    for method in REGISTRY:
        assert method in text
    for gpu in est.gpus:
        assert gpu in text
    assert f"{est.total_params:,} parameters" in text
    assert "rule of thumb" in text
    data = json.loads(json.dumps(to_dict(est)))
    assert data["total_params"] == est.total_params
    assert data["rows"][0]["method"] == "fp32"
    assert data["runtime_factor"] == 1.2


def test_a_config_claiming_hundreds_of_billions_of_parameters_is_estimated_from_shapes(tmp_path):
    """Nothing is allocated: a 1M-token vocabulary of 65,536-wide embeddings (262 GB in fp32) is a shape."""
    huge = dict(
        vocab_size=1_000_000,
        hidden_size=65_536,
        intermediate_size=262_144,
        num_hidden_layers=2,
        num_attention_heads=512,
        num_key_value_heads=8,
        max_position_embeddings=1 << 24,
        tie_word_embeddings=False,
    )
    result = estimate(config_source(tmp_path, "huge", **huge))
    embeddings = 2 * 1_000_000 * 65_536
    block = 65_536 * (65_536 + 2 * 8 * 128 + 65_536) + 3 * 65_536 * 262_144
    assert result.total_params >= embeddings + 2 * block
