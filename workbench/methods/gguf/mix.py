"""Map-guided GGUF mixes: a ggml type for every block tensor, chosen from the sensitivity map under
the byte budget of one of llama.cpp's own files.

For a tensor t and a type k that fits its rows, the predicted loss is s_t * e_t(k) / e_t(Q4_0):
s_t is the map's end-to-end KL when t alone is stored in Q4_0 (the type that fits every row of 32),
and e_t(k) is t's error in type k weighted by the importance matrix (sum over columns j of
imatrix_j * (w - q)^2, the error the layer's output sees), measured by quantizing t with ggml.
Every tensor starts at its cheapest type; the greedy step takes the upgrade with the largest
predicted KL drop per extra byte that still fits the budget: the bytes llama.cpp's file of the
same file type spends on the block tensors (the embedding and norms keep llama.cpp's types), so
the two files are compared at equal bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.core.errors import WorkbenchError
from workbench.methods.gguf import ggml

LADDER = ("Q2_K", "Q3_K", "Q4_0", "IQ4_NL", "IQ4_XS", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")
"""Types a tensor may get (those whose blocks fit its rows), cheapest first."""
MAP_TYPE = "Q4_0"
MAP_METHOD = "ggml Q4_0"
"""The map's cells are quantized to Q4_0 by ggml (its name keys the cached map)."""


def _kind(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def fake_quantize(weight):
    """A weight stored in Q4_0 by ggml and read back: the map's cell quantizer."""
    import torch

    kind = _kind(MAP_TYPE)
    stored = ggml.quantize(weight.detach().float().cpu().numpy(), kind)
    back = ggml.dequantize(stored, kind).reshape(weight.shape)
    return torch.from_numpy(back).to(weight.dtype)


@dataclass(frozen=True)
class Option:
    kind: str
    bytes: int
    kl: float
    """Predicted KL (nats per token) with this tensor alone in this type."""


def _error(values, kind, importance) -> float:
    """Importance-weighted squared error of `values` stored in `kind` (quantized with `importance`)."""
    back = ggml.dequantize(ggml.quantize(values, kind, importance), kind).reshape(values.shape)
    return float((((values - back) ** 2) * (1.0 if importance is None else importance)).sum())


def options(values, importance, map_kl: float) -> list[Option]:
    """The tensor's ladder: for each type that fits, its bytes and predicted KL; a type that costs
    more bytes than a cheaper one without predicting less KL is dropped."""
    row = values.shape[-1]
    reference = _error(values, _kind(MAP_TYPE), None) or 1e-30
    ladder = []
    for name in LADDER:
        kind = _kind(name)
        if not ggml.fits(kind, row):
            continue
        size = values.shape[0] * ggml.row_size(kind, row)
        ladder.append(Option(name, size, max(map_kl, 0.0) * _error(values, kind, importance) / reference))
    kept: list[Option] = []
    for option in sorted(ladder, key=lambda o: (o.bytes, o.kl)):
        if not kept or option.kl < kept[-1].kl:
            kept.append(option)
    return kept


def plan(ladders: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """Greedy under `budget` bytes: the upgrade with the largest predicted KL drop per byte first."""
    chosen = {name: ladder[0] for name, ladder in ladders.items()}
    total = sum(option.bytes for option in chosen.values())
    if total > budget:
        raise WorkbenchError(
            f"gguf-map: the cheapest type of every tensor already takes {total / 1e6:.1f} MB, above the "
            f"budget of {budget / 1e6:.1f} MB; choose a larger file type."
        )
    while True:
        best, best_gain = None, 0.0
        for name, ladder in ladders.items():
            current = chosen[name]
            for option in ladder[ladder.index(current) + 1 :]:
                extra = option.bytes - current.bytes
                gain = (current.kl - option.kl) / extra
                if total + extra <= budget and gain > best_gain:
                    best, best_gain = (name, option), gain
        if best is None:
            return chosen
        name, option = best
        total += option.bytes - chosen[name].bytes
        chosen[name] = option
