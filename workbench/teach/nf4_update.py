"""How small a trained LoRA update is next to the 4-bit grid of the base it sits on (notebook 04).

`update_vs_nf4`: for a trained adapter, dW = alpha/r * B A per target layer against the NF4 step
of the base under it: the distance between neighbouring NF4 levels times the block's absmax
(blocks of 64), and how many weights a re-quantization of W_q + dW rounds back to the code they
had. NF4 is rounded by hand (nearest of bitsandbytes' 16 levels, exact fp32 absmax); bnb-nf4's
double quantization of the absmax is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workbench.core.quiet import LIBRARY_LOG, library_output
from workbench.sources import models

NF4_BLOCK = 64
HALF_STEP = 0.5
"""An update smaller than half a step cannot move a weight that sits on a level to another code."""
RATIO_BINS = (-7.0, 1.0, 0.1)
"""log10(|dW| / step) histogram: from, to, bin width."""


def nf4_levels():
    """bitsandbytes' 16 NF4 values (relative to a block's absmax), ascending."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").float().sort().values


def _blocks(weight, block: int = NF4_BLOCK):
    """The flattened tensor as rows of `block` consecutive weights (bitsandbytes' layout; the last
    block padded with zeros, which change no absmax)."""
    import torch

    flat = weight.detach().float().flatten()
    return (
        torch.nn.functional.pad(flat, (0, -flat.numel() % block)).reshape(-1, block)
        if flat.numel() % block
        else flat.reshape(-1, block)
    )


def _round_blocks(blocks, levels):
    """(codes, absmax per block) of round-to-nearest NF4, blocks as rows."""
    import torch

    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.bucketize(blocks / absmax, (levels[1:] + levels[:-1]) / 2), absmax


def nf4_round(weight, levels, block: int = NF4_BLOCK):
    """(codes, absmax per weight) of round-to-nearest NF4 over consecutive blocks of `block`
    weights of the flattened tensor."""
    codes, absmax = _round_blocks(_blocks(weight, block), levels)
    return codes.flatten()[: weight.numel()], absmax.expand(-1, block).flatten()[: weight.numel()]


def adapter_deltas(adapter_dir) -> dict[str, object]:
    """alpha/r * B A per adapted layer, by the base model's module name, from a saved adapter folder."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    settings = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    scale = settings["lora_alpha"] / settings["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            layer = key.removesuffix(".lora_A.weight")
            deltas[layer.removeprefix("base_model.model.")] = scale * (
                tensors[layer + ".lora_B.weight"].float() @ a.float()
            )
    return deltas


@dataclass(frozen=True)
class LayerUpdate:
    module: str
    """Short name (q_proj, ...), over every block that has it."""
    weights: int
    median_of_absmax: float
    """Median |dW| / its block's absmax."""
    median_of_step: float
    """Median |dW| / NF4 step."""
    below_half_step: float
    """Share of weights with |dW| < half a step."""
    same_code: float
    """Share of weights whose code in NF4(W_q + dW) equals their code in W_q (absmax recomputed)."""
    moved: int
    """How many weights re-rounding moves to another code: all a merge in 4 bits keeps of the update."""


@dataclass(frozen=True)
class UpdateStudy:
    layers: tuple[LayerUpdate, ...]
    weights: int
    below_half_step: float
    same_code: float
    moved: int
    step_range: tuple[float, float]
    """Smallest and largest gap between neighbouring NF4 levels, as a share of the block's absmax."""
    bin_edges: tuple[float, ...]
    """log10(|dW| / step) bin edges; updates of exactly 0 are counted in `zero`."""
    counts: tuple[int, ...]
    zero: int
    adapted: int
    """How many weight matrices the adapter changes."""


@dataclass(frozen=True)
class NF4Grid:
    """Per code: its level, the gaps to the levels above and below (an end level's only gap on
    both sides), and the edges of the values that round to it (`torch.bucketize`: lower < x <= upper)."""

    levels: object
    up: object
    down: object
    lower: object
    upper: object

    @classmethod
    def of(cls, levels) -> "NF4Grid":
        import torch

        gaps, middles, infinity = (
            levels[1:] - levels[:-1],
            (levels[1:] + levels[:-1]) / 2,
            torch.tensor([float("inf")]),
        )
        return cls(
            levels,
            torch.cat([gaps, gaps[-1:]]),
            torch.cat([gaps[:1], gaps]),
            torch.cat([-infinity, middles]),
            torch.cat([middles, infinity]),
        )


def _update_of(weight, delta, grid: NF4Grid):
    """(|dW| / absmax, |dW| / step, keeps its code) for every weight of one layer (block order)."""
    import torch

    size = weight.numel()
    blocks, change = _blocks(weight), _blocks(delta)
    codes, absmax = _round_blocks(blocks, grid.levels)
    moved = torch.take(grid.levels, codes) * absmax + change  # W_q + dW
    again = moved / moved.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    kept = (again > torch.take(grid.lower, codes)) & (again <= torch.take(grid.upper, codes))  # rounds to the same code
    step = (
        torch.where(change < 0, torch.take(grid.down, codes), torch.take(grid.up, codes)) * absmax
    )  # towards where dW pushes
    size_of = change.abs()
    return ((size_of / absmax).flatten()[:size], (size_of / step).flatten()[:size], kept.flatten()[:size])


