"""LoRA by the numbers, for notebook 03: the shapes LoRA trains on a real model.

`lora_plan`: per target layer W (d x k), A (r x k), B (d x r) from the model's own layers, and
the trainable vs frozen parameter counts (what PEFT reports), with a figure. How small a trained
update is next to the 4-bit grid of its base is `teach.nf4_update` (notebook 04).
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.core.quiet import LIBRARY_LOG, library_output
from workbench.finetune import FinetuneConfig, block_linear_names
from workbench.sources import models

# ---------------------------------------------------------------------------- the shapes LoRA trains


@dataclass(frozen=True)
class LoraLayer:
    module: str
    """Short name (q_proj, down_proj, ...)."""
    d: int
    """Output width: rows of W and B."""
    k: int
    """Input width: columns of W and A."""
    layers: int
    """How many blocks have this layer."""


@dataclass(frozen=True)
class LoraPlan:
    model: str
    r: int
    alpha: int
    layers: tuple[LoraLayer, ...]
    trainable: int
    """r (d + k) summed over every adapted layer: the LoRA matrices."""
    frozen: int
    """Every parameter of the base model (embeddings included), counted once."""


def lora_plan_of(model, config: FinetuneConfig, label: str = "") -> LoraPlan:
    """The LoRA layout `attach_lora` would build on `model` (a real or an empty meta-device model)."""
    targets = set(config.target_modules or block_linear_names(model))
    found: dict[str, list] = {}
    for name, layer in models.block_linears(model):
        short = name.rsplit(".", 1)[-1]
        if short in targets:
            found.setdefault(short, []).append((layer.out_features, layer.in_features))
    rows = tuple(LoraLayer(short, *shapes[0], len(shapes)) for short, shapes in sorted(found.items()))
    trainable = sum(config.r * (d + k) for shapes in found.values() for d, k in shapes)
    frozen = sum(p.numel() for p in model.parameters())
    return LoraPlan(label or type(model).__name__, config.r, config.alpha, rows, trainable, frozen)


def lora_plan(spec, config: FinetuneConfig) -> LoraPlan:
    """`lora_plan_of` for the model a ModelPicker's spec names, from its config alone (no weights loaded)."""
    with library_output(LIBRARY_LOG):
        source = models.resolve(spec.name, spec.token, lambda _: None, trust_remote_code=spec.trust_remote_code)
        empty = models.empty_model(source)
    empty.tie_weights()  # built on the meta device, a tied output head is a second matrix until tied
    return lora_plan_of(empty, config, source.label)


def lora_table(plan: LoraPlan) -> list[dict]:
    rows = [
        {
            "layer": f.module,
            "W (d x k)": f"{f.d} x {f.k}",
            "A (r x k)": f"{plan.r} x {f.k}",
            "B (d x r)": f"{f.d} x {plan.r}",
            "in blocks": f.layers,
            "frozen W weights": f"{f.d * f.k:,}",
            "LoRA weights r(d+k)": f"{plan.r * (f.d + f.k):,}",
            "LoRA / W": f"{100 * plan.r * (f.d + f.k) / (f.d * f.k):.2f} %",
        }
        for f in plan.layers
    ]
    rows.append(
        {
            "layer": "whole model",
            "W (d x k)": "",
            "A (r x k)": "",
            "B (d x r)": "",
            "in blocks": "",
            "frozen W weights": f"{plan.frozen:,} (all base parameters)",
            "LoRA weights r(d+k)": f"{plan.trainable:,}",
            "LoRA / W": f"{100 * plan.trainable / plan.frozen:.2f} %",
        }
    )
    return rows


def lora_figure(plan: LoraPlan, module: str | None = None):
    """W, B and A of one target layer as rectangles (width = columns, height = rows); the rank r
    is drawn at least 4 % of the largest side so it stays visible, and the figure says so."""
    import plotly.graph_objects as go

    layer = next((f for f in plan.layers if f.module == module), None) or max(plan.layers, key=lambda f: f.d * f.k)
    side = max(layer.d, layer.k)
    r_drawn, gap = max(plan.r, 0.04 * side), 0.16 * side
    boxes = (  # name, x0, width, height (top-aligned at y = 0), colour, text
        (
            "W",
            0,
            layer.k,
            layer.d,
            "#9e9e9e",
            f"W  {layer.d} x {layer.k}<br>frozen (4-bit in QLoRA)<br>{layer.d * layer.k:,} weights",
        ),
        ("B", layer.k + 2 * gap, r_drawn, layer.d, "#1f77b4", f"B  {layer.d} x {plan.r}<br>trainable, starts at 0"),
        (
            "A",
            layer.k + 2 * gap + r_drawn + 0.5 * gap,
            layer.k,
            r_drawn,
            "#ff7f0e",
            f"A  {plan.r} x {layer.k}<br>trainable, starts random",
        ),
    )
    fig = go.Figure()
    for name, x0, width, height, colour, text in boxes:
        fig.add_shape(
            type="rect", x0=x0, x1=x0 + width, y0=-height, y1=0, fillcolor=colour, opacity=0.55, line={"color": colour}
        )
        fig.add_annotation(
            x=x0 + width / 2,
            y=-height - 0.03 * side if name != "W" else -height / 2,
            text=text,
            showarrow=False,
            yanchor="top" if name != "W" else "middle",
            font={"size": 12},
        )
    fig.add_annotation(
        x=layer.k + gap, y=-layer.d / 2, text=f"+ {plan.alpha}/{plan.r} x", showarrow=False, font={"size": 16}
    )
    fig.update_xaxes(
        title_text="width: columns (k inputs, or r)",
        showticklabels=False,
        showgrid=False,
        zeroline=False,
        range=[-0.05 * side, boxes[2][1] + layer.k + 0.05 * side],
    )
    fig.update_yaxes(
        title_text="height: rows (d outputs, or r)",
        range=[-layer.d - 0.25 * side, 0.05 * side],
        scaleanchor="x",
        showticklabels=False,
        showgrid=False,
        zeroline=False,
    )
    fig.update_layout(
        title=(
            f"LoRA on {layer.module} of {plan.model}: W x + (alpha/r) B A x, r = {plan.r}, alpha = {plan.alpha}<br>"
            f"<sup>shapes from the model's layers; {layer.layers} blocks x {len(plan.layers)} target layer types: LoRA trains "
            f"{plan.trainable:,} parameters next to {plan.frozen:,} frozen ({100 * plan.trainable / plan.frozen:.2f} %); "
            f"r drawn at least 4 % of the largest side</sup>"
        ),
        template="plotly_white",
        height=520,
        width=900,
        showlegend=False,
    )
    return fig
