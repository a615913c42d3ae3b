"""What a GGUF block stores, drawn from the learner's own weights (notebook 06).

`super_block` takes 256 weights of one row of the model, quantizes them with ggml's own quantizer
to a few llama.cpp types and reads them back (the bytes llama.cpp would store, dequantized by the
`gguf` package), so the figure shows each type's grid on real weights, not a sketch:
- Q8_0 and Q4_0: blocks of 32 weights, one fp16 scale each, 8- or 4-bit integers;
- Q4_K and Q2_K: a super-block of 256 weights in sub-blocks of 32 (Q4_K) or 16 (Q2_K), each
  sub-block with its own scale and minimum, themselves stored in 6 (Q4_K) or 4 (Q2_K) bits.
`row_widths` says which of the model's layers have rows that k-quants can hold (a multiple of 256).
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.teach.charts import _layout

TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q2_K")
SUPER_BLOCK = 256


@dataclass(frozen=True)
class BlockView:
    layer: str
    row: int
    original: object
    """The 256 weights (numpy float32)."""
    restored: dict
    """type -> the same weights as llama.cpp stores them, read back."""
    bits: dict
    """type -> bits per weight, scales included."""


def _weight_files(source) -> list:
    """The model's safetensors files: its folder's, or (a hub model) the hub's, downloaded as
    `compare` would download them."""
    from pathlib import Path

    if source.is_local:
        folder = Path(source.location)
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source.location, allow_patterns=["*.safetensors", "*.json"]))
    return sorted(folder.glob("*.safetensors"))


def _block0_shapes(source) -> dict:
    """name -> shape of block 0's linear weights, read from the files' headers (no weights loaded)."""
    from safetensors import safe_open

    shapes = {}
    for file in _weight_files(source):
        with safe_open(str(file), framework="pt") as opened:
            for name in opened.keys():
                if ".layers.0." in name and name.endswith("_proj.weight"):
                    shapes[name] = opened.get_slice(name).get_shape()
    return shapes


def super_block(source, kind: str = "down_proj", row: int = 0) -> BlockView:
    """The first 256 weights of `row` of block 0's `kind` linear, in each of TYPES: one tensor is
    read from the weight files, not the whole model."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from safetensors import safe_open

    from workbench.methods.gguf import ggml

    name = next((n for n in _block0_shapes(source) if n.endswith(f".{kind}.weight")), None)
    if name is None:
        raise ValueError(f"block 0 has no {kind} weight in {source.label}'s files.")
    for file in _weight_files(source):
        with safe_open(str(file), framework="pt") as opened:
            if name in opened.keys():
                weights = opened.get_slice(name)[row : row + 1, :SUPER_BLOCK].to(torch.float32).numpy()
    values = np.ascontiguousarray(weights, dtype=np.float32)
    restored, bits = {}, {}
    for type_name in TYPES:
        quant = GGMLQuantizationType[type_name]
        restored[type_name] = ggml.dequantize(ggml.quantize(values, quant), quant).reshape(-1)
        bits[type_name] = 8 * ggml.row_size(quant, SUPER_BLOCK) / SUPER_BLOCK
    return BlockView(name.removesuffix(".weight"), row, values.reshape(-1), restored, bits)


def block_table(view: BlockView) -> list[dict]:
    """Per type: bits per weight and the error on these 256 weights, relative to their largest."""
    import numpy as np

    top = float(np.abs(view.original).max())
    return [
        {
            "type": name,
            "bits/weight": round(view.bits[name], 4),
            "bytes per 256 weights": int(round(view.bits[name] * SUPER_BLOCK / 8)),
            "largest error, % of largest weight": round(
                100 * float(np.abs(view.restored[name] - view.original).max()) / top, 2
            ),
            "RMS error, % of largest weight": round(
                100 * float(np.sqrt(np.mean((view.restored[name] - view.original) ** 2))) / top, 2
            ),
        }
        for name in TYPES
    ]


def block_figure(view: BlockView, weights_shown: int = 64):
    """The first `weights_shown` weights and what each type stores for them; dotted lines at
    every 32 weights (a Q8_0/Q4_0 block, a Q4_K sub-block)."""
    import plotly.graph_objects as go

    index = list(range(weights_shown))
    fig = go.Figure()
    fig.add_scatter(
        x=index,
        y=view.original[:weights_shown],
        name="original (fp32)",
        mode="markers",
        marker={"size": 9, "color": "black", "symbol": "circle-open"},
    )
    for name in TYPES:
        fig.add_scatter(
            x=index,
            y=view.restored[name][:weights_shown],
            name=f"{name} ({view.bits[name]:.3g} bits/weight)",
            mode="lines+markers",
            marker={"size": 4},
            line={"width": 1},
        )
    for border in range(32, weights_shown, 32):
        fig.add_vline(x=border - 0.5, line={"dash": "dot", "color": "#999"})
    _layout(
        fig,
        f"What llama.cpp stores for {weights_shown} weights of {view.layer}, row {view.row}",
        "quantized by ggml's own quantizer and read back; dotted: a new 32-weight block (Q8_0, Q4_0) or sub-block (Q4_K)",
        440,
        xaxis_title="weight index in the row",
        yaxis_title="weight value",
    )
    return fig


def row_widths(source) -> list[dict]:
    """Each kind of block linear: its row width (the weights one output reads) and whether
    k-quant and IQ types, with super-blocks of 256, can hold it."""
    rows = []
    for name, shape in _block0_shapes(source).items():
        width = shape[1]
        rows.append(
            {
                "layer kind": name.split(".")[-2],
                "row width": width,
                "multiple of 256": width % SUPER_BLOCK == 0,
                "in Q4_K_M": "Q4_K / Q6_K" if width % SUPER_BLOCK == 0 else "falls back (Q5_0 / Q8_0)",
            }
        )
    return rows
