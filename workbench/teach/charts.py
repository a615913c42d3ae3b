"""The basics notebook's figures (plotly), each drawn from what `teach` computed on the
learner's model. Pure figure builders: nothing is displayed here (the interactive explorer is
`teach.explorer`; GPTQ's figures are in `teach.gptq`).
"""

from __future__ import annotations

import math

FIELD_COLORS = {"sign": "#d62728", "exponent": "#1f77b4", "mantissa": "#2ca02c", "value": "#9467bd"}
WIDTH = 900


def _layout(fig, title: str, subtitle: str, height: int, **axes) -> None:
    fig.update_layout(
        title=f"{title}<br><sup>{subtitle}</sup>",
        template="plotly_white",
        height=height,
        width=WIDTH,
        margin={"t": 90},
        **axes,
    )


def bit_layout_figure(fields: dict[str, list[tuple[str, int]]]):
    """One bar per format, one segment per field, as wide as its bits."""
    import plotly.graph_objects as go

    fig = go.Figure()
    names = list(fields)[::-1]  # fp32 on top
    seen = set()
    for name in names:
        start = 0
        for field, bits in fields[name]:
            kind = field.split()[0]
            fig.add_trace(
                go.Bar(
                    y=[name],
                    x=[bits],
                    base=start,
                    orientation="h",
                    name=kind,
                    legendgroup=kind,
                    showlegend=kind not in seen,
                    marker={"color": FIELD_COLORS[kind], "line": {"color": "white", "width": 1}},
                    text=f"{field} · {bits}",
                    textposition="inside",
                    insidetextanchor="middle",
                    hovertemplate=f"{name} {field}: {bits} bits<extra></extra>",
                )
            )
            seen.add(kind)
            start += bits
    _layout(
        fig,
        "Bit layouts: what each stored bit is for",
        "fields from torch.finfo / torch.iinfo (mantissa bits = -log2(eps))",
        330,
        barmode="overlay",
        xaxis={"title": "bit (most significant on the left)", "dtick": 4, "range": [0, 32]},
        yaxis={"title": "format"},
        legend={"orientation": "h", "y": -0.3},
    )
    return fig


