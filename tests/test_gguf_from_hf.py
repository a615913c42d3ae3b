"""A merged fine-tune (a transformers folder) as a GGUF, written from its base model's .gguf as a template
(`workbench.sources.gguf_from_hf`), checked against the template tensor for tensor and in llama.cpp.

The "fine-tunes" here are the bundled model's own weights, saved as a folder with the record a merge
writes (`merged_from_record`, the function `merge_to_dequantized` uses), some with a small known
change: a real QLoRA fine-tune and merge takes minutes on 2 cores and would change every tensor, so
nothing could be checked place by place. About a minute and a half on 2 cores.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from workbench.core.config import EvalConfig, ModelSpec
from workbench.core.errors import WorkbenchError
from workbench.run import executors, runner
from workbench.run.compare import compare
from workbench.sources import gguf_f32, gguf_from_hf, models

pytestmark = [pytest.mark.model, pytest.mark.timeout(1200)]

EVAL = EvalConfig(max_tokens=256, decode_tokens=0)
LAYER, HEAD, PAIR, DELTA = 3, 4, 5, 1.0
"""The change of `changed_folder`: DELTA added to one row of block LAYER's q_proj: in head HEAD, the
second-half row of rotary pair PAIR."""


def quiet(message):
    pass


FOLDERS = ("smollm2-merged-fp32", "changed", "folder", "merged-fp16")
"""The folders these tests write F32 GGUFs of: their cached files go when the module ends."""


@pytest.fixture(scope="module", autouse=True)
def leave_no_cached_files_behind():
    """Each run's folders hold another record (a temporary path in it), so each run would leave
    0.5 GB per folder in the user's cache."""
    yield
    for path in (gguf_f32.cache_dir() / "gguf-f32").glob("*.gguf"):
        if path.name.startswith(tuple(f"{name}-" for name in FOLDERS)):
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory, bundled_source):
    """The bundled model as the workbench loads it, saved in fp32 with a merge's record naming it."""
    import torch

    folder = tmp_path_factory.mktemp("merged") / "smollm2-merged-fp32"
    models.load_model(bundled_source, "cpu", dtype=torch.float32).save_pretrained(folder)
    models.load_tokenizer(bundled_source).save_pretrained(folder)
    record = gguf_from_hf.merged_from_record(bundled_source, folder.parent / "adapter", "bnb-nf4")
    (folder / gguf_from_hf.MERGED_FROM_FILE).write_text(json.dumps(record), encoding="utf-8")
    return folder


def copy_with(folder, target, change=None, dtype=None):
    """A copy of `folder` whose weights went through `change(state_dict)` and are saved in `dtype`
    (unchanged weights: a link to them, not a 0.5 GB copy)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("model.safetensors"))
    if change is None and dtype is None:
        (target / "model.safetensors").symlink_to(folder / "model.safetensors")
        return target
    tensors = load_file(folder / "model.safetensors")
    if change:
        change(tensors)
    if dtype is not None:
        tensors = {name: values.to(dtype) for name, values in tensors.items()}
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def add_delta(tensors):
    q = tensors[f"model.layers.{LAYER}.self_attn.q_proj.weight"]
    head_dim = q.shape[0] // 9  # SmolLM2-135M: 9 query heads of 64
    q[HEAD * head_dim + head_dim // 2 + PAIR] += DELTA


def f32_of(folder):
    return gguf_f32.f32_gguf(models.resolve(str(folder), log=quiet), quiet)


def tensors_of(path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {
        t.name: dequantize(t.data, t.tensor_type).reshape(gguf_from_hf.numpy_shape(t)) for t in GGUFReader(path).tensors
    }


def llama_cpp_ppl(path, session) -> float:
    """`path` scored in llama.cpp on `session`'s windows, as the gguf rows are."""
    import torch

    from workbench.methods.gguf.llama_cpp import LlamaCppModel
    from workbench.metrics import perplexity

    model = LlamaCppModel(path, torch.get_num_threads())
    return perplexity.perplexity(
        model, session.eval_ids, session.eval.max_length, session.eval.stride, bos_token_id=session.bos_id
    ).ppl


@pytest.fixture(scope="module")
def template(bundled_source):
    return tensors_of(bundled_source.gguf)


def test_the_bundled_weights_give_back_the_template_tensor_for_tensor(fp32_folder, bundled_source, template):
    from gguf import GGUFReader

    path = f32_of(fp32_folder)
    written = tensors_of(path)
    assert list(written) == list(template)  # same names, same order; no output.weight (tied embeddings)
    assert "output.weight" not in written
    # Exactly equal, not within rounding: transformers dequantized the template with the same arithmetic,
    # and renaming and reordering rows move values without touching them.
    assert max(float(np.abs(written[name] - template[name]).max()) for name in template) == 0.0
    assert all(written[name].dtype == np.float32 for name in written)
    reader = GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == gguf_f32.ALL_F32
    assert reader.fields["tokenizer.chat_template"].contents() == (
        GGUFReader(bundled_source.gguf).fields["tokenizer.chat_template"].contents()
    )
    # Byte for byte the file the bundled model's own F32 rewrite gives.
    assert path.read_bytes() == gguf_f32.f32_gguf(bundled_source, quiet).read_bytes()
    assert f32_of(fp32_folder) == path  # cached by content: the second call writes nothing


