"""FineTunePanel: QLoRA training with a live loss curve (merge and deploy: `panels.deploy`).

Thin surfaces over `workbench.finetune`, in the style of `work.py`: they take the panels
they read from in their constructor, run the core calls through `Job` (states, log,
Stop), and keep what came back (`.result`, `.trained`, `.merge_report`, `.results`,
`.loss_figure`) for tests and later cells.

State is a value: FineTunePanel publishes one frozen `TrainedAdapter` (what was trained,
from which model on which device, where the adapter is) and MergeDeployPanel reads only
that, never the other panel's widgets or working attributes, so changing the model
picker after training cannot make a merge use another model than the one trained.

The loss curve is a plain plotly `go.Figure` redrawn through `FigureArea` (an Output
widget in JupyterLab, a display handle in Colab), never a FigureWidget. Training logs a
loss every optimizer step; one mini-batch is noisy, so a smoothed curve (exponential
moving average) is drawn over the raw one.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import ipywidgets as widgets

from workbench import methods
from workbench.core.config import ModelSpec
from workbench.core.errors import WorkbenchError
from workbench.finetune import FinetuneConfig, merge_refusal
from workbench.panels._base import FigureArea, Job, JobState, Panel, table_html
from workbench.panels.pickers import ModelPicker

SMOOTHING = 0.6
"""Weight of the past in the moving average: 0 = raw loss, 0.9 = very smooth, slow to follow."""


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction, so the first points
    are not pulled towards the zero the average starts from."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def loss_chart(losses: list[tuple[int, float]], max_steps: int, subtitle: str = ""):
    """Training loss per optimizer step, raw and smoothed (pure: no display)."""
    import plotly.graph_objects as go

    steps, values = [s for s, _ in losses], [v for _, v in losses]
    fig = go.Figure(
        [
            go.Scatter(
                x=steps,
                y=values,
                mode="lines+markers",
                name="loss (one batch)",
                line={"color": "#aec7e8"},
                marker={"size": 4},
            ),
            go.Scatter(
                x=steps,
                y=smoothed(values),
                mode="lines",
                name=f"smoothed (EMA {SMOOTHING})",
                line={"color": "#1f77b4", "width": 3},
            ),
        ]
    )
    fig.update_layout(
        title=f"Training loss (lower is better)<br><sup>{html.escape(subtitle)}</sup>",
        template="plotly_white",
        xaxis_title="optimizer step",
        yaxis_title="loss (nats per response token)",
        height=380,
    )
    fig.update_xaxes(range=[0, max(max_steps, 1) + 0.5])
    return fig


def run_here(job: Job) -> JobState:
    """`Panel.run` for a panel with more than one button."""
    job.start(background=False)
    if job.state is JobState.ERROR:
        raise WorkbenchError(job.error)
    return job.state


def _memory_bytes(device: str) -> int:
    """Peak CUDA allocation, or the process's resident memory now on CPU: cheap enough for every step."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def notes_html(lines: list[str]) -> str:
    return "".join(f"<p style='font-size:11px'>{html.escape(line)}</p>" for line in lines)


@dataclass(frozen=True)
class TrainedAdapter:
    """What FineTunePanel hands on after a run: everything a merge or a deployment needs."""

    spec: ModelSpec
    """The model as picked for training (a deployment measures the same model)."""
    source: object
    """The resolved `models.ModelSource` the base was loaded from."""
    device: str
    base: str
    """The method choice the adapter was trained on (e.g. `bnb-nf4`)."""
    adapter_dir: Path
    model: object = field(default=None, repr=False, compare=False)
    """The trained model in memory (quantized base + adapter), None once released."""


