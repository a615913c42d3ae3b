"""Results -> plotly figures (pure: no display, no files), and the HTML report.

Every axis carries its unit and every figure its protocol, so a chart cut out of the
report still says what was measured.
"""

from __future__ import annotations

import html
from pathlib import Path

from . import files
from .results import MB, Result, baseline_of, format_table

BAR_METRICS = (
    # (title, unit label, function of a result, lower is better)
    ("Perplexity", "perplexity (lower is better)", lambda r: r.ppl, True),
    ("Weight memory", "MB of stored weights", lambda r: r.weight_bytes / MB if r.weight_bytes else None, True),
    ("Peak memory", "MB peak above the worker's baseline",
     lambda r: r.peak_above_baseline_bytes / MB if r.peak_above_baseline_bytes else None, True),
    ("Decode speed", "tokens/s (greedy, batch 1)", lambda r: r.decode_tokens_per_s, False),
)


def _ok(results: list[Result]) -> list[Result]:
    return [r for r in results if r.error is None]


def _protocol_line(results: list[Result]) -> str:
    done = _ok(results)
    if not done:
        return ""
    p = done[0].protocol
    return f"{done[0].model} · {p.get('text')} · {p.get('n_tokens')} tokens · window {p.get('max_length')} / step {p.get('stride')} · {done[0].device}"


def bar_chart(results: list[Result], title: str, unit: str, value, lower_is_better: bool = True):
    import plotly.graph_objects as go

    done = [r for r in _ok(results) if value(r) is not None]
    base = baseline_of(results)
    colors = ["#7f7f7f" if r is base else "#1f77b4" for r in done]
    fig = go.Figure(go.Bar(x=[r.label for r in done], y=[value(r) for r in done], marker_color=colors,
                           text=[f"{value(r):.3g}" for r in done], textposition="outside"))
    better = "lower is better" if lower_is_better else "higher is better"
    fig.update_layout(title=f"{title} ({better})<br><sup>{_protocol_line(results)}</sup>", yaxis_title=unit,
                      xaxis_title="method", template="plotly_white", height=420)
    if title == "Perplexity" and done and max(value(r) for r in done) > 20 * min(value(r) for r in done):
        fig.update_yaxes(type="log")  # a collapsed method (int2) would flatten every other bar
    return fig


def ppl_vs_memory(results: list[Result]):
    """The trade-off in one picture: bottom-left is best."""
    import plotly.graph_objects as go

    done = [r for r in _ok(results) if r.ppl is not None and r.weight_bytes]
    fig = go.Figure(go.Scatter(x=[r.weight_bytes / MB for r in done], y=[r.ppl for r in done], mode="markers+text",
                               text=[r.label for r in done], textposition="top center", marker={"size": 12}))
    fig.update_layout(title=f"Perplexity vs weight memory (bottom-left is best)<br><sup>{_protocol_line(results)}</sup>",
                      xaxis_title="weight memory (MB)", yaxis_title="perplexity", template="plotly_white", height=460)
    if done and max(r.ppl for r in done) > 20 * min(r.ppl for r in done):
        fig.update_yaxes(type="log")
    return fig


def all_charts(results: list[Result]) -> list:
    return [bar_chart(results, *metric) for metric in BAR_METRICS] + [ppl_vs_memory(results)]


def write_report(results: list[Result], path: Path, left_out: list[str] = ()) -> None:
    """A self-contained HTML report (plotly.js inlined once, so it opens offline)."""
    parts = []
    for i, fig in enumerate(all_charts(results)):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in left_out)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Quantization Workbench report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} pre{{font-size:12px;overflow-x:auto}}</style></head>
<body><h1>Quantization Workbench: {html.escape(results[0].model if results else '')}</h1>
<pre>{html.escape(format_table(results))}</pre>
{f'<h3>Not run here</h3><ul>{notes}</ul>' if notes else ''}
{''.join(parts)}</body></html>"""
    files.write_text(path, page)  # atomically: a failed write leaves the previous report whole


def mimebundle(fig) -> dict:
    """Both representations of a figure; each frontend renders the richest it knows:
    JupyterLab the plotly mimetype (its bundled extension, works offline), Colab the HTML
    (plotly.js from the CDN, which Colab can reach)."""
    import json

    return {
        "application/vnd.plotly.v1+json": json.loads(fig.to_json()),
        "text/html": fig.to_html(full_html=False, include_plotlyjs="cdn"),
    }


def show(fig) -> None:
    """Display a figure in the cell's output (returns nothing: no stray repr under the chart).

    Not a FigureWidget (unreliable in Colab) and not `display` inside an Output widget
    after a click (Colab's "Plotly is not defined"): plain display data owned by the cell."""
    from IPython.display import display

    display(mimebundle(fig), raw=True)
