"""Perplexity against independent direct computations; storage counting against known sizes."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from workbench import measure, models
from workbench.measure import PeakMemory


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("n,max_length,stride", [(10, 4, 4), (10, 4, 1), (100, 16, 7), (5, 8, 8), (513, 512, 512), (64, 16, 16)])
def test_windows_score_every_token_exactly_once(n, max_length, stride, bos):
    spans, step = measure.windows(n, max_length, stride, bos)
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
    result = measure.perplexity(model, ids, max_length=128, stride=128)
    assert result.n_tokens == 99 and result.n_windows == 1
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_bos_window_matches_direct_computation(tiny):
    model, ids = tiny
    ids = ids[:60]
    bos = 1
    nlls = _token_nlls(model, [bos] + ids)  # every text token scored, the first given BOS as context
    result = measure.perplexity(model, ids, max_length=128, stride=128, bos_token_id=bos)
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
    result = measure.perplexity(model, ids, max_length=64, stride=64, batch_size=3)
    assert result.n_tokens == count == len(ids) - 1
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-4)


def test_overlapping_stride_gives_lower_or_equal_perplexity_with_more_context(tiny):
    model, ids = tiny
    wide = measure.perplexity(model, ids, max_length=64, stride=16)
    assert wide.n_tokens == len(ids) - 1
    assert wide.n_windows > measure.perplexity(model, ids, max_length=64, stride=64).n_windows


def test_fp32_weight_bytes_are_four_per_parameter(tiny):
    model, _ = tiny
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied embeddings once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    stored = measure.storage(model)
    assert stored.weight_bytes == 4 * sum(unique.values()) + buffers
    assert stored.bits_per_weight == 32 and stored.kernel == "Linear"


def test_quanto_storage_is_counted_from_real_tensors_not_the_footprint(tiny_session):
    from optimum import quanto

    model = models.load_model(tiny_session.source, "cpu")
    fp32_bytes = measure.storage(model).weight_bytes
    quanto.quantize(model, weights=quanto.qint8, exclude="lm_head")
    quanto.freeze(model)
    assert model.get_memory_footprint() >= fp32_bytes * 0.99  # transformers' number stays at the fp32 size
    stored = measure.storage(model)
    assert 8 <= stored.bits_per_weight < 8.6
    assert stored.weight_bytes < fp32_bytes


def test_decode_speed_is_the_median_of_repetitions_with_its_spread(tiny):
    model, ids = tiny
    speed = measure.decode_speed(model, ids[:8], new_tokens=8, pad_token_id=0)
    assert speed.decode_tokens_per_s > 0 and speed.prefill_ms > 0 and speed.new_tokens == 8
    assert speed.repeats >= measure.MIN_DECODE_REPEATS and speed.decode_spread >= 1.0


def test_too_few_decode_tokens_are_refused(tiny):
    from workbench.config import EvalConfig
    from workbench.errors import WorkbenchError

    model, ids = tiny
    with pytest.raises(WorkbenchError, match="at least 8"):
        measure.decode_speed(model, ids[:8], new_tokens=1, pad_token_id=0)
    with pytest.raises(WorkbenchError, match="decode_tokens: 4 new tokens are too few"):
        EvalConfig(decode_tokens=4)


def test_nll_sum_is_the_shifted_cross_entropy_over_labelled_tokens():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, 4, -100, 1, 2], [-100, -100, 5, 6, 7]])
    total, count = measure.nll_sum(logits, labels)
    logp = torch.log_softmax(logits, dim=-1)
    expected = [-logp[b, t - 1, labels[b, t]].item() for b in range(2) for t in range(1, 5) if labels[b, t] != -100]
    assert count == len(expected) == 6 and total == pytest.approx(sum(expected), rel=1e-5)


def test_a_non_finite_perplexity_is_an_error_not_a_number(tiny_session):
    from workbench.errors import WorkbenchError

    model = models.load_model(tiny_session.source, "cpu")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(WorkbenchError, match="not finite"):
        measure.perplexity(model, tiny_session.eval_ids, 128, 128)


MB = 2**20


def _touched(megabytes: int) -> bytearray:
    return bytearray(b"\x01") * (megabytes * MB)  # written, so resident


def test_a_process_started_by_a_big_parent_does_not_report_the_parents_peak():
    """getrusage's ru_maxrss of a spawned worker starts at the parent's size on Linux; the
    workbench reads the worker's own high-water mark instead."""
    held = _touched(600)
    child = subprocess.run([sys.executable, "-c", "from workbench.measure import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    assert len(held) == 600 * MB
    assert int(child.stdout) < 300 * MB


def test_peak_memory_counts_the_block_not_what_came_before():
    if not measure.reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs): the peak is sampled")
    earlier = _touched(400)
    del earlier  # the process's peak is now 400 MB higher than what it holds
    with PeakMemory("cpu") as peak:
        inside = _touched(100)
        del inside  # freed at once: a 10 ms sampler may miss it, the kernel's high-water mark does not
    assert 90 * MB <= peak.above_baseline_bytes < 250 * MB
