"""The runner's two verbs, the method contract, worker processes and honest numbers, on the tiny model.

Worker-process tests run the real spawn path (a fresh Python per method); the methods that
crash, hang or return NaN come from tests/custom_method.py, registered from outside the
package the way a plug-in would be."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workbench import methods
from workbench.cli import main
from workbench.core import allocator
from workbench.core.config import EvalConfig, ModelSpec
from workbench.core.errors import WorkbenchError
from workbench.run import estimate, executors, runner, workers
from workbench.run.compare import compare
from workbench.sources import models

FAST = ["--max-length", "128", "--max-tokens", "256", "--decode-tokens", "8"]
TESTS = Path(__file__).resolve().parent


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- the method contract


def test_a_method_registered_from_one_module_appears_in_every_surface(custom, capsys, tiny_folder, tmp_path):
    from workbench.panels import MethodPicker

    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0 and "test-rtn8" in {r["name"] for r in json.loads(out)}
    code, out, _ = run(capsys, "estimate", "--model", str(tiny_folder), "--json")
    row = next(r for r in json.loads(out)["rows"] if r["method"] == "test-rtn8")
    assert row["bits_per_weight"] == 32
    picker = MethodPicker(device="cpu")
    picker.select("test-rtn8")
    assert picker.choices() == ["test-rtn8"]
    code, out, err = run(
        capsys, "compare", "--model", str(tiny_folder), "--methods", "fp32,test-rtn8", "--out", str(tmp_path), *FAST
    )  # in worker processes: the worker imports custom_method too
    assert code == 0, err
    fp32, rtn8 = json.loads((tmp_path / "results.json").read_text())
    assert rtn8["method"] == "test-rtn8" and rtn8["error"] is None and rtn8["mode"] == "worker"
    assert rtn8["ppl"] != fp32["ppl"] and abs(rtn8["ppl"] / fp32["ppl"] - 1) < 0.05  # rounded, yet close


def test_build_counts_storage_before_any_forward_pass_and_close_removes_the_workdir(tiny_session):
    built = runner.build(tiny_session, "bnb-nf4", log=lambda m: None)
    assert built.storage.kernel == "Linear4bit" and 4 < built.storage.bits_per_weight < 6
    assert built.workdir.is_dir()
    measured = runner.measure(tiny_session, built, log=lambda m: None)
    assert math.isfinite(measured.perplexity.ppl) and measured.speed.repeats >= 3
    built.close()
    assert built.model is None and not built.workdir.exists()


def test_measure_warms_up_and_hands_back_what_repacking_freed_before_scoring(tiny_session, monkeypatch):
    """gptqmodel repacks its int4 weights for the CPU kernel in the first forward pass, freeing the
    old ones: left in the heap while scoring, they moved rtn's peak memory from run to run by up
    to 11% (bench/worker_isolation.py). So: warm-up pass, memory handed back, then scoring."""
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear

    events = []
    with runner.build(tiny_session, "rtn", log=lambda m: None) as built:
        packed = [m for m in built.model.modules() if isinstance(m, TorchAtenLinear)]
        modes = lambda: {m.linear_mode for m in packed}  # noqa: E731
        assert packed and modes() == {None}  # nothing ran yet

        def record(embedding, args):  # every forward pass starts here, the scoring kernel's too
            events.append(("forward", args[0].shape[-1], modes()))

        def release_freed(real=allocator.release_freed):
            events.append(("release", None, modes()))
            return real()

        built.model.get_input_embeddings().register_forward_pre_hook(record)
        monkeypatch.setattr(allocator, "release_freed", release_freed)
        measured = runner.measure(tiny_session, built, log=lambda m: None)
    warm_up_tokens = len(tiny_session.speed_prompt())
    assert events[0] == ("forward", warm_up_tokens, {None}) and measured.warm_up_s > 0
    assert events[1][0] == "release" and None not in events[1][2]  # every layer prepared, then memory handed back
    scoring = events[2:]
    assert any(length == tiny_session.eval.max_length for _, length, _ in scoring)  # the perplexity windows came after
    assert tiny_session.planned_protocol()["warm_up_tokens"] == warm_up_tokens  # part of a result's identity


def test_adapter_wrapped_models_count_base_and_adapter(tiny_session, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = runner.build(tiny_session, "bnb-nf4", log=lambda m: None)
    lora = get_peft_model(base.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "adapter")
    base.close()
    with runner.build(
        tiny_session, methods.parse("bnb-nf4", adapter=str(tmp_path / "adapter")), log=lambda m: None
    ) as built:
        assert built.choice.label == "bnb-nf4+lora"
        plain = runner.build(tiny_session, "bnb-nf4", log=lambda m: None)
        # LoRA A (r x in) and B (out x r) in fp32 on q and v of each block: added to the 4-bit layers' bytes.
        layers = dict(models.block_linears(plain.model))
        adapter_bits = sum(
            32 * 8 * (layers[n].in_features + layers[n].out_features)
            for n in layers
            if n.endswith(("q_proj", "v_proj"))
        )
        weights = sum(m.in_features * m.out_features for m in layers.values())
        assert built.storage.bits_per_weight == pytest.approx(
            plain.storage.bits_per_weight + adapter_bits / weights, rel=1e-3
        )
        plain.close()


def test_no_family_checks_outside_the_methods_package():
    package = Path(runner.__file__).parent
    offenders = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if "methods" not in p.parts and "family ==" in p.read_text(encoding="utf-8")
    ]
    assert not offenders


def test_result_identity_is_not_its_label(tiny_session):
    result = runner.failed(tiny_session, methods.parse("gptq:bits=8:group_size=32"), "not run")
    assert result.method == "gptq" and result.label == "gptq(bits=8, group_size=32)"
    identity = result.identity()
    assert (
        identity["method"] == "gptq"
        and identity["params"]["bits"] == 8
        and identity["model"] == tiny_session.fingerprint
    )
    assert identity["protocol"]["decode_tokens"] == 8 and identity["backend"].startswith("gptqmodel ")


# ---------------------------------------------------------------------------- worker processes


def _compare(session, choices, executor, **kwargs):
    return compare(session, choices, log=lambda m: None, executor=executor, **kwargs)


@pytest.fixture(scope="module")
def recorded_reference(tiny_session):
    """fp32's next-token distributions recorded for the tiny session, so a comparison of other
    methods measures only those (no reference row added first for the KL columns)."""
    _compare(tiny_session, ["fp32"], executors.InProcess())


def test_a_crashing_worker_is_an_error_row_naming_the_signal_and_the_comparison_goes_on(custom, tiny_session):
    crashed, fp32 = _compare(tiny_session, ["test-crash", "fp32"], workers.WorkerProcesses())
    assert "SIGSEGV" in crashed.error and crashed.mode == "worker"
    assert fp32.error is None and math.isfinite(fp32.ppl)


def test_a_stuck_worker_ends_at_its_timeout(custom, tiny_session, recorded_reference):
    start = time.monotonic()
    (hung,) = _compare(tiny_session, ["test-hang"], workers.WorkerProcesses(timeout_s=6))
    assert "time limit of 6 s" in hung.error and time.monotonic() - start < 60


def test_cancel_ends_the_running_worker_within_two_seconds(custom, tiny_session, recorded_reference):
    stop, stopped_at = threading.Event(), []
    timer = threading.Timer(6, lambda: (stopped_at.append(time.monotonic()), stop.set()))
    timer.start()
    results = _compare(tiny_session, ["test-hang", "bnb-nf4"], workers.WorkerProcesses(), should_stop=stop.is_set)
    assert results == [] and time.monotonic() - stopped_at[0] < 2


def test_a_worker_terminated_from_outside_names_the_sender(custom, tiny_session, recorded_reference):
    import psutil

    def terminate_the_worker():
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            for child in psutil.Process().children(recursive=True):
                try:
                    if "workbench-worker-" in child.cwd():
                        time.sleep(1)  # past its start, inside the method
                        os.kill(child.pid, signal.SIGTERM)
                        return
                except psutil.Error:
                    continue
            time.sleep(0.1)

    killer = threading.Thread(target=terminate_the_worker)
    killer.start()
    (row,) = _compare(tiny_session, ["test-hang"], workers.WorkerProcesses(timeout_s=180))
    killer.join()
    assert "died from SIGTERM" in row.error and f"SIGTERM sent by process {os.getpid()}" in row.error, row.error


def test_what_the_fork_server_prints_is_library_output_not_the_callers(tiny_folder):
    """In a notebook kernel, the fork server's import messages would land in the running cell."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from workbench.run import compare, runner, workers\nfrom workbench.core.config import EvalConfig, ModelSpec\n"
        "workers.WORKER_PRELOAD.append('noisy_import')\n"
        "if __name__ == '__main__':\n"
        "    session = runner.Session.open(ModelSpec(sys.argv[2], device='cpu'), EvalConfig(max_length=128, stride=128, "
        "max_tokens=256, decode_tokens=8), log=lambda m: None)\n"
        "    lines = []\n"
        "    (row,) = compare.compare(session, ['fp32'], log=lambda m: None, executor=workers.WorkerProcesses(library_log=lines.append))\n"
        "    print('error:', row.error, '| library:', ' / '.join(line for line in lines if 'noisy' in line))\n"
        "    import os; print('server output file left:', os.path.exists(workers._fork_server_output.name))\n"
    )
    # cwd: Python 3.11's fork server ignores the parent's sys.path when it preloads, but finds the cwd's modules
    done = subprocess.run(
        [sys.executable, "-c", script, str(TESTS), str(tiny_folder)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=TESTS,
    )
    assert done.returncode == 0, done.stderr
    assert "noisy" not in done.stderr and done.stdout.count("noisy") == 3, (done.stdout, done.stderr)
    assert done.stdout.startswith("error: None | library: ")
    assert "server output file left: False" in done.stdout  # read through the open file, no name left in /tmp


def test_nan_perplexity_is_an_error_row(custom, tiny_session, recorded_reference):
    (row,) = _compare(tiny_session, ["test-nan"], executors.InProcess())
    assert row.error and "not finite" in row.error and row.ppl is None


def test_worker_rows_report_their_own_peak_above_the_baseline(tiny_session):
    (row,) = _compare(tiny_session, ["fp32"], workers.WorkerProcesses())
    apart = "" if allocator.glibc() is None else " (blocks of 2 MiB and more mapped apart)"
    assert row.mode == "worker" and row.peak_kind == f"peak RSS{apart}"  # the table's footnote says so
    assert row.weight_bytes <= row.peak_above_baseline_bytes < row.peak_bytes  # holds the model, not the imports
    assert row.weight_bytes <= row.run_peak_bytes  # using the model holds its weights
    assert row.peak_above_baseline_bytes == max(row.build_peak_bytes, row.run_peak_bytes)
    (here,) = _compare(tiny_session, ["fp32"], executors.InProcess())
    assert here.mode == "in-process" and here.error is None and here.peak_kind == row.peak_kind  # one protocol


def test_results_stream_into_history_as_each_finishes(custom, tiny_folder, tmp_path):
    """Ctrl-C during the second method: the first is already in the history, and a re-run reuses it."""
    out = tmp_path / "out"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import custom_method; from workbench.cli import main; "
        "sys.exit(main(sys.argv[2:]))"
    )
    argv = [sys.executable, "-c", script, str(TESTS), "compare", "--model", str(tiny_folder), "--out", str(out), *FAST]
    cli = subprocess.Popen(
        argv + ["--methods", "fp32,test-hang"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    history = out / "history.jsonl"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not (history.is_file() and history.read_text().strip()):
        time.sleep(0.2)
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=900)
    assert cli.returncode == 130
    assert f"interrupted: 1 finished result(s) kept in {history}" in err
    assert [json.loads(line)["method"] for line in history.read_text().splitlines()] == ["fp32"]
    again = subprocess.run(argv + ["--methods", "fp32"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "reusing it" in again.stderr and "reused from" in again.stdout


# ---------------------------------------------------------------------------- refused before any work


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "fp32,nope"], "unknown method 'nope'"),
        (["--methods", "gptq:bits=5"], "bits=5 is not supported"),
        (["--methods", "hqq:bits=nan"], "is not a int"),
        (["--methods", "bnb-int8:threshold=nan"], "must be a finite number"),
        (["--decode-tokens", "1"], "too few to time"),
        (["--max-length", "2048"], "beyond"),
        (["--jobs", "100000"], "use --jobs"),
    ],
)
def test_bad_choices_and_settings_are_refused_before_any_work(capsys, tiny_folder, tmp_path, argv, message):
    base = ["compare", "--model", str(tiny_folder), "--out", str(tmp_path / "o"), *FAST]
    if "--methods" not in argv:
        argv = argv + ["--methods", "fp32,bnb-nf4"]
    code, out, err = run(capsys, *base, *argv)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "o" / "history.jsonl").exists()


