"""Hostile input: everything a careless or unlucky user can give the workbench, refused with one
`error:` line and exit status 2 before any work, with the output folder and its history left
as they were; and what must survive a kill, a full disk or a damaged file.

The table below is README's "What the workbench refuses". Each case runs the real CLI
(`workbench.cli.main`) on the tiny model, against an output folder that already holds a
finished comparison, and compares that folder's files before and after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.core import files
from workbench.core.config import EvalConfig
from workbench.core.errors import WorkbenchError
from workbench.run import results, runner
from workbench.sources import models

FAST = ["--max-length", "64", "--max-tokens", "64", "--decode-tokens", "0", "--in-process"]
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256); {} when the folder does not exist."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_one_error_line(err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


def assert_history_extended(before: bytes, after_path: Path) -> list[results.Result]:
    """The old history is a prefix of the new one, and every line of the new one is a record."""
    after = after_path.read_bytes()
    assert after.startswith(before)
    skipped = []
    records = results.read_history(after_path, skipped.append)
    assert not skipped, skipped
    return records


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def finished_out(tmp_path_factory, tiny_folder):
    """An output folder holding one finished comparison (results files and a history line)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    with pytest.MonkeyPatch.context() as patch:  # its KL reference goes with the folder: see `case`
        patch.setenv("WORKBENCH_CACHE", str(out.parent / "cache"))
        assert main(["compare", "--model", str(tiny_folder), "--methods", "fp32", "--out", str(out), *FAST]) == 0
    return out


