"""Panels driven headlessly as a person would: set widgets, click, wait, read what is shown.

Runs under ipywidgets 8 (the venv) and 7.7.1 (what Colab ships: `make test` runs this file
again with ipywidgets 7.7.1 first on PYTHONPATH)."""

from __future__ import annotations

import json
import os

import ipywidgets
import pytest

from workbench.core.config import EvalConfig
from workbench.panels import ComparePanel, GeneratePanel, MethodPicker, ModelPicker, QuantizePanel

FAST = EvalConfig(max_length=128, stride=128, max_tokens=256, decode_tokens=8)
SECRET = "hf_NEVER_SHOW_THIS_TOKEN_123"


def test_runs_on_the_expected_ipywidgets_version():
    expected = os.environ.get("WORKBENCH_EXPECT_IPYWIDGETS")
    if expected:
        assert ipywidgets.__version__ == expected
    assert ipywidgets.__version__.split(".")[0] in ("7", "8")


@pytest.fixture
def model(tiny_folder):
    picker = ModelPicker(default=str(tiny_folder), device="cpu")
    picker.token.value = SECRET  # typed by a user: must never appear anywhere
    return picker


def _log_text(job) -> str:
    return job.log.text


def test_method_picker_draws_forms_from_declarations_and_disables_what_cannot_run():
    picker = MethodPicker(device="cpu")
    assert picker.checks["torchao-int4"].disabled and not picker.checks["torchao-int4"].value
    assert set(picker.fields["gptq"]) == {"bits", "group_size", "act_order", "damp", "samples", "block_tokens"}
    assert list(picker.fields["gptq"]["bits"].options) == [2, 3, 4, 8]
    picker.select("gptq", "torchao-int4")
    picker.fields["gptq"]["bits"].value = 8
    picker.fields["gptq"]["act_order"].value = True
    assert picker.choices() == ["gptq:bits=8:act_order=True"]  # the GPU-only method stays unticked


def test_model_picker_keeps_the_token_out_of_every_repr(model, tiny_folder):
    spec = model.spec()
    assert spec.name == str(tiny_folder) and spec.token == SECRET
    assert SECRET not in repr(spec) and SECRET not in str(spec)


def test_estimate_button_shows_the_fit_table(model):
    model.estimate_button.click()
    assert model.job.wait(900) == "done", model.job.error
    assert "T4 16GB" in model.estimate_view.value and "bnb-nf4" in model.estimate_view.value


def test_quantize_panel_states_result_and_model_replacement(model):
    methods = MethodPicker(device="cpu")
    panel = QuantizePanel(model, methods, FAST)
    panel.method.value = "bnb-nf4"
    panel.button.click()
    assert panel.job.wait(900) == "done", panel.job.error
    assert panel.job.states == ["idle", "running", "done"]
    assert panel.result.method == "bnb-nf4" and panel.result.ppl > 1 and panel.model is not None
    assert "bnb-nf4" in panel.summary.value and not panel.button.disabled
    first = panel.model
    panel.method.value = "fp32"
    panel.button.click()
    assert panel.job.wait(900) == "done"
    assert panel.model is not first and panel.result.method == "fp32"


