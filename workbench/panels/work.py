"""QuantizePanel, ComparePanel, GeneratePanel: each a thin class over one core call.

They take the pickers they read from in their constructor (no globals), run the core
call through `Job` (progress, status, captured log, cancel), and keep what it returned
in `.result` / `.results` / `.figures` so tests and later cells can use it.

ComparePanel appends each finished method to the history the moment it finishes, and
measures each method in a fresh worker process as the CLI does (Cancel ends the running
worker at once); `in_process=True` measures in the kernel. QuantizePanel keeps its model for
the next cells, so it measures in this process.
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as widgets

from workbench.core.config import EvalConfig
from workbench.core.errors import WorkbenchError
from workbench.panels._base import FigureArea, Job, Panel, table_html
from workbench.panels.pickers import MethodPicker, ModelPicker
from workbench.report import charts
from workbench.run import compare, generate, results, runner


class QuantizePanel(Panel):
    """Quantize with one method, measure it, and keep the model for the next panels."""

    def __init__(self, model: ModelPicker, methods: MethodPicker, eval_cfg: EvalConfig = EvalConfig(max_tokens=2048)):
        self.model_picker, self.method_picker, self.eval_cfg = model, methods, eval_cfg
        names = [name for name, check in methods.checks.items() if not check.disabled]
        self.method = widgets.Dropdown(
            options=names, value="bnb-nf4" if "bnb-nf4" in names else names[0], description="Method"
        )
        self.button = widgets.Button(description="Quantize", button_style="primary", icon="compress")
        self.job = Job(self.button, self._work, self._show)
        self.summary = widgets.HTML()
        self.widget = widgets.VBox(
            [widgets.HTML("Parameters come from the method list above."), self.method, self.job.widget, self.summary]
        )
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
        return runner.evaluate(
            session, choice, job.write, lambda _, done, total: job.set_progress(done, total), keep=True
        )

    def _show(self, evaluated: runner.Evaluated) -> None:
        self.result, self.built = evaluated.result, evaluated.built
        if evaluated.result.error:
            raise WorkbenchError(evaluated.result.error)
        self.summary.value = (
            table_html(results.table_rows([evaluated.result]))
            + f"<p style='font-size:11px'>{html.escape(' '.join(results.footnotes([evaluated.result])))}</p>"
        )

    def release(self) -> None:
        if self.built:
            self.built.close()
            self.built = None


class ComparePanel(Panel):
    """Run several methods one after another against the baseline; table, charts, export."""

    def __init__(
        self,
        model: ModelPicker,
        methods: MethodPicker,
        out_dir: str = "results",
        eval_cfg: EvalConfig = EvalConfig(max_tokens=2048, decode_tokens=16),
        in_process: bool = False,
    ):
        self.model_picker, self.method_picker, self.eval_cfg, self.in_process = (model, methods, eval_cfg, in_process)
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
        self.failures = widgets.HTML()
        self.widget = widgets.VBox(
            [
                self.rerun,
                self.job.widget,
                self.table,
                widgets.HBox([self.export_csv, self.export_json, self.exported]),
                self.figure_area.widget,
                self.failures,
            ]
        )
        self.results: list[results.Result] = []
        self.figures: list = []
        self._listeners: list = []

    def _ipython_display_(self):
        super()._ipython_display_()
        self.figure_area.reserve(len(charts.BAR_METRICS) + 1)

    def on_results(self, callback) -> None:
        """Call `callback(results)` after every comparison (and now, when there are results already):
        how another panel (the claims table) stays current without reading this one's attributes."""
        self._listeners.append(callback)
        if self.results:
            callback(self.results)

    @property
    def history(self) -> Path:
        return self.out_dir / "history.jsonl"

    def _work(self, job: Job) -> list[results.Result]:
        session = self.model_picker.session(self.eval_cfg, job.write)
        with self.job.library_log.open("a", encoding="utf-8") as library:
            executor = compare.executor_for(self.in_process, lambda line: library.write(line + "\n"))
            return compare.compare(
                session,
                self.method_picker.choices(),
                compare.History(self.history),
                self.rerun.value,
                job.write,
                lambda _, done, total: job.set_progress(done, total),
                job.should_stop,
                executor,
            )

    def _show(self, measured: list[results.Result]) -> str | None:
        """Table, charts, export; the failed methods listed under the charts, and named in the
        job's (amber) status."""
        self.results = measured
        self.table.value = table_html(results.table_rows(measured)) + "".join(
            f"<p style='font-size:11px'>{html.escape(line)}</p>" for line in results.footnotes(measured)
        )
        self.figures = charts.all_charts(measured)
        self.figure_area.show(self.figures)
        self.export_csv.disabled = self.export_json.disabled = not measured
        failed = [r for r in measured if r.error]
        self.failures.value = (
            ""
            if not failed
            else (
                "<div style='color:#b8860b;font-size:12px'><b>Not in the charts (failed):</b><ul>"
                + "".join(
                    f"<li style='white-space:normal;word-break:break-word'><b>{html.escape(r.label)}</b>: "
                    f"{html.escape(r.error)}</li>"
                    for r in failed
                )
                + "</ul></div>"
            )
        )
        for callback in self._listeners:
            callback(measured)
        if failed:
            return f"{len(failed)} of {len(measured)} failed: {', '.join(r.label for r in failed)} (reasons under the charts)"
        return None

    def export(self, kind: str) -> Path:
        path = self.out_dir / f"results.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        (results.write_csv if kind == "csv" else results.write_json)(self.results, path)
        self.exported.value = f"wrote {html.escape(str(path))}"
        return path


