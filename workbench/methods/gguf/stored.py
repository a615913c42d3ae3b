"""What a GGUF file really stores, read back from the file: bytes, bits per weight and the share
of the weights held in each ggml type.

llama.cpp's file types name a mix, not one type, and it silently changes the mix for tensors
whose rows do not fit a type's blocks: k-quant and IQ blocks are 256 weights wide, so a model
with rows of 576 (SmolLM2-135M) gets Q5_0 where Q4_K_M asks for Q4_K. The label alone would
mislead; these numbers come from the file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from workbench.metrics.memory import Storage

SUPER_BLOCK = 256
"""Weights per block of the k-quant (Q2_K..Q6_K) and IQ types."""


def _weights(path: Path):
    """(name, ggml type name, row length, elements, bytes) of every tensor in the file."""
    from gguf import GGUFReader

    for tensor in GGUFReader(path).tensors:
        yield tensor.name, tensor.tensor_type.name, int(tensor.shape[0]), int(tensor.n_elements), int(tensor.n_bytes)


def storage(path: Path, kernel: str) -> Storage:
    """Bytes of every tensor, and bits per weight over the blocks' 2-D weights (`blk.*`)."""
    tensors = list(_weights(path))
    block = [t for t in tensors if t[0].startswith("blk.") and t[0].endswith(".weight") and t[3] != t[2]]
    bits = 8 * sum(t[4] for t in block) / sum(t[3] for t in block) if block else None
    return Storage(sum(t[4] for t in tensors), bits, kernel)


def type_mix(path: Path) -> dict[str, float]:
    """Share of the 2-D weights (embedding and output included) stored in each ggml type, largest first."""
    counts: Counter = Counter()
    for _, kind, row, elements, _ in _weights(path):
        if elements != row:  # 1-D tensors (norms) stay F32 in every file type
            counts[kind] += elements
    total = sum(counts.values())
    return {kind: n / total for kind, n in counts.most_common()}


def details(path: Path, file_type: str, fallback: bool = True) -> dict:
    """The result's details: the type mix, and why it differs from the label when rows do not fit
    (`fallback`: the label is one of llama.cpp's file types)."""
    mix = type_mix(path)
    shown = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in mix.items())
    rows = sorted({row for name, _, row, elements, _ in _weights(path) if elements != row and row % SUPER_BLOCK})
    note = ""
    if fallback and rows and ("_K" in file_type or file_type.startswith("IQ")):
        note = (
            f"; rows of {', '.join(map(str, rows))} weights are not a multiple of {SUPER_BLOCK} (the block of "
            "k-quant and IQ types), so llama.cpp stored those tensors in other types"
        )
    return {"summary": f"{file_type} as written: {shown} of weights{note}", "type_mix": mix}
