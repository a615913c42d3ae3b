"""Quantization by hand, for the basics notebook: number formats, absmax and zero-point
int8 on a real weight matrix, rounding errors, NF4 levels and activation outliers.

These are the textbook formulas (Dettmers et al., LLM.int8 and QLoRA; Maarten
Grootendorst's introduction in shared/reference), written out so a learner can see each
step; the workbench's methods call the real libraries instead.
"""

from __future__ import annotations

from dataclasses import dataclass


def number_formats() -> list[dict]:
    """Range and precision of the formats a model can be stored in."""
    import torch

    rows = []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        info = torch.finfo(dtype)
        rows.append({"format": name, "bits": info.bits, "largest": f"{info.max:.3g}", "smallest normal": f"{info.tiny:.3g}",
                     "step near 1 (eps)": f"{info.eps:.3g}"})
    info = torch.iinfo(torch.int8)
    rows.append({"format": "int8", "bits": 8, "largest": str(info.max), "smallest normal": "1 (integers)", "step near 1 (eps)": "1"})
    rows.append({"format": "nf4 / fp4", "bits": 4, "largest": "1 x block scale", "smallest normal": "16 levels", "step near 1 (eps)": "~0.28 (nf4)"})
    return rows


@dataclass(frozen=True)
class RoundTrip:
    """A weight matrix quantized and dequantized again, with the error that leaves."""

    name: str
    quantized: object
    """The int8 codes, shape of the weight."""
    restored: object
    """Dequantized back to float: what the model computes with."""

    def error(self, weight):
        return self.restored - weight

    def mean_abs_error(self, weight) -> float:
        return self.error(weight).abs().mean().item()


def absmax_int8(weight) -> RoundTrip:
    """Symmetric: scale = 127 / max|w|; zero stays exactly zero, but one outlier wastes the range."""
    import torch

    scale = 127 / weight.abs().max()
    codes = torch.round(weight * scale).clamp(-127, 127).to(torch.int8)
    return RoundTrip("absmax int8", codes, codes.float() / scale)


def zeropoint_int8(weight) -> RoundTrip:
    """Asymmetric: map [min, max] onto [-128, 127] with a shift, using all 256 codes."""
    import torch

    low, high = weight.min(), weight.max()
    scale = 255 / (high - low)
    zero = torch.round(-scale * low) - 128
    codes = torch.round(scale * weight + zero).clamp(-128, 127).to(torch.int8)
    return RoundTrip("zero-point int8", codes, (codes.float() - zero) / scale)


def rowwise_absmax_int8(weight) -> RoundTrip:
    """absmax with one scale per output row (what bitsandbytes and quanto int8 do): an outlier only
    costs its own row."""
    import torch

    scale = 127 / weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    codes = torch.round(weight * scale).clamp(-127, 127).to(torch.int8)
    return RoundTrip("row-wise absmax int8", codes, codes.float() / scale)


def error_histogram(weight, trips: list[RoundTrip]):
    """Distribution of the rounding error of each scheme, on one figure."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for trip in trips:
        fig.add_trace(go.Histogram(x=trip.error(weight).flatten().numpy()[:200_000], name=trip.name, opacity=0.6, nbinsx=120))
    fig.update_layout(barmode="overlay", title="Rounding error per weight (dequantized - original)",
                      xaxis_title="error (weight units)", yaxis_title="number of weights", template="plotly_white", height=420)
    return fig


def four_bit_levels() -> dict[str, list[float]]:
    """The 16 values a 4-bit code can mean, relative to the block's absmax: NF4 puts them at
    quantiles of a normal distribution (dense near zero, where weights are); FP4 and a uniform
    int4 grid spread them differently."""
    from bitsandbytes.functional import get_4bit_type

    return {"nf4": sorted(get_4bit_type("nf4", device="cpu").tolist()),
            "fp4": sorted(get_4bit_type("fp4", device="cpu").tolist()),
            "int4 (uniform)": [i / 7 for i in range(-7, 8)]}


def levels_figure(weight, block: int = 64):
    """Block-normalized weights (w / absmax of its block of 64) with the 4-bit levels on top."""
    import plotly.graph_objects as go

    flat = weight.flatten()[: (weight.numel() // block) * block].reshape(-1, block)
    normalized = (flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).flatten().numpy()[:200_000]
    fig = go.Figure(go.Histogram(x=normalized, nbinsx=200, name="weights / block absmax", marker_color="#bbb"))
    for i, (name, levels) in enumerate(four_bit_levels().items()):
        fig.add_trace(go.Scatter(x=levels, y=[-(i + 1) * 40] * len(levels), mode="markers", name=f"{name} levels",
                                 marker={"size": 9, "symbol": "line-ns-open"}))
    fig.update_layout(title=f"Where 4-bit codes land (blocks of {block})", xaxis_title="normalized weight",
                      yaxis_title="count", template="plotly_white", height=420)
    return fig


def activation_outliers(model, tokenizer, text: str, layer: int = -3, threshold: float = 6.0) -> dict:
    """Largest |activation| per feature entering one block's MLP down-projection, on `text`.

    LLM.int8() keeps features above `threshold` in 16-bit: a handful of such outlier
    features carry large values that int8 rounding would otherwise destroy."""
    import torch

    captured = {}
    target = model.model.layers[layer].mlp.down_proj
    hook = target.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].detach()))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    peaks = captured["x"].abs().amax(dim=(0, 1)).float()
    return {"peaks": peaks, "outliers": int((peaks > threshold).sum()), "features": peaks.numel(), "threshold": threshold}


def outliers_figure(stats: dict):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(y=stats["peaks"].numpy(), name="max |activation|"))
    fig.add_hline(y=stats["threshold"], line_dash="dash", annotation_text=f"LLM.int8 threshold {stats['threshold']}")
    fig.update_layout(title=f"{stats['outliers']} of {stats['features']} features exceed the threshold",
                      xaxis_title="hidden feature", yaxis_title="max |activation|", template="plotly_white", height=380)
    return fig


def error_table(weight, trips: list[RoundTrip]) -> list[dict]:
    return [{"scheme": t.name, "mean |error|": f"{t.mean_abs_error(weight):.2e}",
             "max |error|": f"{t.error(weight).abs().max().item():.2e}"} for t in trips]