def number_line_figure(example: dict):
    """Each scheme as two number lines: the weights (float) above, their int8 codes below,
    a line from every weight to its code; x marks the dequantized values."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    values = example["values"].tolist()
    schemes = [("absmax", example["absmax"]), ("zero-point", example["zeropoint"])]
    titles = []
    for label, trip in schemes:
        titles += [
            f"{label}: weight values (scale {float(trip.scale):.1f} codes per weight unit)",
            f"{label}: int8 codes (0.0 becomes code {int(trip.zero_point)})",
        ]
    fig = make_subplots(rows=4, cols=1, subplot_titles=titles, vertical_spacing=0.12)
    for s, (label, trip) in enumerate(schemes):
        top, bottom = 2 * s + 1, 2 * s + 2
        if label == "absmax":
            edge = max(abs(v) for v in values)
            weight_range = [-edge * 1.08, edge * 1.08]
        else:
            span = max(values) - min(values)
            weight_range = [min(values) - 0.08 * span, max(values) + 0.08 * span]
        code_range = [-136, 135]
        fig.add_trace(
            go.Scatter(
                x=values,
                y=[0] * len(values),
                mode="markers",
                name="weight",
                showlegend=s == 0,
                marker={"size": 10, "color": "#1f77b4"},
            ),
            row=top,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=trip.restored.tolist(),
                y=[0] * len(values),
                mode="markers",
                name="dequantized",
                showlegend=s == 0,
                marker={"size": 12, "symbol": "x-thin-open", "color": "#d62728", "line": {"width": 2}},
            ),
            row=top,
            col=1,
        )
        codes = trip.quantized.tolist()
        fig.add_trace(
            go.Scatter(
                x=codes,
                y=[0] * len(codes),
                mode="markers",
                name="int8 code",
                showlegend=s == 0,
                marker={"size": 10, "color": "#ff7f0e", "symbol": "square"},
            ),
            row=bottom,
            col=1,
        )
        for row, axis_range in ((top, weight_range), (bottom, code_range)):
            fig.update_xaxes(range=axis_range, row=row, col=1, zeroline=False)
            fig.update_yaxes(visible=False, range=[-1, 1], row=row, col=1)
        fig.add_vline(x=0, line_dash="dot", line_color="#888", row=top, col=1)
        fig.add_vline(x=float(trip.zero_point), line_dash="dot", line_color="#888", row=bottom, col=1)
        for edge in (-128 if label == "zero-point" else -127, 127):
            fig.add_vline(x=edge, line_color="#bbb", row=bottom, col=1)
        top_axis, bottom_axis = (fig.layout[f"yaxis{top}"].domain, fig.layout[f"yaxis{bottom}"].domain)
        for value, code in zip(values, codes):
            fig.add_shape(
                type="line",
                xref="paper",
                yref="paper",
                line={"color": "#aaa", "width": 1},
                x0=(value - weight_range[0]) / (weight_range[1] - weight_range[0]),
                y0=sum(top_axis) / 2,
                x1=(code - code_range[0]) / (code_range[1] - code_range[0]),
                y1=sum(bottom_axis) / 2,
            )
    _layout(
        fig,
        f"{len(values)} real weights mapped to int8, two ways",
        f"{example['where']} of the layer; dotted: where 0.0 sits",
        720,
        legend={"orientation": "h", "y": -0.08},
    )
    return fig


def granularity_heatmaps(study: dict):
    """Rows: one scale per tensor / row / group. Columns: weight, codes, dequantized, error
    (each column on one colour scale, so the rows compare)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    weight = study["weight"]
    trips = study["trips"]
    columns = ["weight", f"{study['bits']}-bit codes", "dequantized", "error (dequantized - weight)"]
    fig = make_subplots(
        rows=len(trips),
        cols=4,
        horizontal_spacing=0.03,
        vertical_spacing=0.08,
        column_titles=columns,
        row_titles=[t.name.split("per ")[-1] for t in trips],
    )
    edge = weight.abs().max().item()
    error_edge = max(t.error(weight).abs().max().item() for t in trips)
    top = 2 ** (study["bits"] - 1) - 1
    scales = [(edge, "RdBu", "weight"), (top, "PuOr", "code"), (edge, "RdBu", "weight"), (error_edge, "PiYG", "error")]
    for r, trip in enumerate(trips, start=1):
        for c, matrix in enumerate((weight, trip.quantized.float(), trip.restored, trip.error(weight)), start=1):
            limit, colors, unit = scales[c - 1]
            fig.add_trace(
                go.Heatmap(
                    z=matrix.numpy(),
                    zmin=-limit,
                    zmax=limit,
                    colorscale=colors,
                    showscale=r == 1 and c in (2, 3, 4),
                    colorbar={
                        "orientation": "h",
                        "len": 0.22,
                        "x": 0.125 + 0.25 * (c - 1) + (0.0 if c > 1 else 0),
                        "y": -0.12,
                        "thickness": 10,
                        "title": {"text": unit, "side": "top"},
                    },
                    hovertemplate=f"row %{{y}}, column %{{x}}: %{{z:.4f}}<extra>{columns[c - 1]}</extra>",
                ),
                row=r,
                col=c,
            )
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    mean_errors = " · ".join(f"{t.name.split('per ')[-1]} {t.mean_abs_error(weight):.2e}" for t in trips)
    _layout(
        fig,
        f"One scale per tensor, per row, per group ({study['bits']} bits, absmax)",
        f"crop of {weight.shape[0]} rows x {weight.shape[1]} columns of the layer · mean |error|: {mean_errors}",
        640,
    )
    return fig


def _label_tiers(levels: list[float], min_gap: float) -> list[int]:
    """A text row for each level's label (0 nearest the marker) so that no two labels in the
    same row are closer than `min_gap`."""
    last: list[float] = []
    tiers = []
    for x in levels:
        tier = next((i for i, end in enumerate(last) if x - end >= min_gap), len(last))
        if tier == len(last):
            last.append(x)
        last[tier] = x
        tiers.append(tier)
    return tiers


