"""SensitivityPanel: where bits matter in this model, and a mix of widths built from that.

Three steps, each a thin call into the core:

1. *Compute map* (a `Job`): the per-layer sensitivity map of the chosen method
   (`sensitivity.load_or_compute`, cached on disk) drawn as a heatmap, and the per-block map
   the `mixed` method plans from (RTN at the smallest width, the same call `methods.mixed.choose`
   makes, so the build later reads it from the cache).
2. The budget slider: each move plans again on that cached map (`mixed.plan`, no model run),
   so the bits per block shown are the ones *Build and measure* builds.
3. *Build and measure* (a `Job`): `runner.compare` of the reference, uniform RTN at the widths
   around the budget and the `mixed:...` choice, each in a fresh worker process as in
   ComparePanel (Cancel ends the running worker at once); the table with its KL columns and
   the Pareto charts.

Cancel during *Compute map* stops at the map's next progress line (every 30 cells).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets

from workbench import methods
from workbench.core.config import EvalConfig
from workbench.core.errors import WorkbenchError
from workbench.methods.mixed import map_choice, parse_widths, stored_bits
from workbench.methods.mixed import planner as mixed
from workbench.metrics import sensitivity
from workbench.panels._base import FigureArea, Job, JobState, Panel, table_html
from workbench.panels.pickers import ModelPicker
from workbench.report import charts
from workbench.report.sensitivity import heatmap
from workbench.run import compare, maps, results

WIDTH_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#9ecae1", 8: "#2ca02c"}
METRICS = ("ppl", "kl")
"""The Pareto charts drawn after *Build and measure*: perplexity and KL against weight memory."""


class Cancelled(Exception):
    """Raised from the map's progress log when Cancel was pressed: the map is not finished or saved."""


@dataclass(frozen=True)
class Settings:
    """What the widgets say, checked: the heatmap's method, the mixing widths and their map."""

    map_method: str
    widths: tuple[int, ...]
    group_size: int
    tokens: int

    @property
    def mixing_method(self) -> str:
        """The map `mixed` plans from: RTN at the smallest width (`methods.mixed.choose`)."""
        return map_choice(self.widths, self.group_size)

    def cost(self, width: int) -> float:
        """Stored bits per weight of an RTN layer at `width`, scales included."""
        return stored_bits(width, self.group_size)

    def mixed_choice(self, budget_bits: float) -> str:
        return (
            f"mixed:budget_bits={budget_bits:.2f}:widths={','.join(map(str, self.widths))}:group_size={self.group_size}"
            f":map_tokens={self.tokens}"
        )

    def uniform_choices(self, budget_bits: float) -> list[str]:
        """Uniform RTN at the widths just below and just above the budget (one when it sits on a width)."""
        below = max((w for w in self.widths if self.cost(w) <= budget_bits + 1e-9), default=self.widths[0])
        above = min((w for w in self.widths if self.cost(w) >= budget_bits - 1e-9), default=self.widths[-1])
        return [f"rtn:bits={w}:group_size={self.group_size}" for w in dict.fromkeys((below, above))]


