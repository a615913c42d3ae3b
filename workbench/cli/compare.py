"""`compare` and `sweep`: open the session, measure each choice through `run.compare` (each
finished result appended to OUT/history.jsonl at once), write results.json/csv and the HTML
report, print the table. Ctrl-C and SIGTERM keep what finished."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path

from workbench import methods
from workbench.core.errors import WorkbenchError

DEFAULT_METHODS = ("fp32", "bnb-int8", "bnb-nf4", "bnb-fp4", "rtn", "gptq")
"""The `make demo` set: small enough to run on a CPU in minutes (GPTQ's calibration is most of
them) and shows the ordering a learner comes for: 8-bit ~ fp32, GPTQ < NF4 < FP4 ~ round-to-nearest."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` runs: workers end, temporary folders go."""


class StopOnce:
    """The CLI's SIGINT and SIGTERM handler: a signal raises (KeyboardInterrupt, or Terminated for
    SIGTERM) so every `finally` runs: workers end, temporary folders go. Another signal within
    CLEANUP_S of it is ignored, quietly: raised inside a `finally` it would cut the cleanup short
    and print a traceback. One after that raises again (the first may have been swallowed where
    Python ignores exceptions, e.g. in a finalizer), so pressing Ctrl-C again always works."""

    CLEANUP_S = 10.0

    def __init__(self):
        self.received_at: float | None = None

    @property
    def received(self) -> bool:
        return self.received_at is not None

    def __call__(self, signum, frame):
        now = time.monotonic()
        if self.received_at is not None and now - self.received_at < self.CLEANUP_S:
            return
        self.received_at = now
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def interrupted_status(exc: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def library_log_path() -> Path:
    """Where the command line sends what libraries print (the notebooks use results/library.log):
    one file in the user cache, named once per run, never the terminal or the output folder."""
    from workbench.sources.source import cache_dir

    return cache_dir() / "library.log"


def library_line(line: str) -> None:
    """One line of a worker's library output, appended to `library_log_path()`."""
    from workbench.core import files

    files.append_line(library_log_path(), line, "library log")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare_command(args) -> int:
    spec, eval_cfg = _model_spec(args), _eval_config(args)
    choices, left_out = _choose_methods(args.methods, spec.resolved_device())
    return _measure(args, spec, eval_cfg, choices, _local_executor(args), left_out)


def sweep_command(args) -> int:
    from workbench.run import sweep

    _check_executor_options(args)
    spec, eval_cfg = _model_spec(args), _eval_config(args)
    choices = sweep.expand(args.grid, log, args.allow_large_sweep)
    executor = _local_executor(args) if args.executor == "local" else _ray_executor(args)
    return _measure(
        args,
        spec,
        eval_cfg,
        choices,
        executor,
        metric=args.metric,
        after=lambda measured: print(f"\n{sweep.format_front(measured, args.metric)}"),
        on_result=_pace(len(choices)),
        note=f"sweep: {len(choices)} cells (those already in the history are reused)",
    )


def _pace(cells: int):
    """After each measured cell: how many are done, and the time left at the pace so far."""
    start, done = time.monotonic(), []

    def report(result) -> None:
        done.append(result)
        spent = time.monotonic() - start
        left = spent / len(done) * max(0, cells - len(done))
        log(f"sweep: {len(done)} measured in {spent / 60:.1f} min; at this pace about {left / 60:.0f} min for the rest")

    return report


def _model_spec(args):
    from workbench.core.config import ModelSpec

    return ModelSpec(args.model, device=args.device, trust_remote_code=args.trust_remote_code)


def _eval_config(args):
    from workbench.core.config import EvalConfig
    from workbench.metrics import tasks

    stride = args.max_length if args.stride is None else args.stride  # --stride 0 is refused, not the default
    specs = tasks.parse(getattr(args, "tasks", None), getattr(args, "tasks_file", ()))
    tasks.check(specs)  # before any model loads
    return EvalConfig(
        max_length=args.max_length,
        stride=stride,
        max_tokens=args.max_tokens,
        text_path=args.eval_text,
        decode_tokens=args.decode_tokens,
        allow_long=args.allow_long_eval,
        tasks=specs,
    )


def _local_executor(args):
    """Worker processes (the default) or this process; --jobs and --timeout are checked in either mode."""
    from workbench.run import executors, workers

    pool = workers.WorkerProcesses(args.jobs, args.timeout, library_log=library_line)
    if args.in_process:
        return executors.InProcess()
    pool.warm_up()  # the workers' fork server imports torch and transformers while the session opens
    return pool


def _check_executor_options(args) -> None:
    """Each executor's options only with it: an option that would be ignored is an error."""
    if args.executor == "ray":
        local_only = [
            name
            for name, given in (
                ("--jobs", args.jobs != 1),
                ("--timeout", args.timeout is not None),
                ("--in-process", args.in_process),
            )
            if given
        ]
        if local_only:
            raise WorkbenchError(
                f"{', '.join(local_only)}: only with --executor local; with --executor ray each cell is a "
                "Ray task and the cluster's resources decide how many run at once."
            )
        return
    ray_only = [
        name
        for name, given in (("--address", args.address is not None), ("--ray-cpus", args.ray_cpus is not None))
        if given
    ]
    if ray_only:
        raise WorkbenchError(
            f"{', '.join(ray_only)}: only with --executor ray; add --executor ray, or leave {'it' if len(ray_only) == 1 else 'them'} out."
        )


def _ray_executor(args):
    from workbench.run import ray_tasks

    ray_tasks.import_ray()  # missing Ray is said before the model is opened
    return ray_tasks.RayTasks(address=args.address, num_cpus=args.ray_cpus, library_log=library_line)


def _measure(
    args,
    spec,
    eval_cfg,
    choices: list,
    executor,
    left_out: list[str] = (),
    metric: str = "ppl",
    after=None,
    on_result=None,
    note: str | None = None,
) -> int:
    """Open the session, run the choices through `compare.compare`, which appends each finished result to
    OUT/history.jsonl at once, write results.json/csv and report.html, print the table (and
    `after(measured)`). Exits non-zero only when nothing succeeded."""
    from workbench.core import quiet
    from workbench.report import charts
    from workbench.run import compare, executors, results, runner, workers

    out = Path(args.out)
    _check_writable(out)
    history = compare.History.in_folder(out)
    quiet.import_libraries(library_log_path())
    session = runner.Session.open(spec, eval_cfg, log)
    if isinstance(executor, workers.WorkerProcesses):
        executors.check_jobs_fit(args.jobs, session, choices)
    log(f"library messages (warnings, backends' progress): {library_log_path()}")
    if note:
        log(note)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # quantization libraries print progress: keep stdout for the table
            measured = compare.compare(
                session, choices, history, args.rerun, log, _progress_bar(), executor=executor, on_result=on_result
            )
    except KeyboardInterrupt as exc:
        word = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"{word}: {len(history.kept)} finished result(s) kept in {history.path}", file=sys.stderr)
        return interrupted_status(exc)
    if any(r.error is None for r in measured):
        out.mkdir(parents=True, exist_ok=True)
        results.write_json(measured, out / "results.json")
        results.write_csv(measured, out / "results.csv")
        charts.write_report(measured, out / "report.html", left_out, metric)
        wrote = f"Wrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'report.html'} (history: {history.path})"
    else:
        wrote = f"Nothing succeeded, so {out}'s results files were left as they were (history: {history.path})"
    print(results.format_table(measured))
    if args.details and results.format_details(measured):
        print(f"\n{results.format_details(measured)}")
    for line in left_out:
        print(f"not run: {line}")
    if after:
        after(measured)
    print(f"\n{wrote}")
    return 0 if any(r.error is None for r in measured) else 1


