"""Perplexity against independent direct computations; storage counting against known sizes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.metrics import memory, perplexity, speed
from workbench.metrics.memory import PeakMemory
from workbench.sources import models


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize(
    "n,max_length,stride", [(10, 4, 4), (10, 4, 1), (100, 16, 7), (5, 8, 8), (513, 512, 512), (64, 16, 16)]
)
def test_windows_score_every_token_exactly_once(n, max_length, stride, bos):
    spans, step = perplexity.windows(n, max_length, stride, bos)
    scored = [t for begin, end, first in spans for t in range(first, end)]
    expected = list(range(0 if bos else 1, n))
    assert scored == expected  # each token once, in order
    for begin, end, first in spans:
        assert end - begin + (1 if bos else 0) <= max_length  # BOS fits inside the window
        assert first > begin or bos  # without BOS, a scored token always has context
    assert step <= stride


@pytest.fixture(scope="module")
def tiny(tiny_session):
    return models.load_model(tiny_session.source, "cpu"), tiny_session.eval_ids


def _token_nlls(model, ids):
    """Direct: one forward over the whole sequence, log-softmax, pick each next token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_single_window_matches_direct_computation(tiny):
    model, ids = tiny
    ids = ids[:100]
    nlls = _token_nlls(model, ids)
    result = perplexity.perplexity(model, ids, max_length=128, stride=128)
    assert result.n_tokens == 99 and result.n_windows == 1
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_bos_window_matches_direct_computation(tiny):
    model, ids = tiny
    ids = ids[:60]
    bos = 1
    nlls = _token_nlls(model, [bos] + ids)  # every text token scored, the first given BOS as context
    result = perplexity.perplexity(model, ids, max_length=128, stride=128, bos_token_id=bos)
    assert result.n_tokens == 60 and result.bos
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_disjoint_windows_match_a_plain_loop(tiny):
    """Independent reference: a loop of model(labels=...) calls, the way most notebooks do it."""
    model, ids = tiny
    total, count, begin = 0.0, 0, 0
    while begin < len(ids) - 1:
        window = torch.tensor([ids[begin : begin + 64]])
        labels = window.clone()
        if begin:
            labels[0, 0] = -100  # the overlap token was scored by the previous window
        with torch.no_grad():
            loss = model(input_ids=window, labels=labels).loss.item()
        n = int((labels[0, 1:] != -100).sum())
        total, count = total + loss * n, count + n
        begin += 63
    result = perplexity.perplexity(model, ids, max_length=64, stride=64, batch_size=3)
    assert result.n_tokens == count == len(ids) - 1
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-4)


def test_overlapping_stride_gives_lower_or_equal_perplexity_with_more_context(tiny):
    model, ids = tiny
    wide = perplexity.perplexity(model, ids, max_length=64, stride=16)
    assert wide.n_tokens == len(ids) - 1
    assert wide.n_windows > perplexity.perplexity(model, ids, max_length=64, stride=64).n_windows


def test_fp32_weight_bytes_are_four_per_parameter(tiny):
    model, _ = tiny
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied embeddings once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    stored = memory.storage(model)
    assert stored.weight_bytes == 4 * sum(unique.values()) + buffers
    assert stored.bits_per_weight == 32 and stored.kernel == "Linear"


def test_quanto_storage_is_counted_from_real_tensors_not_the_footprint(tiny_session):
    from optimum import quanto

    model = models.load_model(tiny_session.source, "cpu")
    fp32_bytes = memory.storage(model).weight_bytes
    quanto.quantize(model, weights=quanto.qint8, exclude="lm_head")
    quanto.freeze(model)
    assert model.get_memory_footprint() >= fp32_bytes * 0.99  # transformers' number stays at the fp32 size
    stored = memory.storage(model)
    assert 8 <= stored.bits_per_weight < 8.6
    assert stored.weight_bytes < fp32_bytes