class SensitivityPanel(Panel):
    """Sensitivity heatmap, a budget slider showing the bits each block gets, and a build of that mix."""

    def __init__(
        self,
        model: ModelPicker,
        out_dir: str = "results",
        tokens: int = 512,
        widths: str = "3,4,8",
        blocks: list[int] | None = None,
        eval_cfg: EvalConfig = EvalConfig(max_tokens=2048, decode_tokens=16),
        in_process: bool = False,
    ):
        """`blocks`: the blocks the per-layer heatmap measures (None: all; the mix's per-block map always has all)."""
        self.model_picker, self.eval_cfg, self.in_process, self.blocks = (model, eval_cfg, in_process, blocks)
        self.out_dir = Path(out_dir)
        style = {"description_width": "initial"}
        self.method = widgets.Dropdown(options=maps.supported(), value="rtn", description="Map method", style=style)
        self.bits = widgets.Dropdown(options=[2, 3, 4, 8], value=3, description="bits", style=style)
        self.group_size = widgets.Dropdown(options=[32, 64, 128], value=64, description="group size", style=style)
        self.tokens = widgets.IntText(
            value=tokens, description="map tokens", style=style, layout=widgets.Layout(width="160px")
        )
        self.widths = widgets.Text(
            value=widths, description="mix widths", style=style, layout=widgets.Layout(width="180px")
        )
        self.method.observe(lambda _: self._method_changed(), names="value")
        self.widths.observe(lambda _: self._widths_changed(), names="value")
        self.group_size.observe(lambda _: self._widths_changed(), names="value")
        self.map_button = widgets.Button(description="Compute map", button_style="primary", icon="th")
        self.map_job = Job(
            self.map_button, self._compute, self._show_map, cancellable=True, library_log=self.out_dir / "library.log"
        )
        self.map_figure = FigureArea()
        self.budget = widgets.FloatSlider(
            step=0.01,
            description="bits/weight",  # its range: `_widths_changed`
            readout_format=".2f",
            continuous_update=True,
            style=style,
            layout=widgets.Layout(width="480px"),
        )
        self.budget.observe(lambda _: self._show_plan(), names="value")
        self.plan_view = widgets.HTML()
        self.build_button = widgets.Button(description="Build and measure", button_style="primary", icon="bar-chart")
        self.build_job = Job(
            self.build_button,
            self._build,
            self._show_results,
            cancellable=True,
            library_log=self.out_dir / "library.log",
        )
        self.table = widgets.HTML()
        self.result_figures = FigureArea()
        self.widget = widgets.VBox(
            [
                widgets.HTML(
                    "<b>1. The map</b>: quantize one layer at a time, measure how far the whole model's output moves (KL)."
                ),
                widgets.HBox([self.method, self.bits, self.group_size, self.tokens]),
                self.map_job.widget,
                self.map_figure.widget,
                widgets.HTML(
                    "<b>2. The budget</b>: mean stored bits per block-linear weight; the slider plans the mix at once."
                ),
                widgets.HBox([self.widths, self.budget]),
                self.plan_view,
                widgets.HTML(
                    "<b>3. Build and measure</b>: the mix next to uniform RTN at the widths around the budget."
                ),
                self.build_job.widget,
                self.table,
                self.result_figures.widget,
            ]
        )
        self.map: sensitivity.SensitivityMap | None = None
        """The heatmap's map (per layer, the chosen method)."""
        self.mixing_map: sensitivity.SensitivityMap | None = None
        """The per-block map the mix is planned from."""
        self.figure = None
        self.plan: mixed.Plan | None = None
        self.results: list[results.Result] = []
        self.figures: list = []
        self._widths_changed()

    def _ipython_display_(self):
        super()._ipython_display_()
        self.map_figure.reserve(1)
        self.result_figures.reserve(len(METRICS))

    # ------------------------------------------------------------ cell equivalents of the buttons

    def compute(self) -> None:
        """Do what *Compute map* does, in this cell; raises with the message on error."""
        _run_here(self.map_job)

    def build(self) -> None:
        """Do what *Build and measure* does, in this cell; raises with the message on error."""
        _run_here(self.build_job)

    def run(self) -> None:
        self.compute()
        self.build()

    # ------------------------------------------------------------ settings

    def settings(self) -> Settings:
        """The widgets' values, checked before any work (a clear error for each bad one)."""
        widths = parse_widths(self.widths.value)
        tokens = self.tokens.value
        if tokens < 32:
            raise WorkbenchError(
                f"map tokens: {tokens} is too few to rank layers; use at least 32 (512 is the default)."
            )
        parts = [self.method.value]
        declared = {p.name for p in methods.get(self.method.value).params}
        if "bits" in declared:
            parts.append(f"bits={self.bits.value}")
        if "group_size" in declared:
            parts.append(f"group_size={self.group_size.value}")
        return Settings(":".join(parts), widths, self.group_size.value, tokens)

    def _method_changed(self) -> None:
        """bnb-nf4/fp4 have neither bits nor group size of their own (4-bit, blocks of 64)."""
        declared = {p.name for p in methods.get(self.method.value).params}
        self.bits.disabled = "bits" not in declared

    def _widths_changed(self) -> None:
        """The slider spans the stored bits of the smallest to the largest width; the plan follows."""
        try:
            widths = parse_widths(self.widths.value)
        except WorkbenchError as exc:
            self.plan, self.plan_view.value = None, _error_html(str(exc))
            return
        group = self.group_size.value
        # Two-decimal ends inside the widths' costs: every slider value is a budget `mixed.plan` accepts.
        low, high = (
            math.ceil(100 * stored_bits(widths[0], group)) / 100,
            math.floor(100 * stored_bits(widths[-1], group)) / 100,
        )
        middle = round((stored_bits(widths[0], group) + stored_bits(widths[1], group)) / 2, 2)
        if low > self.budget.max:  # never min > max on the way
            self.budget.max, self.budget.min = high, low
        else:
            self.budget.min, self.budget.max = low, high
        self.budget.value = middle
        self._show_plan()

    # ------------------------------------------------------------ 1. the map

    def _compute(self, job: Job):
        settings = self.settings()
        source = self.model_picker.session(self.eval_cfg, job.write).source
        log = _checkpointed(job)
        try:
            job.set_progress(0, 2)
            shown, _ = maps.load_or_compute(source, settings.map_method, settings.tokens, "layer", self.blocks, log=log)
            job.set_progress(1, 2)
            planned, _ = maps.load_or_compute(source, settings.mixing_method, settings.tokens, "block", log=log)
        except Cancelled:
            job.write("cancelled: the map was not finished (nothing saved).")
            return None
        return shown, planned

    def _show_map(self, maps) -> None:
        if maps is None:
            return
        self.map, self.mixing_map = maps
        self.figure = heatmap(self.map)
        self.map_figure.show([self.figure])
        top = max(self.map.cells, key=lambda c: c.kl)
        self.map_job.write(
            f"most sensitive layer: block {top.block} {top.kind} (KL {top.kl:.3g} nats/token); "
            f"per-block map for the mix: {self.mixing_map.method}"
        )
        self._show_plan()

    # ------------------------------------------------------------ 2. the plan

    def _show_plan(self) -> None:
        """Plan the mix for the slider's budget on the cached per-block map (no model run)."""
        if self.mixing_map is None:
            self.plan, self.plan_view.value = (None, "<i>Compute the map first: the mix is planned from it.</i>")
            return
        try:
            settings = self.settings()
            self.plan = self._plan_for(settings, round(self.budget.value, 2))
        except WorkbenchError as exc:
            self.plan, self.plan_view.value = None, _error_html(str(exc))
            return
        self.plan_view.value = _plan_html(self.plan)

    def _plan_for(self, settings: Settings, budget: float) -> mixed.Plan:
        if (
            self.mixing_map.method != methods.parse(settings.mixing_method).text
            or self.mixing_map.tokens != settings.tokens
        ):
            raise WorkbenchError(
                f"the widths, group size or tokens changed since the map: press Compute map again "
                f"(the mix needs the map of {settings.mixing_method} on {settings.tokens} tokens)."
            )
        return mixed.plan(self.mixing_map, budget, settings.widths, "block", cost=settings.cost)

    # ------------------------------------------------------------ 3. build and measure

    def _build(self, job: Job) -> list[results.Result]:
        settings = self.settings()
        if self.mixing_map is None:
            raise WorkbenchError("build: no map yet. Press Compute map first: the mix is planned from it.")
        budget = round(self.budget.value, 2)
        self._plan_for(settings, budget)  # the same checks and errors as the slider's plan, before any work
        session = self.model_picker.session(self.eval_cfg, job.write)
        if session.fingerprint != self.mixing_map.fingerprint:
            raise WorkbenchError(
                f"build: the map is of {self.mixing_map.model}, the model picked now is {session.source.label}; "
                "press Compute map again."
            )
        choices = [session.reference_method(), *settings.uniform_choices(budget), settings.mixed_choice(budget)]
        with self.build_job.library_log.open("a", encoding="utf-8") as library:
            executor = compare.executor_for(self.in_process, lambda line: library.write(line + "\n"))
            return compare.compare(
                session,
                choices,
                compare.History.in_folder(self.out_dir),
                False,
                job.write,
                lambda _, done, total: job.set_progress(done, total),
                job.should_stop,
                executor,
            )

    def _show_results(self, measured: list[results.Result]) -> str | None:
        self.results = measured
        self.table.value = table_html(results.table_rows(measured)) + "".join(
            f"<p style='font-size:11px'>{html.escape(line)}</p>" for line in results.footnotes(measured)
        )
        self.figures = [charts.pareto_chart(measured, metric) for metric in METRICS]
        self.result_figures.show(self.figures)
        failed = [r for r in measured if r.error]
        if failed:
            return f"{len(failed)} of {len(measured)} failed: " + "; ".join(f"{r.label}: {r.error}" for r in failed)
        return None


