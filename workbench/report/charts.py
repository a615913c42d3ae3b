"""Results -> plotly figures (pure: no display, no files), and the HTML report.

Every axis carries its unit and every figure its protocol, so a chart cut out of the
report still says what was measured.
"""

from __future__ import annotations

import html
from pathlib import Path

from workbench.core import files
from workbench.report.display import mimebundle, show  # noqa: F401 (charts.show is public)
from workbench.run.results import MB, Result, baseline_of, format_details, format_table
from workbench.run.tradeoff import metric_of, pareto_front, trade_off_points


def _mb(name: str):
    return lambda r: getattr(r, name) / MB if getattr(r, name) else None


BAR_METRICS = (
    # (title, unit label, series: (name, function of a result) pairs, lower is better)
    ("Perplexity", "perplexity (lower is better)", ((None, lambda r: r.ppl),), True),
    ("Weight memory", "MB of stored weights", ((None, _mb("weight_bytes")),), True),
    (
        "Peak memory: making the model and using it",
        "MB peak above the worker's baseline",
        (("build peak (load, quantize)", _mb("build_peak_bytes")), ("run peak (score, decode)", _mb("run_peak_bytes"))),
        True,
    ),
    ("Decode speed", "tokens/s (greedy, batch 1)", ((None, lambda r: r.decode_tokens_per_s),), False),
)


FRONT_COLOR = "#d62728"


def _ok(results: list[Result]) -> list[Result]:
    return [r for r in results if r.error is None]


def _protocol_line(results: list[Result]) -> str:
    done = _ok(results)
    if not done:
        return ""
    p = done[0].protocol
    return f"{done[0].model} · {p.get('text')} · {p.get('n_tokens')} tokens · window {p.get('max_length')} / step {p.get('stride')} · {done[0].device}"


def bar_chart(results: list[Result], title: str, unit: str, series, lower_is_better: bool = True):
    """A bar per method for each of `series` ((name, function of a result) pairs): one series
    greys the baseline's bar, two or more stand side by side with a legend."""
    import plotly.graph_objects as go

    base, grouped = baseline_of(results), len(series) > 1
    fig = go.Figure()
    for name, value in series:
        done = [r for r in _ok(results) if value(r) is not None]
        fig.add_bar(
            name=name,
            x=[r.label for r in done],
            y=[value(r) for r in done],
            marker_color=None if grouped else ["#7f7f7f" if r is base else "#1f77b4" for r in done],
            text=[f"{value(r):.3g}" for r in done],
            textposition="outside",
        )
    better = "lower is better" if lower_is_better else "higher is better"
    fig.update_layout(
        title=f"{title} ({better})<br><sup>{_protocol_line(results)}</sup>",
        yaxis_title=unit,
        xaxis_title="method",
        template="plotly_white",
        height=420,
        barmode="group",
        showlegend=grouped,
    )
    values = [y for trace in fig.data for y in trace.y]
    if title == "Perplexity" and values and max(values) > 20 * min(values):
        fig.update_yaxes(type="log")  # a collapsed method (int2) would flatten every other bar
    return fig


def pareto_chart(results: list[Result], metric: str = "ppl"):
    """`metric` against weight memory, every point hoverable with its settings, the Pareto front
    marked and joined by its staircase (bottom-left is best). One trace: the staircase is
    drawn as shapes, so a chart's trace is its points, like the bar charts'."""
    import plotly.graph_objects as go

    name, unit, value = metric_of(metric)
    points = trade_off_points(results, metric)
    front = pareto_front(results, metric)
    marked = [any(p is f for f in front) for p in points]
    fig = go.Figure(
        go.Scatter(
            x=[p.weight_bytes / MB for p in points],
            y=[value(p) for p in points],
            mode="markers+text",
            text=[p.label if m else "" for p, m in zip(points, marked)],
            textposition="top center",
            hovertext=[_hover(p, name, value(p), m) for p, m in zip(points, marked)],
            hoverinfo="text",
            marker={
                "size": [13 if m else 9 for m in marked],
                "symbol": ["diamond" if m else "circle" for m in marked],
                "color": [FRONT_COLOR if m else "#9ecae1" for m in marked],
                "line": {"width": 1, "color": "#555"},
            },
        )
    )
    for a, b in zip(
        front, front[1:]
    ):  # right at a's value up to b's bytes, then down to b's value: what more bytes buy
        corner = (b.weight_bytes / MB, value(a))
        for (x0, y0), (x1, y1) in (
            ((a.weight_bytes / MB, value(a)), corner),
            (corner, (b.weight_bytes / MB, value(b))),
        ):
            fig.add_shape(
                type="line", x0=x0, y0=y0, x1=x1, y1=y1, layer="below", line={"color": FRONT_COLOR, "width": 2}
            )
    fig.update_layout(
        title=f"{name} vs weight memory, Pareto front in red ({len(front)} of {len(points)} points; "
        f"bottom-left is best)<br><sup>{_protocol_line(results)}</sup>",
        xaxis_title="weight memory (MB of stored weights)",
        yaxis_title=unit,
        template="plotly_white",
        height=480,
        showlegend=False,
    )
    values = [value(p) for p in points]
    if values and min(values) > 0 and max(values) > 20 * min(values):
        fig.update_yaxes(type="log")  # a collapsed 2-bit cell would flatten every other point
    return fig


