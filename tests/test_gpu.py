"""GPU-only paths (skipped without CUDA): the methods that need it, and CUDA memory counters."""

from __future__ import annotations

import math

import pytest

from workbench.core.config import EvalConfig, ModelSpec
from workbench.run import runner

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_session(tiny_folder):
    return runner.Session.open(
        ModelSpec(str(tiny_folder), device="cuda"),
        EvalConfig(max_length=128, stride=128, max_tokens=512, decode_tokens=8),
    )


@pytest.mark.parametrize("name", ["fp16", "bf16", "bnb-nf4", "bnb-int8", "torchao-int4", "gptq"])
def test_gpu_method_runs_and_reports_cuda_memory(gpu_session, name):
    result = runner.run_method(gpu_session, name, log=lambda m: None)
    assert result.error is None, result.error
    assert math.isfinite(result.ppl) and result.peak_kind == "cuda max allocated" and result.peak_bytes > 0
    assert result.environment["device_name"] and not result.environment["device_name"].startswith("CPU")
