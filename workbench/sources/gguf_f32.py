"""An F32 GGUF of a model, made once per model content: what llama.cpp's quantizer starts from.

A model that came from a .gguf file (the bundled model, a user's .gguf) is rewritten from that
file: the same metadata (architecture, tokenizer, chat template) with every tensor dequantized to
F32, which are exactly the weights the workbench's fp32 reference holds (transformers dequantizes
the same file with the same arithmetic). A transformers folder or a hub model would need llama.cpp's
converter (`convert_hf_to_gguf.py`), which is not installed with the workbench: refused, saying so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.sources import model_files
from workbench.sources.models import fingerprint
from workbench.sources.source import ModelSource, cache_dir

ALL_F32 = 0
"""llama.cpp's `LLAMA_FTYPE_ALL_F32`, written as the file's `general.file_type`."""

SKIPPED_FIELDS = ("general.architecture", "general.file_type")
"""Written by the writer itself (the architecture) or anew (the file type)."""


def f32_gguf(source: ModelSource, log=print) -> Path:
    """The cached F32 GGUF of `source`, written on first use (seconds for a small model)."""
    if not source.gguf:
        raise WorkbenchError(
            f"model {source.label!r}: GGUF methods start from a .gguf file, and this model is a transformers "
            "folder or hub model. Convert it with llama.cpp's convert_hf_to_gguf.py (from a llama.cpp checkout "
            "of the release cyllama was built from), then give the .gguf file as the model."
        )
    digest = hashlib.sha256(fingerprint(source).encode()).hexdigest()[:16]
    path = cache_dir() / "gguf-f32" / f"{Path(source.gguf).stem}-{digest}.f32.gguf"
    if path.is_file():
        return path
    with model_files.conversion_lock(path, log):
        if path.is_file():  # written by the process we waited for
            return path
        partial = path.with_name(path.name + ".partial")
        log(f"Writing an F32 GGUF of {source.label} for llama.cpp to {path} (first use only)...")
        try:
            rewrite_as_f32(Path(source.gguf), partial)
            partial.rename(path)  # atomic: an interrupted rewrite never looks finished
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise files.write_error(
                partial, exc, "cannot write the F32 GGUF (set WORKBENCH_CACHE to move the cache)"
            ) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return path


def rewrite_as_f32(origin: Path, out: Path) -> None:
    """`origin`'s metadata and tensors, every tensor dequantized to F32 by the `gguf` package."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(origin)
    writer = GGUFWriter(out, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in SKIPPED_FIELDS:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)
    writer.add_file_type(ALL_F32)
    for tensor in reader.tensors:
        # Shapes as numpy sees them: GGUF lists dimensions innermost first.
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        writer.add_tensor(
            tensor.name, values.reshape([int(d) for d in reversed(tensor.shape)]), raw_dtype=GGMLQuantizationType.F32
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
