"""Where a (build, measure) pair runs: in this process, in a fresh worker process per method,
or as one Ray task per method on a cluster.

One small interface, `Executor.run(session, pending, finished, log, progress, should_stop)`:
`pending` is a list of `(index, Choice)`, and `finished(index, result)` is called the
moment each result is ready, so the caller can append it to the history at once.

`WorkerProcesses` is the default. Each method is built and measured in a fresh process
(spawn), so its peak memory is its own (the worker's peak RSS, and the peak above what
the worker held after its imports), a crash (segfault, the OOM killer, a native abort)
becomes an error row that names the signal, a stuck method ends at its timeout, and
cancel ends the running worker at once. The parent never holds a model. The worker's
library output (gptqmodel, bitsandbytes...) goes to `library_log`, not to the caller's
stdout, and its working directory and temporary folder are a scratch folder that the parent
removes however the worker ends.

`InProcess` measures in the calling process: for notebooks that keep a model. `RayTasks`
sends each method to a Ray cluster (or a local Ray instance) as one task in a fresh Ray
worker process; Ray is an optional extra, imported only there. Rows say which mode
measured them (`in-process`, `worker`, `ray`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from multiprocessing import connection, get_context
from pathlib import Path
from typing import Callable, Protocol

from .errors import WorkbenchError
from .methods import Choice
from .results import Result

SIGNAL_HINTS = {
    "SIGKILL": "killed; on Linux the out-of-memory killer does this when memory runs out",
    "SIGSEGV": "segmentation fault inside a native library",
    "SIGABRT": "a native library aborted",
    "SIGBUS": "bus error inside a native library",
    "SIGTERM": "terminated from outside",
}
WORKER_OVERHEAD_BYTES = 1200 * 2**20
"""What an idle worker holds after importing torch, transformers and a backend (measured ~0.9-1.1 GB)."""


class Executor(Protocol):
    def run(self, session, pending: list[tuple[int, Choice]], finished: Callable[[int, Result], None],
            log: Callable[[str], None], progress, should_stop: Callable[[], bool]) -> None: ...


class InProcess:
    """Build and measure here, one after another; cancel takes effect between methods."""

    def run(self, session, pending, finished, log, progress, should_stop) -> None:
        from . import runner

        for index, choice in pending:
            if should_stop():
                return
            finished(index, runner.evaluate(session, choice, log, progress).result)


@dataclass
class _Task:
    index: int
    choice: Choice
    process: object
    conn: connection.Connection
    scratch: Path
    started: float
    log_file: object
    result: Result | None = None
    ended: bool = False
    """The worker closed its end of the pipe (it finished, or died)."""


class WorkerProcesses:
    """Each method in a fresh spawned process; up to `jobs` at once; `timeout_s` per method."""

    def __init__(self, jobs: int = 1, timeout_s: float | None = None, library_log: Callable[[str], None] | None = None):
        if jobs < 1:
            raise WorkbenchError(f"--jobs: {jobs} is not a number of worker processes; use 1 or more.")
        if timeout_s is not None and not timeout_s > 0:
            raise WorkbenchError(f"--timeout: {timeout_s} seconds is not a time limit; give a positive number of seconds.")
        self.jobs, self.timeout_s, self.library_log = jobs, timeout_s, library_log

    @staticmethod
    def warm_up() -> None:
        """Start the fork server now, e.g. while the session opens: its imports take a few seconds.
        What it prints while importing is library output like a worker's (`library_log`)."""
        if _worker_context().get_start_method() == "forkserver":
            _start_fork_server()

    def run(self, session, pending, finished, log, progress, should_stop) -> None:
        queue, running = list(pending), []
        try:
            while queue or running:
                if should_stop():
                    return
                while queue and len(running) < self.jobs:
                    index, choice = queue.pop(0)
                    running.append(self._start(session, index, choice))
                ready = connection.wait([task.conn for task in running], timeout=0.1)
                for task in list(running):
                    self._drain(task, task.conn in ready, log, progress)
                    outcome = self._outcome(session, task)
                    if outcome is not None:
                        running.remove(task)
                        self._cleanup(task)
                        finished(task.index, outcome)
        finally:
            for task in running:  # cancel, Ctrl-C, or an error in a callback: end the workers now
                self._stop(task)
                self._cleanup(task)

    def _start(self, session, index: int, choice: Choice) -> _Task:
        self.warm_up()
        context = _worker_context()
        receive, send = context.Pipe(duplex=False)
        scratch = Path(tempfile.mkdtemp(prefix="workbench-worker-"))
        threads = max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else None
        process = context.Process(target=_worker_main, daemon=True, name=f"workbench-{choice.label}",
                                  args=(send, session.source, session.device, _portable_eval(session), choice.text, choice.adapter,
                                        choice.method.quantize.__module__, str(scratch), threads))
        process.start()
        send.close()
        log_file = open(scratch / "library.log", "a+", encoding="utf-8", errors="replace")
        return _Task(index, choice, process, receive, scratch, time.monotonic(), log_file)

    def _drain(self, task: _Task, ready: bool, log, progress) -> None:
        while ready and task.result is None:
            try:
                kind, *payload = task.conn.recv()
            except (EOFError, OSError):
                task.ended = True
                break
            if kind == "log":
                log(payload[0])
            elif kind == "progress" and progress:
                progress(*payload)
            elif kind == "result":
                task.result = payload[0]
            ready = task.conn.poll()
        if self.library_log:
            server = _fork_server_output.read() if _fork_server_output else ""
            for line in server.splitlines() + task.log_file.read().splitlines():  # new library output since the last look
                self.library_log(line)

    def _outcome(self, session, task: _Task) -> Result | None:
        from . import runner

        if task.result is not None:
            task.process.join(5)
            return task.result
        if self.timeout_s is not None and time.monotonic() - task.started > self.timeout_s:
            self._stop(task)
            return runner.failed(session, task.choice, f"{task.choice.label}: stopped after the per-method time limit of "
                                 f"{self.timeout_s:g} s (--timeout); raise it for slow methods.", mode="worker")
        if task.process.is_alive() or not task.ended:
            return None
        code = task.process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            message = f"{task.choice.label}: the worker process died from {name} ({SIGNAL_HINTS.get(name, 'a signal')})"
        else:
            message = f"{task.choice.label}: the worker process exited with status {code} before reporting a result"
        return runner.failed(session, task.choice, message + _last_words(task), mode="worker")

    @staticmethod
    def _stop(task: _Task) -> None:
        if task.process.is_alive():
            task.process.terminate()
            task.process.join(2)
        if task.process.is_alive():
            task.process.kill()
            task.process.join(2)

    @staticmethod
    def _cleanup(task: _Task) -> None:
        task.log_file.close()
        task.conn.close()
        shutil.rmtree(task.scratch, ignore_errors=True)