@dataclass
class Case:
    """What one case needs: its own folder, the tiny model, a copy of a finished output folder."""

    tmp: Path
    tiny: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def model_copy(self, name: str = "model", config_text: str | None = None, **config_changes) -> Path:
        """The tiny model's folder with its config changed (weights linked, not copied)."""
        folder = self.tmp / name
        folder.mkdir()
        for file in self.tiny.iterdir():
            if file.name != "config.json":
                (folder / file.name).symlink_to(file)
        config = json.loads((self.tiny / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(config_text if config_text is not None else json.dumps(config))
        return folder

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path


@pytest.fixture
def case(tmp_path, tiny_folder, finished_out, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    shutil.copytree(finished_out.parent / "cache", tmp_path / "cache")
    out = tmp_path / "out"
    shutil.copytree(finished_out, out)
    made = Case(tmp_path, tiny_folder, out, monkeypatch)
    with made.stack:
        yield made


def _mount(*argv) -> bool:
    return shutil.which("mount") is not None and subprocess.run(["mount", *argv], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only for this process: permissions for a normal user, a read-only
    bind mount for root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if not _mount("--bind", str(folder), str(folder)):
        pytest.skip("root without mount: cannot make a read-only folder here")
    try:
        if not _mount("-o", "remount,bind,ro", str(folder)):
            pytest.skip("cannot remount read-only here")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def full_disk(folder: Path, size_kb: int = 2048, leave_kb: int = 0):
    """A small tmpfs at `folder` filled up to `leave_kb` free (root only: nothing else can mount)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)):
        pytest.skip("needs root to mount a small tmpfs that fills up")
    try:
        with (folder / "filler").open("wb") as filler:
            with contextlib.suppress(OSError):
                filler.write(b"\0" * max(0, size_kb - leave_kb) * 1024)
                filler.flush()
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# ---------------------------------------------------------------------------- the table


def _gguf_cache_damaged(c: Case) -> list:
    """A .gguf whose converted copy in the cache has a weight file cut short."""
    gguf = c.file("model.gguf", b"GGUF" + b"\0" * 60)
    cached = models.gguf_cache_folder(gguf)
    shutil.copytree(c.tiny, cached)
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 20])
    return ["--model", gguf]


def _hub_unreachable(c: Case) -> list:
    from huggingface_hub import constants

    c.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    c.monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    return ["--model", "some-org/some-model"]


def _truncated_gguf(c: Case) -> list:
    with models.bundled_gguf().open("rb") as whole:
        return ["--model", c.file("cut.gguf", whole.read(5 * 2**20))]


def _in_tmp(c: Case, argv: list) -> list:
    c.monkeypatch.chdir(c.tmp)  # where `out/` exists
    return argv


def _out_read_only(c: Case) -> list:
    c.stack.enter_context(read_only(c.out))
    return ["--out", c.out]


def _out_full(c: Case) -> list:
    disk = c.stack.enter_context(full_disk(c.tmp / "disk"))
    return ["--out", disk / "out"]


CASES = [
    # (id, extra argv or a function of the case, message in the error line)
    ("unknown method after a good one", ["--methods", "fp32,nope"], "unknown method 'nope'"),
    ("no method named", ["--methods", ","], "no method named"),
    ("unsupported parameter value", ["--methods", "gptq:bits=5"], "bits=5 is not supported"),
    ("nan parameter", ["--methods", "gptq:damp=nan"], "must be a finite number"),
    ("inf parameter", ["--methods", "bnb-int8:threshold=inf"], "must be a finite number"),
    ("unknown parameter", ["--methods", "gptq:colour=red"], "unknown parameter(s) colour"),
    ("parameter without a value", ["--methods", "gptq:bits"], "written name:key=value"),
    ("stride 0", ["--stride", "0"], "stride: must be a positive integer"),
    ("negative stride", ["--stride", "-64"], "stride: must be a positive integer"),
    ("stride above the window", ["--stride", "4096"], "larger than max_length"),
    ("window beyond the context", ["--max-length", "4096"], "beyond"),
    ("decode tokens too few to time", ["--decode-tokens", "3"], "too few to time"),
    ("negative max tokens", ["--max-tokens", "-1"], "must be 0 or more"),
    ("no worker processes", ["--jobs", "0"], "--jobs"),
    ("negative timeout", ["--timeout", "-5"], "--timeout"),
    ("--out is a file", lambda c: ["--out", c.file("a-file", b"x")], "cannot write there"),
    ("--out below a file", lambda c: ["--out", c.file("a-file", b"x") / "sub"], "cannot write there"),
    ("--out read-only", _out_read_only, "cannot write there"),
    ("--out on a full disk", _out_full, "the disk is full"),
    ("relative path that does not exist", ["--model", "./no/such/model"], "read as a path"),
    ("x/y where x exists", lambda c: _in_tmp(c, ["--model", "out/no-such-model"]), "read as a path"),
    ("home path", ["--model", "~/no-such-workbench-model"], "read as a path"),
    ("absolute path", ["--model", "/no/such/workbench-model"], "read as a path"),
    ("backslash path", ["--model", "models\\tiny"], "read as a path"),
    ("hub unreachable", _hub_unreachable, "cannot be reached"),
    ("a file that is not a model", lambda c: ["--model", c.file("notes.txt", b"hello")], "a file, not a model folder"),
    ("folder without config.json", lambda c: ["--model", c.out], "has no config.json"),
    ("config.json not JSON", lambda c: ["--model", c.model_copy(config_text="{not json")], "not valid JSON"),
    ("config.json a list", lambda c: ["--model", c.model_copy(config_text="[1, 2]")], "not an object"),
    ("config value of the wrong type", lambda c: ["--model", c.model_copy(hidden_size="big")], "hidden_size"),
    ("weights cut short", lambda c: ["--model", _cut_weights(c)], "cut short"),
    ("missing .gguf", ["--model", "no-such.gguf"], "no such .gguf file"),
    ("empty .gguf", lambda c: ["--model", c.file("empty.gguf", b"")], "the file is empty"),
    ("random bytes .gguf", lambda c: ["--model", c.file("random.gguf", os.urandom(4096))], "not a GGUF file"),
    ("truncated .gguf", _truncated_gguf, "cannot read it as a GGUF model"),
    ("damaged conversion cache", _gguf_cache_damaged, "rm -rf"),
    ("eval text missing", ["--eval-text", "/no/such.txt"], "no such file"),
    ("eval text empty", lambda c: ["--eval-text", c.file("e.txt", b" \n")], "the file is empty"),
    ("eval text not UTF-8", lambda c: ["--eval-text", c.file("b.txt", b"\xff\xfe\x00\x80")], "not UTF-8"),
    ("eval text too short", lambda c: ["--eval-text", c.file("s.txt", b"Too short.")], "at least 32"),
    ("all of a 50 MB eval text", lambda c: ["--eval-text", _big_text(c), "--max-tokens", "0"], "--allow-long-eval"),
    (
        "2M tokens of an eval text",
        lambda c: ["--eval-text", _big_text(c), "--max-tokens", "2000000"],
        "--allow-long-eval",
    ),
    ("damp 0", ["--methods", "gptq:damp=0"], "must be above 0.0 and below 1.0"),
    ("damp -0.0", ["--methods", "gptq:damp=-0.0"], "must be above 0.0 and below 1.0"),
    ("damp below the smallest float", ["--methods", "gptq:damp=1e-400"], "must be above 0.0 and below 1.0"),
    ("damp 1", ["--methods", "gptq:damp=1"], "must be above 0.0 and below 1.0"),
    ("group size gptqmodel has no kernel for", ["--methods", "gptq:group_size=1"], "group_size=1 is not supported"),
    ("a parameter set twice", ["--methods", "rtn:bits=4:bits=8"], "bits is set twice"),
    ("history is a symbolic link", lambda c: _history_link(c), "symbolic link"),
    ("history is a FIFO", lambda c: _history_fifo(c), "FIFO"),
    ("results.json is a folder", lambda c: _results_folder(c), "is a folder"),
    (
        "a config transformers cannot build a model from",
        lambda c: ["--model", c.model_copy(intermediate_size=-1)],
        "cannot build the model",
    ),
    (
        "safetensors offsets that are strings",
        lambda c: ["--model", _header(c, {"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}})],
        "no valid byte range",
    ),
    ("safetensors header a JSON list", lambda c: ["--model", _header(c, [1, 2])], "JSON list"),
    (
        "safetensors header nested 100,000 deep",
        lambda c: ["--model", _header(c, None, "[" * 100_000 + "]" * 100_000)],
        "not a safetensors file",
    ),
    (
        "config.json nested 100,000 deep",
        lambda c: ["--model", c.model_copy(config_text='{"a":' * 100_000 + "1" + "}" * 100_000)],
        "nested too deeply",
    ),
    (
        "tokenizer.json not JSON",
        lambda c: ["--model", _tokenizer_file(c, "tokenizer.json", b"{not json")],
        "tokenizer.json is not valid JSON",
    ),
    (
        "tokenizer_config.json with a byte-order mark",
        lambda c: [
            "--model",
            _tokenizer_file(
                c, "tokenizer_config.json", b"\xef\xbb\xbf" + (c.tiny / "tokenizer_config.json").read_bytes()
            ),
        ],
        "tokenizer_config.json is not valid JSON",
    ),
]


def _history_link(c: Case) -> list:
    """history.jsonl a link to a file outside the folder (as if to /etc/passwd): never appended to."""
    target = c.file("not-a-history.txt", b"root:x:0:0:root:/root:/bin/bash\n")
    (c.out / "history.jsonl").unlink()
    (c.out / "history.jsonl").symlink_to(target)
    c.stack.callback(lambda: _same_bytes(target, b"root:x:0:0:root:/root:/bin/bash\n"))
    return []


def _same_bytes(path: Path, data: bytes) -> None:
    assert path.read_bytes() == data


def _history_fifo(c: Case) -> list:
    (c.out / "history.jsonl").unlink()
    os.mkfifo(c.out / "history.jsonl")  # reading or writing it would block forever
    return []


def _results_folder(c: Case) -> list:
    (c.out / "results.json").unlink()
    (c.out / "results.json").mkdir()
    return []


def _header(c: Case, header, text: str | None = None) -> Path:
    """The tiny model with its weights replaced by a safetensors file with this header."""
    folder = c.model_copy()
    data = (text if text is not None else json.dumps(header)).encode()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(len(data).to_bytes(8, "little") + data + b"\0" * 4)
    return folder


def _tokenizer_file(c: Case, name: str, data: bytes) -> Path:
    folder = c.model_copy()
    (folder / name).unlink()
    (folder / name).write_bytes(data)
    return folder


def _cut_weights(c: Case) -> Path:
    folder = c.model_copy()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes((c.tiny / "model.safetensors").read_bytes()[:4096])
    return folder


def _big_text(c: Case) -> Path:
    paragraph = "Quantization stores the weights of a neural network with fewer bits, so it fits and runs faster. "
    return c.file("big.txt", (paragraph * (50 * 2**20 // len(paragraph))).encode())


@pytest.mark.parametrize("argv,message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_refused_with_one_error_line_and_nothing_touched(capsys, case, argv, message):
    extra = argv(case) if callable(argv) else argv
    argv = ["compare", "--model", case.tiny, "--methods", "fp32", "--out", case.out, *FAST, *extra]
    before = snapshot(case.out)
    start = time.monotonic()
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert_one_error_line(err, message)
    assert snapshot(case.out) == before
    assert time.monotonic() - start < 30  # refused, not measured (nor retried for half a minute)
    assert not list((case.tmp / "cache").glob("*.partial"))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda c: c.model_copy(config_text="{not json"), "not valid JSON"),
        (lambda c: c.model_copy(hidden_size="big"), "hidden_size"),
        (lambda c: c.model_copy(num_attention_heads=3), "not a multiple of the number of attention heads"),
        (lambda c: c.model_copy(intermediate_size=-1), "cannot build the model"),
        (lambda c: c.file("empty.gguf", b""), "the file is empty"),
    ],
    ids=["not JSON", "wrong type", "inconsistent values", "negative size", "empty gguf"],
)
def test_estimate_refuses_broken_models_with_one_line(capsys, case, make, message):
    code, out, err = run(capsys, "estimate", "--model", make(case))
    assert code == 2 and out == ""
    assert_one_error_line(err, message)


def test_a_refused_run_creates_no_output_folder(capsys, case):
    fresh = case.tmp / "fresh" / "out"
    code, _, err = run(capsys, "compare", "--model", case.tiny, "--methods", "fp32,nope", "--out", fresh, *FAST)
    assert code == 2 and not (case.tmp / "fresh").exists()


# ---------------------------------------------------------------------------- history keyed by content


def _same_model_other_weights(tiny: Path, folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, folder)
    tensors = load_file(tiny / "model.safetensors")
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_history_is_keyed_by_content_not_by_name(capsys, case):
    """`models/tiny` and `models2/tiny` (other weights) are two models; a copy of one is the same model;
    two merged fine-tunes both named merged-fp16 are two models."""
    first = shutil.copytree(case.tiny, case.tmp / "models" / "tiny")
    other = _same_model_other_weights(case.tiny, case.tmp / "models2" / "tiny")
    copy = shutil.copytree(first, case.tmp / "copy" / "tiny")
    out = case.tmp / "o"
    measure = lambda model: run(capsys, "compare", "--model", model, "--methods", "fp32", "--out", out, *FAST)  # noqa: E731
    assert measure(first)[0] == 0
    code, table, err = measure(other)
    assert code == 0 and "reusing" not in err
    code, table, err = measure(copy)
    assert code == 0 and "reused from" in table
    merged_a = _same_model_other_weights(case.tiny, case.tmp / "run-a" / "merged-fp16")
    merged_b = shutil.copytree(case.tiny, case.tmp / "run-b" / "merged-fp16")
    prints = [models.fingerprint(models.resolve(str(f))) for f in (first, other, copy, merged_a, merged_b)]
    assert prints[0] != prints[1] and prints[0] == prints[2] == prints[4] and prints[1] == prints[3]
    assert len(assert_history_extended(b"", out / "history.jsonl")) == 2


def test_fingerprint_hashes_are_cached_until_the_file_changes_even_behind_its_old_mtime(case, monkeypatch):
    """The second call reads no weights; weights replaced by others of the same size with the old
    mtime restored (as `cp -p`, `rsync -a` or `tar x` leave them) are read again: the cache also
    keys on the change time, which no copy tool can set back."""
    from workbench.sources import model_files

    monkeypatch.setattr(model_files, "RACY_NS", 0)  # the copy was made a moment ago
    folder = shutil.copytree(case.tiny, case.tmp / "m")
    weights = folder / "model.safetensors"
    old = time.time_ns() - 60 * 10**9
    os.utime(weights, ns=(old, old))
    source = models.resolve(str(folder))
    first = models.fingerprint(source)
    hashed, real = [], model_files._sha256
    monkeypatch.setattr(model_files, "_sha256", lambda file: hashed.append(file.name) or real(file))
    assert models.fingerprint(source) == first and "model.safetensors" not in hashed  # from the cache
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(old, old))
    assert models.fingerprint(source) != first and "model.safetensors" in hashed
    cache = json.loads((case.tmp / "cache" / models.FINGERPRINT_CACHE).read_text())
    assert str(weights.resolve()) in cache


def test_eval_text_and_decode_tokens_are_part_of_the_key(case):
    a, b = case.tmp / "a", case.tmp / "b"
    for folder, words in ((a, "alpha beta gamma "), (b, "delta epsilon zeta ")):
        folder.mkdir()
        (folder / "eval.txt").write_text(words * 200)
    source = models.resolve(str(case.tiny))
    keys = set()
    for text, decode in ((a, 0), (b, 0), (a, 8)):
        session = runner.Session.from_source(
            source,
            "cpu",
            EvalConfig(max_length=64, stride=64, max_tokens=64, text_path=str(text / "eval.txt"), decode_tokens=decode),
        )
        keys.add(runner.planned_key(session, runner.as_choice("fp32")))
    assert len(keys) == 3


# ---------------------------------------------------------------------------- history that cannot break


def test_damaged_history_lines_are_skipped_named_and_kept(capsys, case):
    history = case.out / "history.jsonl"
    good = history.read_text(encoding="utf-8").splitlines()[0]
    older = json.dumps({**json.loads(good), "schema": 1})
    damaged = ("\ufeff" + good + "\n" + "garbage, not json\n" + older + "\n" + good[: len(good) // 2]).encode("utf-8")
    history.write_bytes(damaged)  # the last line was cut short by a crash: no newline
    code, table, err = run(
        capsys, "compare", "--model", case.tiny, "--methods", "fp32,bnb-int8", "--out", case.out, *FAST
    )
    assert code == 0 and "reused from" in table  # the first (BOM) line is still a usable record
    assert "skipped 3 line(s)" in err and "line 2, 3, 4" in err
    after = history.read_bytes()
    assert after.startswith(damaged)
    lines = after.decode("utf-8").splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["method"] == "bnb-int8"  # on its own line, whole


@pytest.mark.parametrize(
    "change",
    [
        {"ppl": "abc"},
        {"ppl": float("nan")},
        {"ppl": 0.5},
        {"weight_bytes": -5},
        {"bits": True},
        {"method": None},
        {"params": "group_size=64"},
        {"protocol": None},
        {"weight_bytes": 10**400},
        {"params": {"bits": {"nested": 1}}},
        {"details": {"a": [[[[[[[1]]]]]]]}},
    ],
)
def test_a_record_with_impossible_values_is_skipped_not_reused(capsys, case, change):
    history = case.out / "history.jsonl"
    good = json.loads(history.read_text(encoding="utf-8").splitlines()[0])
    history.write_text(json.dumps({**good, **change}) + "\n", encoding="utf-8")  # json writes NaN as a bare NaN
    code, table, err = run(
        capsys, "compare", "--model", case.tiny, "--methods", good["method"], "--out", case.out, *FAST
    )
    assert code == 0 and "skipped 1 line(s)" in err and "line 1" in err
    assert "reused from" not in table  # measured again, not taken from the damaged record


def test_a_line_nested_too_deep_for_python_is_skipped_not_fatal(capsys, case):
    history = case.out / "history.jsonl"
    good = history.read_text(encoding="utf-8").splitlines()[0]
    history.write_text(good + "\n" + '{"a":' * 100_000 + "1" + "}" * 100_000 + "\n", encoding="utf-8")
    code, table, err = run(capsys, "compare", "--model", case.tiny, "--methods", "fp32", "--out", case.out, *FAST)
    assert code == 0 and "skipped 1 line(s)" in err and "line 2" in err and "reused from" in table


def test_a_huge_eval_text_is_streamed_not_read_whole(tmp_path):
    """Only what the protocol can use is kept; the whole file is still hashed (the text's identity)."""
    import tracemalloc

    from workbench.sources import data

    paragraph = "Quantization stores the weights of a neural network with fewer bits.\r\n"
    whole = paragraph * (40 * 2**20 // len(paragraph))
    path = tmp_path / "big.txt"
    path.write_bytes(whole.encode())
    tracemalloc.start()
    kept = data.read_text_file(str(path), 2048)
    streamed = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    everything = data.read_text_file(str(path))
    read_whole = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert kept.text == everything.text[:2048] and kept.sha == everything.sha and not kept.whole
    assert kept.total_chars == everything.total_chars == len(whole.replace("\r\n", "\n"))
    assert streamed * 4 < read_whole  # a few chunks in memory, not the file


def test_the_command_line_says_how_much_of_the_eval_text_it_used(capsys, case):
    prose = "A sentence of ordinary English prose for the evaluation. " * 400
    text = case.file("e.txt", prose.encode())
    argv = ["compare", "--model", case.tiny, "--methods", "fp32", "--out", case.tmp / "o", "--eval-text", text]
    code, _, err = run(capsys, *argv, *FAST)
    assert code == 0 and f"64 tokens scored, taken from the start of its {len(prose):,} characters" in err


def test_a_sweep_of_too_many_cells_is_refused_before_any_work(capsys, case):
    grid = "rtn:bits=2,3,4,8:group_size=" + ",".join(["32", "64"] * 50)
    before = snapshot(case.out)
    code, _, err = run(capsys, "sweep", "--model", case.tiny, "--grid", grid, "--out", case.out, *FAST)
    assert code == 2 and snapshot(case.out) == before
    assert_one_error_line(err, "400 cells")
    assert "--allow-large-sweep" in err


def test_a_sweep_says_its_cells_and_its_pace(capsys, case):
    argv = ["sweep", "--model", case.tiny, "--grid", "fp32", "--grid", "bnb-int8", "--out", case.tmp / "o"]
    code, _, err = run(capsys, *argv, *FAST)
    assert code == 0 and "sweep: 2 cells" in err
    assert "sweep: 1 measured in" in err and "sweep: 2 measured in" in err and "for the rest" in err


def test_a_sensitivity_map_of_zero_tokens_is_refused(capsys, case):
    code, _, err = run(capsys, "sensitivity", "--model", case.tiny, "--tokens", "0", "--out", case.tmp / "o")
    assert code == 2
    assert_one_error_line(err, "--tokens 0")


def test_nothing_succeeded_keeps_the_results_files_and_extends_history(capsys, case):
    before = snapshot(case.out)
    history = (case.out / "history.jsonl").read_bytes()
    code, table, err = run(
        capsys, "compare", "--model", case.tiny, "--methods", "torchao-int4", "--out", case.out, *FAST
    )
    assert code == 1 and "left as they were" in table
    after = snapshot(case.out)
    assert {k: v for k, v in after.items() if k != "history.jsonl"} == {
        k: v for k, v in before.items() if k != "history.jsonl"
    }
    (row,) = assert_history_extended(history, case.out / "history.jsonl")[1:]
    assert "cuda only" in row.error


def test_duplicate_choices_are_measured_once(capsys, case):
    out = case.tmp / "o"
    code, table, err = run(
        capsys,
        "compare",
        "--model",
        case.tiny,
        "--methods",
        "fp32,fp32,bnb-int8:threshold=6.0,bnb-int8",
        "--out",
        out,
        *FAST,
    )
    assert code == 0 and err.count("named twice") == 2
    assert [r.method for r in results.read_history(out / "history.jsonl")] == ["fp32", "bnb-int8"]


# ---------------------------------------------------------------------------- writes that cannot half-happen


def test_atomic_writes_leave_the_old_file_whole(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with files.atomic_open(target) as out:
            out.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    files.write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_full_disk_is_one_clear_error_and_the_old_files_stay_whole(tmp_path):
    with full_disk(tmp_path / "disk", size_kb=1024, leave_kb=64) as disk:
        target = disk / "report.html"
        target.write_text("old report", encoding="utf-8")
        with pytest.raises(WorkbenchError, match="the disk is full"):
            files.write_text(target, "x" * 2**20)
        assert target.read_text() == "old report" and sorted(p.name for p in disk.iterdir()) == [
            "filler",
            "report.html",
        ]
        history = disk / "history.jsonl"
        history.write_text('{"a": 1}\n', encoding="utf-8")
        with pytest.raises(WorkbenchError, match="the disk is full"):
            files.append_line(history, "y" * 2**20)
        (disk / "filler").unlink()  # space again: the next record starts on a line of its own
        files.append_line(history, '{"b": 2}')
        assert history.read_text().splitlines()[0] == '{"a": 1}' and history.read_text().splitlines()[-1] == '{"b": 2}'


# ---------------------------------------------------------------------------- conversions


def _write_tiny_gguf(path: Path) -> Path:
    """A 1-block Llama GGUF (f32 tensors) with the bundled model's tokenizer: converts in seconds."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    source = GGUFReader(models.bundled_gguf())
    writer = GGUFWriter(str(path), "llama")
    hidden, ff, heads, kv_heads = 64, 128, 4, 2
    sizes = {
        "llama.block_count": 1,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": ff,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.dimension_count": hidden // heads,
        "llama.context_length": 1024,
    }
    for key, entry in source.fields.items():
        if key.startswith("GGUF.") or key in (
            "general.architecture",
            "general.file_type",
            "general.quantization_version",
        ):
            continue
        sub_type = entry.types[1] if entry.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, sizes.get(key, entry.contents()), entry.types[0], sub_type=sub_type)
    rng = np.random.default_rng(0)
    weight = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    writer.add_tensor("token_embd.weight", weight(int(source.fields["llama.vocab_size"].contents()), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    kv = kv_heads * hidden // heads
    for name, shape in (
        ("attn_q", (hidden, hidden)),
        ("attn_k", (kv, hidden)),
        ("attn_v", (kv, hidden)),
        ("attn_output", (hidden, hidden)),
        ("ffn_gate", (ff, hidden)),
        ("ffn_up", (ff, hidden)),
        ("ffn_down", (hidden, ff)),
    ):
        writer.add_tensor(f"blk.0.{name}.weight", weight(*shape))
    for name in ("attn_norm", "ffn_norm"):
        writer.add_tensor(f"blk.0.{name}.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_two_first_time_conversions_of_one_gguf_take_turns(case):
    gguf = _write_tiny_gguf(case.tmp / "tiny.gguf")
    start, logs, sources = threading.Barrier(2), [], []

    def convert():
        start.wait()
        sources.append(models.resolve(str(gguf), log=logs.append))

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(sources) == 2 and sources[0].location == sources[1].location
    assert sum("Converting" in line for line in logs) == 1 and any("waiting" in line for line in logs), logs
    assert not list((case.tmp / "cache").glob("*.partial"))
    assert models.model_files.folder_problem(Path(sources[0].location)) is None


# ---------------------------------------------------------------------------- fine-tuning


def test_finetune_data_folder_without_train_jsonl_is_refused(tmp_path):
    from workbench import finetune as ft

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "heldout.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    with pytest.raises(WorkbenchError, match="no train.jsonl") as refused:
        ft.FinetuneConfig(data_path=str(tmp_path / "data"))
    assert "\n" not in str(refused.value)


def test_finetune_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, tiny_folder):
    from workbench import finetune as ft

    locked = tmp_path / "locked"
    locked.mkdir()
    steps = []
    with read_only(locked):
        config = ft.FinetuneConfig(base="fp32", max_steps=1, output_dir=str(locked / "run"), max_new_tokens=0)
        with pytest.raises(WorkbenchError, match="cannot write there") as refused:
            ft.finetune(
                models.resolve(str(tiny_folder)),
                config,
                on_loss=lambda step, loss: steps.append(step),
                log=lambda m: None,
            )
    assert steps == [] and "\n" not in str(refused.value)  # no training step ran
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------------------- interrupted runs and stray files


def _cli(tmp_path: Path, argv: list) -> subprocess.Popen:
    """The CLI in its own process, its temporary folder and working directory inside `tmp_path`."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import custom_method; from workbench.cli import main; "
        "sys.exit(main(sys.argv[2:]))"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(TESTS), *map(str, argv)],
        cwd=tmp_path / "cwd",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _workdirs(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("workbench-*") if p.is_dir()]


@pytest.mark.parametrize(
    "sig,mode,status,word,signals",
    [
        (signal.SIGINT, ["--in-process"], 130, "interrupted", 1),
        (signal.SIGTERM, [], 143, "terminated", 1),
        (signal.SIGTERM, [], 143, "terminated", 2),
    ],
    ids=["ctrl-c in-process", "sigterm with workers", "a second sigterm during cleanup"],
)
def test_a_stopped_run_keeps_what_finished_and_removes_its_temporary_folders(
    tmp_path, tiny_folder, sig, mode, status, word, signals
):
    out = tmp_path / "out"
    argv = ["compare", "--model", tiny_folder, "--methods", "fp32,test-hang", "--out", out, *FAST[:-1], *mode]
    cli = _cli(tmp_path, argv)
    history = out / "history.jsonl"
    _wait_for(lambda: history.is_file() and history.read_text().strip())
    # the hanging method is inside its build: its working folder exists (in a worker: inside the worker's scratch)
    _wait_for(lambda: any(p.name.startswith("workbench-build-") for p in _workdirs(tmp_path / "tmp")))
    for _ in range(signals):
        cli.send_signal(sig)
        time.sleep(0.05)  # the second lands while the first one's cleanup runs (workers stopping: seconds)
    _, err = cli.communicate(timeout=900)
    # A second signal that lands after the cleanup, while Python shuts down (it restores the default
    # handlers there), ends the process by that signal: late, but nothing is lost and nothing printed.
    assert cli.returncode == status or (signals == 2 and cli.returncode == -sig), err
    assert f"{word}: 1 finished result(s) kept in {history}" in err and "Traceback" not in err
    assert [r.method for r in assert_history_extended(b"", history)] == ["fp32"]
    assert _workdirs(tmp_path / "tmp") == []
    assert list((tmp_path / "cwd").iterdir()) == []


def test_after_a_kill_9_no_worker_goes_on_and_the_next_run_removes_every_folder_left(
    tmp_path, tiny_folder, monkeypatch
):
    """multiprocessing's own folder (pymp-*) now lives inside a workbench-mp-<pid>-* folder, and a
    worker ends with the run that started it (Linux: it used to quantize on for nobody)."""
    import psutil

    from workbench.core import files

    hang = "test-hang:seconds=1800"  # longer than the wait below: a worker that went on would fail it
    argv = ["compare", "--model", tiny_folder, "--methods", hang, "--out", tmp_path / "out", *FAST[:-1]]
    cli = _cli(tmp_path, argv)
    tmp = tmp_path / "tmp"
    _wait_for(lambda: any(p.name.startswith("workbench-build-") for p in _workdirs(tmp)))  # in the hang
    cli.kill()
    cli.wait(900)

    def left_running():
        running = []
        for process in psutil.process_iter():
            try:
                running += [process.pid] if str(tmp) in process.cwd() else []
            except psutil.Error:
                continue
        return running

    _wait_for(lambda: not left_running())
    assert sorted(p.name.split("-")[1] for p in tmp.iterdir()) == ["mp", "worker"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert files.remove_stale_folders() == 2 and list(tmp.iterdir()) == []


def test_a_temporary_folder_too_deep_for_the_fork_servers_socket_still_runs_workers(tmp_path, tiny_folder):
    """multiprocessing's fork server listens on a Unix socket inside the temporary folder (at most
    107 bytes of path on Linux): with a deeper TMPDIR `compare` died with "AF_UNIX path too long";
    now the workers are spawned instead."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(deep), "HF_HUB_OFFLINE": "1"}
    argv = ["compare", "--model", tiny_folder, "--methods", "fp32", "--out", tmp_path / "out", *FAST[:-1]]
    done = subprocess.run(
        [sys.executable, "-m", "workbench", *map(str, argv)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert row["error"] is None and row["mode"] == "worker"


def test_gptqmodel_writes_no_logs_into_the_working_directory(capsys, case, monkeypatch):
    cwd = case.tmp / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, _, err = run(capsys, "compare", "--model", case.tiny, "--methods", "rtn", "--out", case.tmp / "o", *FAST)
    assert code == 0, err
    assert list(cwd.iterdir()) == []


def test_no_logs_are_tracked_in_the_repository():
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "logs"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert tracked == ""
    ignored = subprocess.run(["git", "check-ignore", "logs/x.log"], cwd=REPO, capture_output=True, text=True)
    assert ignored.returncode == 0


def test_a_later_run_removes_the_folders_a_killed_run_left_and_nothing_live(capsys, case, monkeypatch):
    """kill -9 leaves a run's temporary folders behind; the next run removes those of processes that
    are gone, and keeps the folders of running processes (its own, another workbench's)."""
    tmp = case.tmp / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp / f"workbench-worker-{gone.pid}-abc"
    live = tmp / f"workbench-build-{os.getppid()}-abc"
    other = tmp / "workbench-gptqmodel-logs-abc"
    for folder in (stale, live, other):
        (folder / "inside").mkdir(parents=True)
    code, _, err = run(capsys, "compare", "--model", case.tiny, "--methods", "fp32", "--out", case.tmp / "o", *FAST)
    assert code == 0 and "removed 1 temporary folder(s)" in err
    assert not stale.exists() and live.exists() and other.exists()


def test_one_identity_measured_twice_with_different_values_uses_the_latest_and_says_so(capsys, case):
    history = case.out / "history.jsonl"
    good = json.loads(history.read_text(encoding="utf-8").splitlines()[0])
    later = {**good, "ppl": good["ppl"] * 2, "timestamp": "later"}
    history.write_text(json.dumps(good) + "\n" + json.dumps(later) + "\n", encoding="utf-8")
    code, table, err = run(capsys, "compare", "--model", case.tiny, "--methods", "fp32", "--out", case.out, *FAST)
    assert code == 0 and "fp32 measured more than once with one identity and different values" in err
    assert "reused from later" in table or "later" in table


def test_a_remote_code_refusal_names_a_package_module_as_its_file(tmp_path):
    from workbench.sources import remote_code

    assert remote_code.code_files({"AutoModelForCausalLM": "sub.mod.Cls"}) == ["sub/mod.py"]


def test_the_command_line_keeps_library_noise_out_of_a_redirected_stderr(tmp_path, tiny_folder):
    """torch's deprecation warnings and the backends' progress bars go to the library log (named once);
    progress on a stderr that is a file or a pipe is plain lines, no carriage returns or escapes."""
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    argv = ["compare", "--model", tiny_folder, "--methods", "fp32,bnb-nf4", "--out", tmp_path / "o", *FAST[:-1]]
    done = subprocess.run(
        [sys.executable, "-m", "workbench", *map(str, argv)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    assert "_pytree" not in done.stderr and "\r" not in done.stderr and "\x1b[" not in done.stderr, done.stderr
    assert "[bnb-nf4] perplexity: 1/1 windows" in done.stderr
    assert done.stderr.count(str(tmp_path / "cache" / "library.log")) == 1
    assert (tmp_path / "cache" / "library.log").stat().st_size > 0


def test_a_gguf_next_to_a_config_naming_code_is_refused_for_that_reason(capsys, case):
    """Not "damaged, download it again": the file is fine, its neighbour would run code."""
    folder = case.tmp / "downloads"
    folder.mkdir()
    gguf = _write_tiny_gguf(folder / "tiny.gguf")
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "sub.mod.Evil"}}))
    code, _, err = run(capsys, "compare", "--model", gguf, "--methods", "fp32", "--out", case.tmp / "o", *FAST)
    assert code == 2
    assert_one_error_line(err, "its folder holds a config.json that asks to run Python code (sub/mod.py)")
    assert "download it again" not in err and not (case.tmp / "o").exists()
