"""Quantization by hand, for the basics notebook: number formats, absmax and zero-point
int8 on a real weight matrix, scale granularity, 4-bit grids and activation outliers. A
hand-written GPTQ pass against round-to-nearest is in `teach.gptq`, the figures in `teach.charts`.

These are the textbook formulas (Dettmers et al., LLM.int8 and QLoRA; Frantar et al., GPTQ;
Maarten Grootendorst's introduction in shared/reference), written out so a learner can see
each step; the workbench's methods call the real libraries instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# ---------------------------------------------------------------------------- number formats


def bit_fields() -> dict[str, list[tuple[str, int]]]:
    """Each format's fields from the most significant bit down, derived from torch.finfo:
    a float stores 1 sign bit, then the exponent, then the mantissa (-log2(eps) bits).
    int8 is two's complement: 8 value bits, the top one weighing -128 (so it reads as the sign)."""
    import torch

    fields = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        info = torch.finfo(dtype)
        mantissa = round(-math.log2(info.eps))
        fields[name] = [("sign", 1), ("exponent", info.bits - 1 - mantissa), ("mantissa", mantissa)]
    fields["int8"] = [("sign (weighs -128)", 1), ("value", torch.iinfo(torch.int8).bits - 1)]
    return fields


def number_formats() -> list[dict]:
    """Range and step of each format, one meaning per column (all computed by torch)."""
    import torch

    def step_below(value, dtype) -> float:
        x = torch.tensor(value, dtype=dtype)
        return (x - torch.nextafter(x, torch.tensor(0.0, dtype=dtype))).item()

    rows = []
    for name, fields in bit_fields().items():
        bits = dict(fields)
        if name == "int8":
            info = torch.iinfo(torch.int8)
            numbers = {
                "largest": info.max,
                "smallest": info.min,
                "smallest positive (normal)": 1,
                "step at 1.0": 1,
                "step at the largest": 1,
            }
        else:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
            info = torch.finfo(dtype)
            numbers = {
                "largest": info.max,
                "smallest": info.min,
                "smallest positive (normal)": info.tiny,
                "step at 1.0": info.eps,
                "step at the largest": step_below(info.max, dtype),
            }
        rows.append(
            {
                "format": name,
                "bits": sum(bits.values()),
                "exponent bits": bits.get("exponent", 0),
                "mantissa / value bits": bits.get("mantissa", bits.get("value")),
                **{key: f"{value:.6g}" for key, value in numbers.items()},
            }
        )
    return rows


# ---------------------------------------------------------------------------- int8 by hand


@dataclass(frozen=True)
class RoundTrip:
    """A weight matrix quantized and dequantized again, with the error that leaves."""

    name: str
    quantized: object
    """The integer codes, shape of the weight."""
    restored: object
    """Dequantized back to float: what the model computes with."""
    scale: object = None
    """Codes per weight unit (code = round(scale * w + zero_point)): one number, or one per row/group."""
    zero_point: object = 0
    """The code that stands for 0.0 (0 for the symmetric schemes)."""

    def error(self, weight):
        return self.restored - weight

    def mean_abs_error(self, weight) -> float:
        return self.error(weight).abs().mean().item()


def absmax_int8(weight) -> RoundTrip:
    """Symmetric: scale = 127 / max|w|; zero stays exactly zero, but one outlier wastes the range."""
    import torch

    scale = 127 / weight.abs().max()
    codes = torch.round(weight * scale).clamp(-127, 127).to(torch.int8)
    return RoundTrip("absmax int8", codes, codes.float() / scale, scale)


def zeropoint_int8(weight) -> RoundTrip:
    """Asymmetric: map [min, max] onto [-128, 127] with a shift, using all 256 codes."""
    import torch

    low, high = weight.min(), weight.max()
    scale = 255 / (high - low)
    zero = torch.round(-scale * low) - 128
    codes = torch.round(scale * weight + zero).clamp(-128, 127).to(torch.int8)
    return RoundTrip("zero-point int8", codes, (codes.float() - zero) / scale, scale, zero)


