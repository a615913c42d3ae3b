"""The default executor: each method built and measured in a fresh worker process.

Its peak memory is its own (the worker's peak RSS, and the peak above what the worker held
after its imports), a crash (segfault, the OOM killer, a native abort) becomes an error row
that names the signal, a stuck method ends at its timeout, and cancel ends the running
worker at once. The parent never holds a model. The worker's library output (gptqmodel,
bitsandbytes...) goes to `library_log`, not to the caller's stdout, and its working
directory and temporary folder are a scratch folder that the parent removes however the
worker ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing import connection, get_context
from pathlib import Path
from typing import Callable

from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.core.quiet import LIBRARIES
from workbench.methods import Choice
from workbench.run.executors import evaluate_fresh, portable_eval
from workbench.run.results import Result

SIGNAL_HINTS = {
    "SIGKILL": "killed; on Linux the out-of-memory killer does this when memory runs out",
    "SIGSEGV": "segmentation fault inside a native library",
    "SIGABRT": "a native library aborted",
    "SIGBUS": "bus error inside a native library",
    "SIGTERM": "terminated from outside",
}


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
            raise WorkbenchError(
                f"--timeout: {timeout_s} seconds is not a time limit; give a positive number of seconds."
            )
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
                    self._start(session, index, choice, running)
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

    def _start(self, session, index: int, choice: Choice, running: list) -> None:
        """Start a worker for `choice`; its task joins `running` before the process starts, so a
        Ctrl-C that lands while it starts still ends it and removes its scratch folder."""
        self.warm_up()
        context = _worker_context()
        receive, send = context.Pipe(duplex=False)
        scratch = files.scratch_folder("worker")
        threads = max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else None
        process = context.Process(
            target=_worker_main,
            daemon=True,
            name=f"workbench-{choice.label}",
            args=(
                send,
                session.source,
                session.device,
                portable_eval(session),
                choice.text,
                choice.adapter,
                choice.method.quantize.__module__,
                str(scratch),
                threads,
            ),
        )
        log_file = open(scratch / "library.log", "a+", encoding="utf-8", errors="replace")
        running.append(_Task(index, choice, process, receive, scratch, time.monotonic(), log_file))
        process.start()
        send.close()

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
            for line in (
                server.splitlines() + task.log_file.read().splitlines()
            ):  # new library output since the last look
                self.library_log(line)

    def _outcome(self, session, task: _Task) -> Result | None:
        from workbench.run import runner

        if task.result is not None:
            task.process.join(5)
            return task.result
        if self.timeout_s is not None and time.monotonic() - task.started > self.timeout_s:
            self._stop(task)
            return runner.failed(
                session,
                task.choice,
                f"{task.choice.label}: stopped after the per-method time limit of "
                f"{self.timeout_s:g} s (--timeout); raise it for slow methods.",
                mode="worker",
            )
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


WORKER_PRELOAD = [*LIBRARIES, "workbench.run.runner"]
"""What every worker imports whatever its method, imported once in the fork server."""


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
    socket = os.path.join(_multiprocessing_folder(util), "listener-xxxxxxxx")  # how multiprocessing names it
    if len(os.fsencode(socket)) > SOCKET_PATH_LIMIT:
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


def _multiprocessing_folder(util) -> str:
    """multiprocessing's temporary folder (`pymp-*`, where the fork server's socket lives), made
    inside a `workbench-mp-<pid>-*` folder: after a kill -9 the next run removes it with this
    process's other folders (`files.remove_stale_folders`); at a normal exit multiprocessing
    removes its folder first, then this one goes. One made earlier (by the caller's own use of
    multiprocessing) is left where it is."""
    ours = files.scratch_folder("mp")
    previous, tempfile.tempdir = tempfile.tempdir, str(ours)
    try:
        folder = util.get_temp_dir()
    finally:
        tempfile.tempdir = previous
    if Path(folder).parent == ours:
        util.Finalize(None, shutil.rmtree, args=(str(ours),), kwargs={"ignore_errors": True}, exitpriority=-101)
    else:
        shutil.rmtree(ours, ignore_errors=True)
    return folder


_fork_server_output = None
"""The fork server's stdout and stderr (a file, open for reading what it printed)."""


def _start_fork_server() -> None:
    """Start this process's fork server (if it is not running) with its stdout and stderr in a
    file: its imports print (torchao, torch), and a fork server started in a notebook kernel
    would otherwise print into whichever cell is running."""
    global _fork_server_output
    from multiprocessing import forkserver

    from workbench.core.quiet import library_output

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
    _end_with_parent()
    os.chdir(scratch)
    # Every temporary folder of this worker (the method's workdir, libraries' own) goes inside the
    # scratch folder, which the parent removes however the worker ends (killed, timed out, Ctrl-C).
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    from workbench.core.quiet import library_output

    with library_output(Path(scratch) / "library.log"):
        _name_who_terminates()
        try:
            _evaluate_and_send(conn, source, device, eval_cfg, choice_text, adapter, method_module, threads)
        except Exception:
            traceback.print_exc()  # into the library log, whose last line the parent reports
            raise SystemExit(1) from None
    os._exit(0)  # the result is sent: skip the interpreter's teardown (seconds of freeing tensors one by one)


def _end_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the process that started it ends (the fork server,
    which ends with the run): after a kill -9 of `compare` no worker quantizes on for nobody."""
    from workbench.core import allocator

    libc = allocator.glibc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1  # Linux's prctl option number


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
        os.kill(
            os.getpid(), signal.SIGTERM
        )  # delivered to this thread, the one that does not block it: the default action

    threading.Thread(target=wait, daemon=True, name="workbench-sigterm").start()


def _command_line(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:160] or "?"
        )
    except OSError:
        return "no longer running" if pid else "the kernel"


def _evaluate_and_send(conn, source, device, eval_cfg, choice_text, adapter, method_module, threads) -> None:
    send = lambda *message: conn.send(message)  # noqa: E731
    result = evaluate_fresh(
        source,
        device,
        eval_cfg,
        choice_text,
        adapter,
        method_module,
        threads,
        "worker",
        lambda message: send("log", message),
        lambda label, done, total: send("progress", label, done, total),
    )
    send("result", result)
    conn.close()
