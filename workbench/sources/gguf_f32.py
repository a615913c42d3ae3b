"""An F32 GGUF of a model, made once per model content: what llama.cpp's quantizer starts from.

A model that came from a .gguf file (the bundled model, a user's .gguf) is rewritten from that
file: the same metadata (architecture, tokenizer, chat template) with every tensor dequantized to
F32, which are exactly the weights the workbench's fp32 reference holds (transformers dequantizes
the same file with the same arithmetic). A fine-tune the workbench merged into a transformers folder
takes its metadata from its base model's .gguf and its tensors from the folder
(`workbench.sources.gguf_from_hf`). Any other transformers folder or hub model would need llama.cpp's
converter (`convert_hf_to_gguf.py`), which is not installed with the workbench: refused, saying so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from workbench.core import files
from workbench.sources import gguf_from_hf, model_files
from workbench.sources.gguf_from_hf import numpy_shape
from workbench.sources.models import fingerprint
from workbench.sources.source import ModelSource, cache_dir

ALL_F32 = 0
"""llama.cpp's `LLAMA_FTYPE_ALL_F32`, written as the file's `general.file_type`."""

WRITER_VERSION = 2
"""Part of the cache key: a file written by an older writer (another order of the metadata) is
written again, so that every cached file is the one this code writes."""

SKIPPED_FIELDS = ("general.architecture", "general.file_type")
"""Written by the writer itself (the architecture) or anew (the file type)."""


def f32_gguf(source: ModelSource, log=print) -> Path:
    """The cached F32 GGUF of `source`, written on first use (seconds for a small model).

    Cached by the model's content (`fingerprint`) and, for a merged folder, by the template it
    takes its metadata from: the same folder merged from another base is another file."""
    if source.gguf:
        origin = Path(source.gguf)
        key, stem = fingerprint(source), origin.stem
        write = lambda out: rewrite_as_f32(origin, out)  # noqa: E731
    else:
        template = gguf_from_hf.template_for(source)  # refuses folders it cannot vouch for, and hub models
        key, stem = f"{fingerprint(source)}|{template.resolve()}|{template.stat().st_size}", Path(source.location).name
        write = lambda out: write_merged_f32(source, template, out)  # noqa: E731
    digest = hashlib.sha256(f"{key}|writer {WRITER_VERSION}".encode()).hexdigest()[:16]
    path = cache_dir() / "gguf-f32" / f"{stem}-{digest}.f32.gguf"
    if path.is_file():
        return path
    with model_files.conversion_lock(path, log):
        if path.is_file():  # written by the process we waited for
            return path
        partial = path.with_name(path.name + ".partial")
        log(f"Writing an F32 GGUF of {source.label} for llama.cpp to {path} (first use only)...")
        try:
            write(partial)
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
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(origin)
    write_f32(
        reader,
        (
            (t.name, dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(numpy_shape(t)))
            for t in reader.tensors
        ),
        out,
    )


def write_merged_f32(source: ModelSource, template: Path, out: Path) -> None:
    """A merged folder's tensors (checked and ordered by `gguf_from_hf.merged_tensors`) with its template's metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(template)
    write_f32(reader, gguf_from_hf.merged_tensors(source, reader), out)


def metadata_writer(template, out: Path, file_type: int):
    """A `GGUFWriter` for `out` holding `template`'s metadata (a `GGUFReader`), with `file_type`."""
    from gguf import GGUFValueType, GGUFWriter

    writer = GGUFWriter(out, template.fields["general.architecture"].contents())
    for name, field in template.fields.items():
        if name == "general.file_type":
            writer.add_file_type(file_type)  # in its place: a file written again keeps its bytes
        elif not (name.startswith("GGUF.") or name in SKIPPED_FIELDS):
            kind = field.types[0]
            sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)
    if "general.file_type" not in template.fields:
        writer.add_file_type(file_type)
    return writer


def write_f32(template, tensors, out: Path) -> None:
    """A GGUF at `out` with `template`'s metadata (a `GGUFReader`), file type ALL_F32, and `tensors`
    ((name, float32 array) pairs, in the order given) stored as F32."""
    from gguf import GGMLQuantizationType

    writer = metadata_writer(template, out, ALL_F32)
    for name, values in tensors:
        writer.add_tensor(name, values, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
