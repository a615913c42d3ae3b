"""The effects a learner comes to see, measured on the real offline model (SmolLM2-135M).

All methods are run once on the same 2048 evaluation tokens (windows of 512, no overlap)
and the checks compare them. Takes about 4 minutes on 2 CPU cores, most of it GPTQ.
"""

from __future__ import annotations

import math

import pytest

from workbench import runner
from workbench.config import EvalConfig, ModelSpec

pytestmark = pytest.mark.slow

METHODS = ["fp32", "bnb-int8", "quanto-int8", "torchao-int8", "bnb-nf4", "bnb-fp4", "quanto-int2", "rtn", "gptq"]


@pytest.fixture(scope="module")
def ppl():
    session = runner.Session.open(ModelSpec("bundled", device="cpu"), EvalConfig(max_tokens=2048, decode_tokens=0))
    results = runner.compare(session, METHODS, log=lambda m: None)
    failed = {r.method: r.error for r in results if r.error}
    assert not failed, failed
    for r in results:
        print(f"{r.method:14} ppl {r.ppl:.2f}  {r.bits_per_weight:.2f} bits/weight")
    return {r.method: r.ppl for r in results}


def test_fp32_baseline_is_a_working_language_model(ppl):
    assert 8 < ppl["fp32"] < 30  # measured 15.2; a broken load gives thousands


@pytest.mark.parametrize("method", ["quanto-int8", "torchao-int8"])
def test_8bit_round_to_nearest_is_within_2_percent(ppl, method):
    assert ppl[method] <= ppl["fp32"] * 1.02


def test_llm_int8_is_close_to_fp32(ppl):
    # Measured +2.0% here (+2.4% on 4096 tokens): on CPU bitsandbytes casts activations to fp16
    # and the outlier threshold decides which features stay in 16-bit.
    assert ppl["bnb-int8"] <= ppl["fp32"] * 1.03


def test_nf4_beats_fp4(ppl):
    assert ppl["bnb-nf4"] < ppl["bnb-fp4"]


@pytest.mark.parametrize("four_bit", ["bnb-nf4", "bnb-fp4", "rtn", "gptq"])
def test_4bit_is_worse_than_8bit(ppl, four_bit):
    assert ppl[four_bit] > max(ppl["bnb-int8"], ppl["quanto-int8"])


def test_2bit_round_to_nearest_collapses(ppl):
    assert ppl["quanto-int2"] > 10 * ppl["fp32"] or not math.isfinite(ppl["quanto-int2"])


def test_gptq_beats_round_to_nearest_at_the_same_bits_and_group(ppl):
    # Both 4-bit, group 64, symmetric, same format and kernel: the difference is GPTQ's calibration.
    assert ppl["gptq"] < ppl["rtn"] * 0.95