def _hover(result: Result, name: str, value: float, on_front: bool) -> str:
    params = ", ".join(f"{k}={v}" for k, v in result.params.items()) or "no parameters"
    return (
        f"<b>{html.escape(result.label)}</b><br>{html.escape(result.method)}: {html.escape(params)}<br>"
        f"weight {result.weight_bytes / MB:.2f} MB ({result.bits_per_weight or 0:.2f} bits/weight)<br>"
        f"{name.lower()} {value:.4g}<br>{'on the Pareto front' if on_front else 'dominated'}"
    )


def task_chart(results: list[Result], task: str):
    """A task's accuracy against weight memory, each point with its standard error as an error bar."""
    import plotly.graph_objects as go

    done = [r for r in _ok(results) if (r.tasks or {}).get(task) and r.weight_bytes]
    scores = [r.tasks[task] for r in done]
    metric = scores[0]["metric"] if scores else ""
    fig = go.Figure(
        go.Scatter(
            x=[r.weight_bytes / MB for r in done],
            y=[100 * s["value"] for s in scores],
            error_y={"type": "data", "array": [100 * (s["stderr"] or 0) for s in scores], "visible": True},
            mode="markers+text",
            text=[r.label for r in done],
            textposition="top center",
            marker={"size": 10, "color": "#1f77b4"},
        )
    )
    limit = scores[0]["limit"] if scores else None
    fig.update_layout(
        title=f"{task}: {metric} vs weight memory, bars ± 1 standard error (higher is better)"
        f"<br><sup>{done[0].model if done else ''} · {scores[0]['n'] if scores else 0} documents"
        f"{f' (limit {limit})' if limit else ''} · lm-evaluation-harness</sup>",
        xaxis_title="weight memory (MB of stored weights)",
        yaxis_title=f"{metric} (%)",
        template="plotly_white",
        height=440,
        showlegend=False,
    )
    return fig


def all_charts(results: list[Result], metric: str = "ppl") -> list:
    """The bar chart of each measured quantity, the trade-off of `metric` against weight memory,
    then each task's accuracy against weight memory."""
    measured_tasks = dict.fromkeys(task for r in _ok(results) for task in (r.tasks or {}))
    return (
        [bar_chart(results, *bar) for bar in BAR_METRICS]
        + [pareto_chart(results, metric)]
        + [task_chart(results, task) for task in measured_tasks]
    )


def write_report(results: list[Result], path: Path, left_out: list[str] = (), metric: str = "ppl") -> None:
    """A self-contained HTML report (plotly.js inlined once, so it opens offline); `metric` is
    what the trade-off chart puts against weight memory."""
    parts = []
    for i, fig in enumerate(all_charts(results, metric)):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in left_out)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Quantization Workbench report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} pre{{font-size:12px;overflow-x:auto}}</style></head>
<body><h1>Quantization Workbench: {html.escape(results[0].model if results else "")}</h1>
<pre>{html.escape(format_table(results))}</pre>
{f"<details><summary>What the methods chose (bits per layer)</summary><pre>{html.escape(format_details(results))}</pre></details>" if format_details(results) else ""}
{f"<h3>Not run here</h3><ul>{notes}</ul>" if notes else ""}
{"".join(parts)}</body></html>"""
    files.write_text(path, page)  # atomically: a failed write leaves the previous report whole
