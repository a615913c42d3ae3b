"""ggml's own quantizer, one tensor at a time: `ggml_quantize_chunk` from libggml-python's prebuilt
`libggml-base.so`.

It is the function llama.cpp's `llama_model_quantize` calls for every tensor (a test checks that
it writes the bytes of llama.cpp's Q4_K_M and Q2_K files exactly), and unlike cyllama 0.2.18's
bindings it takes an importance matrix and any type per tensor. So the workbench can quantize
with an importance matrix, and write mixes of its own, with llama.cpp's arithmetic.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

from workbench.core.errors import WorkbenchError

PIP = "pip install libggml-python==0.20.2.post1"


@cache
def _library():
    try:
        import libggml
    except ImportError:
        raise WorkbenchError(f"ggml's quantizer needs libggml-python: {PIP}") from None
    library = ctypes.CDLL(str(Path(libggml.__file__).parent / "lib64" / "libggml-base.so"))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    # (type, source, destination, start, rows, weights per row, importance or NULL)
    library.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        *[ctypes.c_void_p] * 2,
        *[ctypes.c_int64] * 3,
        ctypes.c_void_p,
    ]
    library.ggml_row_size.restype = ctypes.c_size_t
    library.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    library.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    library.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return library


def block_size(kind) -> int:
    """Weights per block of a ggml type (32 for Q8_0/Q4_0/IQ4_NL, 256 for k-quants and IQ4_XS)."""
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[kind][0]


def fits(kind, row: int) -> bool:
    return row % block_size(kind) == 0


def row_size(kind, row: int) -> int:
    """Bytes of one row of `row` weights in ggml type `kind`."""
    return _library().ggml_row_size(int(kind), row)


def quantize(values, kind, importance=None):
    """`values` (rows x row, float32) in ggml type `kind`: the bytes llama.cpp stores, rows x bytes per row.
    `importance`: one weight per column (the mean squared activation it multiplies), or None."""
    import numpy as np

    library = _library()
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, row = values.shape
    if not fits(kind, row):
        raise WorkbenchError(f"ggml: rows of {row} weights do not fit {kind.name}'s blocks of {block_size(kind)}.")
    if importance is None and library.ggml_quantize_requires_imatrix(int(kind)):
        raise WorkbenchError(f"ggml: {kind.name} needs an importance matrix.")
    out = np.empty((rows, row_size(kind, row)), dtype=np.uint8)
    weights = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (row,):
            raise WorkbenchError(f"ggml: an importance matrix of {importance.shape} for rows of {row} weights.")
        weights = importance.ctypes.data
    written = library.ggml_quantize_chunk(int(kind), values.ctypes.data, out.ctypes.data, 0, rows, row, weights)
    if written != out.nbytes:
        raise WorkbenchError(f"ggml: quantizing to {kind.name} wrote {written} bytes, expected {out.nbytes}.")
    return out


def dequantize(data, kind):
    """Bytes of ggml type `kind` back to float32 rows (the `gguf` package's reference dequantizer)."""
    from gguf.quants import dequantize as dequantize_bytes

    return dequantize_bytes(data, kind)
