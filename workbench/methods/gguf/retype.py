"""Write a GGUF whose tensors ggml's quantizer makes from the model's F32 GGUF: with an importance
matrix, with per-tensor types of the workbench's choosing, or both.

The metadata (architecture, tokenizer, chat template, file type) comes from a *template*: a file
llama.cpp's quantizer wrote for the model, so everything but the tensors' bytes is llama.cpp's.
Without an importance matrix and with the template's own types the result is byte-identical to
the template (tested), so any difference a row shows comes from the importance matrix or the types.
"""

from __future__ import annotations

from pathlib import Path

from workbench.methods.gguf import ggml

GUESSED_FILE_TYPE = 1024
"""llama.cpp's `LLAMA_FTYPE_GUESSED`: what a file of per-tensor types of our own calls itself."""


def write(template: Path, f32: Path, out: Path, types: dict | None = None, importance=None, log=print) -> None:
    """`out`: `template`'s metadata and tensor order; each tensor quantized from `f32` by ggml to
    `types[name]` (default: the template's type), weighted by `importance` (an `imatrix.Importance`)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader

    from workbench.sources.gguf_f32 import metadata_writer

    reader = GGUFReader(template)
    source = {tensor.name: tensor for tensor in GGUFReader(f32).tensors}
    file_type = GUESSED_FILE_TYPE if types else int(reader.fields["general.file_type"].contents())
    writer = metadata_writer(reader, out, file_type)
    if importance is not None:
        writer.add_string("quantize.imatrix.dataset", importance.dataset)
        writer.add_int32("quantize.imatrix.entries_count", len(importance.sums))
        writer.add_int32("quantize.imatrix.chunks_count", importance.tokens // importance.chunk_size)
    for tensor in reader.tensors:
        kind = (types or {}).get(tensor.name, tensor.tensor_type)
        values = np.asarray(source[tensor.name].data, dtype=np.float32)
        shape = [int(d) for d in reversed(tensor.shape)]  # numpy's order: GGUF lists the innermost first
        if kind == GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, values.reshape(shape), raw_dtype=kind)
            continue
        weights = importance.mean(tensor.name) if importance is not None else None
        writer.add_tensor(tensor.name, ggml.quantize(values.reshape(-1, shape[-1]), kind, weights), raw_dtype=kind)
    log(f"[gguf] ggml quantized {len(reader.tensors)} tensors into {out.name}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