class FineTunePanel(Panel):
    """LoRA adapters on a quantized base (QLoRA on bnb-nf4): settings, Train/Stop, live loss, before/after."""

    def __init__(self, model: ModelPicker, config: FinetuneConfig | None = None, out_dir: str = "results"):
        self.model_picker, self.base_config, self.out_dir = (model, config or FinetuneConfig(), Path(out_dir))
        c, style = self.base_config, {"description_width": "initial"}
        device = None if model.device.value == "auto" else model.device.value
        bases = [m.name for m, reason in methods.available(device) if m.trainable and reason is None]
        current = methods.parse_choice(c.base)[0].name
        self.base = widgets.Dropdown(
            options=[(self._base_label(name), name) for name in bases],
            value=current if current in bases else bases[0],
            description="Base",
            style=style,
        )
        self.r = widgets.BoundedIntText(value=c.r, min=1, max=1024, description="LoRA r", style=style)
        self.alpha = widgets.BoundedIntText(value=c.alpha, min=1, max=4096, description="alpha", style=style)
        self.dropout = widgets.BoundedFloatText(
            value=c.dropout, min=0, max=0.95, step=0.01, description="dropout", style=style
        )
        self.steps = widgets.BoundedIntText(value=c.max_steps, min=1, max=100_000, description="Steps", style=style)
        self.learning_rate = widgets.FloatText(value=c.learning_rate, description="Learning rate", style=style)
        self.batch_size = widgets.BoundedIntText(
            value=c.batch_size, min=1, max=1024, description="Batch size", style=style
        )
        self.max_seq_len = widgets.BoundedIntText(
            value=c.max_seq_len, min=16, max=32_768, description="Max seq len", style=style
        )
        self.checkpointing = widgets.Checkbox(
            value=c.gradient_checkpointing, description="gradient checkpointing", indent=False
        )
        self.button = widgets.Button(description="Train", button_style="primary", icon="graduation-cap")
        self.job = Job(self.button, self._work, self._show, cancellable=True)
        self.job.cancel_button.description = "Stop"
        self.live = widgets.HTML()
        self.summary = widgets.HTML()
        self.generations = widgets.HTML()
        settings = widgets.VBox(
            [
                widgets.HBox([self.base, self.r, self.alpha, self.dropout]),
                widgets.HBox([self.steps, self.learning_rate, self.batch_size, self.max_seq_len]),
                self.checkpointing,
            ]
        )
        self.figure_area = FigureArea()
        self.widget = widgets.VBox(
            [settings, self.job.widget, self.live, self.figure_area.widget, self.summary, self.generations]
        )
        self.losses: list[tuple[int, float]] = []
        self.loss_figure = loss_chart([], c.max_steps)
        self.figures = [self.loss_figure]
        self.result = None
        self.trained: TrainedAdapter | None = None
        self._started, self._peak = 0.0, 0

    @staticmethod
    def _base_label(name: str) -> str:
        note = {"bnb-nf4": "QLoRA", "fp32": "plain LoRA"}.get(name) or ("no merge" if merge_refusal(name) else "")
        return f"{name} ({note})" if note else name

    def _ipython_display_(self):
        super()._ipython_display_()
        self.figure_area.reserve(1)

    def config(self) -> FinetuneConfig:
        """The constructor's config with the widgets' values (validated by FinetuneConfig)."""
        base = (
            self.base_config.base
            if methods.parse_choice(self.base_config.base)[0].name == self.base.value
            else self.base.value
        )
        return replace(
            self.base_config,
            base=base,
            r=self.r.value,
            alpha=self.alpha.value,
            dropout=self.dropout.value,
            max_steps=self.steps.value,
            learning_rate=self.learning_rate.value,
            batch_size=self.batch_size.value,
            max_seq_len=self.max_seq_len.value,
            gradient_checkpointing=self.checkpointing.value,
        )

    def _work(self, job: Job):
        from workbench import finetune
        from workbench.sources import models

        config = self.config()
        if config.output_dir is None:  # a new folder per run, so earlier adapters stay
            config = replace(
                config, output_dir=str(self.out_dir / "adapters" / datetime.now().strftime("%Y%m%d-%H%M%S"))
            )
        spec = self.model_picker.spec()
        self.release()  # free the previous run's model (and its GPU memory) first
        device = spec.resolved_device()
        source = models.resolve(spec.name, spec.token, job.write, trust_remote_code=spec.trust_remote_code)
        self.losses, self._peak = [], 0
        self._redraw(config.max_steps, "waiting for the first step (loading and evaluating before training)")
        self._started = time.perf_counter()

        def on_loss(step: int, loss: float) -> None:
            self.losses.append((step, loss))
            self._peak = max(self._peak, _memory_bytes(device))
            elapsed = time.perf_counter() - self._started
            job.set_progress(step, config.max_steps)
            self.live.value = (
                f"step {step}/{config.max_steps} · loss {loss:.3f} (smoothed {smoothed([v for _, v in self.losses])[-1]:.3f})"
                f" · {elapsed:.0f} s elapsed · peak memory so far {self._peak / 2**20:.0f} MB"
            )
            self._redraw(
                config.max_steps,
                f"{config.base} + LoRA r={config.r}, alpha={config.alpha}, lr {config.learning_rate:g}, "
                f"batch {config.batch_size} · {source.label} on {device}",
            )

        run = finetune.finetune(source, config, device, on_loss, job.should_stop, job.write)
        return TrainedAdapter(
            spec, source, device, run.report.base, Path(run.report.adapter_dir), run.model
        ), run.report

    def _redraw(self, max_steps: int, subtitle: str) -> None:
        self.loss_figure = loss_chart(self.losses, max_steps, subtitle)
        self.figures = [self.loss_figure]
        self.figure_area.show(self.figures)

    def _show(self, outcome: tuple[TrainedAdapter, object]) -> None:
        from workbench.sources.data import load_rows

        self.trained, self.result = outcome
        report = self.result
        stopped = " (stopped early)" if report.stopped_early else ""
        self._redraw(
            report.config["max_steps"],
            f"{report.base} + LoRA r={report.config['r']} · {report.steps} steps{stopped} · {report.model}",
        )
        self.live.value = (
            f"{report.steps} steps{stopped} in {report.train_s:.0f} s ({report.s_per_step:.2f} s/step) · "
            f"peak memory {report.peak_bytes / 2**20:.0f} MB ({report.peak_kind}) · adapter saved to "
            f"<code>{html.escape(str(self.trained.adapter_dir))}</code>"
        )
        rows = [
            {
                "": "held-out loss (nats/token)",
                "before": round(report.heldout_loss_before, 4),
                "after": round(report.heldout_loss_after, 4),
                "change": f"{report.heldout_loss_after - report.heldout_loss_before:+.4f}",
            },
            {
                "": "held-out perplexity",
                "before": round(report.heldout_ppl_before, 2),
                "after": round(report.heldout_ppl_after, 2),
                "change": f"{100 * (report.heldout_ppl_after / report.heldout_ppl_before - 1):+.1f} %",
            },
        ]
        held_out = len(load_rows(report.config.get("data_path"))[1])
        self.summary.value = table_html(rows) + notes_html(
            [
                f"Held-out: {held_out} examples never trained on; loss on the answer tokens only, as in training. "
                f"Trainable: {report.trainable_params:,} of {report.total_params:,} parameters "
                f"({100 * report.trainable_params / max(report.total_params, 1):.2f} %), only the LoRA matrices."
            ]
        )
        if report.generations_after:
            cards = [
                {"prompt": p, "reference": ref, "before": b, "after": a}
                for p, ref, b, a in zip(
                    report.prompts, report.references, report.generations_before, report.generations_after
                )
            ]
            self.generations.value = "<b>Greedy answers to fixed prompts, before and after</b>" + table_html(cards)
        else:
            self.generations.value = ""

    @property
    def adapter_dir(self) -> Path | None:
        """Where the last adapter was saved (None before the first run)."""
        return self.trained.adapter_dir if self.trained else None

    def release(self) -> None:
        """Drop the trained model (the adapter stays on disk)."""
        from workbench.run import runner

        if self.trained is not None:
            self.trained = replace(self.trained, model=None)
        runner.free_memory()
