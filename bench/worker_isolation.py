"""Benchmark (c): what measuring each method in its own worker process costs and buys.

On the offline model, in one run:
1. wall time of the method set measured in worker processes vs in this process (goal <= 1.10);
2. order independence: the set in two orders, each method in a fresh worker; each method's
   peak memory above the worker's baseline must agree within 5% between the orders (in one
   process it does not: what earlier methods left behind is counted);
3. decode speed: the spread (fastest / slowest repetition) per method.
Ratios are printed last. Run: .venv/bin/python bench/worker_isolation.py [--methods a,b,...] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from workbench import executors, runner
from workbench.cli import DEFAULT_METHODS
from workbench.config import EvalConfig, ModelSpec
from workbench.quiet import library_output

MB = 2**20


def timed_compare(session, choices, executor):
    """Wall time of a comparison; for workers it includes starting their fork server."""
    start = time.perf_counter()
    if isinstance(executor, executors.WorkerProcesses):
        executor.warm_up()
    results = runner.compare(session, choices, log=lambda m: None, executor=executor)
    failed = {r.label: r.error for r in results if r.error}
    if failed:
        raise SystemExit(f"failed: {failed}")
    return {r.label: r for r in results}, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=16)
    args = parser.parse_args()
    choices = args.methods.split(",")
    session = runner.Session.open(ModelSpec("bundled", device="cpu"),
                                  EvalConfig(max_tokens=args.tokens, decode_tokens=args.decode_tokens), log=lambda m: None)

    library_log = Path(tempfile.gettempdir()) / "workbench-bench-library.log"
    with library_output(library_log):  # the in-process run's library chatter; workers keep theirs
        here, here_s = timed_compare(session, choices, executors.InProcess())
        forward, forward_s = timed_compare(session, choices, executors.WorkerProcesses())
        backward, _ = timed_compare(session, list(reversed(choices)), executors.WorkerProcesses())
    print(f"library output: {library_log}")

    print(f"{'method':28} {'in-process peak MB':>18} {'worker peak MB (order A / B)':>30} {'A/B':>6}  {'decode tok/s':>12} {'spread':>7}")
    ratios = []
    for label, a in forward.items():
        b = backward[label]
        ratio = a.peak_above_baseline_bytes / b.peak_above_baseline_bytes
        ratios.append(ratio)
        print(f"{label:28} {here[label].peak_above_baseline_bytes / MB:18.0f} {a.peak_above_baseline_bytes / MB:14.0f} / "
              f"{b.peak_above_baseline_bytes / MB:<13.0f} {ratio:6.3f}  {a.decode_tokens_per_s or 0:12.1f} "
              f"{'x%.2f' % a.decode_spread if a.decode_spread else '':>7}")
    print(f"\nwall time: workers {forward_s:.1f} s, in-process {here_s:.1f} s")
    print(f"ratio workers / in-process wall time: {forward_s / here_s:.2f}x (goal <= 1.10)")
    worst = max(abs(r - 1) for r in ratios)
    print(f"order independence: largest peak-above-baseline difference between the orders {100 * worst:.1f}% (goal <= 5%)")


if __name__ == "__main__":
    main()