def _portable_eval(session):
    """The session's evaluation settings for another process: its text file by absolute path
    (a worker runs in a scratch folder)."""
    eval_cfg = session.eval
    if eval_cfg.text_path:
        eval_cfg = replace(eval_cfg, text_path=str(Path(eval_cfg.text_path).expanduser().resolve()))
    return eval_cfg


WORKER_PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "transformers.generation.utils",
                  "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
                  "transformers.tokenization_utils_tokenizers", "datasets", "workbench.runner"]
"""What every worker imports whatever its method, imported once in the fork server (transformers
loads its submodules lazily: without them a worker spent 2.5 s opening the session)."""


SOCKET_PATH_LIMIT = 107 if sys.platform.startswith("linux") else 103
"""Longest path of a Unix socket (108 bytes on Linux, 104 on macOS, the terminating NUL included)."""


def _worker_context():
    """Workers are forked from a fork server that imported WORKER_PRELOAD once (about 2 s a worker
    saved); nothing else is shared: the fork server never builds a model, touches CUDA or imports
    a method's backend, so each worker starts from the same state. Where fork servers do not
    exist, or the temporary folder's path is too long for the fork server's socket (a deep
    TMPDIR made `compare` fail with "AF_UNIX path too long"), spawn."""
    import multiprocessing
    from multiprocessing import util

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return get_context("spawn")
    socket = os.path.join(util.get_temp_dir(), "listener-xxxxxxxx")  # how multiprocessing names it
    if len(os.fsencode(socket)) > SOCKET_PATH_LIMIT:
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


_fork_server_output = None
"""The fork server's stdout and stderr (a file, open for reading what it printed)."""