def test_library_output_goes_to_the_panel_log_file_not_the_cell(model, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    panel = QuantizePanel(model, MethodPicker(device="cpu"), FAST)
    panel.method.value = "bnb-int8"  # bitsandbytes logs a line on every 8-bit forward pass
    panel.run()
    out, err = capfd.readouterr()
    assert "MatMul8bitLt" not in out + err
    assert "MatMul8bitLt" in (tmp_path / "results" / "library.log").read_text()
    assert "line(s) in results/library.log" in _log_text(panel.job)


def test_errors_are_shown_in_the_panel_not_lost(tiny_folder):
    picker = ModelPicker(default="./no/such/model", device="cpu")
    panel = QuantizePanel(picker, MethodPicker(device="cpu"), FAST)
    panel.button.click()
    assert panel.job.wait(900) == "error"
    assert "no such model folder" in panel.job.status.value and "no such model folder" in panel.job.error
    assert not panel.button.disabled  # ready for another try


def test_compare_panel_table_charts_history_and_export(model, tmp_path):
    methods = MethodPicker(device="cpu")
    methods.select("fp32", "bnb-nf4", "quanto-int8")
    panel = ComparePanel(model, methods, out_dir=str(tmp_path), eval_cfg=FAST, in_process=False)
    panel.button.click()
    assert panel.job.wait(900) == "done", panel.job.error
    assert [r.method for r in panel.results] == ["fp32", "bnb-nf4", "quanto-int8"]
    assert {r.mode for r in panel.results} == {"worker"}  # each method in its own process, as in the CLI
    for name in ("fp32", "bnb-nf4", "quanto-int8", "Δ ppl %"):
        assert name in panel.table.value
    assert [len(fig.data) for fig in panel.figures] == [1, 1, 2, 1, 1]  # build and run peaks side by side
    assert all(len(trace.x) == 3 for fig in panel.figures for trace in fig.data)
    assert panel.figures[0].layout.yaxis.title.text.startswith("perplexity")

    panel.button.click()  # same configurations: reused from the history
    assert panel.job.wait(900) == "done"
    assert "reusing" in _log_text(panel.job)

    exported = json.loads(panel.export("json").read_text())
    assert [r["method"] for r in exported] == ["fp32", "bnb-nf4", "quanto-int8"]
    assert panel.export("csv").read_text().count("\n") == 4
    everything = (
        _log_text(panel.job) + panel.table.value + (tmp_path / "history.jsonl").read_text() + json.dumps(exported)
    )
    assert SECRET not in everything


def test_compare_panel_cancel_stops_between_methods(model, tmp_path):
    methods = MethodPicker(device="cpu")
    methods.select("fp32", "bnb-nf4", "bnb-fp4", "quanto-int8")
    panel = ComparePanel(model, methods, out_dir=str(tmp_path), eval_cfg=FAST)
    panel.button.click()
    panel.job.cancel_button.click()
    assert panel.job.wait(900) == "cancelled"
    assert panel.job.states == ["idle", "running", "cancelled"]
    assert len(panel.results) < 4 and "Cancelled: the remaining methods were not run." in _log_text(panel.job)


def test_generate_panel_side_by_side(model):
    methods = MethodPicker(device="cpu")
    methods.select("fp32", "bnb-nf4")
    panel = GeneratePanel(model, methods)
    panel.max_tokens.value = 8
    panel.button.click()
    assert panel.job.wait(900) == "done", panel.job.error
    assert [g.method for g in panel.generations] == ["fp32", "bnb-nf4"]
    assert all(g.error is None and g.tokens_per_s > 0 for g in panel.generations), panel.generations
    assert "tok/s" in panel.outputs.value


def test_run_from_a_cell_raises_with_the_message_on_error():
    from workbench.core.errors import WorkbenchError

    panel = QuantizePanel(ModelPicker(default="./no/such/model", device="cpu"), MethodPicker(device="cpu"), FAST)
    with pytest.raises(WorkbenchError, match="no such model folder"):
        panel.run()
    assert panel.job.states == ["idle", "running", "error"]


def test_compare_panel_draws_its_charts_into_the_panel(model, tmp_path):
    methods = MethodPicker(device="cpu")
    methods.select("fp32")
    panel = ComparePanel(model, methods, out_dir=str(tmp_path), eval_cfg=FAST)
    assert panel.run() is None and panel.job.state == "done"
    outputs = panel.figure_area.widget.outputs
    assert len(outputs) == 5 and all("application/vnd.plotly.v1+json" in o["data"] for o in outputs)


# ---------------------------------------------------------------------------- panels that respond


@pytest.fixture
def misbehaving():
    import custom_method

    custom_method.register_all()
    yield
    custom_method.unregister_all()


def test_method_picker_reports_what_it_could_not_select_and_summarises_the_selection():
    picker = MethodPicker(selected=("fp32", "no-such-method", "torchao-int4", "gptq:bits=8"), device="cpu")
    assert picker.choices() == ["fp32", "gptq:bits=8"]
    assert set(picker.not_selected) == {"no-such-method", "torchao-int4"}
    assert "cannot run here" in picker.not_selected["torchao-int4"]
    assert "no-such-method" in picker.problems.value and "torchao-int4" in picker.problems.value
    assert "Selected (2):" in picker.summary.value and "gptq:bits=8" in picker.summary.value
    picker.checks["bnb-nf4"].value = True  # the summary follows every tick
    assert "Selected (3):" in picker.summary.value
    assert "Weights per scale group" in str([w.value for w in _html_widgets(picker.widget)])  # parameter help is shown


def _html_widgets(widget):
    found = [widget] if isinstance(widget, ipywidgets.HTML) else []
    for child in getattr(widget, "children", ()):
        found += _html_widgets(child)
    return found


def test_method_picker_offers_only_group_sizes_that_divide_the_models_widths(model):
    picker = MethodPicker(device="cpu", model=model)
    model.run()  # "Will it fit?" resolves the model: the form fits itself to it (widths 128 and 256)
    assert list(picker.fields["hqq"]["group_size"].options) == [8, 16, 32, 64, 128]
    assert -1 in picker.fields["gptq"]["group_size"].options
    picker.fields["hqq"]["group_size"].value = 128
    picker.fit_to_widths({576, 1536})  # SmolLM2-135M: 128 does not divide 576
    hqq = picker.fields["hqq"]["group_size"]
    assert 128 not in hqq.options and 64 in hqq.options and hqq.value == 64


def test_compare_panel_cancel_inside_a_long_method_stops_within_two_seconds(model, tmp_path, misbehaving):
    import time

    methods = MethodPicker(selected=("test-hang", "fp32"), device="cpu")
    panel = ComparePanel(model, methods, out_dir=str(tmp_path), eval_cfg=FAST)
    panel.button.click()
    deadline = time.monotonic() + 900
    while "[test-hang] quantizing" not in _log_text(panel.job) and time.monotonic() < deadline:
        time.sleep(0.1)
    clicked = time.monotonic()
    panel.job.cancel_button.click()
    assert "cancelling..." in panel.job.status.value  # at once, before the worker has ended
    assert panel.job.wait(900) == "cancelled"
    assert time.monotonic() - clicked < 2
    assert [r.method for r in panel.results] == ["fp32"]  # measured before the hang; the hang is not a row


def test_a_run_with_a_failed_method_ends_amber_naming_it_and_lists_it_under_the_charts(model, tmp_path, misbehaving):
    from workbench.panels._base import AMBER

    methods = MethodPicker(selected=("fp32", "test-crash"), device="cpu")
    panel = ComparePanel(model, methods, out_dir=str(tmp_path), eval_cfg=FAST)
    panel.run()
    assert panel.job.state == "done" and "1 of 2 failed: test-crash" in panel.job.warning
    assert AMBER in panel.job.status.value and "test-crash" in panel.job.status.value
    assert "test-crash" in panel.failures.value and "SIGSEGV" in panel.failures.value
    assert all(len(fig.data[0].x) == 1 for fig in panel.figures)  # the charts hold the method that worked


def test_generate_reuses_the_models_it_built(model):
    methods = MethodPicker(selected=("fp32",), device="cpu")
    panel = GeneratePanel(model, methods, max_new_tokens=8)
    panel.run()
    first = panel.generations[0]
    panel.run()
    assert "reusing the model built by the last Generate" in _log_text(panel.job)
    assert panel.generations[0].text == first.text and first.error is None
    panel.release()


def test_the_log_keeps_its_newest_lines_in_view():
    from workbench.panels._base import LogView

    log = LogView()
    for i in range(LogView.MAX_LINES + 10):
        log.write(f"line {i}")
    assert (
        log.text.splitlines()[-1] == f"line {LogView.MAX_LINES + 9}" and len(log.text.splitlines()) == LogView.MAX_LINES
    )
    assert "flex-direction:column-reverse" in log.widget.value  # the box shows its end
