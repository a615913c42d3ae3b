"""The overview's claims: verdicts on hand-built results, what a missing row asks for, and the
ClaimsPanel redrawn after every Compare."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from workbench.report import claims
from workbench.run.results import MB, Result

PROTOCOL = {"text": "wiki", "eval_tokens": 256, "max_length": 512, "stride": 512}
DEFAULTS = {
    "gptq": {"bits": 4, "group_size": 64, "act_order": False},
    "bnb-nf4": {"double_quant": True},
    "bnb-int8": {"threshold": 6.0},
    "fp32": {},
}


def result(
    method: str,
    ppl: float,
    tok_s: float = 10.0,
    load_s: float = 1.0,
    weight_mb: float = 100.0,
    bits: int = 4,
    params: dict | None = None,
    error: str | None = None,
    fingerprint: str = "m1",
    device: str = "cpu",
) -> Result:
    params = {**DEFAULTS.get(method, {}), **(params or {})}
    label = method + "".join(f"({k}={v})" for k, v in (params.items() - DEFAULTS.get(method, {}).items()))
    return Result(
        "tiny",
        method,
        method,
        bits,
        params,
        device,
        label=label,
        ppl=None if error else ppl,
        decode_tokens_per_s=tok_s,
        load_s=load_s,
        weight_bytes=int(weight_mb * MB),
        error=error,
        model_fingerprint=fingerprint,
        protocol=PROTOCOL,
    )


def row(rows: list[dict], checked_with: str, words: str = "") -> dict:
    return next(r for r in rows if r["checked with"] == checked_with and words in r["the overview says (section)"])


FP32 = result("fp32", 20.0, tok_s=40, load_s=0.2, weight_mb=500, bits=32)


def test_minimal_degradation_holds_and_fails_at_the_stated_bar():
    just_in = result("bnb-int8", 20.0 * (1 + claims.MINIMAL_DEGRADATION_PCT / 100) - 1e-9, bits=8)
    rows = claims.check([FP32, just_in, result("bnb-nf4", 25.0)])
    assert row(rows, "bnb-int8")["verdict"] == claims.HOLDS
    assert f"{claims.MINIMAL_DEGRADATION_PCT:g} %" in row(rows, "bnb-int8")["holds when"]
    assert row(rows, "bnb-nf4", "degradation is minimal")["verdict"] == claims.FAILS
    assert (
        row(rows, "bnb-nf4", "degradation is minimal")["measured here"] == "bnb-nf4 25 vs fp32 20 ppl (+25.0 %), on cpu"
    )
    over = claims.check([FP32, result("bnb-int8", 20.0 * (1 + claims.MINIMAL_DEGRADATION_PCT / 100) + 1e-6, bits=8)])
    assert row(over, "bnb-int8")["verdict"] == claims.FAILS


def with_tasks(r: Result, accuracy: float) -> Result:
    return replace(r, tasks={"wb_lastword": {"metric": "acc", "value": accuracy, "stderr": 0.02, "n": 500}})


def test_the_accuracy_claim_compares_task_scores_at_the_stated_bar():
    accuracy = "leaderboard's average task accuracy"
    baseline = with_tasks(FP32, 0.60)
    just_in = with_tasks(result("bnb-nf4", 21.0), 0.60 * (1 - claims.MINIMAL_DEGRADATION_PCT / 100) + 1e-9)
    gptq_low = with_tasks(result("gptq", 21.0), 0.50)
    rows = claims.check([baseline, just_in, gptq_low])
    assert row(rows, "bnb-nf4", accuracy)["verdict"] == claims.HOLDS
    assert row(rows, "gptq:bits=4", accuracy)["verdict"] == claims.FAILS
    assert row(rows, "gptq:bits=4", accuracy)["measured here"] == "gptq 50 vs fp32 60 % (-16.7 %), on cpu"
    untasked = claims.check([FP32, result("bnb-nf4", 21.0)])
    assert row(untasked, "bnb-nf4", accuracy)["verdict"] == claims.NOT_MEASURED
    assert "--tasks" in row(untasked, "bnb-nf4", accuracy)["holds when"]


def test_two_bit_gptq_claim_is_checked_with_two_bit_gptq_only():
    four_bit = result("gptq", 21.0, tok_s=30, load_s=50)
    rows = claims.check([FP32, four_bit, result("quanto-int2", 5000.0, bits=2)])
    two_bit = row(rows, "gptq:bits=2")
    assert two_bit["verdict"] == claims.NOT_MEASURED and "add gptq:bits=2 " in two_bit["measured here"]
    assert "quanto" not in two_bit["measured here"]
    rows = claims.check([FP32, four_bit, result("gptq", 45.0, params={"bits": 2}, bits=2)])
    assert row(rows, "gptq:bits=2")["verdict"] == claims.HOLDS  # 45 >= 2 x 20
    rows = claims.check([FP32, result("gptq", 30.0, params={"bits": 2}, bits=2)])
    assert row(rows, "gptq:bits=2")["verdict"] == claims.FAILS  # 1.5 x is not severe


def test_speed_and_preparation_compare_gptq_with_bitsandbytes_and_say_the_device():
    rows = claims.check(
        [
            FP32,
            result("gptq", 21.0, tok_s=30, load_s=50, device="cuda"),
            result("bnb-nf4", 22.0, tok_s=12, load_s=2, device="cuda"),
        ]
    )
    speed, prepare = (row(rows, "gptq:bits=4", "fast compared"), row(rows, "gptq:bits=4", "calibration dataset"))
    assert speed["verdict"] == prepare["verdict"] == claims.HOLDS
    assert (
        speed["measured here"] == "gptq 30 vs bnb-nf4 12 tok/s (2.5 x), on cuda"
        and "GPU" in speed["the blog measured on"]
    )
    slower = claims.check([result("gptq", 21.0, tok_s=5), result("bnb-nf4", 22.0, tok_s=12)])
    assert row(slower, "gptq:bits=4", "fast compared")["verdict"] == claims.FAILS


def test_not_measured_asks_only_for_what_is_missing():
    rows = claims.check([result("bnb-nf4", 22.0)])  # no baseline, no gptq
    asked = row(rows, "bnb-nf4", "degradation is minimal")["measured here"]
    assert "add fp32 " in asked and "bnb-nf4" not in asked
    speed = row(rows, "gptq:bits=4", "fast compared")["measured here"]
    assert "add gptq:bits=4 " in speed and "bnb-nf4" not in speed
    everything = [
        FP32,
        result("bnb-int8", 20.1, bits=8),
        result("bnb-nf4", 22.0),
        result("gptq", 21.0),
        result("gptq", 60.0, params={"bits": 2}, bits=2),
    ]
    rows = claims.check([with_tasks(r, 0.5) for r in everything])
    assert all(r["verdict"] != claims.NOT_MEASURED for r in rows)


def test_a_failed_method_is_reported_not_requested_again():
    rows = claims.check([FP32, result("gptq", 0, params={"bits": 2}, bits=2, error="RuntimeError: no kernel\nmore")])
    two_bit = row(rows, "gptq:bits=2")
    assert two_bit["verdict"] == claims.NOT_MEASURED
    assert "failed here: RuntimeError: no kernel" in two_bit["measured here"] and "add" not in two_bit["measured here"]
    retried = claims.check(
        [
            FP32,
            result("gptq", 0, params={"bits": 2}, bits=2, error="RuntimeError"),
            result("gptq", 50.0, params={"bits": 2}, bits=2),
        ]
    )
    assert row(retried, "gptq:bits=2")["verdict"] == claims.HOLDS  # a later success is used


def test_an_adapter_row_is_not_taken_for_its_base():
    with_adapter = Result(
        "tiny",
        "bnb-nf4",
        "bitsandbytes",
        4,
        DEFAULTS["bnb-nf4"],
        "cpu",
        label="bnb-nf4+lora",
        adapter="/a",
        ppl=20.0,
        weight_bytes=MB,
    )
    assert row(claims.check([FP32, with_adapter]), "bnb-nf4", "minimal")["verdict"] == claims.NOT_MEASURED


def test_notebook_prose_states_the_same_bar_as_the_table():
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "02_compare_methods.ipynb"
    prose = " ".join(
        "".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "markdown"
    )
    assert "nearly lossless" not in prose
    assert f"{claims.MINIMAL_DEGRADATION_PCT:g} %" in prose


@pytest.fixture
def compare(tmp_path):
    from workbench.panels import ComparePanel, MethodPicker, ModelPicker

    return ComparePanel(ModelPicker(), MethodPicker(), out_dir=str(tmp_path))


def test_claims_panel_redraws_after_every_compare_and_keeps_earlier_rows(compare):
    from workbench.panels import ClaimsPanel

    panel = ClaimsPanel(compare)
    assert "press Compare" in panel.widget.value
    compare._show([FP32, result("gptq", 21.0)])  # what ComparePanel does when a Compare finishes
    assert "add gptq:bits=2 " in panel.widget.value and row(panel.rows, "gptq:bits=2")["verdict"] == claims.NOT_MEASURED
    compare._show([result("gptq", 50.0, params={"bits": 2}, bits=2)])  # a second Compare, same model and protocol
    assert row(panel.rows, "gptq:bits=2")["verdict"] == claims.HOLDS  # fp32 from the first Compare is kept
    assert "add gptq:bits=2 " not in panel.widget.value
    compare._show([result("fp32", 10.0, bits=32, fingerprint="other model")])
    assert [r.model_fingerprint for r in panel.results] == ["other model"]


def test_claims_panel_shows_results_that_exist_when_it_is_made(compare):
    from workbench.panels import ClaimsPanel

    compare._show([FP32, result("bnb-int8", 20.2, bits=8)])
    assert row(ClaimsPanel(compare).rows, "bnb-int8")["verdict"] == claims.HOLDS
