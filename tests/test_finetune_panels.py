"""FineTunePanel and MergeDeployPanel driven headlessly: set widgets, click, wait, read what is shown.

Mechanics only, on the tiny random Llama (seconds per run); what training does to a real
model is tested in test_finetune.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from workbench.core.config import EvalConfig
from workbench.core.errors import WorkbenchError
from workbench.finetune import FinetuneConfig
from workbench.panels import FineTunePanel, MergeDeployPanel, ModelPicker
from workbench.panels._base import JobState
from workbench.panels.finetune import smoothed

FAST = EvalConfig(max_length=128, stride=128, max_tokens=256, decode_tokens=8)  # 8: the fewest EvalConfig accepts
SHORT = FinetuneConfig(max_seq_len=96, max_new_tokens=4)


@pytest.fixture
def model(tiny_folder):
    return ModelPicker(default=str(tiny_folder), device="cpu")


def _log_text(job) -> str:
    return job.log.text


def _trained(model, out_dir: Path, base: str = "bnb-nf4", steps: int = 2) -> FineTunePanel:
    panel = FineTunePanel(model, SHORT, out_dir=str(out_dir))
    panel.base.value, panel.steps.value = base, steps
    panel.button.click()
    assert panel.job.wait(900) == "done", panel.job.error
    return panel


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards the starting zero
    curve = smoothed([4.0, 0.0, 0.0, 0.0])
    assert curve[0] == 4.0 and curve[1] > 0 and curve == sorted(curve, reverse=True)


def test_train_shows_states_live_curve_before_after_and_saves_the_adapter(model, tmp_path):
    panel = FineTunePanel(model, SHORT, out_dir=str(tmp_path))
    assert (
        panel.base.value == "bnb-nf4" and "torchao-int4" not in panel.base.options
    )  # untrainable bases are not offered
    panel.steps.value, panel.r.value, panel.alpha.value = 3, 4, 8
    panel.button.click()
    assert panel.job.wait(900) == "done", panel.job.error
    assert panel.job.states == ["idle", "running", "done"]
    report = panel.result
    assert (report.base, report.config["r"], report.config["alpha"], report.steps) == ("bnb-nf4", 4, 8, 3)
    raw, smooth = panel.loss_figure.data
    assert list(raw.x) == list(smooth.x) == [1, 2, 3] and list(raw.y) == [loss for _, loss in report.losses]
    assert panel.figures == [panel.loss_figure] and len(panel.figure_area.widget.outputs) == 1
    assert panel.adapter_dir.parent.parent == tmp_path / "adapters"
    assert (panel.adapter_dir / "adapter_model.safetensors").is_file() and str(panel.adapter_dir) == report.adapter_dir
    for text in ("held-out loss", "held-out perplexity", f"{report.heldout_loss_after:.4f}".rstrip("0")):
        assert text in panel.summary.value
    assert "before" in panel.generations.value and report.prompts[0][:20] in panel.generations.value
    assert "3 steps" in panel.live.value and "peak memory" in panel.live.value
    assert panel.job.state is JobState.DONE and panel.trained.model is not None and not panel.button.disabled
    assert (panel.trained.base, panel.trained.device, panel.trained.adapter_dir) == (
        "bnb-nf4",
        "cpu",
        panel.adapter_dir,
    )


def test_stop_ends_training_early_as_cancelled(model, tmp_path):
    panel = FineTunePanel(model, SHORT, out_dir=str(tmp_path))
    panel.steps.value = 500
    panel.button.click()
    deadline = time.time() + 900
    while len(panel.losses) < 2 and time.time() < deadline and panel.job.state == "running":
        time.sleep(0.02)
    assert panel.job.cancel_button.description == "Stop"
    panel.job.cancel_button.click()
    assert panel.job.wait(900) == "cancelled", panel.job.error
    assert panel.job.states == ["idle", "running", "cancelled"]
    assert panel.result.stopped_early and 2 <= panel.result.steps < 500
    assert len(panel.loss_figure.data[0].x) == panel.result.steps and "stopped early" in panel.live.value
    assert (panel.adapter_dir / "adapter_model.safetensors").is_file()  # what was learned so far is kept


def test_bad_settings_are_refused_before_any_loading(model, tmp_path):
    panel = FineTunePanel(model, SHORT, out_dir=str(tmp_path))
    panel.learning_rate.value = 0.0
    panel.button.click()
    assert panel.job.wait(900) == "error"
    assert "learning_rate" in panel.job.error and "learning_rate" in panel.job.status.value
    with pytest.raises(WorkbenchError, match="learning_rate"):
        panel.run()


def test_merge_and_deploy_wait_for_their_inputs(model, tmp_path):
    merge = MergeDeployPanel(FineTunePanel(model, SHORT, out_dir=str(tmp_path)), out_dir=str(tmp_path))
    merge.merge_button.click()
    assert merge.merge_job.wait(900) == "error" and "Train one first" in merge.merge_job.error
    merge.deploy_button.click()
    assert merge.deploy_job.wait(900) == "error" and "Press Merge first" in merge.deploy_job.error
    with pytest.raises(WorkbenchError, match="choose one of gptq, awq, rtn, bnb-nf4"):
        merge.deploy("fp32")


def test_merge_is_refused_with_the_reason_for_a_quanto_base(model, tmp_path):
    tuned = _trained(model, tmp_path, base="quanto-int8", steps=1)
    merge = MergeDeployPanel(tuned, out_dir=str(tmp_path))
    merge.merge_button.click()
    assert merge.merge_job.wait(900) == "error"
    assert merge.merge_job.states == ["idle", "running", "error"]
    assert "cannot merge an adapter trained on quanto-int8" in merge.merge_job.error
    assert "silently drops the adapter" in merge.merge_job.status.value
    assert merge.merge_report is None and merge.merge_view.value == "" and not (tmp_path / "merged").exists()
    with pytest.raises(WorkbenchError, match="quanto-int8"):
        merge.run()


def test_merge_then_deploy_with_rtn_shows_adapter_and_deployed_rows(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # gptqmodel (rtn) writes a logs/ folder into the working directory
    tuned = _trained(model, tmp_path / "out")
    panel = MergeDeployPanel(tuned, out_dir=str(tmp_path / "out"), eval_cfg=FAST)
    model.custom.value = str(tmp_path / "another-model")  # merge and deploy use what was trained, not the picker now
    panel.merge_button.click()
    assert panel.merge_job.wait(900) == "done", panel.merge_job.error
    assert panel.merged_from == tuned.trained and panel.merged_from.model is None  # the trained model is not kept twice
    assert panel.merge_job.states == ["idle", "running", "done"]
    report = panel.merge_report
    assert report.merged_loss == pytest.approx(report.unmerged_loss, rel=1e-4)
    assert Path(report.merged_dir) == tmp_path / "out" / "merged" / tuned.adapter_dir.parent.name
    assert json.loads((Path(report.merged_dir) / "config.json").read_text())["dtype"] == "float16"
    assert "tolerance" in panel.merge_view.value and f"{report.merged_loss:.4f}".rstrip("0") in panel.merge_view.value

    panel.method.value = "rtn"
    panel.deploy_button.click()
    assert panel.deploy_job.wait(900) == "done", panel.deploy_job.error
    assert panel.deploy_job.states == ["idle", "running", "done"]
    rows = panel.results[1:] if panel.results[0].label == "fp32" else panel.results  # the base's reference (KL)
    assert [r.label for r in rows] == ["bnb-nf4", "bnb-nf4+lora", "merged fp32", "merged rtn"]
    assert rows[1].adapter == str(tuned.adapter_dir)
    assert all(r.error is None and r.ppl > 1 for r in panel.results)
    for text in ("bnb-nf4+lora", "merged rtn", "perplexity", "tokens scored"):
        assert text in panel.table.value
    assert len((tmp_path / "out" / "deploy.jsonl").read_text().splitlines()) == len(panel.results)
