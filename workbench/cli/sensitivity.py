"""`python -m workbench sensitivity`: the sensitivity map from the command line.

    sensitivity --model M --method rtn:bits=3:group_size=64 [--tokens 512] [--unit layer|block]
                [--blocks 0,5,29] [--proxy-only] [--out results] [--rerun] [--json]

Writes OUT/sensitivity/<key>.json (reused unless --rerun) and the heatmap as
OUT/sensitivity/<key>.html; prints the most sensitive cells, the per-block and per-kind
sums, the timings and Spearman(proxy, end-to-end). Progress goes to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from workbench.core.errors import WorkbenchError


def add_sensitivity_parser(sub) -> None:
    """Register the `sensitivity` subcommand on the CLI's subparsers."""
    cmd = sub.add_parser("sensitivity", help="how much quantizing each layer alone hurts the model (KL heatmap)")
    cmd.add_argument("--model", default="bundled", help="short name (bundled), hub id, model folder or .gguf file")
    cmd.add_argument(
        "--method", default="rtn:bits=3:group_size=64", help="rtn, hqq, bnb-nf4 or bnb-fp4, with :key=value parameters"
    )
    cmd.add_argument("--tokens", type=int, default=512, help="calibration-text tokens to measure on (default 512)")
    cmd.add_argument(
        "--unit", default="layer", choices=("layer", "block"), help="quantize one layer or one whole block per cell"
    )
    cmd.add_argument("--blocks", default=None, help="comma-separated block numbers (default: all)")
    cmd.add_argument("--proxy-only", action="store_true", help="only the fast per-layer proxy, no end-to-end KL")
    cmd.add_argument("--trust-remote-code", action="store_true", help="let the model's own Python code run")
    cmd.add_argument("--out", default="results", help="output folder (default: results)")
    cmd.add_argument("--rerun", action="store_true", help="compute again even when a cached map exists")
    cmd.add_argument("--json", action="store_true", help="print the map as JSON")
    cmd.set_defaults(run=run_sensitivity_command)


def _blocks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise WorkbenchError(f"--blocks {text!r}: give comma-separated block numbers, e.g. 0,5,29.") from None


def run_sensitivity_command(args) -> int:
    from workbench.core import files
    from workbench.report.sensitivity import heatmap, report
    from workbench.run import maps
    from workbench.sources import models

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    maps.check_tokens(args.tokens)
    folder = Path(args.out) / "sensitivity"
    files.check_writable(folder, f"--out {args.out!r}")
    source = models.resolve(args.model, log=log, trust_remote_code=args.trust_remote_code)
    smap, path = maps.load_or_compute(
        source, args.method, args.tokens, args.unit, _blocks(args.blocks), folder, args.rerun, not args.proxy_only, log
    )
    field = "proxy" if args.proxy_only else "kl"
    html = path.with_suffix(".html")
    try:
        heatmap(smap, field).write_html(str(html), include_plotlyjs="cdn")
    except OSError as exc:
        raise files.write_error(html, exc) from None
    if args.json:
        print(json.dumps(smap.to_dict(), indent=1))
        return 0
    print(report(smap, field))
    print(f"\nmap: {path}\nheatmap: {html}")
    return 0
