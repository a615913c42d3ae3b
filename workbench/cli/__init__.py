"""`python -m workbench ...`: the headless surface over the same core the panels use.

    methods  [--json]                      every method, and why it can't run here
    compare  --model M --methods a,b,...   quantize, measure, write results/ (JSON, CSV, HTML)
    sweep    --model M --grid G [--grid G]  grids of settings, with the Pareto front (--executor ray: a cluster)
    estimate --model M [--json]            will it fit? from the config alone

Progress goes to stderr, the table to stdout. Expected problems print one line
starting with "error:" and exit with status 2; `compare` and `sweep` exit non-zero only
when no method succeeded. By default each method is built and measured in a fresh worker
process (honest peak memory, crashes and timeouts contained); `--in-process` measures
in this process. Each finished method is appended to OUT/history.jsonl at once. Tokens for gated models are read from the HF_TOKEN environment
variable by the Hugging Face libraries, never from the command line (shell history).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path

from workbench import methods
from workbench.core.errors import WorkbenchError
from workbench.cli.sensitivity import add_sensitivity_parser

DEFAULT_METHODS = ("fp32", "bnb-int8", "bnb-nf4", "bnb-fp4", "rtn", "gptq")
"""The `make demo` set: runs on 2 CPU cores in about 4 minutes together (GPTQ is 2.5 of them)
and shows the ordering a learner comes for: 8-bit ~ fp32, GPTQ < NF4 < FP4 ~ round-to-nearest."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` runs: workers end, temporary folders go."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return args.run(args)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return _interrupted_status(exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupted_status(exc: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


TRUST_HELP = "let the model's own Python code (its config's auto_map) run; off by default: such a model is refused"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="Quantization Workbench")
    sub = parser.add_subparsers(required=True, metavar="command")

    listing = sub.add_parser("methods", help="list every quantization method and whether it runs here")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_methods)

    cmp = sub.add_parser("compare", help="quantize with several methods and compare them")
    cmp.add_argument("--methods", default=None,
                     help=f"comma-separated: name or name:key=value:... (default: {','.join(DEFAULT_METHODS)}, those available here)")
    _add_measuring_options(cmp)
    cmp.set_defaults(run=_compare)

    swp = sub.add_parser("sweep", help="grids of method settings, with the Pareto front of quality vs weight memory")
    swp.add_argument("--grid", action="append", required=True, metavar="GRID",
                     help="a method with comma lists of values, e.g. rtn:bits=2,3,4:group_size=32,64 (every combination); "
                          "repeat for more grids; a name alone is one cell")
    swp.add_argument("--metric", default="ppl", choices=("ppl", "kl"),
                     help="what the Pareto front puts against weight bytes (default ppl; kl: mean KL to the baseline)")
    swp.add_argument("--executor", default="local", choices=("local", "ray"),
                     help="local: worker processes here (default); ray: one Ray task per cell (pip install '.[cluster]')")
    swp.add_argument("--address", default=None,
                     help="with --executor ray: the Ray cluster to join, e.g. auto (default: start a local Ray instance)")
    swp.add_argument("--ray-cpus", type=int, default=None,
                     help="with --executor ray and no --address: CPUs of the local Ray instance (default: all)")
    _add_measuring_options(swp)
    swp.set_defaults(run=_sweep)

    est = sub.add_parser("estimate", help="weight memory per method and which GPUs it fits, from the config alone")
    est.add_argument("--model", default="bundled")
    est.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the weight MB column is meant (GPU columns are always shown)")
    est.add_argument("--json", action="store_true")
    est.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    est.set_defaults(run=_estimate)
    add_sensitivity_parser(sub)
    return parser


def _add_measuring_options(command: argparse.ArgumentParser) -> None:
    """The options of every command that measures methods into OUT (compare, sweep)."""
    command.add_argument("--model", default="bundled", help="short name (bundled), hub id, model folder or .gguf file")
    command.add_argument("--eval-text", default=None, help="plain UTF-8 text file to evaluate on (default: Python's pydoc topics)")
    command.add_argument("--max-length", type=int, default=512, help="tokens per perplexity window (default 512)")
    command.add_argument("--stride", type=int, default=None, help="window step (default: = max-length, no overlap)")
    command.add_argument("--max-tokens", type=int, default=4096, help="evaluate on the first N tokens (0 = all; default 4096)")
    command.add_argument("--allow-long-eval", action="store_true",
                         help="measure an evaluation text of more than a million tokens (refused by default: hours per method)")
    command.add_argument("--decode-tokens", type=int, default=32, help="tokens generated to measure decode speed (0 = skip; else 8 or more)")
    command.add_argument("--jobs", type=int, default=1, help="methods measured at once, each in its own worker (default 1; refused when they would not fit in memory)")
    command.add_argument("--timeout", type=float, default=None, help="seconds one method may take before its worker is stopped (default: no limit)")
    command.add_argument("--in-process", action="store_true", help="measure in this process instead of a fresh worker per method")
    command.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    command.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    command.add_argument("--out", default="results", help="output folder (default: results)")
    command.add_argument("--rerun", action="store_true", help="measure again configurations already in OUT/history.jsonl")
    command.add_argument("--details", action="store_true", help="after the table, what each method chose while building (mixed: the bits of every layer)")


