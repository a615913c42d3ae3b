"""`python -m workbench ...`: the headless surface over the same core the panels use.

    methods  [--json]                      every method, and why it can't run here
    compare  --model M --methods a,b,...   quantize, measure, write results/ (JSON, CSV, HTML)
    sweep    --model M --grid G [--grid G]  grids of settings, with the Pareto front (--executor ray: a cluster)
    estimate --model M [--json]            will it fit? from the config alone
    export   --model M --method gguf:... --out DIR   the .gguf, an Ollama Modelfile and its measured row

Progress goes to stderr, the table to stdout. Expected problems print one line
starting with "error:" and exit with status 2; `compare` and `sweep` exit non-zero only
when no method succeeded. By default each method is built and measured in a fresh worker
process (honest peak memory, crashes and timeouts contained); `--in-process` measures
in this process. Each finished method is appended to OUT/history.jsonl at once. Tokens for gated models are read from the HF_TOKEN environment
variable by the Hugging Face libraries, never from the command line (shell history).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from workbench import methods
from workbench.cli.compare import (  # noqa: F401 (DEFAULT_METHODS)
    DEFAULT_METHODS,
    StopOnce,
    Terminated,
    compare_command,
    interrupted_status,
    log,
    sweep_command,
)
from workbench.cli.export import add_export_parser
from workbench.cli.sensitivity import add_sensitivity_parser
from workbench.core.errors import WorkbenchError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = StopOnce()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, stop) for sig in signals} if _main_thread() else {}
    try:
        return args.run(args)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return interrupted_status(exc)
    finally:
        if not stop.received:  # after a signal the process is on its way out: later ones stay quiet
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


TRUST_HELP = "let the model's own Python code (its config's auto_map) run; off by default: such a model is refused"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="Quantization Workbench")
    sub = parser.add_subparsers(required=True, metavar="command")

    listing = sub.add_parser("methods", help="list every quantization method and whether it runs here")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_methods)

    cmp = sub.add_parser("compare", help="quantize with several methods and compare them")
    cmp.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated: name or name:key=value:..., or all (every method that runs here; default: "
        f"{','.join(DEFAULT_METHODS)}, those available here)",
    )
    _add_measuring_options(cmp)
    cmp.set_defaults(run=compare_command)

    swp = sub.add_parser("sweep", help="grids of method settings, with the Pareto front of quality vs weight memory")
    swp.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="GRID",
        help="a method with comma lists of values, e.g. rtn:bits=2,3,4:group_size=32,64 (every combination); "
        "repeat for more grids; a name alone is one cell",
    )
    swp.add_argument(
        "--metric",
        default="ppl",
        choices=("ppl", "kl"),
        help="what the Pareto front puts against weight bytes (default ppl; kl: mean KL to the baseline)",
    )
    swp.add_argument(
        "--executor",
        default="local",
        choices=("local", "ray"),
        help="local: worker processes here (default); ray: one Ray task per cell (pip install '.[cluster]')",
    )
    swp.add_argument(
        "--address",
        default=None,
        help="with --executor ray: the Ray cluster to join, e.g. auto (default: start a local Ray instance)",
    )
    swp.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="with --executor ray and no --address: CPUs of the local Ray instance (default: all)",
    )
    swp.add_argument(
        "--allow-large-sweep",
        action="store_true",
        help="run grids of more than 64 cells (each cell builds and measures the model once)",
    )
    _add_measuring_options(swp)
    swp.set_defaults(run=sweep_command)

    est = sub.add_parser("estimate", help="weight memory per method and which GPUs it fits, from the config alone")
    est.add_argument("--model", default="bundled")
    est.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the weight MB column is meant (GPU columns are always shown)",
    )
    est.add_argument("--json", action="store_true")
    est.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    est.set_defaults(run=_estimate)
    add_sensitivity_parser(sub)
    add_export_parser(sub)
    return parser


def _add_measuring_options(command: argparse.ArgumentParser) -> None:
    """The options of every command that measures methods into OUT (compare, sweep)."""
    command.add_argument("--model", default="bundled", help="short name (bundled), hub id, model folder or .gguf file")
    command.add_argument(
        "--eval-text", default=None, help="plain UTF-8 text file to evaluate on (default: Python's pydoc topics)"
    )
    command.add_argument("--max-length", type=int, default=512, help="tokens per perplexity window (default 512)")
    command.add_argument("--stride", type=int, default=None, help="window step (default: = max-length, no overlap)")
    command.add_argument(
        "--max-tokens", type=int, default=4096, help="evaluate on the first N tokens (0 = all; default 4096)"
    )
    command.add_argument(
        "--allow-long-eval",
        action="store_true",
        help="measure an evaluation text of more than a million tokens (refused by default: hours per method)",
    )
    command.add_argument(
        "--decode-tokens",
        type=int,
        default=32,
        help="tokens generated to measure decode speed (0 = skip; else 8 or more)",
    )
    command.add_argument(
        "--tasks",
        default=None,
        help="task accuracy through lm-eval after perplexity: name[:limit=N][:fewshot=K],... "
        "(lm-eval task names, or the offline wb_lastword, wb_heldout)",
    )
    command.add_argument(
        "--tasks-file",
        action="append",
        default=[],
        help="your own task: an lm-eval task .yaml, or a .jsonl of questions (see docs/tasks.md); repeatable",
    )
    command.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="methods measured at once, each in its own worker (default 1; refused when they would not fit in memory)",
    )
    command.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds one method may take before its worker is stopped (default: no limit)",
    )
    command.add_argument(
        "--in-process", action="store_true", help="measure in this process instead of a fresh worker per method"
    )
    command.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    command.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    command.add_argument("--out", default="results", help="output folder (default: results)")
    command.add_argument(
        "--rerun", action="store_true", help="measure again configurations already in OUT/history.jsonl"
    )
    command.add_argument(
        "--details",
        action="store_true",
        help="after the table, what each method chose while building (mixed: the bits of every layer)",
    )


def _methods(args) -> int:
    rows = [method.describe() for method in methods.REGISTRY.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        status = "yes" if r["available"] else f"no: {r['reason']}"
        print(
            f"{r['name']:<{width}}  {r['family']:<12} {r['bits']:>2}-bit  {r['summary']}\n{'':<{width}}  available: {status}"
        )
    return 0


def _estimate(args) -> int:
    from workbench.core.config import ModelSpec
    from workbench.run import estimate
    from workbench.sources import models

    source = models.resolve(args.model, log=log, trust_remote_code=args.trust_remote_code)
    models.check_causal_lm(source)
    device = ModelSpec(args.model, device=args.device).resolved_device()
    result = estimate.estimate(source, device=device)
    print(json.dumps(estimate.to_dict(result), indent=2) if args.json else estimate.format_estimate(result))
    return 0
