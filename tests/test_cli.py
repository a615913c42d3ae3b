"""The CLI contract end to end, and one clear message for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from workbench.cli import main

FAST = ["--max-length", "128", "--max-tokens", "256", "--decode-tokens", "8"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_json_lists_every_method_with_availability(capsys):
    code, out, _ = run(capsys, "methods", "--json")
    rows = json.loads(out)
    assert code == 0
    names = {r["name"] for r in rows}
    assert {"fp32", "bnb-int8", "bnb-nf4", "gptq", "rtn", "awq", "quanto-int4", "hqq", "torchao-int8"} <= names
    for r in rows:
        assert {"name", "family", "bits", "available", "reason"} <= set(r)
        assert isinstance(r["available"], bool) and (r["reason"] is None) == r["available"]
    assert next(r for r in rows if r["name"] == "torchao-int4")["available"] is False


def test_all_methods_are_every_method_that_runs_here_with_its_defaults():
    from workbench import methods
    from workbench.cli.compare import _choose_methods

    chosen, left_out = _choose_methods("all", "cpu")
    runs_here = [m.name for m, reason in methods.available("cpu") if reason is None]
    assert [c.text for c in chosen] == [methods.parse(name).text for name in runs_here] and len(chosen) > 10
    assert any(line.startswith("torchao-int4: runs on cuda only") for line in left_out)


def test_compare_writes_results_and_goes_on_after_a_failure(capsys, tiny_folder, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys,
        "compare",
        "--model",
        str(tiny_folder),
        "--methods",
        "fp32,bnb-nf4,torchao-int4,fp32",
        "--out",
        str(out_dir),
        *FAST,
    )
    assert code == 0
    assert "named twice" in err  # the duplicate is measured once
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["method"] for r in results] == ["fp32", "bnb-nf4", "torchao-int4"]
    for r in results:
        assert {
            "method",
            "label",
            "ppl",
            "weight_bytes",
            "peak_bytes",
            "peak_above_baseline_bytes",
            "build_peak_bytes",
            "run_peak_bytes",
            "load_s",
            "decode_tokens_per_s",
            "decode_spread",
            "mode",
            "error",
            "protocol",
        } <= set(r)
    fp32, nf4, gpu_only = results
    assert fp32["error"] is None and nf4["error"] is None and fp32["mode"] == nf4["mode"] == "worker"
    assert nf4["weight_bytes"] < fp32["weight_bytes"] and nf4["ppl"] > 1
    assert (
        fp32["protocol"]["max_length"] == 128
        and fp32["protocol"]["stride"] == 127
        and fp32["protocol"]["n_tokens"] == 255
    )
    assert "cuda only" in gpu_only["error"]
    assert (out_dir / "results.csv").read_text().startswith("model,method,")
    assert (
        "js-plotly-plot" in (out_dir / "report.html").read_text() or "plotly" in (out_dir / "report.html").read_text()
    )
    assert "bnb-nf4" in out and "Δ ppl %" in out and "Traceback" not in err
    assert len((out_dir / "history.jsonl").read_text().splitlines()) == 3


def test_compare_reuses_history_unless_rerun(capsys, tiny_folder, tmp_path):
    args = ["compare", "--model", str(tiny_folder), "--methods", "fp32", "--out", str(tmp_path), *FAST]
    run(capsys, *args)
    _, _, err = run(capsys, *args)
    assert "reusing" in err
    _, _, err = run(capsys, *args, "--rerun")
    assert "reusing" not in err
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 2


def test_compare_exits_non_zero_when_nothing_succeeds_and_keeps_earlier_results(capsys, tiny_folder, tmp_path):
    run(capsys, "compare", "--model", str(tiny_folder), "--methods", "fp32", "--out", str(tmp_path), *FAST)
    before = (tmp_path / "results.json").read_text()
    code, out, _ = run(
        capsys, "compare", "--model", str(tiny_folder), "--methods", "torchao-int4", "--out", str(tmp_path), *FAST
    )
    assert code == 1 and "cuda only" in out and "left as they were" in out
    assert (tmp_path / "results.json").read_text() == before


def test_eval_text_file_is_used_and_named(capsys, tiny_folder, tmp_path):
    text = tmp_path / "essay.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    code, _, _ = run(
        capsys,
        "compare",
        "--model",
        str(tiny_folder),
        "--methods",
        "fp32",
        "--eval-text",
        str(text),
        "--out",
        str(tmp_path / "o"),
        *FAST,
    )
    assert code == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())[0]["protocol"]["text"] == "essay.txt"


@pytest.mark.parametrize(
    "setup,argv,message",
    [
        (None, ["--model", "./no/such/folder"], "no such model folder"),
        ("not_model", ["--model", "{dir}"], "has no config.json"),
        (
            None,
            ["--model", "some-org/model-that-does-not-exist-xyz"],
            "could not read its config from the Hugging Face Hub",
        ),
        ("empty", ["--eval-text", "{file}"], "the file is empty"),
        ("short", ["--eval-text", "{file}"], "perplexity needs at least 32"),
        ("binary", ["--eval-text", "{file}"], "not UTF-8"),
        (None, ["--eval-text", "/no/such.txt"], "no such file"),
        (None, ["--stride", "4096"], "larger than max_length"),
        (None, ["--methods", ","], "no method named"),
        (None, ["--methods", "nope"], "unknown method 'nope'"),
        ("file", ["--out", "{file}"], "cannot write there"),
        (None, ["--model", "missing.gguf"], "no such .gguf file"),
    ],
)
def test_bad_input_gives_one_clear_message(capsys, tiny_folder, tmp_path, setup, argv, message):
    target = tmp_path / "input"
    if setup == "not_model":
        target.mkdir()
    elif setup == "empty":
        target.write_text("   \n", encoding="utf-8")
    elif setup == "short":
        target.write_text("Too short.", encoding="utf-8")
    elif setup == "binary":
        target.write_bytes(b"\xff\xfe\x00\x80 binary")
    elif setup == "file":
        target.write_text("a file, not a folder", encoding="utf-8")
    argv = [a.format(dir=target, file=target) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_folder)]
    code, out, err = (
        run(capsys, "compare", "--methods", "fp32", "--out", str(tmp_path / "o"), *FAST, *argv)
        if "--methods" not in argv
        else run(capsys, "compare", "--out", str(tmp_path / "o"), *FAST, *argv)
    )
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_estimate_json(capsys, tiny_folder):
    code, out, _ = run(capsys, "estimate", "--model", str(tiny_folder), "--json")
    data = json.loads(out)
    assert code == 0 and data["total_params"] > 0
    fp32 = next(r for r in data["rows"] if r["method"] == "fp32")
    assert fp32["weight_bytes"] == 4 * data["total_params"]


def test_python_dash_m_entry_point(tiny_folder):
    done = subprocess.run([sys.executable, "-m", "workbench", "methods"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "bnb-nf4" in done.stdout and "available: yes" in done.stdout
