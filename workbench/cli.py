"""`python -m workbench ...`: the headless surface over the same core the panels use.

    methods  [--json]                      every method, and why it can't run here
    compare  --model M --methods a,b,...   quantize, measure, write results/ (JSON, CSV, HTML)
    estimate --model M [--json]            will it fit? from the config alone

Progress goes to stderr, the table to stdout. Expected problems print one line
starting with "error:" and exit with status 2; `compare` exits non-zero only when no
method succeeded. By default each method is built and measured in a fresh worker
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

from . import methods
from .errors import WorkbenchError

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
    cmp.add_argument("--model", default="bundled", help="short name (bundled), hub id, model folder or .gguf file")
    cmp.add_argument("--methods", default=None,
                     help=f"comma-separated: name or name:key=value:... (default: {','.join(DEFAULT_METHODS)}, those available here)")
    cmp.add_argument("--eval-text", default=None, help="plain UTF-8 text file to evaluate on (default: Python's pydoc topics)")
    cmp.add_argument("--max-length", type=int, default=512, help="tokens per perplexity window (default 512)")
    cmp.add_argument("--stride", type=int, default=None, help="window step (default: = max-length, no overlap)")
    cmp.add_argument("--max-tokens", type=int, default=4096, help="evaluate on the first N tokens (0 = all; default 4096)")
    cmp.add_argument("--allow-long-eval", action="store_true",
                     help="measure an evaluation text of more than a million tokens (refused by default: hours per method)")
    cmp.add_argument("--decode-tokens", type=int, default=32, help="tokens generated to measure decode speed (0 = skip; else 8 or more)")
    cmp.add_argument("--jobs", type=int, default=1, help="methods measured at once, each in its own worker (default 1; refused when they would not fit in memory)")
    cmp.add_argument("--timeout", type=float, default=None, help="seconds one method may take before its worker is stopped (default: no limit)")
    cmp.add_argument("--in-process", action="store_true", help="measure in this process instead of a fresh worker per method")
    cmp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    cmp.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    cmp.add_argument("--out", default="results", help="output folder (default: results)")
    cmp.add_argument("--rerun", action="store_true", help="measure again configurations already in OUT/history.jsonl")
    cmp.set_defaults(run=_compare)

    est = sub.add_parser("estimate", help="weight memory per method and which GPUs it fits, from the config alone")
    est.add_argument("--model", default="bundled")
    est.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the weight MB column is meant (GPU columns are always shown)")
    est.add_argument("--json", action="store_true")
    est.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    est.set_defaults(run=_estimate)
    return parser


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
    from . import charts, executors, results, runner
    from .config import EvalConfig, ModelSpec

    spec = ModelSpec(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    stride = args.max_length if args.stride is None else args.stride  # --stride 0 is refused, not the default
    eval_cfg = EvalConfig(max_length=args.max_length, stride=stride, max_tokens=args.max_tokens, text_path=args.eval_text,
                          decode_tokens=args.decode_tokens, allow_long=args.allow_long_eval)
    choices, left_out = _choose_methods(args.methods, spec.resolved_device())
    workers = executors.WorkerProcesses(args.jobs, args.timeout, library_log=_log)  # checks --jobs, --timeout in either mode
    executor = executors.InProcess() if args.in_process else workers
    if not args.in_process:
        workers.warm_up()  # the workers' fork server imports torch and transformers while the session opens
    out = Path(args.out)
    _check_writable(out)
    session = runner.Session.open(spec, eval_cfg, _log)
    if not args.in_process:
        executors.check_jobs_fit(args.jobs, session, choices)
    history = out / "history.jsonl"
    previous = results.read_history(history, _log)
    finished = []

    def keep(result) -> None:
        finished.append(result)
        results.append_history([result], history)

    try:
        with contextlib.redirect_stdout(sys.stderr):  # quantization libraries print progress: keep stdout for the table
            measured = runner.compare(session, choices, previous, args.rerun, _log, _progress_bar(), executor=executor,
                                      on_result=keep)
    except KeyboardInterrupt as exc:
        word = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"{word}: {len(finished)} finished result(s) kept in {history}", file=sys.stderr)
        return _interrupted_status(exc)
    if any(r.error is None for r in measured):
        out.mkdir(parents=True, exist_ok=True)
        results.write_json(measured, out / "results.json")
        results.write_csv(measured, out / "results.csv")
        charts.write_report(measured, out / "report.html", left_out)
        wrote = f"Wrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'report.html'} (history: {history})"
    else:
        wrote = f"Nothing succeeded, so {out}'s results files were left as they were (history: {history})"
    print(results.format_table(measured))
    for line in left_out:
        print(f"not run: {line}")
    print(f"\n{wrote}")
    return 0 if any(r.error is None for r in measured) else 1


def _check_writable(out: Path) -> None:
    """Before any work: the output folder can be written to and has room (it is created at the first result)."""
    from .files import check_writable

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
    from . import estimate, models
    from .config import ModelSpec

    source = models.resolve(args.model, log=_log, trust_remote_code=args.trust_remote_code)
    models.check_causal_lm(source)
    device = ModelSpec(args.model, device=args.device).resolved_device()
    result = estimate.estimate(source, device=device)
    print(json.dumps(estimate.to_dict(result), indent=2) if args.json else estimate.format_estimate(result))
    return 0
