"""The Ray executor on a real local Ray instance (2 CPUs, started once for the module): a sweep
measures what the local executor measures, a crashed task is an error row while the others
finish, cancel cancels the outstanding tasks.

The misbehaving methods come from tests/custom_method.py: each Ray task imports that module
from the folder the driver imported it from, as a plug-in on a cluster would be."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace

import pytest

ray = pytest.importorskip("ray")  # the [cluster] extra; `make test` installs it

from workbench import methods  # noqa: E402
from workbench.cli import main  # noqa: E402
from workbench.core.config import EvalConfig, ModelSpec  # noqa: E402
from workbench.core.errors import WorkbenchError  # noqa: E402
from workbench.run import ray_tasks, runner  # noqa: E402

FAST = ["--max-length", "128", "--max-tokens", "256", "--decode-tokens", "0"]
CELLS = ["fp32", "bnb-nf4", "bnb-int8", "bnb-fp4"]


@pytest.fixture(scope="module")
def local_ray():
    ray_tasks.same_priority_workers()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def session(tiny_folder):
    return runner.Session.open(
        ModelSpec(str(tiny_folder), device="cpu"),
        EvalConfig(max_length=128, stride=128, max_tokens=256, decode_tokens=0),
        log=lambda m: None,
    )


def _rows(folder):
    return json.loads((folder / "results.json").read_text())


@pytest.mark.timeout(1800)  # Ray's start and nine cells: 3.5 minutes on 2 idle cores
def test_a_ray_sweep_measures_what_the_local_executor_measures_and_a_crash_is_an_error_row(
    local_ray, custom, capsys, tiny_folder, tmp_path
):
    common = ["sweep", "--model", str(tiny_folder), *FAST]
    grids = [arg for cell in CELLS for arg in ("--grid", cell)]
    assert main([*common, *grids, "--grid", "test-crash", "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
    out, _ = capsys.readouterr()
    assert (
        main([*common, *grids, "--in-process", "--out", str(tmp_path / "local")]) == 0
    )  # (a crash here would end pytest)
    capsys.readouterr()
    *on_ray, crashed = _rows(tmp_path / "ray")
    here = _rows(tmp_path / "local")
    assert [r["label"] for r in on_ray] == [r["label"] for r in here] == CELLS
    lines = out.splitlines()
    first_row = lines[next(i for i, line in enumerate(lines) if line.startswith("method ")) + 2]
    assert {r["mode"] for r in on_ray} == {"ray"} and first_row.split()[-1] == "ray", out  # the "run in" column
    for a, b in zip(on_ray, here):
        assert a["error"] is None and math.isfinite(a["ppl"])
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6), a["label"]
        assert a["weight_bytes"] == b["weight_bytes"]
    assert (
        crashed["mode"] == "ray"
        and "Ray worker process died" in crashed["error"]
        and "WorkerCrashedError" in crashed["error"]
    )
    assert len((tmp_path / "ray" / "history.jsonl").read_text().splitlines()) == 5  # written here as the tasks ended


def test_cancel_after_the_first_result_cancels_the_running_and_the_queued_tasks(local_ray, custom, session):
    cells = [methods.parse(c) for c in ("bnb-nf4", "test-hang:seconds=1800", "test-hang:seconds=1801")]
    finished = []
    start = time.monotonic()
    ray_tasks.RayTasks().run(
        session,
        list(enumerate(cells)),
        lambda index, result: finished.append((index, result)),
        lambda m: None,
        None,
        should_stop=lambda: bool(finished),
    )
    assert [(index, result.label, result.error) for index, result in finished] == [(0, "bnb-nf4", None)]
    deadline = time.monotonic() + 900
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2  # the running hang was killed, the queued one never started
    assert (
        time.monotonic() - start < 1800
    )  # ended by the cancel, not by the hang running out (however busy the machine)


def test_a_task_that_raises_before_measuring_is_an_error_row_saying_why(local_ray, tiny_folder, tmp_path):
    text = tmp_path / "essay.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    session = runner.Session.open(
        ModelSpec(str(tiny_folder), device="cpu"),
        EvalConfig(max_length=128, stride=128, text_path=str(text), decode_tokens=0),
        log=lambda m: None,
    )
    text.unlink()  # as on a node that lacks the evaluation text
    rows = []
    ray_tasks.RayTasks().run(
        session,
        [(0, methods.parse("bnb-nf4"))],
        lambda index, result: rows.append(result),
        lambda m: None,
        None,
        lambda: False,
    )
    (row,) = rows
    assert row.mode == "ray" and "the Ray task raised WorkbenchError" in row.error and "essay.txt" in row.error


def test_a_gpu_session_on_a_cluster_without_gpus_is_refused_before_any_task(local_ray, session):
    with pytest.raises(WorkbenchError, match="each task needs 1 GPU"):
        ray_tasks.RayTasks().run(
            replace(session, device="cuda"),
            [(0, methods.parse("fp32"))],
            lambda i, r: None,
            lambda m: None,
            None,
            lambda: False,
        )


def test_ray_workers_run_at_the_drivers_priority(local_ray):
    """Ray's default niceness of 15 starved its workers beside any busy process (a sweep that
    takes 3.5 minutes on idle cores did not end in an hour on a busy 2-core machine)."""
    niceness = ray.remote(lambda: os.nice(0))
    assert ray.get(niceness.remote(), timeout=900) == os.nice(0)