def test_a_non_causal_model_is_refused_before_any_work(capsys, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    ).save_pretrained(tmp_path / "bert")
    code, _, err = run(
        capsys, "compare", "--model", str(tmp_path / "bert"), "--methods", "fp32", "--out", str(tmp_path / "o"), *FAST
    )
    assert code == 2 and "BertForMaskedLM is not a causal" in err


def test_a_checkpoint_missing_a_layer_is_an_error_row_naming_the_tensors(tiny_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    weights = load_file(broken / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".layers.1." not in k},
        broken / "model.safetensors",
        metadata={"format": "pt"},
    )
    session = runner.Session.open(
        ModelSpec(str(broken), device="cpu"), EvalConfig(max_length=128, stride=128, max_tokens=256, decode_tokens=0)
    )
    (row,) = _compare(session, ["fp32"], executors.InProcess())
    assert row.error and "missing" in row.error and "model.layers.1." in row.error


# ---------------------------------------------------------------------------- estimate and measurement agree


@pytest.mark.parametrize(
    "name", ["fp32", "bnb-int8", "bnb-nf4", "bnb-nf4:double_quant=false", "hqq", "quanto-int8", "torchao-int8"]
)
def test_estimate_agrees_with_the_measured_storage(tiny_session, name):
    choice = methods.parse(name)
    total, linear = estimate.count_params(models.empty_model(tiny_session.source))
    expected = estimate.method_estimate(choice.method, total, linear, {}, "cpu", choice.params).weight_bytes
    with runner.build(tiny_session, choice, log=lambda m: None) as built:
        assert built.storage.weight_bytes == pytest.approx(expected, rel=0.05)


def test_jobs_that_fit_are_accepted(tiny_session):
    executors.check_jobs_fit(2, tiny_session, [methods.parse("fp32")])
    with pytest.raises(WorkbenchError, match="use --jobs"):
        executors.check_jobs_fit(10**6, tiny_session, [methods.parse("fp32")])
