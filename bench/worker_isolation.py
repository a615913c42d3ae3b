"""Benchmark (c): what measuring each method in its own worker process costs and buys.

On the offline model, in one run:
1. wall time of the method set measured in worker processes vs in this process (goal <= 1.10),
   each method timed in both modes back to back (which mode goes first alternates), so that the
   machine's drift over minutes (10-50% here) falls on both sides alike;
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

from workbench.cli import DEFAULT_METHODS
from workbench.core.config import EvalConfig, ModelSpec
from workbench.core.quiet import library_output
from workbench.run import executors, runner, workers
from workbench.run.compare import compare

import record

MB = 2**20


def timed(session, choice, executor):
    """One method's result and the wall time of its comparison."""
    start = time.perf_counter()
    (result,) = compare(session, [choice], log=lambda m: None, executor=executor)
    if result.error:
        raise SystemExit(f"{result.label} failed: {result.error}")
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=16)
    args = parser.parse_args()
    choices = args.methods.split(",")
    session = runner.Session.open(
        ModelSpec("bundled", device="cpu"),
        EvalConfig(max_tokens=args.tokens, decode_tokens=args.decode_tokens),
        log=lambda m: None,
    )

    library_log = Path(tempfile.gettempdir()) / "workbench-bench-library.log"
    here, forward, backward = {}, {}, {}
    seconds = {"workers": 0.0, "in-process": 0.0}
    modes = [("workers", workers.WorkerProcesses(), forward), ("in-process", executors.InProcess(), here)]
    with library_output(library_log):  # the in-process run's library chatter; workers keep theirs
        start = time.perf_counter()
        modes[0][1].warm_up()  # the fork server's start counts for the workers
        seconds["workers"] += time.perf_counter() - start
        # order A, both modes back to back, the first one alternating
        for i, choice in enumerate(choices):
            for name, executor, results in modes if i % 2 == 0 else modes[::-1]:
                result, elapsed = timed(session, choice, executor)
                results[result.label] = result
                seconds[name] += elapsed
        for choice in reversed(choices):  # order B, workers only
            result, _ = timed(session, choice, modes[0][1])
            backward[result.label] = result
    print(f"library output: {library_log}")

    print(
        f"{'method':28} {'in-process peak MB':>18} {'worker peak MB (order A / B)':>30} {'A/B':>6}  {'decode tok/s':>12} {'spread':>7}"
    )
    ratios, rows = [], []
    for label, a in forward.items():
        b = backward[label]
        ratio = a.peak_above_baseline_bytes / b.peak_above_baseline_bytes
        ratios.append(ratio)
        rows.append(
            {
                "method": label,
                "in-process peak (MB)": round(here[label].peak_above_baseline_bytes / MB),
                "worker peak, order A (MB)": round(a.peak_above_baseline_bytes / MB),
                "worker peak, order B (MB)": round(b.peak_above_baseline_bytes / MB),
                "A / B": round(ratio, 3),
                "decode (tok/s)": round(a.decode_tokens_per_s or 0, 1),
                "decode spread (x)": round(a.decode_spread, 2) if a.decode_spread else None,
            }
        )
        print(
            f"{label:28} {here[label].peak_above_baseline_bytes / MB:18.0f} {a.peak_above_baseline_bytes / MB:14.0f} / "
            f"{b.peak_above_baseline_bytes / MB:<13.0f} {ratio:6.3f}  {a.decode_tokens_per_s or 0:12.1f} "
            f"{'x%.2f' % a.decode_spread if a.decode_spread else '':>7}"
        )
    print(f"\nwall time: workers {seconds['workers']:.1f} s, in-process {seconds['in-process']:.1f} s")
    print(f"ratio workers / in-process wall time: {seconds['workers'] / seconds['in-process']:.2f}x (goal <= 1.10)")
    worst = max(abs(r - 1) for r in ratios)
    print(
        f"order independence: largest peak-above-baseline difference between the orders {100 * worst:.1f}% (goal <= 5%)"
    )
    summary = {
        "workers wall time (s)": round(seconds["workers"], 1),
        "in-process wall time (s)": round(seconds["in-process"], 1),
        "ratio workers / in-process wall time (x)": record.goal(
            round(seconds["workers"] / seconds["in-process"], 2), "<= 1.10"
        ),
        "largest peak-above-baseline difference between the orders (%)": record.goal(round(100 * worst, 1), "<= 5"),
    }
    record.save(
        "worker_isolation", summary, rows, [f"{args.tokens} evaluation tokens, {args.decode_tokens} decode tokens"]
    )


if __name__ == "__main__":
    main()
