"""One Ray task per method, on a local Ray instance or an existing cluster.

Each task runs in a fresh Ray worker process (the body is `executors.evaluate_fresh`); Ray is
an optional extra, imported only when this executor is used.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from workbench.core.errors import WorkbenchError
from workbench.methods import Choice
from workbench.run.executors import evaluate_fresh, portable_eval
from workbench.run.results import Result

RAY_PIP = "pip install 'quantization-workbench[cluster]' (or: pip install 'ray==2.60.*')"

RAY_FAILURES = {
    "TaskCancelledError": "the Ray task was cancelled",
    "WorkerCrashedError": "the Ray worker process died (a crash in a native library, or killed: on Linux the "
    "out-of-memory killer does this when memory runs out)",
    "OutOfMemoryError": "Ray's memory monitor killed the task: its node ran low on memory",
    "NodeDiedError": "the node running the task died or left the cluster",
    "LocalRayletDiedError": "the Ray raylet of the node running the task died",
    "ObjectLostError": "the task's result was lost with the node that held it",
    "RuntimeEnvSetupError": "Ray could not set up the task's environment on its node",
}
"""What each way a Ray task can end without a result means, by Ray's exception class (the
first match along the exception's class hierarchy); any other `RayError` is named as it is."""


class RayTasks:
    """Each method one Ray task, on a local Ray instance or an existing cluster (`address`).

    A task asks for what one build+measure needs: `cpus_per_task` CPUs (torch in the task uses
    that many threads) and, when the session's device is cuda, one GPU too; Ray runs as many
    at once as the cluster's resources hold. Each task gets a fresh worker process
    (`max_calls=1`: Ray otherwise reuses worker processes, and a method's peak RSS would
    count what earlier methods left behind, as in `WorkerProcesses`), and none is retried
    (`max_retries=0`: a method that crashed or ran out of memory would only do it again).
    Results come back as tasks finish (`ray.wait`) and go to `finished` at once: the driver,
    this process, writes the history. A task that raised, or whose worker or node died, is an
    error row; `should_stop`, Ctrl-C or an error in a callback cancel every outstanding task
    (`force`: its worker process is killed). A task's log lines and library output come back
    with its result (no live progress). A local instance started here lasts until this
    process exits, so later sweeps skip Ray's start-up; a `ray.init` made by the caller (a
    notebook, a test) is used as it is."""

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_task: int = 1,
        library_log: Callable[[str], None] | None = None,
    ):
        if address is not None and num_cpus is not None:
            raise WorkbenchError(
                f"--ray-cpus {num_cpus}: an existing Ray cluster ({address}) has the CPUs its nodes "
                "were started with; leave out --ray-cpus, or --address for a local instance."
            )
        if num_cpus is not None and num_cpus < 1:
            raise WorkbenchError(
                f"--ray-cpus: {num_cpus} is not a number of CPUs for the local Ray instance; use 1 or more."
            )
        if cpus_per_task < 1:
            raise WorkbenchError(f"cpus_per_task: {cpus_per_task} is not a number of CPUs; use 1 or more.")
        self.address, self.num_cpus, self.cpus_per_task, self.library_log = (
            address,
            num_cpus,
            cpus_per_task,
            library_log,
        )

    def resources(self, device: str) -> dict:
        """What one task asks Ray for."""
        return {"num_cpus": self.cpus_per_task, "num_gpus": 1 if device == "cuda" else 0}

    def run(self, session, pending, finished, log, progress, should_stop) -> None:
        if not pending or should_stop():
            return
        ray = import_ray()
        self._connect(ray, log)
        needs = self.resources(session.device)
        self._check_cluster_holds(ray, needs)
        remote = ray.remote(max_calls=1, max_retries=0, **needs)(_ray_task)
        threads = self.cpus_per_task if session.device == "cpu" else None
        eval_cfg = portable_eval(session)
        outstanding = {}
        try:
            for index, choice in pending:
                module = choice.method.quantize.__module__
                ref = remote.remote(
                    session.source,
                    session.device,
                    eval_cfg,
                    choice.text,
                    choice.adapter,
                    module,
                    _import_root(module),
                    threads,
                )
                outstanding[ref] = (index, choice)
            while outstanding:
                if should_stop():
                    return
                ready, _ = ray.wait(list(outstanding), num_returns=1, timeout=0.1)
                for ref in ready:
                    index, choice = outstanding.pop(ref)
                    finished(index, self._outcome(ray, ref, session, choice, log))
        finally:
            for ref in outstanding:
                ray.cancel(ref, force=True)

    def _connect(self, ray, log) -> None:
        """Join the cluster at `address`, or start a local instance (quiet: no dashboard, the
        workers' output stays in Ray's log files on their nodes)."""
        import logging

        if ray.is_initialized():
            return
        quiet = {
            "ignore_reinit_error": True,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        try:
            if self.address:
                ray.init(address=self.address, **quiet)
            else:
                same_priority_workers()
                ray.init(num_cpus=self.num_cpus, **quiet)
        except ConnectionError as exc:
            raise WorkbenchError(
                f"--address {self.address}: no Ray cluster answered ({exc}). Start one with `ray start --head` "
                "on the head node (and `ray start --address HEAD:6379` on the others), or leave out --address "
                "to run on a local Ray instance."
            ) from None
        total = ray.cluster_resources()
        log(
            f"Ray: {len(ray.nodes())} node(s), {total.get('CPU', 0):g} CPU(s), {total.get('GPU', 0):g} GPU(s)"
            f"{f' at {self.address}' if self.address else ' (local instance)'}"
        )

    @staticmethod
    def _check_cluster_holds(ray, needs: dict) -> None:
        """Refuse before submitting a task no node could run: Ray would keep it pending forever."""
        total = ray.cluster_resources()
        for name, key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            if needs[name] and total.get(key, 0) < needs[name]:
                raise WorkbenchError(
                    f"--executor ray: each task needs {needs[name]} {key}(s) and the Ray cluster has "
                    f"{total.get(key, 0):g}; add nodes that have them, or use --device cpu."
                )

    def _outcome(self, ray, ref, session, choice: Choice, log) -> Result:
        from workbench.run import runner

        try:
            result, messages, library = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # raised outside `evaluate` (opening the session, an import)
            cause = exc.cause if exc.cause is not None else exc
            return runner.failed(
                session,
                choice,
                f"{choice.label}: the Ray task raised {type(cause).__name__}: {str(cause).strip()[:300]}",
                mode="ray",
            )
        except ray.exceptions.RayError as exc:
            return runner.failed(session, choice, f"{choice.label}: {_ray_failure(exc)}", mode="ray")
        for message in messages:
            log(message)
        if self.library_log:
            for line in library:
                self.library_log(line)
        return result


def _ray_failure(exc: Exception) -> str:
    for kind in type(exc).__mro__:
        if kind.__name__ in RAY_FAILURES:
            return f"{RAY_FAILURES[kind.__name__]} ({kind.__name__})"
    text = str(exc).strip()
    return f"Ray could not run the task: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def import_ray():
    """Ray, or a message that says how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise WorkbenchError(f"--executor ray needs the 'ray' package: {RAY_PIP}") from None
    return ray


def _import_root(module_name: str) -> str | None:
    """The folder a method's module is imported from, so that a Ray worker, which does not get
    this process's sys.path, can import a method registered outside the package (a plug-in
    such as tests/custom_method.py). On a cluster the folder must exist on every node."""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return None
    root = Path(path).resolve().parent
    for _ in range(module_name.count(".") + (Path(path).name == "__init__.py")):
        root = root.parent
    return str(root)


def _ray_task(source, device, eval_cfg, choice_text, adapter, method_module, module_root, threads):
    """A Ray task's whole life, in a fresh worker process: one `_evaluate_fresh` inside a scratch
    folder (its working directory and TMPDIR, removed at the end), library output into a file
    there. Returns (result, log messages, library output lines) to the driver."""
    from workbench.core.quiet import library_output

    if module_root and module_root not in sys.path:
        sys.path.append(module_root)  # after the installed packages: the node's own install wins
    scratch = Path(tempfile.mkdtemp(prefix="workbench-ray-"))
    os.chdir(scratch)
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    messages: list[str] = []
    try:
        with library_output(scratch / "library.log"):
            result = evaluate_fresh(
                source, device, eval_cfg, choice_text, adapter, method_module, threads, "ray", messages.append, None
            )
        return (result, messages, (scratch / "library.log").read_text(encoding="utf-8", errors="replace").splitlines())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def same_priority_workers() -> None:
    """A local Ray instance started after this runs its workers at this process's priority.
    Ray starts them at niceness 15: beside any other busy process (a second sweep, a test
    suite, a browser) such a worker got a few percent of a core, and a sweep that took 3.5
    minutes on idle cores did not end in an hour; the local executor's workers are not niced
    either, so the two measure alike. A value the user set is kept."""
    os.environ.setdefault("RAY_worker_niceness", "0")
