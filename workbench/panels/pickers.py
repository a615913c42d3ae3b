"""ModelPicker and MethodPicker: read the user's choices into the core's configs.

Neither does long work of its own except the "will it fit?" estimate. The method form
is drawn from what each method declares (its `Param`s), never written by hand.
"""

from __future__ import annotations

import html

import ipywidgets as widgets

from workbench import methods
from workbench.core.config import EvalConfig, ModelSpec
from workbench.core.errors import WorkbenchError
from workbench.panels._base import Job, Panel, table_html

BUNDLED_LABEL = "SmolLM2-135M-Instruct (offline, bundled)"
OTHER_LABEL = "Other: hub id or local path below"
CURATED = {
    # label -> hub id. All fit a free Colab T4 (16 GB) in fp16; "gated" needs an accepted licence and a token.
    BUNDLED_LABEL: "bundled",
    "facebook/opt-125m": "facebook/opt-125m",
    "facebook/opt-350m": "facebook/opt-350m",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen3-0.6B": "Qwen/Qwen3-0.6B",
    "Qwen/Qwen3-1.7B": "Qwen/Qwen3-1.7B",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "meta-llama/Llama-3.2-1B (gated)": "meta-llama/Llama-3.2-1B",
    "google/gemma-3-1b-it (gated)": "google/gemma-3-1b-it",
    OTHER_LABEL: "",
}


class ModelPicker(Panel):
    """Which model, on which device, with which token; plus the "will it fit?" estimate."""

    def __init__(self, default: str = "bundled", device: str = "auto"):
        label = next((k for k, v in CURATED.items() if v == default), OTHER_LABEL)
        self.choice = widgets.Dropdown(options=list(CURATED), value=label, description="Model")
        self.custom = widgets.Text(
            value="" if label != OTHER_LABEL else default,
            placeholder="org/name, ./folder or file.gguf",
            description="Hub id / path",
        )
        self.token = widgets.Password(description="HF token", placeholder="only for gated models")
        self.device = widgets.Dropdown(options=["auto", "cpu", "cuda"], value=device, description="Device")
        # Off by default: a model whose config names its own Python code is refused (workbench.sources.remote_code).
        self.trust_remote_code = widgets.Checkbox(value=False, description="trust remote code", indent=False)
        self.button = self.estimate_button = widgets.Button(description="Will it fit?", icon="calculator")
        self.job = Job(self.button, self._estimate, self._show_estimate)
        self.estimate_view = widgets.HTML()
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.choice, self.device]),
                widgets.HBox([self.custom, self.token, self.trust_remote_code]),
                self.job.widget,
                self.estimate_view,
            ]
        )
        self._sessions: dict = {}
        self.source = None
        """The model last resolved ("Will it fit?" or a panel's session): what the method form fits itself to."""
        self._listeners: list = []

    def on_model(self, callback) -> None:
        """Call `callback(source)` whenever a model is resolved (and now, if one is)."""
        self._listeners.append(callback)
        if self.source is not None:
            callback(self.source)

    def _resolved(self, source) -> None:
        self.source = source
        for callback in self._listeners:
            callback(source)

    def spec(self) -> ModelSpec:
        name = CURATED[self.choice.value] or self.custom.value.strip()
        return ModelSpec(
            name=name,
            device=self.device.value,
            token=self.token.value or None,
            trust_remote_code=self.trust_remote_code.value,
        )

    def session(self, eval_cfg: EvalConfig, log=print):
        """The shared runner session for the current choice (opened once per model and protocol)."""
        from workbench.run import runner

        spec = self.spec()
        key = (spec.name, spec.device, spec.trust_remote_code, eval_cfg)
        if key not in self._sessions:
            self._sessions = {key: runner.Session.open(spec, eval_cfg, log)}  # keep one: tokenizers are not small
            self._resolved(self._sessions[key].source)
        return self._sessions[key]

    def _estimate(self, job: Job):
        from workbench.run import estimate
        from workbench.sources import models

        spec = self.spec()
        source = models.resolve(spec.name, spec.token, job.write, trust_remote_code=spec.trust_remote_code)
        models.check_causal_lm(source)
        return source, estimate.estimate(source, device=spec.resolved_device())

    def _show_estimate(self, resolved) -> None:
        source, result = resolved
        self._resolved(source)
        from workbench.run.estimate import footnotes

        rows = [
            {
                "method": r.method,
                "bits": r.bits,
                f"weight MB ({result.device})": round(r.weight_bytes / 2**20),
                "GPU weight MB": round(r.gpu_weight_bytes / 2**20),
                **{gpu: "yes" if fits else "no" for gpu, fits in r.fits.items()},
            }
            for r in result.rows
        ]
        notes = "".join(f"<p style='font-size:11px'>{html.escape(n)}</p>" for n in footnotes(result))
        self.estimate_view.value = table_html(rows) + notes


