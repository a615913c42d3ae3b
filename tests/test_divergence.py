"""KL divergence and top-1 agreement against the full-precision reference: exact zero for the
reference itself, the compact reference against the exact KL on a real model, refusals of a
reference recorded on other tokens, and the reference run first by `compare`."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.core.config import EvalConfig, ModelSpec
from workbench.core.errors import WorkbenchError
from workbench.metrics import divergence, perplexity
from workbench.run import executors, results, runner, workers
from workbench.run.compare import History, compare
from workbench.sources import models


def _score(model, ids, kl, max_length=128, batch_size=4):
    with torch.no_grad():
        return perplexity.perplexity(model, ids, max_length, max_length, batch_size, divergence=kl)


@pytest.fixture(scope="module")
def recording(tiny_model, tiny_session):
    """The tiny model recorded as the reference on its first 300 evaluation tokens (299 scored)."""
    kl = divergence.Divergence.recording()
    _score(tiny_model, tiny_session.eval_ids[:300], kl)
    return kl


def test_the_reference_against_itself_has_exactly_zero_kl(recording, tiny_model, tiny_session, tmp_path):
    own = recording.stats()
    assert own.kl_mean == 0.0 and own.kl_p99 == 0.0 and own.top1_agreement == 1.0 and own.n_tokens == 299
    path, key = tmp_path / "reference.safetensors", {"test": 1}
    recording.recorded_reference().save(path, key)
    again = divergence.Divergence.against(divergence.Reference.load(path, key))
    _score(tiny_model, tiny_session.eval_ids[:300], again, batch_size=1)  # read back from disk, other batches
    assert again.stats().kl_mean == 0.0 and again.stats().top1_agreement == 1.0


def test_a_changed_model_has_positive_kl_whatever_the_chunking(recording, tiny_session, monkeypatch):
    ids = tiny_session.eval_ids[:300]
    reference = recording.recorded_reference()
    changed = models.load_model(tiny_session.source, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for _, linear in models.block_linears(changed):
            linear.weight.add_(torch.randn_like(linear.weight) * linear.weight.std())
    stats = []
    for chunk in (
        perplexity.LOGITS_CHUNK_ELEMENTS,
        len(tiny_session.tokenizer) * 7,
    ):  # one chunk per batch / many ragged chunks
        monkeypatch.setattr(perplexity, "LOGITS_CHUNK_ELEMENTS", chunk)
        kl = divergence.Divergence.against(reference)
        _score(changed, ids, kl)
        stats.append(kl.stats())
    assert stats[0].kl_mean > 1e-3 and stats[0].kl_p99 > stats[0].kl_mean and stats[0].top1_agreement < 1
    assert (
        stats[1].kl_mean == pytest.approx(stats[0].kl_mean, rel=1e-5)
        and stats[1].top1_agreement == stats[0].top1_agreement
    )


def test_a_model_scored_from_full_logits_gets_the_same_kl_path():
    """Granite scales its logits, so the kernel scores it from full logits: KL comes from there too."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    model = GraniteForCausalLM(
        GraniteConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            logits_scaling=8.0,
        )
    ).eval()
    ids = torch.randint(0, 300, (2, 24))
    kl = divergence.Divergence.recording()
    with torch.no_grad():
        nll, count = perplexity.model_nll_sum(model, ids, ids, divergence=kl)
        plain = perplexity.model_nll_sum(model, ids, ids)
    assert perplexity._HEAD_CHECKED[model] is None  # the full-logits path ran
    assert count == 46 and nll == pytest.approx(plain[0], rel=1e-5)
    assert kl.stats().kl_mean == 0.0 and kl.recorded_reference().top_ids.shape == (46, divergence.TOP_K)


def test_a_reference_recorded_on_other_tokens_is_refused(recording, tiny_model, tiny_session):
    ids, reference = tiny_session.eval_ids, recording.recorded_reference()
    with pytest.raises(WorkbenchError, match="not the tokens the reference distributions were recorded on"):
        _score(tiny_model, ids[100:400], divergence.Divergence.against(reference))
    with pytest.raises(WorkbenchError, match="more tokens than the reference distributions hold"):
        _score(tiny_model, ids[:400], divergence.Divergence.against(reference))
    shorter = divergence.Divergence.against(reference)
    _score(tiny_model, ids[:150], shorter)
    with pytest.raises(WorkbenchError, match="149 tokens were scored but the reference distributions hold 299"):
        shorter.stats()


def test_the_reference_file_is_compact_and_refused_when_damaged_or_for_another_key(recording, tmp_path):
    reference = recording.recorded_reference()
    path, key = tmp_path / "r.safetensors", {"model": "abc"}
    assert divergence.Reference.load(path, key) is None  # not recorded yet
    reference.save(path, key)
    per_token = 4 + 4 + 8 * (divergence.TOP_K + divergence.TAIL_SAMPLES)  # target, tail mass, (id, log-prob) pairs
    assert len(reference) * per_token <= path.stat().st_size < len(reference) * per_token + 4096
    back = divergence.Reference.load(path, key)
    assert all(torch.equal(getattr(back, name), getattr(reference, name)) for name in divergence.TENSORS)
    with pytest.raises(WorkbenchError, match="saved for another model, text or protocol; delete the file"):
        divergence.Reference.load(path, {"model": "other"})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WorkbenchError, match="cannot be read .*delete the file"):
        divergence.Reference.load(path, key)