def _start_fork_server() -> None:
    """Start this process's fork server (if it is not running) with its stdout and stderr in a
    file: its imports print (torchao, torch), and a fork server started in a notebook kernel
    would otherwise print into whichever cell is running."""
    global _fork_server_output
    from multiprocessing import forkserver

    from .quiet import library_output

    if _fork_server_output is None:
        handle, name = tempfile.mkstemp(prefix="workbench-forkserver-", suffix=".log")
        os.close(handle)
        _fork_server_output = open(name, encoding="utf-8", errors="replace")
    path = Path(_fork_server_output.name)
    try:
        with library_output(path):  # inside a panel's own log, the server writes there instead
            forkserver.ensure_running()
    finally:
        # The server and this process keep the file open; its name goes now, so that no file is
        # left in the temporary folder however this process ends (a killed kernel left them).
        path.unlink(missing_ok=True)


def _last_words(task: _Task) -> str:
    """The last line the backend wrote before dying, when there is one."""
    task.log_file.seek(0)
    lines = [line.strip() for line in task.log_file.read().splitlines() if line.strip()]
    return f"; its last output: {lines[-1][:200]}" if lines else ""


def _worker_main(conn, source, device, eval_cfg, choice_text, adapter, method_module, scratch, threads) -> None:
    """A worker's whole life: imports, session, one evaluate, send the result, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends this process
    os.chdir(scratch)
    # Every temporary folder of this worker (the method's workdir, libraries' own) goes inside the
    # scratch folder, which the parent removes however the worker ends (killed, timed out, Ctrl-C).
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    from .quiet import library_output

    with library_output(Path(scratch) / "library.log"):
        _name_who_terminates()
        try:
            _evaluate_and_send(conn, source, device, eval_cfg, choice_text, adapter, method_module, threads)
        except Exception:
            traceback.print_exc()  # into the library log, whose last line the parent reports
            raise SystemExit(1)
    os._exit(0)  # the result is sent: skip the interpreter's teardown (seconds of freeing tensors one by one)


def _name_who_terminates() -> None:
    """A SIGTERM still ends the worker at once, but first its sender goes into the worker's log,
    whose last line the error row quotes: a worker once died from a SIGTERM nobody here sent.
    SIGTERM is blocked in every thread (torch's threads start later and inherit the mask) but
    one that waits for it."""
    import threading

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        info = signal.sigwaitinfo({signal.SIGTERM})
        print(f"SIGTERM sent by process {info.si_pid} ({_command_line(info.si_pid)})", flush=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this thread, the one that does not block it: the default action

    threading.Thread(target=wait, daemon=True, name="workbench-sigterm").start()


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:160] or "?"
    except OSError:
        return "no longer running" if pid else "the kernel"


def _evaluate_and_send(conn, source, device, eval_cfg, choice_text, adapter, method_module, threads) -> None:
    send = lambda *message: conn.send(message)  # noqa: E731
    result = _evaluate_fresh(source, device, eval_cfg, choice_text, adapter, method_module, threads, "worker",
                             lambda message: send("log", message), lambda label, done, total: send("progress", label, done, total))
    send("result", result)
    conn.close()


def _evaluate_fresh(source, device, eval_cfg, choice_text, adapter, method_module, threads, mode, log, progress) -> Result:
    """The body of a fresh process that measures one method (a worker, a Ray task): rebuild the
    session from what pickles cheaply, do the imports before the baseline, one evaluate."""
    import importlib

    import torch

    from . import allocator, methods, models, runner

    if device == "cpu":
        allocator.share_one_heap()  # the method's peak, not its threads' heaps (see allocator)
    if threads:
        torch.set_num_threads(threads)
    importlib.import_module(method_module)  # a method registered outside the package registers itself here too
    choice = methods.parse(choice_text, adapter)  # the parent parsed it already: this cannot fail
    session = runner.Session.from_source(source, device, eval_cfg)
    if choice.method.backend:
        importlib.import_module(choice.method.backend)  # imports belong to the baseline, not the measurement
    models.empty_model(source)  # so do transformers' lazy imports of the model's code (a meta-device build: no weights)
    return runner.evaluate(session, choice, log, progress, mode=mode).result


# ---------------------------------------------------------------------------- Ray tasks

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

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: int = 1,
                 library_log: Callable[[str], None] | None = None):
        if address is not None and num_cpus is not None:
            raise WorkbenchError(f"--ray-cpus {num_cpus}: an existing Ray cluster ({address}) has the CPUs its nodes "
                                 "were started with; leave out --ray-cpus, or --address for a local instance.")
        if num_cpus is not None and num_cpus < 1:
            raise WorkbenchError(f"--ray-cpus: {num_cpus} is not a number of CPUs for the local Ray instance; use 1 or more.")
        if cpus_per_task < 1:
            raise WorkbenchError(f"cpus_per_task: {cpus_per_task} is not a number of CPUs; use 1 or more.")
        self.address, self.num_cpus, self.cpus_per_task, self.library_log = address, num_cpus, cpus_per_task, library_log

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
        eval_cfg = _portable_eval(session)
        outstanding = {}
        try:
            for index, choice in pending:
                module = choice.method.quantize.__module__
                ref = remote.remote(session.source, session.device, eval_cfg, choice.text, choice.adapter, module,
                                    _import_root(module), threads)
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
        quiet = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if self.address:
                ray.init(address=self.address, **quiet)
            else:
                ray.init(num_cpus=self.num_cpus, **quiet)
        except ConnectionError as exc:
            raise WorkbenchError(f"--address {self.address}: no Ray cluster answered ({exc}). Start one with `ray start --head` "
                                 "on the head node (and `ray start --address HEAD:6379` on the others), or leave out --address "
                                 "to run on a local Ray instance.") from None
        total = ray.cluster_resources()
        log(f"Ray: {len(ray.nodes())} node(s), {total.get('CPU', 0):g} CPU(s), {total.get('GPU', 0):g} GPU(s)"
            f"{f' at {self.address}' if self.address else ' (local instance)'}")

    @staticmethod
    def _check_cluster_holds(ray, needs: dict) -> None:
        """Refuse before submitting a task no node could run: Ray would keep it pending forever."""
        total = ray.cluster_resources()
        for name, key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            if needs[name] and total.get(key, 0) < needs[name]:
                raise WorkbenchError(f"--executor ray: each task needs {needs[name]} {key}(s) and the Ray cluster has "
                                     f"{total.get(key, 0):g}; add nodes that have them, or use --device cpu.")

    def _outcome(self, ray, ref, session, choice: Choice, log) -> Result:
        from . import runner

        try:
            result, messages, library = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # raised outside `evaluate` (opening the session, an import)
            cause = exc.cause if exc.cause is not None else exc
            return runner.failed(session, choice, f"{choice.label}: the Ray task raised {type(cause).__name__}: "
                                 f"{str(cause).strip()[:300]}", mode="ray")
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
    from .quiet import library_output

    if module_root and module_root not in sys.path:
        sys.path.append(module_root)  # after the installed packages: the node's own install wins
    scratch = Path(tempfile.mkdtemp(prefix="workbench-ray-"))
    os.chdir(scratch)
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    messages: list[str] = []
    try:
        with library_output(scratch / "library.log"):
            result = _evaluate_fresh(source, device, eval_cfg, choice_text, adapter, method_module, threads, "ray",
                                     messages.append, None)
        return result, messages, (scratch / "library.log").read_text(encoding="utf-8", errors="replace").splitlines()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_jobs_fit(jobs: int, session, choices: list[Choice]) -> None:
    """Refuse more parallel workers than memory holds, by the estimate: each worker loads the
    full-precision model, quantizes it and evaluates (weights x the runtime factor, plus the
    worker's own imports)."""
    if jobs <= 1 or not choices:
        return
    from . import estimate, models

    total, linear = estimate.count_params(models.empty_model(session.source))
    full = estimate.method_estimate(_full_precision(session.device), total, linear, {}, session.device).weight_bytes
    largest = max(estimate.method_estimate(c.method, total, linear, {}, session.device, c.params).weight_bytes for c in choices)
    per_job = int((full + largest) * estimate.RUNTIME_FACTOR) + WORKER_OVERHEAD_BYTES
    available = _available_memory(session.device)
    if jobs * per_job > available:
        fits = max(1, available // per_job)
        raise WorkbenchError(f"--jobs {jobs}: each worker needs about {per_job / 2**30:.1f} GiB by the estimate "
                             f"(full-precision load + quantized model + runtime), {jobs} need {jobs * per_job / 2**30:.1f} GiB, "
                             f"and {available / 2**30:.1f} GiB are available; use --jobs {fits}.")


def _full_precision(device: str):
    from . import methods

    return methods.get("fp32" if device == "cpu" else "bf16")


def _available_memory(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    import psutil

    return psutil.virtual_memory().available