def _checkpointed(job: Job):
    """The job's log, which raises `Cancelled` once Cancel was pressed: the map's progress lines are its checkpoints."""

    def log(message: str) -> None:
        job.write(message)
        if job.should_stop():
            raise Cancelled()

    return log


def _run_here(job: Job) -> None:
    job.start(background=False)
    if job.state is JobState.ERROR:
        raise WorkbenchError(job.error)


def _error_html(message: str) -> str:
    return f"<div style='color:#d62728;white-space:normal;word-break:break-word'>{html.escape(message)}</div>"


def _plan_html(chosen: mixed.Plan) -> str:
    """One coloured cell per block with its bits, then how many blocks get each width."""
    cells = "".join(
        f"<td title='{html.escape(unit.name)}: KL {unit.sensitivity:.3g} at {chosen.widths[0]}-bit' "
        f"style='background:{WIDTH_COLORS.get(bits, '#ccc')};padding:2px 4px;text-align:center;font-size:11px'>"
        f"{unit.name.replace('block ', '')}<br><b>{bits}</b></td>"
        for unit, bits in zip(chosen.units, chosen.bits)
    )
    counts = ", ".join(f"{n} block(s) at {w}-bit" for w, n in chosen.count().items() if n)
    return (
        f"<table style='border-collapse:collapse'><tr>{cells}</tr></table>"
        f"<p style='font-size:12px'>Block (top) and its bits (bottom): {html.escape(counts)}; "
        f"{chosen.stored_bits:.3f} of {chosen.budget_bits:.2f} bits/weight spent.</p>"
    )