def _methods(args) -> int:
    rows = [method.describe() for method in methods.REGISTRY.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        status = "yes" if r["available"] else f"no: {r['reason']}"
        print(f"{r['name']:<{width}}  {r['family']:<12} {r['bits']:>2}-bit  {r['summary']}\n{'':<{width}}  available: {status}")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _compare(args) -> int:
    spec, eval_cfg = _model_spec(args), _eval_config(args)
    choices, left_out = _choose_methods(args.methods, spec.resolved_device())
    return _measure(args, spec, eval_cfg, choices, _local_executor(args), left_out)


def _sweep(args) -> int:
    from workbench.run import sweep

    _check_executor_options(args)
    spec, eval_cfg = _model_spec(args), _eval_config(args)
    choices = sweep.expand(args.grid, _log)
    executor = _local_executor(args) if args.executor == "local" else _ray_executor(args)
    return _measure(args, spec, eval_cfg, choices, executor, metric=args.metric,
                    after=lambda measured: print(f"\n{sweep.format_front(measured, args.metric)}"))


def _model_spec(args):
    from workbench.core.config import ModelSpec

    return ModelSpec(args.model, device=args.device, trust_remote_code=args.trust_remote_code)


def _eval_config(args):
    from workbench.core.config import EvalConfig

    stride = args.max_length if args.stride is None else args.stride  # --stride 0 is refused, not the default
    return EvalConfig(max_length=args.max_length, stride=stride, max_tokens=args.max_tokens, text_path=args.eval_text,
                      decode_tokens=args.decode_tokens, allow_long=args.allow_long_eval)


def _local_executor(args):
    """Worker processes (the default) or this process; --jobs and --timeout are checked in either mode."""
    from workbench.run import executors, workers

    pool = workers.WorkerProcesses(args.jobs, args.timeout, library_log=_log)
    if args.in_process:
        return executors.InProcess()
    pool.warm_up()  # the workers' fork server imports torch and transformers while the session opens
    return pool


def _check_executor_options(args) -> None:
    """Each executor's options only with it: an option that would be ignored is an error."""
    if args.executor == "ray":
        local_only = [name for name, given in (("--jobs", args.jobs != 1), ("--timeout", args.timeout is not None),
                                               ("--in-process", args.in_process)) if given]
        if local_only:
            raise WorkbenchError(f"{', '.join(local_only)}: only with --executor local; with --executor ray each cell is a "
                                 "Ray task and the cluster's resources decide how many run at once.")
        return
    ray_only = [name for name, given in (("--address", args.address is not None), ("--ray-cpus", args.ray_cpus is not None))
                if given]
    if ray_only:
        raise WorkbenchError(f"{', '.join(ray_only)}: only with --executor ray; add --executor ray, or leave {'it' if len(ray_only) == 1 else 'them'} out.")


def _ray_executor(args):
    from workbench.run import ray_tasks

    ray_tasks.import_ray()  # missing Ray is said before the model is opened
    return ray_tasks.RayTasks(address=args.address, num_cpus=args.ray_cpus, library_log=_log)


def _measure(args, spec, eval_cfg, choices: list, executor, left_out: list[str] = (), metric: str = "ppl", after=None) -> int:
    """Open the session, run the choices through `compare.compare`, which appends each finished result to
    OUT/history.jsonl at once, write results.json/csv and report.html, print the table (and
    `after(measured)`). Exits non-zero only when nothing succeeded."""
    from workbench.report import charts
    from workbench.run import compare, executors, results, runner, workers

    out = Path(args.out)
    _check_writable(out)
    session = runner.Session.open(spec, eval_cfg, _log)
    if isinstance(executor, workers.WorkerProcesses):
        executors.check_jobs_fit(args.jobs, session, choices)
    history = compare.History.in_folder(out)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # quantization libraries print progress: keep stdout for the table
            measured = compare.compare(session, choices, history, args.rerun, _log, _progress_bar(), executor=executor)
    except KeyboardInterrupt as exc:
        word = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"{word}: {len(history.kept)} finished result(s) kept in {history.path}", file=sys.stderr)
        return _interrupted_status(exc)
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


def _check_writable(out: Path) -> None:
    """Before any work: the output folder can be written to and has room (it is created at the first result)."""
    from workbench.core.files import check_writable

    check_writable(out, f"--out {str(out)!r}")


def _choose_methods(text: str | None, device: str) -> tuple[list, list[str]]:
    """The methods to run, parsed and validated before any work (a typo is an error, not a
    failed row after an hour of measuring), and for the default set a line for each method
    left out and why. A choice named twice is measured once."""
    if text:
        choices = []
        for item in (c.strip() for c in text.split(",")):
            if item:
                choice = methods.parse(item)
                if any(c.text == choice.text for c in choices):
                    _log(f"note: {item} is named twice in --methods; measuring it once.")
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
            left_out.append(f"{method.name}: not in the quick default set; add it with --methods {','.join(DEFAULT_METHODS)},{method.name}")
    return choices, left_out


def _progress_bar():
    """Perplexity progress as a tqdm bar per method (stderr)."""
    from tqdm.auto import tqdm

    bars = {}

    def update(label: str, done: int, total: int) -> None:
        bar = bars.setdefault(label, tqdm(total=total, desc=f"{label} perplexity", unit="window", file=sys.stderr, leave=False))
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def _estimate(args) -> int:
    from workbench.run import estimate
    from workbench.sources import models
    from workbench.core.config import ModelSpec

    source = models.resolve(args.model, log=_log, trust_remote_code=args.trust_remote_code)
    models.check_causal_lm(source)
    device = ModelSpec(args.model, device=args.device).resolved_device()
    result = estimate.estimate(source, device=device)
    print(json.dumps(estimate.to_dict(result), indent=2) if args.json else estimate.format_estimate(result))
    return 0
