"""An F32 GGUF of a merged fine-tune (a transformers folder), written without llama.cpp's converter.

llama.cpp's converter (`convert_hf_to_gguf.py`) is not installed with the workbench. It is not
needed for a fine-tune the workbench merged (`workbench.finetune.merge`): merging changes a base
model's weights and nothing else, so when the base came from a .gguf file (the bundled model, a
user's .gguf) that file is a *template* whose metadata (architecture, hyper-parameters, tokenizer,
chat template) is right for the fine-tune too. Only the tensors come from the folder, and for
llama the converter does two things to them, both done here:
- names: each transformers name becomes the GGUF name by the `gguf` package's own table (the one
  the converter uses);
- query/key rows: transformers and llama.cpp order the rows of each attention head differently
  (two halves vs interleaved pairs for rotary embeddings), so they are reordered like the
  converter's `LlamaModel.permute`.
Whatever the template cannot vouch for is refused, pointing to the converter: a folder without the
merge's record of its base, a base without a .gguf, another architecture, another tokenizer, or
tensors whose names or shapes differ from the template's.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.sources.source import ModelSource

MERGED_FROM_FILE = "workbench_merged_from.json"
"""Written by the merge into the merged folder: the adapter, its base method and the base model."""
ARCHITECTURE = "llama"
"""The one architecture whose renaming and row order are done here (the converter knows dozens)."""
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
"""Buffers old checkpoints saved that llama.cpp recomputes (the converter skips them too)."""


def merged_from_record(source: ModelSource, adapter_dir, base: str) -> dict:
    """What the merge writes to MERGED_FROM_FILE: the adapter, the method its base was loaded
    with, and the base model itself (with the .gguf it came from, the template read here)."""
    return {
        "adapter_dir": str(Path(adapter_dir).resolve()),
        "base": base,
        "model": {"label": source.label, "location": source.location, "gguf": source.gguf},
    }


def template_for(source: ModelSource) -> Path:
    """The .gguf of the base model `source` was merged from, or the refusal that says why there is none."""
    if not source.is_local:
        raise convert_refusal(source, "GGUF methods start from a .gguf file, and this is a hub model.")
    record_file = Path(source.location) / MERGED_FROM_FILE
    if not record_file.is_file():
        raise convert_refusal(
            source,
            f"GGUF methods start from a .gguf file, and this transformers folder has no {MERGED_FROM_FILE} "
            "(written when the workbench merges a fine-tune) naming a base model whose .gguf could give "
            "the metadata.",
        )
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        model = record.get("model") or {}
        gguf = model.get("gguf") if isinstance(model, dict) else None
    except (OSError, ValueError, AttributeError):
        raise convert_refusal(source, f"its {MERGED_FROM_FILE} is not the JSON object the merge writes.") from None
    if "model" not in record:
        raise convert_refusal(
            source,
            f"its {MERGED_FROM_FILE} was written before merges recorded their base model, so the .gguf to take "
            "the metadata from is unknown (merge the adapter again to record it).",
        )
    if not gguf:
        raise convert_refusal(
            source,
            f"its base model {model.get('label')!r} is a transformers folder or hub model, not a .gguf file, so "
            "there is no GGUF to take the metadata (architecture, tokenizer, chat template) from.",
        )
    if not Path(gguf).is_file():
        raise convert_refusal(source, f"the .gguf of its base model, {gguf}, is gone (it gives the metadata).")
    return Path(gguf)


def merged_tensors(source: ModelSource, reader) -> list:
    """The folder's tensors as (GGUF name, fp32 array) in the template's (`reader`'s) order, checked
    against it first (`check_config`, `check_tokenizer`, `gguf_tensors`)."""
    config = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
    check_config(source, config, reader)
    check_tokenizer(source, reader)
    tensors = gguf_tensors(source, config, reader)
    return [(t.name, tensors.pop(t.name)) for t in reader.tensors]


def convert_refusal(source: ModelSource, why: str) -> WorkbenchError:
    """Why `source` cannot become a GGUF here, and what to run instead (llama.cpp's converter)."""
    return WorkbenchError(
        f"model {source.label!r}: {why} Convert it with llama.cpp's convert_hf_to_gguf.py (from a llama.cpp "
        "checkout of the release cyllama was built from), then give the .gguf file as the model."
    )


def numpy_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape as numpy and torch see it (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _field(reader, name):
    field = reader.fields.get(name)
    return field.contents() if field is not None else None


def check_config(source: ModelSource, config: dict, reader) -> None:
    """The folder is a llama with the template's block and head counts (the row order needs them)."""
    arch = _field(reader, "general.architecture")
    if arch != ARCHITECTURE or config.get("model_type") != ARCHITECTURE:
        raise convert_refusal(
            source,
            f"the folder is a {config.get('model_type')!r} model and its base .gguf a {arch!r} one; tensors are "
            f"renamed and reordered here for {ARCHITECTURE!r} only, into the base's own architecture.",
        )
    pairs = (
        ("num_hidden_layers", "llama.block_count"),
        ("num_attention_heads", "llama.attention.head_count"),
        ("num_key_value_heads", "llama.attention.head_count_kv"),
    )
    config = {"num_key_value_heads": config.get("num_attention_heads"), **config}  # absent: one kv head per head
    for key, field in pairs:
        ours, theirs = config.get(key), _field(reader, field)
        if ours != theirs:
            raise convert_refusal(
                source,
                f"config.json has {key}={ours} but its base .gguf has {field}={theirs}: the folder is not a "
                "fine-tune of that model, so the base's metadata would describe another model.",
            )


def check_tokenizer(source: ModelSource, reader) -> None:
    """The folder's tokenizer has the template's vocabulary, token for token: the template's tokenizer
    is the one written, and token ids that meant other tokens would be read as nonsense."""
    from workbench.sources import models

    theirs = [str(t) for t in reader.fields["tokenizer.ggml.tokens"].contents()]
    vocab = models.load_tokenizer(source).get_vocab()
    ours = [None] * max(len(theirs), max(vocab.values(), default=-1) + 1)
    for token, index in vocab.items():
        ours[index] = token
    differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if len(ours) != len(theirs) or differ is not None:
        where = f"token {differ} is {ours[differ]!r} here, {theirs[differ]!r} there" if differ is not None else ""
        raise convert_refusal(
            source,
            f"its tokenizer differs from its base .gguf's ({len(vocab)} vs {len(theirs)} tokens{'; ' if where else ''}"
            f"{where}); the GGUF would carry the base's tokenizer, which does not match these weights.",
        )


def llama_permute(weights, n_head: int, n_head_kv: int | None = None):
    """transformers' query/key rows in llama.cpp's order (the converter's `LlamaModel.permute`): per head,
    rows [first half, second half] become interleaved pairs (row j of each half side by side)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def folder_tensors(source: ModelSource):
    """(name, fp32 numpy array) for every tensor in the folder's safetensors files, read one at a time."""
    import torch  # torch reads bf16, which numpy cannot
    from safetensors import safe_open

    weights = sorted(Path(source.location).glob("*.safetensors"))
    if not weights:
        raise convert_refusal(source, "the folder has no .safetensors weights (the merge writes safetensors).")
    for file in weights:
        with safe_open(file, framework="pt") as opened:
            for name in opened.keys():
                yield name, opened.get_tensor(name).to(torch.float32).numpy()


def gguf_tensors(source: ModelSource, config: dict, reader) -> dict:
    """The folder's tensors by GGUF name, query/key rows reordered; refused unless they are exactly the
    template's tensors, name for name and shape for shape."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads", n_head))
    expected = {t.name: numpy_shape(t) for t in reader.tensors}
    tensors, problems = {}, []
    for hf_name, values in folder_tensors(source):
        if hf_name.endswith(SKIPPED_SUFFIXES):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name == "output.weight" and name not in expected and config.get("tie_word_embeddings", False):
            continue  # tied to the embeddings: llama.cpp reuses token_embd when the file has no output
        if name not in expected:
            problems.append(f"{hf_name} has no tensor in the base .gguf" + (f" ({name})" if name else ""))
            continue
        if values.shape != expected[name]:
            problems.append(f"{hf_name} is {list(values.shape)}, {name} {list(expected[name])} in the base .gguf")
        elif hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            values = llama_permute(values, n_head, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            values = llama_permute(values, n_head, n_head_kv)
        tensors[name] = values
    problems += [f"the base .gguf's {name} is not in the folder" for name in expected if name not in tensors]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise convert_refusal(
            source, f"its tensors are not its base .gguf's ({shown}), so the base's metadata does not describe them."
        )
    return tensors
