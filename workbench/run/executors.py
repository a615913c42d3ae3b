"""Where a (build, measure) pair runs, behind one small interface.

`Executor.run(session, pending, finished, log, progress, should_stop)`: `pending` is a list
of `(index, Choice)`, and `finished(index, result)` is called the moment each result is
ready, so the caller can append it to the history at once. Rows say which mode measured
them (`in-process`, `worker`, `ray`).

`InProcess` measures in the calling process: for notebooks that keep a model. The default,
`workers.WorkerProcesses`, builds and measures each method in a fresh process;
`ray_tasks.RayTasks` sends each method to a Ray cluster as one task. Both run the body
here, `evaluate_fresh`, in their fresh process.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Protocol

from workbench import methods
from workbench.core import allocator
from workbench.core.errors import WorkbenchError
from workbench.methods import Choice
from workbench.metrics import divergence
from workbench.run import runner
from workbench.run.results import Result
from workbench.sources import models

WORKER_OVERHEAD_BYTES = 1200 * 2**20
"""What an idle worker holds after importing torch, transformers and a backend (about 1 GB, rounded up for a margin)."""


class Executor(Protocol):
    def run(
        self,
        session,
        pending: list[tuple[int, Choice]],
        finished: Callable[[int, Result], None],
        log: Callable[[str], None],
        progress,
        should_stop: Callable[[], bool],
    ) -> None: ...


class InProcess:
    """Build and measure here, one after another; cancel takes effect between methods."""

    def run(self, session, pending, finished, log, progress, should_stop) -> None:
        for index, choice in pending:
            if should_stop():
                return
            finished(index, runner.evaluate(session, choice, log, progress).result)


def portable_eval(session):
    """The session's evaluation settings for another process: its text file by absolute path
    (a worker runs in a scratch folder)."""
    eval_cfg = session.eval
    if eval_cfg.text_path:
        eval_cfg = replace(eval_cfg, text_path=str(Path(eval_cfg.text_path).expanduser().resolve()))
    return eval_cfg


def evaluate_fresh(
    source, device, eval_cfg, choice_text, adapter, method_module, threads, mode, log, progress
) -> Result:
    """The body of a fresh process that measures one method (a worker, a Ray task): rebuild the
    session from what pickles cheaply, do the imports before the baseline, one evaluate."""
    import importlib

    import torch

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


def check_jobs_fit(jobs: int, session, choices: list[Choice]) -> None:
    """Refuse more parallel workers than memory holds, by the estimate: each worker loads the
    full-precision model, quantizes it and evaluates (weights x the runtime factor, plus the
    worker's own imports)."""
    if jobs <= 1 or not choices:
        return
    from workbench.run import estimate  # estimate imports the registry's every family: only when asked

    total, linear = estimate.count_params(models.empty_model(session.source))
    full = estimate.method_estimate(_full_precision(session.device), total, linear, {}, session.device).weight_bytes
    largest = max(
        estimate.method_estimate(c.method, total, linear, {}, session.device, c.params).weight_bytes for c in choices
    )
    per_job = int((full + largest) * estimate.RUNTIME_FACTOR) + WORKER_OVERHEAD_BYTES
    available = _available_memory(session.device)
    if jobs * per_job > available:
        fits = max(1, available // per_job)
        raise WorkbenchError(
            f"--jobs {jobs}: each worker needs about {per_job / 2**30:.1f} GiB by the estimate "
            f"(full-precision load + quantized model + runtime), {jobs} need {jobs * per_job / 2**30:.1f} GiB, "
            f"and {available / 2**30:.1f} GiB are available; use --jobs {fits}."
        )


def _full_precision(device: str):
    return methods.get(divergence.reference_method(device))


def _available_memory(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    import psutil

    return psutil.virtual_memory().available