RESULT_FILES = ("results.json", "results.csv", "report.html")


def _check_writable(out: Path) -> None:
    """Before any work: the output folder can be written to and has room (it is created at the
    first result), and no results file there is a folder that the results could not replace."""
    from workbench.core.files import check_writable

    check_writable(out, f"--out {str(out)!r}")
    for name in RESULT_FILES:
        if (out / name).is_dir():
            raise WorkbenchError(
                f"--out {str(out)!r}: {out / name} is a folder, so the results cannot be written there; "
                "move it away or give another --out."
            )


def _choose_methods(text: str | None, device: str) -> tuple[list, list[str]]:
    """The methods to run, parsed and validated before any work (a typo is an error, not a
    failed row after an hour of measuring), and for the default set a line for each method
    left out and why. A choice named twice is measured once. `all`: every method that runs
    here, with its default settings."""
    if text and text.strip() == "all":
        available = methods.available(device)
        return (
            [methods.parse(method.name) for method, reason in available if reason is None],
            [f"{method.name}: {reason}" for method, reason in available if reason],
        )
    if text:
        choices = []
        for item in (c.strip() for c in text.split(",")):
            if item:
                choice = methods.parse(item)
                if any(c.text == choice.text for c in choices):
                    log(f"note: {item} is named twice in --methods; measuring it once.")
                else:
                    choices.append(choice)
        if not choices:
            raise WorkbenchError("--methods: no method named. Example: --methods fp32,bnb-nf4,gptq:bits=4")
        return choices, []
    choices, left_out = [], []
    for method, reason in methods.available(device):
        if method.name in DEFAULT_METHODS and reason is None:
            choices.append(methods.parse(method.name))
        elif reason:
            left_out.append(f"{method.name}: {reason}")
        else:
            left_out.append(
                f"{method.name}: not in the quick default set; add it with --methods {','.join(DEFAULT_METHODS)},{method.name}"
            )
    return choices, left_out


def _progress_bar():
    """Perplexity progress: a tqdm bar per method on a terminal; where stderr is a file or a pipe
    (a log, CI), a plain line at each quarter instead of carriage returns and escape sequences."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        said = set()

        def line(label: str, done: int, total: int) -> None:
            quarter = 4 * done // max(total, 1)
            if (label, quarter) not in said and (quarter or done == total):
                said.add((label, quarter))
                log(f"[{label}] perplexity: {done}/{total} windows")

        return line
    bars = {}

    def update(label: str, done: int, total: int) -> None:
        bar = bars.setdefault(
            label, tqdm(total=total, desc=f"{label} perplexity", unit="window", file=sys.stderr, leave=False)
        )
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
