"""The sensitivity map as a figure (blocks x linear kinds, with per-block and per-kind sums) and as text.

Pure: a plotly `go.Figure` from a `SensitivityMap`, nothing displayed or written.
"""

from __future__ import annotations

import math

from workbench.metrics.sensitivity import SensitivityMap

FIELDS = {"kl": "KL (nats/token)", "proxy": "relative output error"}


def heatmap(smap: SensitivityMap, field: str = "kl", log_color: bool = True):
    """Heatmap (y = block, x = kind) of `field`, a bar of per-block sums on the right and of
    per-kind sums below. `log_color` colours by log10: a few cells (the last blocks' MLP)
    dominate and would leave the rest one colour."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if field not in FIELDS:
        raise ValueError(f"field must be one of {', '.join(FIELDS)}")
    unit = FIELDS[field]
    values = smap.grid(field)
    shown = [[_log(v) if log_color else v for v in row] for row in values]
    blocks, kinds = smap.blocks, smap.kinds
    by_block, by_kind = smap.sums(field, "block"), smap.sums(field, "kind")
    fig = make_subplots(
        rows=2,
        cols=2,
        column_widths=[0.78, 0.22],
        row_heights=[0.8, 0.2],
        shared_yaxes=True,
        shared_xaxes=True,
        horizontal_spacing=0.03,
        vertical_spacing=0.04,
    )
    fig.add_trace(
        go.Heatmap(
            z=shown,
            x=kinds,
            y=blocks,
            customdata=values,
            colorscale="Viridis",
            colorbar={"title": f"log10 {unit}" if log_color else unit, "x": 0.76},
            hovertemplate="block %{y}, %{x}: %{customdata:.3g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=[by_block[b] for b in blocks],
            y=blocks,
            orientation="h",
            name="per block",
            hovertemplate="block %{y}: %{x:.3g}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Bar(x=kinds, y=[by_kind[k] for k in kinds], name="per kind", hovertemplate="%{x}: %{y:.3g}<extra></extra>"),
        row=2,
        col=1,
    )
    fig.update_yaxes(title_text="block", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text=f"sum, {unit}", row=1, col=2)
    fig.update_yaxes(title_text="sum", row=2, col=1)
    what = "end-to-end KL of the output" if field == "kl" else "proxy: layer output error on captured activations"
    fig.update_layout(
        title=f"Sensitivity of {smap.model} to {smap.method}, one {smap.unit} at a time: {what} ({unit}), "
        f"{smap.tokens} tokens of {smap.text}",
        showlegend=False,
        height=max(420, 18 * len(blocks) + 200),
    )
    return fig


def _log(value):
    """log10 of a positive value; None (a gap) for missing or non-positive cells."""
    return math.log10(value) if value is not None and value > 0 else None


TOP = 10
"""Cells the text report names."""


def report(smap, field: str = "kl") -> str:
    """The most sensitive cells, per-block and per-kind sums, timings, and the rank correlation."""
    unit = "nats/token" if field == "kl" else "relative error"
    ranked = sorted(smap.cells, key=lambda c: -(getattr(c, field) or 0))
    lines = [
        f"{smap.model}, {smap.method}, one {smap.unit} at a time, {smap.tokens} tokens of {smap.text} ({unit})",
        f"most sensitive {min(TOP, len(ranked))}:",
    ]
    lines += [f"  block {c.block:>3} {c.kind:<10} {getattr(c, field):.4g}" for c in ranked[:TOP]]
    by_block = smap.sums(field, "block")
    lines.append("per block: " + ", ".join(f"{b}: {v:.3g}" for b, v in by_block.items()))
    lines.append("per kind:  " + ", ".join(f"{k}: {v:.3g}" for k, v in smap.sums(field, "kind").items()))
    times = f"proxy {smap.proxy_s:.1f} s"
    if smap.end_to_end_s is not None:
        times += f", end-to-end {smap.end_to_end_s:.1f} s"
    lines.append(f"time: {times} ({len(smap.cells)} cells)")
    rho = smap.spearman()
    if rho is not None:
        lines.append(f"Spearman(proxy, end-to-end) = {rho:.3f}")
    return "\n".join(lines)
