"""QuantizePanel, ComparePanel, GeneratePanel: each a thin class over one core call.

They take the pickers they read from in their constructor (no globals), run the core
call through `Job` (progress, status, captured log, cancel), and keep what it returned
in `.result` / `.results` / `.figures` so tests and later cells can use it.

ComparePanel appends each finished method to the history the moment it finishes. It
measures in the kernel by default (rows say "in-process"): worker processes started from a
button click in JupyterLab were killed by SIGTERM in about one browser test run in five,
cause not found yet; `in_process=False` gives the CLI's fresh worker per method.
QuantizePanel keeps its model for the next cells, so it measures in this process too.
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as widgets

from .. import charts, executors, results, runner
from ..config import EvalConfig
from ..errors import WorkbenchError
from ._base import FigureArea, Job, Panel, table_html
from .pickers import MethodPicker, ModelPicker


class QuantizePanel(Panel):
    """Quantize with one method, measure it, and keep the model for the next panels."""

    def __init__(self, model: ModelPicker, methods: MethodPicker, eval_cfg: EvalConfig = EvalConfig(max_tokens=2048)):
        self.model_picker, self.method_picker, self.eval_cfg = model, methods, eval_cfg
        names = [name for name, check in methods.checks.items() if not check.disabled]
        self.method = widgets.Dropdown(options=names, value="bnb-nf4" if "bnb-nf4" in names else names[0], description="Method")
        self.button = widgets.Button(description="Quantize", button_style="primary", icon="compress")
        self.job = Job(self.button, self._work, self._show)
        self.summary = widgets.HTML()
        self.widget = widgets.VBox([widgets.HTML("Parameters come from the method list above."), self.method,
                                    self.job.widget, self.summary])
        self.result: results.Result | None = None
        self.built: runner.Built | None = None

    @property
    def model(self):
        """The quantized model kept for the next cells (None until a run succeeded)."""
        return self.built.model if self.built else None

    def _work(self, job: Job) -> runner.Evaluated:
        self.release()  # free the previous model (and its GPU memory) before loading the next
        session = self.model_picker.session(self.eval_cfg, job.write)
        choice = self.method_picker.choice_for(self.method.value)
        return runner.evaluate(session, choice, job.write, lambda _, done, total: job.set_progress(done, total), keep=True)

    def _show(self, evaluated: runner.Evaluated) -> None:
        self.result, self.built = evaluated.result, evaluated.built
        if evaluated.result.error:
            raise WorkbenchError(evaluated.result.error)
        self.summary.value = table_html(results.table_rows([evaluated.result])) + \
            f"<p style='font-size:11px'>{html.escape(' '.join(results.footnotes([evaluated.result])))}</p>"

    def release(self) -> None:
        if self.built:
            self.built.close()
            self.built = None


class ComparePanel(Panel):
    """Run several methods one after another against the baseline; table, charts, export."""

    def __init__(self, model: ModelPicker, methods: MethodPicker, out_dir: str = "results",
                 eval_cfg: EvalConfig = EvalConfig(max_tokens=2048, decode_tokens=16), in_process: bool = True):
        self.model_picker, self.method_picker, self.eval_cfg, self.in_process = model, methods, eval_cfg, in_process
        self.out_dir = Path(out_dir)
        self.button = widgets.Button(description="Compare", button_style="primary", icon="bar-chart")
        self.rerun = widgets.Checkbox(value=False, description="re-run configurations already measured", indent=False)
        self.job = Job(self.button, self._work, self._show, cancellable=True, library_log=self.out_dir / "library.log")
        self.table = widgets.HTML()
        self.export_csv = widgets.Button(description="Export CSV", icon="download", disabled=True)
        self.export_json = widgets.Button(description="Export JSON", icon="download", disabled=True)
        self.exported = widgets.HTML()
        self.export_csv.on_click(lambda _: self.export("csv"))
        self.export_json.on_click(lambda _: self.export("json"))
        self.figure_area = FigureArea()
        self.widget = widgets.VBox([self.rerun, self.job.widget, self.table,
                                    widgets.HBox([self.export_csv, self.export_json, self.exported]), self.figure_area.widget])
        self.results: list[results.Result] = []
        self.figures: list = []

    def _ipython_display_(self):
        super()._ipython_display_()
        self.figure_area.reserve(len(charts.BAR_METRICS) + 1)

    @property
    def history(self) -> Path:
        return self.out_dir / "history.jsonl"

    def _work(self, job: Job) -> list[results.Result]:
        session = self.model_picker.session(self.eval_cfg, job.write)
        previous = results.read_history(self.history, job.write)
        with self.job.library_log.open("a", encoding="utf-8") as library:
            executor = executors.InProcess() if self.in_process else \
                executors.WorkerProcesses(library_log=lambda line: library.write(line + "\n"))
            return runner.compare(session, self.method_picker.choices(), previous, self.rerun.value, job.write,
                                  lambda _, done, total: job.set_progress(done, total), job.should_stop, executor,
                                  on_result=lambda result: results.append_history([result], self.history))

    def _show(self, measured: list[results.Result]) -> None:
        self.results = measured
        self.table.value = table_html(results.table_rows(measured)) + "".join(
            f"<p style='font-size:11px'>{html.escape(line)}</p>" for line in results.footnotes(measured))
        self.figures = charts.all_charts(measured)
        self.figure_area.show(self.figures)
        self.export_csv.disabled = self.export_json.disabled = not measured

    def export(self, kind: str) -> Path:
        path = self.out_dir / f"results.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        (results.write_csv if kind == "csv" else results.write_json)(self.results, path)
        self.exported.value = f"wrote {html.escape(str(path))}"
        return path


class GeneratePanel(Panel):
    """The same prompt through each selected method, side by side, with tokens/s."""

    def __init__(self, model: ModelPicker, methods: MethodPicker,
                 prompt: str = "Explain in two sentences what quantization does to a neural network.", max_new_tokens: int = 40):
        self.model_picker, self.method_picker = model, methods
        self.prompt = widgets.Textarea(value=prompt, description="Prompt", layout=widgets.Layout(width="95%"))
        self.max_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=256, description="New tokens")
        self.button = widgets.Button(description="Generate", button_style="primary", icon="comment")
        self.job = Job(self.button, self._work, self._show, cancellable=True)
        self.outputs = widgets.HTML()
        self.widget = widgets.VBox([self.prompt, self.max_tokens, self.job.widget, self.outputs])
        self.generations: list[runner.Generation] = []

    def _work(self, job: Job) -> list[runner.Generation]:
        session = self.model_picker.session(EvalConfig(max_tokens=64), job.write)
        done = []
        for i, choice in enumerate(self.method_picker.choices()):
            if job.should_stop():
                break
            job.set_progress(i, len(self.method_picker.choices()))
            done.append(runner.generate(session, choice, self.prompt.value, self.max_tokens.value, job.write))
        return done

    def _show(self, generations: list[runner.Generation]) -> None:
        self.generations = generations
        cards = []
        for g in generations:
            speed = f"{g.tokens_per_s:.1f} tok/s" if g.tokens_per_s else ""
            body = f"<span style='color:#d62728'>{html.escape(g.error)}</span>" if g.error else html.escape(g.text)
            cards.append(f"<div style='flex:1;min-width:220px;border:1px solid #ddd;padding:6px;margin:2px'>"
                         f"<b>{html.escape(g.method)}</b> <small>{speed}</small><p>{body}</p></div>")
        self.outputs.value = f"<div style='display:flex;flex-wrap:wrap'>{''.join(cards)}</div>"