def rowwise_absmax_int8(weight) -> RoundTrip:
    """absmax with one scale per output row (what bitsandbytes and quanto int8 do): an outlier only
    costs its own row."""
    trip = absmax_quantize(weight, 8, "row")
    return RoundTrip("row-wise absmax int8", trip.quantized, trip.restored, trip.scale)


def worked_example(weight, count: int = 8, row: int = 0) -> dict:
    """`count` real weights of one row, evenly spaced along it, quantized by absmax and by
    zero-point int8 (each with its own scale computed from these values alone)."""
    columns = list(range(0, weight.shape[1], weight.shape[1] // count))[:count]
    values = weight[row, columns].detach().float()
    return {
        "values": values,
        "absmax": absmax_int8(values),
        "zeropoint": zeropoint_int8(values),
        "where": f"row {row}, columns {', '.join(map(str, columns))}",
    }


def worked_example_table(example: dict) -> list[dict]:
    absmax, zeropoint = example["absmax"], example["zeropoint"]
    return [
        {
            "weight": f"{w:+.5f}",
            "absmax code": int(a),
            "absmax dequantized": f"{ra:+.5f}",
            "zero-point code": int(z),
            "zero-point dequantized": f"{rz:+.5f}",
        }
        for w, a, ra, z, rz in zip(
            example["values"].tolist(),
            absmax.quantized.tolist(),
            absmax.restored.tolist(),
            zeropoint.quantized.tolist(),
            zeropoint.restored.tolist(),
        )
    ]


def error_table(weight, trips: list[RoundTrip]) -> list[dict]:
    return [
        {
            "scheme": t.name,
            "mean |error|": f"{t.mean_abs_error(weight):.2e}",
            "max |error|": f"{t.error(weight).abs().max().item():.2e}",
        }
        for t in trips
    ]


# ---------------------------------------------------------------------------- granularity


def absmax_quantize(weight, bits: int, granularity="row") -> RoundTrip:
    """Symmetric `bits`-bit codes in [-(2^(bits-1) - 1), 2^(bits-1) - 1], with one scale for the
    whole tensor ("tensor"), one per output row ("row"), or one per group of `granularity`
    consecutive weights of a row (an int that divides the row length)."""
    import torch

    top = 2 ** (bits - 1) - 1
    rows, cols = weight.shape
    if granularity == "tensor":
        absmax = weight.abs().max().reshape(1, 1)
    elif granularity == "row":
        absmax = weight.abs().amax(dim=1, keepdim=True)
    else:
        if cols % granularity:
            raise ValueError(f"group size {granularity} does not divide the row length {cols}")
        absmax = (
            weight.reshape(rows, cols // granularity, granularity)
            .abs()
            .amax(dim=2)
            .repeat_interleave(granularity, dim=1)
        )
    scale = top / absmax.clamp_min(1e-12)
    codes = torch.round(weight * scale).clamp(-top, top)
    label = granularity if granularity in ("tensor", "row") else f"groups of {granularity}"
    return RoundTrip(f"{bits}-bit absmax, per {label}", codes.to(torch.int8), codes / scale, scale)


def granularity_study(weight, bits: int = 4, rows: int = 32, cols: int = 64, group: int = 16) -> dict:
    """A crop of the weight quantized with one scale per tensor (the crop), per row and per group."""
    crop = weight[:rows, :cols].detach().float()
    granularities = ("tensor", "row", group)
    return {
        "weight": crop,
        "trips": [absmax_quantize(crop, bits, g) for g in granularities],
        "bits": bits,
        "granularities": granularities,
    }


def granularity_table(weight, study: dict) -> list[dict]:
    """Mean |error| of each granularity on the crop and, with the same rule, on the whole matrix."""
    rows = []
    for granularity, crop in zip(study["granularities"], study["trips"]):
        whole = absmax_quantize(weight.detach().float(), study["bits"], granularity)
        rows.append(
            {
                "one scale per": crop.name.split("per ")[-1],
                "scales in the whole matrix": whole.scale.numel()
                // (granularity if isinstance(granularity, int) else 1),
                "mean |error|, crop": f"{crop.mean_abs_error(study['weight']):.2e}",
                "mean |error|, whole matrix": f"{whole.mean_abs_error(weight):.2e}",
            }
        )
    return rows


def error_histogram_data(weight, bits: int, granularity) -> RoundTrip:
    """What the interactive explorer draws: absmax at `bits` with the chosen granularity."""
    return absmax_quantize(weight.detach().float(), bits, granularity)


# ---------------------------------------------------------------------------- 4-bit grids


def four_bit_levels() -> dict[str, list[float]]:
    """The values a 4-bit code can mean, relative to the block's absmax: NF4 puts them at
    quantiles of a normal distribution (dense near zero, where weights are); FP4 and a uniform
    int4 grid spread them differently. (bitsandbytes' FP4 table holds 0 twice: +0 and -0.)"""
    from workbench.core.quiet import LIBRARY_LOG, library_output

    with library_output(LIBRARY_LOG):  # bitsandbytes reports the CPU kernels it lacks on import
        from bitsandbytes.functional import get_4bit_type

    return {
        "nf4": sorted(get_4bit_type("nf4", device="cpu").tolist()),
        "fp4": sorted(get_4bit_type("fp4", device="cpu").tolist()),
        "int4 (absmax)": [i / 7 for i in range(-7, 8)],
    }


def blockwise_round_trip(weight, levels: list[float], block: int = 64):
    """Each block of `block` consecutive weights scaled by its absmax, every weight replaced by
    the nearest level, scaled back (what bitsandbytes' 4-bit quantization does, unpacked)."""
    import torch

    flat = weight.detach().float().flatten()
    usable = (flat.numel() // block) * block
    blocks = flat[:usable].reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    grid = torch.tensor(sorted(set(levels)), dtype=torch.float32)
    normalized = blocks / absmax
    nearest = (normalized.unsqueeze(-1) - grid).abs().argmin(dim=-1)
    return (grid[nearest] * absmax).flatten(), flat[:usable]


def four_bit_errors(weight, block: int = 64) -> list[dict]:
    rows = []
    for name, levels in four_bit_levels().items():
        restored, original = blockwise_round_trip(weight, levels, block)
        error = restored - original
        rows.append(
            {
                "grid": name,
                "distinct levels": len(set(levels)),
                "mean |error|": error.abs().mean().item(),
                "RMS error": error.pow(2).mean().sqrt().item(),
            }
        )
    return rows


def block_normalized(weight, block: int = 64):
    """Every weight divided by the absmax of its block: the values the 4-bit grids must cover."""
    flat = weight.detach().float().flatten()
    blocks = flat[: (flat.numel() // block) * block].reshape(-1, block)
    return (blocks / blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).flatten()


# ---------------------------------------------------------------------------- activation outliers


class _Captured(Exception):
    """Raised by the capture hook: the layers after the one captured need not run."""


def layer_inputs(model, layer: int, blocks: list[list[int]]):
    """The inputs of block `layer`'s MLP down-projection on the token blocks (equal lengths, one
    batch), as a (features, tokens) matrix X, so that the layer computes W @ X."""
    import torch

    captured = []

    def capture(module, args):
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _Captured

    hook = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(blocks))
    except _Captured:
        pass
    finally:
        hook.remove()
    return captured[0].float().T.contiguous()


def _layer_name(model, layer: int) -> str:
    return f"model.layers[{layer % len(model.model.layers)}].mlp.down_proj"


def activation_outliers(
    model, tokenizer, text: str, layer: int = -3, threshold: float = 6.0, tokens: int = 256
) -> dict:
    """Largest |activation| per feature entering one block's MLP down-projection, on `text`.

    LLM.int8() keeps features above `threshold` in 16-bit: such outlier features carry large
    values that int8 rounding would otherwise destroy."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    inputs = layer_inputs(model, layer, [ids[0].tolist()])
    peaks = inputs.abs().amax(dim=1)
    return {
        "peaks": peaks,
        "outliers": int((peaks > threshold).sum()),
        "features": peaks.numel(),
        "threshold": threshold,
        "tokens": inputs.shape[1],
        "layer": _layer_name(model, layer),
    }


# ---------------------------------------------------------------------------- the whole model