@pytest.mark.slow
def test_the_kl_estimate_is_close_to_the_exact_kl_on_a_real_model(bundled_source):
    """SmolLM2-135M and a copy with noisy block weights, one window of 256 tokens: the exact KL
    from full distributions against the compact reference's estimate and lower bound."""
    model = models.load_model(bundled_source, "cpu")
    ids = models.load_tokenizer(bundled_source)(runner.data.builtin_eval_text().text[:4000])["input_ids"][:256]
    window = torch.tensor([ids])
    with torch.no_grad():
        exact_p = torch.log_softmax(model(input_ids=window).logits[0, :-1].float(), -1)
        recording = divergence.Divergence.recording()
        perplexity.perplexity(model, ids, 256, 256, divergence=recording)
        torch.manual_seed(0)
        for _, linear in models.block_linears(model):
            linear.weight.add_(torch.randn_like(linear.weight) * 0.08 * linear.weight.std())
        exact_q = torch.log_softmax(model(input_ids=window).logits[0, :-1].float(), -1)
    reference = recording.recorded_reference()
    exact = (exact_p.exp() * (exact_p - exact_q)).sum(-1)
    estimate, lower, _ = divergence.token_kl(exact_q, reference)
    assert bool((lower <= exact + 1e-5).all()) and bool((estimate >= lower).all())  # a bound, and never below it
    assert 0.005 < exact.mean() < 1  # a real difference, in the range of 8- to 4-bit quantization
    assert estimate.mean().item() == pytest.approx(exact.mean().item(), rel=0.05)
    assert torch.quantile(estimate.double(), 0.99).item() == pytest.approx(
        torch.quantile(exact.double(), 0.99).item(), rel=0.15
    )
    assert lower.mean() < 0.97 * exact.mean()  # the tail matters: the lumped bound alone would be well off


def test_compare_measures_the_reference_first_and_shows_kl_in_every_output(tiny_folder, tmp_path):
    session = runner.Session.open(
        ModelSpec(str(tiny_folder), device="cpu"),
        EvalConfig(max_length=128, stride=128, max_tokens=333, decode_tokens=0),
        log=lambda m: None,
    )
    session.reference_path().unlink(missing_ok=True)  # a protocol of this test's own: no other test shares the file
    logs = []
    fp32, nf4 = compare(session, ["bnb-nf4"], log=logs.append, executor=executors.InProcess())
    assert fp32.method == "fp32" and any("measuring the full-precision reference first" in line for line in logs)
    assert fp32.kl_mean == 0.0 and fp32.top1_agreement == 1.0 and fp32.protocol["kl_reference"] == "fp32"
    assert nf4.kl_mean > 0 and nf4.kl_p99 >= nf4.kl_mean and 0 < nf4.top1_agreement <= 1
    assert session.reference_path().is_file()

    (reused,) = compare(
        session, ["bnb-nf4"], history=History(kept=[fp32, nf4]), log=logs.append, executor=executors.InProcess()
    )
    assert reused.reused_from and reused.kl_mean == nf4.kl_mean  # recorded: nothing runs again

    session.reference_path().unlink()
    logs.clear()
    again = compare(
        session,
        ["fp32", "bnb-int8"],
        history=History(kept=[fp32, nf4]),
        log=logs.append,
        executor=executors.InProcess(),
    )
    assert [r.method for r in again] == ["fp32", "bnb-int8"] and again[0].reused_from is None
    assert any("measuring it again instead of reusing it" in line for line in logs) and again[1].kl_mean > 0

    table = results.format_table([fp32, nf4])
    assert "KL mean (nats)" in table and "top-1 same %" in table and "KL divergence (nats per token)" in table
    results.write_json([fp32, nf4], tmp_path / "r.json")
    results.write_csv([fp32, nf4], tmp_path / "r.csv")
    assert json.loads((tmp_path / "r.json").read_text())[1]["kl_p99"] == nf4.kl_p99
    assert "kl_mean,kl_p99,top1_agreement" in (tmp_path / "r.csv").read_text().splitlines()[0]
    assert results.Result.from_dict(nf4.to_dict()).top1_agreement == nf4.top1_agreement


@pytest.mark.slow
def test_a_worker_finds_the_reference_its_session_recorded(tiny_folder):
    session = runner.Session.open(
        ModelSpec(str(tiny_folder), device="cpu"),
        EvalConfig(max_length=128, stride=128, max_tokens=334, decode_tokens=0),
        log=lambda m: None,
    )
    session.reference_path().unlink(missing_ok=True)
    fp32, rtn = compare(session, ["fp32", "bnb-int8"], log=lambda m: None, executor=workers.WorkerProcesses())
    assert fp32.mode == rtn.mode == "worker" and fp32.kl_mean == 0.0
    assert rtn.kl_mean > 0 and rtn.protocol["kl_top_k"] == divergence.TOP_K