def levels_figure(levels: dict[str, list[float]], errors: list[dict], normalized, block: int = 64):
    """The block-normalized weights on top; below, one row per 4-bit grid with its levels
    labelled and its error on this matrix."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.35, 0.65], vertical_spacing=0.04)
    fig.add_trace(
        go.Histogram(x=normalized.numpy(), nbinsx=200, marker_color="#bbb", name="weights / block absmax"), row=1, col=1
    )
    error_of = {row["grid"]: row for row in errors}
    names = list(levels)
    for i, name in enumerate(names):
        distinct = sorted(set(levels[name]))
        y = 3.0 * (len(names) - 1 - i)
        fig.add_trace(
            go.Scatter(
                x=distinct,
                y=[y] * len(distinct),
                mode="markers",
                name=name,
                showlegend=False,
                marker={"size": 11, "symbol": "line-ns-open", "line": {"width": 2}},
            ),
            row=2,
            col=1,
        )
        for x, tier in zip(distinct, _label_tiers(distinct, min_gap=0.11)):
            fig.add_annotation(
                x=x,
                y=y - 0.45 - 0.55 * tier,
                text=f"{x:.2f}" if x == 0 or abs(x) >= 0.01 else f"{x:.4f}",
                showarrow=False,
                font={"size": 9},
                row=2,
                col=1,
            )
        fig.add_annotation(
            x=-1.02,
            y=y + 0.5,
            xanchor="left",
            showarrow=False,
            row=2,
            col=1,
            font={"size": 12},
            text=f"<b>{name}</b>: {len(distinct)} levels · mean |error| {error_of[name]['mean |error|']:.2e}",
        )
    fig.update_yaxes(visible=False, row=2, col=1, range=[-2.3, 3.0 * len(names) - 1.8])
    fig.update_yaxes(title_text="weights", row=1, col=1)
    fig.update_xaxes(
        title_text="weight / absmax of its block of 64 (-1 to 1)", row=2, col=1, range=[-1.05, 1.05], dtick=0.25
    )
    _layout(
        fig,
        "Where 4-bit codes land: NF4, FP4 and int4 levels",
        f"histogram: every weight of the layer divided by its block's absmax (blocks of {block}); errors on this matrix",
        620,
        showlegend=False,
    )
    return fig


def outliers_figure(stats: dict):
    """Every feature's largest |activation|, sorted, log axis; outliers in another colour."""
    import plotly.graph_objects as go

    peaks = stats["peaks"].sort(descending=True).values.numpy()
    over = peaks > stats["threshold"]
    fig = go.Figure(
        go.Bar(
            x=list(range(1, len(peaks) + 1)),
            y=peaks,
            marker_color=["#d62728" if o else "#1f77b4" for o in over],
            marker_line_width=0,
            hovertemplate="rank %{x}: %{y:.2f}<extra></extra>",
        )
    )
    fig.add_hline(y=stats["threshold"], line_dash="dash", line_color="#333")
    fig.add_annotation(
        x=1,
        xref="paper",
        xanchor="right",
        y=math.log10(stats["threshold"]),
        yanchor="bottom",
        showarrow=False,
        text=f"LLM.int8() threshold {stats['threshold']:g}",
    )  # on a log axis, y is log10 of the value
    _layout(
        fig,
        f"{stats['outliers']} of {stats['features']} features exceed {stats['threshold']:g} (red)",
        f"max |activation| per input feature of {stats['layer']} over {stats['tokens']} evaluation tokens",
        420,
        xaxis={"title": "feature, ranked by its largest |activation|"},
        yaxis={"title": "max |activation| (log scale)", "type": "log"},
        bargap=0,
    )
    return fig


def error_histogram(weight, trips: list):
    """Distribution of the rounding error of each scheme, on one figure."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for trip in trips:
        fig.add_trace(
            go.Histogram(x=trip.error(weight).flatten().numpy()[:200_000], name=trip.name, opacity=0.6, nbinsx=120)
        )
    _layout(
        fig,
        "Rounding error per weight (dequantized - original)",
        f"all {weight.numel():,} weights of the layer",
        420,
        barmode="overlay",
        xaxis={"title": "error (weight units)"},
        yaxis={"title": "number of weights"},
    )
    return fig