def update_vs_nf4_of(base_model, adapter_dir) -> UpdateStudy:
    """How the update of a saved adapter compares with the NF4 grid of `base_model`'s weights."""
    import numpy as np
    import torch

    levels = nf4_levels()
    grid = NF4Grid.of(levels)
    low, high, width = RATIO_BINS
    bins = round((high - low) / width)
    counts, zero, by_module = np.zeros(bins, dtype=np.int64), 0, {}
    with torch.no_grad():
        for name, delta in adapter_deltas(adapter_dir).items():
            of_absmax, of_step, same = _update_of(base_model.get_submodule(name).weight, delta, grid)
            positive = of_step[of_step > 0]
            zero += of_step.numel() - positive.numel()
            counts += torch.histc(positive.log10().clamp(low, high), bins=bins, min=low, max=high).long().numpy()
            by_module.setdefault(name.rsplit(".", 1)[-1], []).append((of_absmax, of_step, same))
        rows = []
        for module, parts in sorted(by_module.items()):
            of_absmax, of_step, same = (torch.cat([p[i] for p in parts]) for i in range(3))
            rows.append(
                LayerUpdate(
                    module,
                    of_step.numel(),
                    of_absmax.median().item(),
                    of_step.median().item(),
                    (of_step < HALF_STEP).double().mean().item(),
                    same.double().mean().item(),
                    int((~same).sum()),
                )
            )
    total = sum(r.weights for r in rows)
    gaps = levels[1:] - levels[:-1]
    return UpdateStudy(
        tuple(rows),
        total,
        sum(r.below_half_step * r.weights for r in rows) / total,
        sum(r.same_code * r.weights for r in rows) / total,
        sum(r.moved for r in rows),
        (gaps.min().item(), gaps.max().item()),
        tuple(low + i * width for i in range(bins + 1)),
        tuple(counts.tolist()),
        zero,
        sum(len(p) for p in by_module.values()),
    )


def update_vs_nf4(source, adapter_dir) -> UpdateStudy:
    """`update_vs_nf4_of` on the full-precision weights of the model the adapter was trained on."""
    import torch

    with library_output(LIBRARY_LOG):
        base = models.load_model(source, "cpu", dtype=torch.float32)
    return update_vs_nf4_of(base, adapter_dir)


def update_table(study: UpdateStudy) -> list[dict]:
    rows = [
        {
            "layer": r.module,
            "weights": f"{r.weights:,}",
            "median |dW| / block absmax": f"{100 * r.median_of_absmax:.4f} %",
            "median |dW| / NF4 step": f"{r.median_of_step:.4f}",
            "|dW| < half a step": f"{100 * r.below_half_step:.3f} %",
            "same 4-bit code after re-rounding": f"{100 * r.same_code:.3f} %",
            "moved to another code": f"{r.moved:,}",
        }
        for r in study.layers
    ]
    rows.append(
        {
            "layer": f"all {study.adapted} matrices",
            "weights": f"{study.weights:,}",
            "median |dW| / block absmax": "",
            "median |dW| / NF4 step": "",
            "|dW| < half a step": f"{100 * study.below_half_step:.3f} %",
            "same 4-bit code after re-rounding": f"{100 * study.same_code:.3f} %",
            "moved to another code": f"{study.moved:,}",
        }
    )
    return rows


def update_figure(study: UpdateStudy, label: str = ""):
    """Histogram of |dW| / NF4 step on a log axis, with the half-step line."""
    import plotly.graph_objects as go

    edges = study.bin_edges
    centres = [10 ** ((a + b) / 2) for a, b in zip(edges[:-1], edges[1:])]
    widths = [10**b - 10**a for a, b in zip(edges[:-1], edges[1:])]
    fig = go.Figure(go.Bar(x=centres, y=study.counts, width=widths, marker_color="#1f77b4", name="weights"))
    fig.add_vline(
        x=HALF_STEP,
        line_dash="dash",
        line_color="#d62728",
        annotation_text=f"half a step: {100 * study.below_half_step:.3f} % of weights are below",
        annotation_position="top left",
    )
    zero = f"; {study.zero:,} updates exactly 0 not drawn" if study.zero else ""
    fig.update_xaxes(type="log", title_text="|dW| / NF4 step of the weight (log scale)", exponentformat="power")
    fig.update_yaxes(title_text="weights (count)")
    fig.update_layout(
        title=(
            f"How far the trained update moves each weight, in NF4 steps<br><sup>{label + ': ' if label else ''}"
            f"{study.weights:,} weights of {study.adapted} adapted matrices; step = gap to the neighbouring NF4 level x block "
            f"absmax (blocks of {NF4_BLOCK}){zero}</sup>"
        ),
        template="plotly_white",
        height=440,
        width=900,
        bargap=0,
        showlegend=False,
    )
    return fig
