"""GPTQ by hand, for the basics notebook: one layer's inputs, its Hessian, the column-by-column
quantization with error feedback (Frantar et al.), against round-to-nearest, and the figures of
both. The workbench's `gptq` method calls gptqmodel instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.teach import _layer_name, absmax_quantize, layer_inputs
from workbench.teach.charts import _layout


def hessian(inputs):
    """H = 2 X X^T: the curvature of the layer-output error ||(W - Q) X||^2 in each row of W."""
    return 2 * inputs @ inputs.T


@dataclass(frozen=True)
class GptqStep:
    """One column of the pass: what was rounded, and what the others received for it."""

    column: int
    before: object
    """The column as the earlier steps left it (what gets quantized)."""
    quantized: object
    error: object
    """before - quantized: the rounding error of this column."""
    update: object
    """What was added to the columns after this one (rows x remaining columns)."""


@dataclass(frozen=True)
class GptqResult:
    restored: object
    step: GptqStep | None


def gptq_quantize(
    weight, hess, bits: int = 4, group: int | None = 64, damp: float = 0.01, record: int | None = None
) -> GptqResult:
    """GPTQ (Frantar et al. 2022, Algorithm 1), absmax codes as in `absmax_quantize`: one scale
    per row (`group=None`), or per group of `group` columns taken from the weights as the pass
    reaches that group.

    Columns are quantized left to right. With U the upper Cholesky factor of H^-1 (H damped by
    `damp` x its mean diagonal), column i's rounding error divided by U[i, i] is spread onto
    the later columns along U[i, i+1:]: the optimal (OBS) correction given the inputs' curvature.
    As in the paper, the columns after the current batch of 128 receive the batch's corrections
    at once (the same sums, one matrix product). `record` keeps one column's step for a figure."""
    import torch

    w = weight.detach().clone()
    h = hess.detach().clone().to(w.dtype)
    dead = torch.diag(h) == 0  # a feature that is always 0: its weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    top = 2 ** (bits - 1) - 1
    batch = group * max(1, 128 // group) if group else 128  # a group never straddles two batches
    restored = torch.zeros_like(w)
    scale = top / w.abs().amax(dim=1).clamp_min(1e-12)
    step = None
    for start in range(0, w.shape[1], batch):
        end = min(start + batch, w.shape[1])
        spread = torch.zeros(w.shape[0], end - start, dtype=w.dtype)
        for i in range(start, end):
            if group is not None and i % group == 0:
                scale = top / w[:, i : i + group].abs().amax(dim=1).clamp_min(1e-12)
            column = w[:, i].clone()
            restored[:, i] = torch.round(column * scale).clamp(-top, top) / scale
            error = column - restored[:, i]
            spread[:, i - start] = error / u[i, i]
            w[:, i + 1 : end] -= torch.outer(spread[:, i - start], u[i, i + 1 : end])
            if record == i:
                step = GptqStep(
                    i, column, restored[:, i].clone(), error, -torch.outer(spread[:, i - start], u[i, i + 1 :])
                )
        w[:, end:] -= spread @ u[start:end, end:]
    return GptqResult(restored, step)


def output_error(weight, restored, inputs) -> dict:
    """||(W - Q) X|| per output feature (row of W), and for the whole layer relative to ||W X||."""
    difference = (restored - weight) @ inputs
    return {"per_feature": difference.norm(dim=1), "relative": (difference.norm() / (weight @ inputs).norm()).item()}


def gptq_vs_rtn(
    model,
    tokenizer,
    layer: int = -3,
    tokens: int = 1024,
    bits: int = 4,
    group: int = 64,
    damp: float = 0.1,
    record: int = 0,
) -> dict:
    """One layer quantized by round-to-nearest and by GPTQ (calibrated on `tokens` tokens of the
    bundled calibration text), each scored on those tokens and on as many held-out evaluation tokens."""
    from workbench.sources import data

    block = 256
    calibration = layer_inputs(model, layer, data.calibration_blocks(tokenizer, max(1, tokens // block), block))
    eval_ids = tokenizer(data.builtin_eval_text().text[: tokens * 8], add_special_tokens=False)["input_ids"]
    held_out = layer_inputs(
        model, layer, [eval_ids[i : i + block] for i in range(0, max(1, tokens // block) * block, block)]
    )
    weight = model.model.layers[layer].mlp.down_proj.weight.detach().float()
    rtn = absmax_quantize(weight, bits, group).restored
    gptq = gptq_quantize(weight, hessian(calibration), bits, group, damp, record)
    return {
        "layer": _layer_name(model, layer),
        "bits": bits,
        "group": group,
        "tokens": calibration.shape[1],
        "damp": damp,
        "weight": weight,
        "step": gptq.step,
        "rtn": {"calibration": output_error(weight, rtn, calibration), "held out": output_error(weight, rtn, held_out)},
        "gptq": {
            "calibration": output_error(weight, gptq.restored, calibration),
            "held out": output_error(weight, gptq.restored, held_out),
        },
    }


def gptq_table(study: dict) -> list[dict]:
    tokens = study["tokens"]
    return [
        {
            "method": name.upper(),
            f"relative output error, {tokens} calibration tokens": f"{study[name]['calibration']['relative']:.4f}",
            f"relative output error, {tokens} held-out tokens": f"{study[name]['held out']['relative']:.4f}",
        }
        for name in ("rtn", "gptq")
    ]


def gptq_error_figure(study: dict):
    """Output error per output feature of the layer, RTN against GPTQ, on held-out tokens."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, color in (("rtn", "#ff7f0e"), ("gptq", "#1f77b4")):
        errors = study[name]["held out"]["per_feature"].numpy()
        fig.add_trace(
            go.Scatter(
                y=errors,
                mode="lines",
                line={"width": 1, "color": color},
                name=f"{name.upper()} (whole layer: {study[name]['held out']['relative']:.3f} relative)",
            )
        )
    _layout(
        fig,
        f"Layer-output error per output feature: RTN vs GPTQ ({study['bits']} bits, groups of {study['group']})",
        f"||(W - Q) X|| per row of W, X = inputs of {study['layer']} on {study['tokens']} held-out tokens; "
        f"GPTQ calibrated on {study['tokens']} other tokens",
        420,
        xaxis={"title": "output feature (row of W)"},
        yaxis={"title": "||(W - Q) X|| (activation units)"},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def gptq_step_figure(study: dict, rows: int = 48, columns: int = 63):
    """One GPTQ step on the real layer: the column, its rounding, and the correction the next
    columns receive (first `rows` rows)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    step = study["step"]
    fig = make_subplots(
        rows=1,
        cols=3,
        column_widths=[0.3, 0.2, 0.5],
        horizontal_spacing=0.06,
        subplot_titles=[
            f"column {step.column}: before and after rounding",
            "rounding error",
            f"update added to columns {step.column + 1}-{step.column + columns}",
        ],
    )
    y = list(range(rows))
    fig.add_trace(
        go.Scatter(x=step.before[:rows].numpy(), y=y, mode="markers", name="weight", marker={"color": "#1f77b4"}),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=step.quantized[:rows].numpy(),
            y=y,
            mode="markers",
            name="quantized",
            marker={"color": "#d62728", "symbol": "x-thin-open", "line": {"width": 2}},
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(x=step.error[:rows].numpy(), y=y, orientation="h", marker_color="#7f7f7f", name="error"), row=1, col=2
    )
    update = step.update[:rows, :columns]
    limit = update.abs().max().item()
    fig.add_trace(
        go.Heatmap(
            z=update.numpy(),
            x=list(range(step.column + 1, step.column + 1 + columns)),
            y=y,
            zmin=-limit,
            zmax=limit,
            colorscale="RdBu",
            colorbar={"title": {"text": "added"}, "thickness": 10},
        ),
        row=1,
        col=3,
    )
    fig.update_yaxes(autorange="reversed", title_text="row of W (output feature)", row=1, col=1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(title_text="weight", row=1, col=1)
    fig.update_xaxes(title_text="weight - quantized", row=1, col=2)
    fig.update_xaxes(title_text="column of W", row=1, col=3)
    _layout(
        fig,
        f"One GPTQ step: quantize column {step.column}, spread its error onto the later columns",
        f"{study['layer']}, first {rows} rows; update = -(error / U[i,i]) x U[i, i+1:], U = Cholesky factor of H^-1",
        480,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