def test_a_changed_query_row_lands_where_llama_cpp_keeps_it_and_llama_cpp_scores_it(
    fp32_folder, bundled_source, tmp_path, template
):
    folder = copy_with(fp32_folder, tmp_path / "changed", add_delta)
    written = tensors_of(f32_of(folder))
    name = f"blk.{LAYER}.attn_q.weight"
    # llama.cpp keeps each head's rotary pairs side by side: second-half row j of a head is row 2j + 1.
    head_dim = written[name].shape[0] // 9
    row = HEAD * head_dim + 2 * PAIR + 1
    difference = written[name] - template[name]
    assert np.flatnonzero(np.abs(difference).max(axis=1)).tolist() == [row]
    assert difference[row] == pytest.approx(np.full(difference.shape[1], DELTA), abs=1e-6)
    assert all(np.array_equal(written[n], template[n]) for n in template if n != name)
    # llama.cpp reads the reordered rows as transformers reads the folder: it scores the change like torch.
    session = runner.Session.open(ModelSpec(str(folder), device="cpu"), EVAL)
    fp32, in_llama = compare(session, ["fp32", "gguf:type=F32"], log=quiet, executor=executors.InProcess())
    assert not fp32.error and not in_llama.error
    assert in_llama.ppl == pytest.approx(fp32.ppl, rel=1e-3) and in_llama.kl_mean <= 1e-4
    unchanged = llama_cpp_ppl(gguf_f32.f32_gguf(bundled_source, quiet), session)  # same tokenizer, same windows
    assert abs(in_llama.ppl - unchanged) > 10 * abs(in_llama.ppl - fp32.ppl)  # the change shows in the row


def write_record(folder, **model):
    record = json.loads((folder / gguf_from_hf.MERGED_FROM_FILE).read_text())
    record["model"] = {**record["model"], **model}
    (folder / gguf_from_hf.MERGED_FROM_FILE).write_text(json.dumps(record))


def swap_two_tokens(folder):
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


def set_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **values}))


def narrower_down_proj(tensors):
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()


def extra_bias(tensors):
    tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.layers.0.self_attn.q_proj.weight"][:, 0].clone()


REFUSALS = {
    "no record": (lambda f: (f / gguf_from_hf.MERGED_FROM_FILE).unlink(), None, "has no workbench_merged_from.json"),
    "old record": (
        lambda f: (f / gguf_from_hf.MERGED_FROM_FILE).write_text('{"adapter_dir": "x", "base": "bnb-nf4"}'),
        None,
        "written before merges recorded their base model",
    ),
    "base without gguf": (lambda f: write_record(f, gguf=""), None, "not a .gguf file"),
    "tokenizer": (swap_two_tokens, None, r"tokenizer differs from its base .gguf's \(49152 vs 49152 tokens; token"),
    "architecture": (
        lambda f: set_config(f, model_type="mistral"),
        None,
        "'mistral' model and its base .gguf a 'llama'",
    ),
    "heads": (lambda f: set_config(f, num_key_value_heads=9), None, "num_key_value_heads=9 but its base .gguf has"),
    "shape": (None, narrower_down_proj, r"down_proj.weight is \[576, 1535\], blk.0.ffn_down.weight \[576, 1536\]"),
    "extra tensor": (None, extra_bias, "q_proj.bias has no tensor in the base .gguf"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_the_template_cannot_vouch_for_is_refused_with_the_converter_named(fp32_folder, tmp_path, case):
    change_files, change_tensors, message = REFUSALS[case]
    folder = copy_with(fp32_folder, tmp_path / "folder", change_tensors)
    if change_files:
        change_files(folder)
    source = models.ModelSource("folder", str(folder))  # as resolve builds it, without its checks of the config
    with pytest.raises(WorkbenchError, match=message) as refused:
        gguf_f32.f32_gguf(source, quiet)
    assert "convert_hf_to_gguf.py" in str(refused.value)
    written = [p.name for p in (gguf_f32.cache_dir() / "gguf-f32").glob("folder-*") if p.suffix != ".lock"]
    assert not written  # nothing written, not even a .partial (the lock file stays, as for every conversion)


def test_export_writes_a_merged_folder_as_a_gguf_whose_row_it_was_measured_on(fp32_folder, tmp_path, capsys):
    """The merged folder as merge.py saves it (fp16), with the known change, exported by the CLI."""
    import torch

    from workbench.cli import main

    folder = copy_with(fp32_folder, tmp_path / "merged-fp16", add_delta, torch.float16)
    out = tmp_path / "deploy"
    args = ["--model", str(folder), "--max-tokens", "256", "--decode-tokens", "0", "--out", str(out)]
    assert main(["export", *args, "--method", "gguf:type=Q8_0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "merged-fp16-Q8_0.gguf", "results.json"]
    (row,) = json.loads((out / "results.json").read_text())
    assert row["params"]["type"] == "Q8_0" and 0 < row["kl_mean"] < 0.05  # against the folder's own fp32 reference
    session = runner.Session.open(ModelSpec(str(folder), device="cpu"), EVAL)
    assert llama_cpp_ppl(out / "merged-fp16-Q8_0.gguf", session) == pytest.approx(row["ppl"], rel=1e-6)
    assert "Wrote" in capsys.readouterr().out
