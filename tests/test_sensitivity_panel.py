"""SensitivityPanel driven as a person would, on the tiny 2-block Llama: compute the map, move the
budget slider, build and measure; bad inputs end in an error a person can act on.

Runs under ipywidgets 8 (the venv) and 7.7.1 (`WORKBENCH_EXPECT_IPYWIDGETS=7.7.1 PYTHONPATH=.widgets7`)."""

from __future__ import annotations

import os

import ipywidgets
import pytest

from workbench.core.config import EvalConfig
from workbench.methods.mixed import stored_bits
from workbench.panels import ModelPicker, SensitivityPanel

FAST = EvalConfig(max_length=128, stride=128, max_tokens=256, decode_tokens=8)
TOKENS = 64


def test_runs_on_the_expected_ipywidgets_version():
    expected = os.environ.get("WORKBENCH_EXPECT_IPYWIDGETS")
    if expected:
        assert ipywidgets.__version__ == expected


@pytest.fixture
def panel(tiny_folder, tmp_path):
    return SensitivityPanel(
        ModelPicker(default=str(tiny_folder), device="cpu"), out_dir=str(tmp_path), tokens=TOKENS, eval_cfg=FAST
    )


def test_compute_draws_the_heatmap_and_the_slider_replans_at_once(panel, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))  # a fresh map, computed here (no worker involved)
    assert panel.plan is None and "Compute the map first" in panel.plan_view.value
    panel.map_button.click()
    assert panel.map_job.wait(900) == "done", panel.map_job.error
    assert panel.map_job.states == ["idle", "running", "done"]
    assert len(panel.map.cells) == 14 and all(c.kl > 0 for c in panel.map.cells)  # 2 blocks x 7 linear kinds
    z = panel.figure.data[0].z
    assert len(z) == 2 and len(z[0]) == 7 and panel.map_figure.widget.outputs  # drawn into the panel
    assert "most sensitive layer: block" in panel.map_job.log.text
    assert (
        stored_bits(3, 64) <= panel.budget.min < stored_bits(3, 64) + 0.01
    )  # two-decimal ends inside the widths' costs
    assert stored_bits(8, 64) - 0.01 < panel.budget.max <= stored_bits(8, 64)

    panel.budget.value = panel.budget.min
    assert panel.plan.bits == (3, 3)
    panel.budget.value = 3.9  # one of the two equal blocks can go to 4 bits: the more sensitive one
    sensitive = max(range(2), key=lambda b: panel.mixing_map.sums("kl")[b])
    assert panel.plan.bits[sensitive] == 4 and panel.plan.bits[1 - sensitive] == 3
    assert "<b>4</b>" in panel.plan_view.value and "1 block(s) at 4-bit" in panel.plan_view.value
    panel.budget.value = panel.budget.max  # just under two 8-bit blocks: the sensitive one gets 8
    assert panel.plan.bits[sensitive] == 8 and panel.plan.bits[1 - sensitive] == 4


def test_build_and_measure_shows_uniform_and_mixed_rows_with_kl_and_pareto_charts(panel):
    panel.in_process = (
        True  # the panel measures in worker processes by default (ComparePanel's tests cover them): 40 s less
    )
    panel.compute()
    panel.budget.value = 3.9
    panel.build_button.click()
    assert panel.build_job.wait(900) == "done", panel.build_job.error
    assert [r.label for r in panel.results] == ["fp32", "rtn(bits=3)", "rtn", "mixed(budget_bits=3.9, map_tokens=64)"]
    assert all(r.error is None and r.mode == "in-process" for r in panel.results), [r.error for r in panel.results]
    mix = panel.results[-1]
    assert panel.results[1].weight_bytes < mix.weight_bytes < panel.results[2].weight_bytes  # between uniform 3 and 4
    assert mix.kl_mean is not None and "KL mean (nats)" in panel.table.value and "top-1 same %" in panel.table.value
    assert len(panel.figures) == 2 and all(len(fig.data[0].x) == 4 for fig in panel.figures)


def test_cancel_during_the_map_ends_cancelled_without_a_map(panel):
    panel.map_button.click()
    panel.map_job.cancel_button.click()
    assert panel.map_job.wait(900) == "cancelled"
    assert panel.map is None and "Compute the map first" in panel.plan_view.value


def test_bad_inputs_end_in_an_error_that_says_what_to_change(panel):
    panel.tokens.value = 16
    panel.map_button.click()
    assert panel.map_job.wait(900) == "error"
    assert "use at least 32" in panel.map_job.status.value and not panel.map_button.disabled

    panel.tokens.value = TOKENS
    panel.build_button.click()  # nothing to plan from yet
    assert panel.build_job.wait(900) == "error" and "Press Compute map first" in panel.build_job.error

    panel.compute()
    panel.widths.value = "3,5"
    assert panel.plan is None and "widths [5] are not supported by RTN" in panel.plan_view.value
    panel.build_button.click()
    assert panel.build_job.wait(900) == "error" and "choose from 2, 3, 4, 8" in panel.build_job.error
    panel.widths.value = "4,8"  # a mix that starts at 4 bits needs the map at 4 bits
    assert panel.plan is None and "press Compute map again" in panel.plan_view.value
