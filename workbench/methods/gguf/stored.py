"""What a GGUF file really stores, read back from the file: bytes, bits per weight and the share
of the weights held in each ggml type.

llama.cpp's file types name a mix, not one type, and it silently changes the mix for tensors
whose rows do not fit a type's blocks: k-quant and IQ blocks are 256 weights wide, so a model
with rows of 576 (SmolLM2-135M) gets Q5_0 where Q4_K_M asks for Q4_K. The label alone would
mislead; these numbers come from the file.
"""

from __future__ import annotations

import functools
import math
import mmap
import struct
from collections import Counter
from pathlib import Path

from workbench.metrics.memory import Storage

SUPER_BLOCK = 256
"""Weights per block of the k-quant (Q2_K..Q6_K) and IQ types."""


def _weights(path: Path) -> tuple:
    """(name, ggml type name, row length, elements, bytes) of every tensor in the file."""
    stat = Path(path).stat()
    return _tensor_table(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _tensor_table(path: str, size: int, mtime_ns: int) -> tuple:
    """The file's tensor table, read once per file version (a row asks for it three times).

    Read from the header directly: gguf's GGUFReader first parses every metadata value element
    by element (the tokenizer's 49,152 strings: 2.7 s a read on 2 cores), and none is needed here."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if size < 24:  # magic, version and the two counts
        raise ValueError(f"{path} is not a GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = _Header(data)  # mapped: only the pages the header spans are read
        if header.read("<I") != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        header.read("<I")  # version
        n_tensors, n_values = header.read("<Q"), header.read("<Q")
        for _ in range(n_values):
            header.skip_string()
            header.skip_value(header.read("<I"))
        table = []
        for _ in range(n_tensors):
            name = header.string()
            dims = [header.read("<Q") for _ in range(header.read("<I"))]
            kind = GGMLQuantizationType(header.read("<I"))
            header.read("<Q")  # offset of the data
            elements = math.prod(dims)
            block, block_bytes = GGML_QUANT_SIZES[kind]
            table.append((name, kind.name, dims[0], elements, elements // block * block_bytes))
    return tuple(table)


_MAGIC = 0x46554747  # "GGUF", little-endian
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Bytes of each fixed-size GGUF value type (8 is a string, 9 an array)."""


class _Header:
    """A cursor over the start of a GGUF file."""

    def __init__(self, data):
        self.data, self.at = data, 0

    def read(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        start = self.at + 8  # after the length
        self.skip_string()
        return self.data[start : self.at].decode("utf-8")

    def skip_string(self) -> None:
        length = self.read("<Q")  # read first: `self.at += self.read(...)` adds to the old position
        self.at += length

    def skip_value(self, kind: int) -> None:
        if kind == 8:
            self.skip_string()
        elif kind == 9:
            item, count = self.read("<I"), self.read("<Q")
            if item in _FIXED:
                self.at += _FIXED[item] * count
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            self.at += _FIXED[kind]


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