def test_decode_speed_is_the_median_of_repetitions_with_its_spread(tiny):
    model, ids = tiny
    decode = speed.decode_speed(model, ids[:8], new_tokens=8, pad_token_id=0)
    assert decode.decode_tokens_per_s > 0 and decode.prefill_ms > 0 and decode.new_tokens == 8
    assert decode.repeats >= speed.MIN_DECODE_REPEATS and decode.decode_spread >= 1.0


def test_too_few_decode_tokens_are_refused(tiny):
    from workbench.core.config import EvalConfig
    from workbench.core.errors import WorkbenchError

    model, ids = tiny
    with pytest.raises(WorkbenchError, match="at least 8"):
        speed.decode_speed(model, ids[:8], new_tokens=1, pad_token_id=0)
    with pytest.raises(WorkbenchError, match="decode_tokens: 4 new tokens are too few"):
        EvalConfig(decode_tokens=4)


def test_nll_sum_is_the_shifted_cross_entropy_over_labelled_tokens():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, 4, -100, 1, 2], [-100, -100, 5, 6, 7]])
    total, count = perplexity.nll_sum(logits, labels)
    logp = torch.log_softmax(logits, dim=-1)
    expected = [-logp[b, t - 1, labels[b, t]].item() for b in range(2) for t in range(1, 5) if labels[b, t] != -100]
    assert count == len(expected) == 6 and total == pytest.approx(sum(expected), rel=1e-5)