class MethodPicker(Panel):
    """Every registered method grouped by family, with a form drawn from its parameters.

    `selected` takes method strings as the CLI does (`gptq:bits=8`); names that are not
    methods, or cannot run here, are listed at the top instead of dropped. A summary line says
    what is selected (the families may be collapsed). Given the `model` picker, group sizes are
    offered only where they divide every layer width of the chosen model."""

    GROUP_SIZES = (8, 16, 32, 64, 128, 256)

    def __init__(
        self,
        selected: tuple[str, ...] = ("fp32", "bnb-nf4"),
        device: str | None = None,
        model: ModelPicker | None = None,
    ):
        self.checks: dict[str, widgets.Checkbox] = {}
        self.fields: dict[str, dict[str, widgets.Widget]] = {}
        self._forms: dict[str, widgets.HBox] = {}
        wanted, problems = _parse_selection(selected, device)
        families: dict[str, list] = {}
        for method, reason in methods.available(device):
            families.setdefault(method.family, []).append(self._row(method, reason, wanted.get(method.name)))
        self.problems = widgets.HTML(_problems_html(problems))
        self.not_selected = problems
        """`{name: why}` for each name given in `selected` that is not ticked."""
        self.summary = widgets.HTML()
        self.accordion = widgets.Accordion(children=[widgets.VBox(rows) for rows in families.values()])
        for i, family in enumerate(families):
            self.accordion.set_title(i, family)
        self.widget = widgets.VBox([self.problems, self.accordion, self.summary])
        self._update_summary()
        if model is not None:
            model.on_model(self.fit_to)

    def _row(self, method: methods.Method, reason: str | None, params: dict | None) -> widgets.Widget:
        check = widgets.Checkbox(
            value=params is not None and reason is None,
            description=method.name,
            disabled=reason is not None,
            indent=False,
            layout=widgets.Layout(width="140px"),
        )
        self.checks[method.name] = check
        self.fields[method.name] = {
            p.name: _param_widget(p, (params or {}).get(p.name, p.default)) for p in method.params
        }
        note = (
            f"<span style='color:#d62728'>not here: {html.escape(reason)}</span>"
            if reason
            else html.escape(method.summary)
        )
        self._forms[method.name] = form = widgets.HBox(list(self.fields[method.name].values()))
        check.observe(lambda _: self._update_summary(), names="value")
        for field in self.fields[method.name].values():
            field.observe(lambda _: self._update_summary(), names="value")
        help_lines = "".join(f"<div><b>{html.escape(p.name)}</b>: {html.escape(p.help)}</div>" for p in method.params)
        parts = [widgets.HBox([check, widgets.HTML(f"<span style='font-size:12px'>{note}</span>")]), form]
        if help_lines:
            parts.append(widgets.HTML(f"<div style='font-size:11px;color:#555;margin-left:140px'>{help_lines}</div>"))
        return widgets.VBox(parts)

    def _update_summary(self) -> None:
        chosen = self.choices()
        self.summary.value = (
            f"<b>Selected ({len(chosen)}):</b> {html.escape(', '.join(chosen))}"
            if chosen
            else "<b style='color:#b8860b'>No method selected.</b>"
        )

    def fit_to(self, source) -> None:
        """Offer only the group sizes that divide every block-linear input width of `source`."""
        from workbench.sources.models import linear_input_widths

        self.fit_to_widths(set(linear_input_widths(source).values()))

    def fit_to_widths(self, widths: set[int]) -> None:
        for name, fields in self.fields.items():
            param = next((p for p in methods.get(name).params if p.name == "group_size"), None)
            if param is None:
                continue
            candidates = param.choices or self.GROUP_SIZES
            allowed = [
                g
                for g in candidates
                if g > 0 and (param.minimum is None or g >= param.minimum) and all(w % g == 0 for w in widths)
            ]
            if -1 in param.choices or (param.minimum is not None and param.minimum <= -1):
                allowed.append(-1)  # one group per row fits every width
            old = fields["group_size"]
            value = (
                old.value
                if old.value in allowed
                else (param.default if param.default in allowed else (allowed or [old.value])[0])
            )
            new = widgets.Dropdown(
                options=allowed or [old.value],
                value=value,
                description="group_size",
                style={"description_width": "initial"},
                layout=widgets.Layout(width="auto"),
            )
            new.observe(lambda _: self._update_summary(), names="value")
            fields["group_size"] = new
            self._forms[name].children = tuple(fields.values())
        self._update_summary()

    def select(self, *names: str) -> None:
        """Tick exactly these methods (for notebooks and tests)."""
        for name, check in self.checks.items():
            check.value = name in names and not check.disabled

    def choice_for(self, name: str) -> str:
        """`name:key=value:...` with the parameters that differ from the defaults."""
        method = methods.get(name)
        changed = [
            f"{p.name}={self.fields[name][p.name].value}"
            for p in method.params
            if self.fields[name][p.name].value != p.default
        ]
        return ":".join([name, *changed])

    def choices(self) -> list[str]:
        return [self.choice_for(name) for name, check in self.checks.items() if check.value]


def _parse_selection(selected, device) -> tuple[dict[str, dict], dict[str, str]]:
    """`{method name: params}` to tick, and `{given text: why not}` for the rest."""
    runnable = {method.name: reason for method, reason in methods.available(device)}
    wanted, problems = {}, {}
    for text in selected:
        text = text.strip()
        if not text:
            continue
        try:
            choice = methods.parse(text)
        except WorkbenchError as exc:
            problems[text] = str(exc)
            continue
        if runnable.get(choice.method.name):
            problems[text] = f"cannot run here: {runnable[choice.method.name]}"
        else:
            wanted[choice.method.name] = choice.params
    return wanted, problems


def _problems_html(problems: dict[str, str]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li><b>{html.escape(text)}</b>: {html.escape(why)}</li>" for text, why in problems.items())
    return f"<div style='color:#b8860b;font-size:12px'>Not selected:<ul style='margin:0'>{items}</ul></div>"


def _param_widget(param: methods.Param, value) -> widgets.Widget:
    common = {
        "value": value,
        "description": param.name,
        "style": {"description_width": "initial"},
        "layout": widgets.Layout(width="auto"),
    }
    if param.choices:
        return widgets.Dropdown(options=list(param.choices), **common)
    if isinstance(param.default, bool):
        return widgets.Checkbox(indent=False, **common)
    kind = {int: widgets.IntText, float: widgets.FloatText}.get(type(param.default), widgets.Text)
    return kind(**common)