class GeneratePanel(Panel):
    """The same prompt through each selected method, side by side, with tokens/s."""

    def __init__(
        self,
        model: ModelPicker,
        methods: MethodPicker,
        prompt: str = "Explain in two sentences what quantization does to a neural network.",
        max_new_tokens: int = 40,
    ):
        self.model_picker, self.method_picker = model, methods
        self.prompt = widgets.Textarea(value=prompt, description="Prompt", layout=widgets.Layout(width="95%"))
        self.max_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=256, description="New tokens")
        self.button = widgets.Button(description="Generate", button_style="primary", icon="comment")
        self.job = Job(self.button, self._work, self._show, cancellable=True)
        self.outputs = widgets.HTML()
        self.widget = widgets.VBox([self.prompt, self.max_tokens, self.job.widget, self.outputs])
        self.generations: list[generate.Generation] = []
        self._built: dict[str, runner.Built] = {}
        """Models this panel built, by configuration: the next Generate reuses them."""

    def _work(self, job: Job) -> list[generate.Generation]:
        session = self.model_picker.session(EvalConfig(max_tokens=64), job.write)
        choices = self.method_picker.choices()
        wanted = {runner.planned_key(session, runner.as_choice(c)): c for c in choices}
        for key in [k for k in self._built if k not in wanted]:  # no longer selected: give the memory back
            self._built.pop(key).close()
        done = []
        for i, (key, choice) in enumerate(wanted.items()):
            if job.should_stop():
                break
            job.set_progress(i, len(wanted))
            if key in self._built:
                job.write(f"[{self._built[key].choice.label}] reusing the model built by the last Generate")
            else:
                try:
                    self._built[key] = runner.build(session, choice, job.write)
                except WorkbenchError as exc:
                    done.append(generate.Generation(choice, error=str(exc)))
                    continue
                except Exception as exc:  # a library failed: say so in this method's card, go on with the others
                    done.append(
                        generate.Generation(
                            choice, error=runner.error_message(exc, runner.as_choice(choice), job.write)
                        )
                    )
                    continue
            done.append(
                generate.generate_with(session, self._built[key], self.prompt.value, self.max_tokens.value, job.write)
            )
        return done

    def release(self) -> None:
        """Free the models kept for the next Generate."""
        for built in self._built.values():
            built.close()
        self._built = {}

    def _show(self, generations: list[generate.Generation]) -> None:
        self.generations = generations
        cards = []
        for g in generations:
            speed = f"{g.tokens_per_s:.1f} tok/s" if g.tokens_per_s else ""
            body = f"<span style='color:#d62728'>{html.escape(g.error)}</span>" if g.error else html.escape(g.text)
            cards.append(
                f"<div style='flex:1;min-width:220px;border:1px solid #ddd;padding:6px;margin:2px'>"
                f"<b>{html.escape(g.method)}</b> <small>{speed}</small><p>{body}</p></div>"
            )
        self.outputs.value = f"<div style='display:flex;flex-wrap:wrap'>{''.join(cards)}</div>"