def _small(cls, config_cls, vocab=300, **extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    return cls(config).eval()


def _full_logits_nll(model, ids, labels):
    with torch.no_grad():
        return perplexity.nll_sum(model(input_ids=ids).logits, labels)


def test_chunked_scoring_equals_scoring_the_full_logits(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _small(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(0, 300, (3, 40))
    labels = ids.clone()
    labels[0, :5] = labels[2, 30:] = -100
    monkeypatch.setattr(
        perplexity, "LOGITS_CHUNK_ELEMENTS", 300 * 7
    )  # 7 positions a chunk: many chunks, a ragged last one
    with torch.no_grad():
        chunked = perplexity.model_nll_sum(model, ids, labels)
    full = _full_logits_nll(model, ids, labels)
    assert perplexity._HEAD_CHECKED[model] is not None  # the chunked path ran
    assert chunked[1] == full[1] == 3 * 39 - 4 - 10 and chunked[0] == pytest.approx(full[0], rel=1e-5)


def test_a_model_that_scales_its_logits_is_scored_from_its_full_logits():
    """Granite divides its logits by `logits_scaling`: the head alone would give other numbers."""
    from transformers import GraniteConfig, GraniteForCausalLM

    model = _small(GraniteForCausalLM, GraniteConfig, logits_scaling=8.0)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        scored = perplexity.model_nll_sum(model, ids, ids)
    assert perplexity._HEAD_CHECKED[model] is None
    assert scored[0] == pytest.approx(_full_logits_nll(model, ids, ids)[0], rel=1e-6)


LOGITS_PEAKS = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_measure import _full_logits_nll, _small
from transformers import LlamaConfig, LlamaForCausalLM
from workbench.metrics import perplexity
from workbench.metrics.memory import PeakMemory

perplexity.LOGITS_CHUNK_ELEMENTS = 2**22
model = _small(LlamaForCausalLM, LlamaConfig, vocab=50_000)
ids = torch.randint(0, 50_000, (4, 256))
peaks = {}
for name, score in (("full", _full_logits_nll), ("chunked", perplexity.model_nll_sum)):
    score(model, ids[:, :16], ids[:, :16])  # warm-up (and the head check) outside the measured block
    with torch.no_grad(), PeakMemory("cpu") as peak:
        score(model, ids, ids)
    peaks[name] = peak.above_baseline_bytes if peak._exact else None
print(json.dumps(peaks))
"""


def test_scoring_does_not_hold_the_whole_batch_of_logits():
    """A 50,000-token vocabulary over 4 x 256 positions: 200 MB of fp32 logits (and as much for
    their log-softmax) when scored at once; in chunks of 16 MB, a small part of that. In a fresh
    process, as the workbench measures: in a pytest worker that had run other tests, memory freed
    earlier served the whole block once (a 16 MB peak for the full logits)."""
    tests = str(Path(__file__).resolve().parent)
    child = subprocess.run([sys.executable, "-c", LOGITS_PEAKS, tests], capture_output=True, text=True, check=True)
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    if peaks["full"] is None:
        pytest.skip("this kernel does not let a process reset its peak memory")
    assert peaks["full"] > 200 * 2**20 and peaks["chunked"] < peaks["full"] / 4, peaks


def test_a_non_finite_perplexity_is_an_error_not_a_number(tiny_session):
    from workbench.core.errors import WorkbenchError

    model = models.load_model(tiny_session.source, "cpu")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(WorkbenchError, match="not finite"):
        perplexity.perplexity(model, tiny_session.eval_ids, 128, 128)


MB = 2**20


def _touched(megabytes: int) -> bytearray:
    return bytearray(b"\x01") * (megabytes * MB)  # written, so resident


def test_a_process_started_by_a_big_parent_does_not_report_the_parents_peak():
    """getrusage's ru_maxrss of a spawned worker starts at the parent's size on Linux; the
    workbench reads the worker's own high-water mark instead."""
    held = _touched(600)
    child = subprocess.run(
        [sys.executable, "-c", "from workbench.metrics.memory import peak_rss_bytes; print(peak_rss_bytes())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(held) == 600 * MB
    assert int(child.stdout) < 300 * MB


PEAK_OF_A_BLOCK = """
from workbench.metrics.memory import PeakMemory, reset_peak_rss
MB = 2**20
if not reset_peak_rss():
    print("no reset")
    raise SystemExit
earlier = bytearray(b"\\x01") * (400 * MB)
del earlier  # the process's peak is now 400 MB higher than what it holds
with PeakMemory("cpu") as peak:
    inside = bytearray(b"\\x01") * (100 * MB)
    del inside  # freed at once: a 10 ms sampler may miss it, the kernel's high-water mark does not
print(peak.above_baseline_bytes)
"""


def test_peak_memory_counts_the_block_not_what_came_before():
    """In a fresh process, as the workbench measures: in a pytest worker, an earlier test's garbage
    collected during the block (a model freed) once took more than the block added."""
    child = subprocess.run([sys.executable, "-c", PEAK_OF_A_BLOCK], capture_output=True, text=True, check=True)
    if child.stdout.strip() == "no reset":
        pytest.skip(
            "this kernel does not let a process reset its peak RSS (/proc/self/clear_refs): the peak is sampled"
        )
    assert 90 * MB <= int(child.stdout) < 250 * MB


def test_the_run_peak_counts_what_using_the_model_takes_from_the_builds_baseline():
    """A build that holds 64 MB and frees 256 MB of scratch, then a run that needs 32 MB more:
    the build peak is about 320 MB, the run peak about 96 MB (what is kept plus what running adds)."""
    from workbench.core import allocator

    if not memory.reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    allocator.release_freed()  # as `runner.evaluate` does: earlier tests' garbage is not the baseline's
    with allocator.large_blocks_apart("cpu") as apart:
        with PeakMemory("cpu", large_blocks_apart=apart) as build:
            kept, scratch = _touched(64), _touched(256)
            del scratch
        allocator.release_freed()
        with PeakMemory("cpu", False, apart, build.baseline_bytes) as run:
            working = _touched(32)
            del working
    fields = memory.phase_fields(build, run)
    assert fields["build_peak_bytes"] >= 300 * MB
    assert 90 * MB <= fields["run_peak_bytes"] < 200 * MB
    assert fields["peak_above_baseline_bytes"] == fields["build_peak_bytes"]
    assert fields["peak_bytes"] == build.peak_bytes and fields["peak_kind"] == build.kind
    del kept
