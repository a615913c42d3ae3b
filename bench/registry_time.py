"""Benchmark: every method of the registry on the bundled model, as a user runs it (issue 24, goal:
the whole command in under 10 minutes on 2 idle cores).

Runs `python -m workbench compare --model bundled --methods all` (the CLI's own defaults: 4,096
evaluation tokens, 32 decoded tokens, each method in a fresh worker) with an empty workbench cache,
so it pays what a first run pays: the full-precision reference, the F32 GGUF that the llama.cpp rows
start from, the sensitivity map of `mixed` and `gguf-map`. The bundled model's fp32 copy stays where
`make setup` put it. Prints each method's build seconds (load, quantize, warm-up), measure seconds
(perplexity, KL) and decode seconds (the tok/s repetitions), their sum against the whole command's
wall time, and the total against the goal; and each row's perplexity as a ratio to fp32's, with the effects tests/test_real_model.py
leaves to this bench (8-bit round-to-nearest within 2 %, 2-bit collapsing), and the order of the run
peaks (fp32 > bnb-int8 > bnb-nf4, fp32 > gptq).
Run: .venv/bin/python bench/registry_time.py [--methods all] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workbench.sources import models

import record

GOAL_S = 600
EFFECTS = {  # perplexity / fp32's: what a learner should see on this model
    "quanto-int8": "<= 1.02",
    "torchao-int8": "<= 1.02",
    "quanto-int2": ">= 10",
}

RUN_PEAK_ORDER = (("fp32", "bnb-int8"), ("bnb-int8", "bnb-nf4"), ("fp32", "gptq"))
"""The order of the memory a quantized model needs to run in the seed's table (issue 24)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the CLI's own (4096)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="registry-time-") as scratch:
        out, cache = Path(scratch) / "out", Path(scratch) / "cache"
        cache.mkdir()
        bundled = Path(models.resolve("bundled").location)  # its fp32 copy: made once per machine by `make setup`
        (cache / bundled.name).symlink_to(bundled)
        command = [sys.executable, "-m", "workbench", "compare", "--model", "bundled", "--methods", args.methods]
        command += ["--out", str(out)] + (["--max-tokens", str(args.max_tokens)] if args.max_tokens else [])
        started = time.perf_counter()
        done = subprocess.run(command, env={**os.environ, "WORKBENCH_CACHE": str(cache)})
        wall = time.perf_counter() - started
        rows = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    if not rows:
        raise SystemExit(f"compare wrote no results (exit status {done.returncode})")

    details, build, measure, decode = [], 0.0, 0.0, 0.0
    fp32 = next((row["ppl"] for row in rows if row["label"] == "fp32" and row.get("ppl")), None)
    print(f"\n{'method':32s} {'build s':>8s} {'measure s':>9s} {'decode s':>8s}  ppl    x fp32")
    for row in rows:
        built, measured, decoded = row.get("load_s") or 0.0, row.get("eval_s") or 0.0, decode_seconds(row)
        build, measure, decode = build + built, measure + measured, decode + decoded
        ppl = f"{row['ppl']:.2f}" if row.get("ppl") else f"error: {(row.get('error') or '')[:60]}"
        ratio = round(row["ppl"] / fp32, 3) if fp32 and row.get("ppl") else None
        print(f"{row['label']:32s} {built:8.1f} {measured:9.1f} {decoded:8.1f}  {ppl:6s} {ratio or ''}")
        details.append(
            {
                "method": row["label"],
                "build (s)": round(built, 1),
                "measure (s)": round(measured, 1),
                "decode (s)": round(decoded, 1),
                "run peak (MB)": round(row["run_peak_bytes"] / 1e6) if row.get("run_peak_bytes") else None,
                "ppl": ppl,
                "ppl / fp32 (x)": ratio,
            }
        )
    failed = [row["label"] for row in rows if row.get("error")]
    whole = args.methods == "all"  # the goal is for the whole registry; a subset is timed without it
    goal = f"(goal {GOAL_S} s)" if whole else "(a subset: the goal is for --methods all)"
    print(
        f"\nbuild {build:.0f} s + measure {measure:.0f} s + decode {decode:.0f} s; "
        f"the whole command {wall:.0f} s {goal}"
    )
    summary = {
        "whole command (s)": record.goal(round(wall), f"<= {GOAL_S}") if whole else round(wall),
        "build, all methods (s)": round(build),
        "measure, all methods (s)": round(measure),
        "decode, all methods (s)": round(decode),
        "methods measured": len(rows) - len(failed),
        "methods failed": len(failed),
    }
    for row in details:
        if row["method"] in EFFECTS and row["ppl / fp32 (x)"] is not None:
            summary[f"{row['method']} ppl / fp32 (x)"] = record.goal(row["ppl / fp32 (x)"], EFFECTS[row["method"]])
    peaks = {row["method"]: row["run peak (MB)"] for row in details if row["run peak (MB)"]}
    for larger, smaller in RUN_PEAK_ORDER:
        if larger in peaks and smaller in peaks:
            summary[f"run peak {larger} / {smaller} (x)"] = record.goal(round(peaks[larger] / peaks[smaller], 2), "> 1")
    notes = [
        f"`python -m workbench compare --model bundled --methods {args.methods}`, an empty workbench cache, "
        "each method in a fresh worker",
        "measure: perplexity and KL; decode: the tok/s repetitions (repetitions x (new tokens / tok/s + "
        "prefill)); the rest of the whole command: starting a worker per method, the evaluation text, "
        "writing results",
    ] + ([f"failed: {', '.join(failed)}"] if failed else [])
    record.save("registry_time", summary, details, notes)


def decode_seconds(row: dict) -> float:
    """Seconds the row's decode-speed repetitions took, from what it records."""
    if not row.get("decode_tokens_per_s"):
        return 0.0
    new_tokens = row.get("protocol", {}).get("decode_tokens") or 0
    per_repetition = new_tokens / row["decode_tokens_per_s"] + (row.get("prefill_ms") or 0) / 1000
    return (row.get("decode_repeats") or 0) * per_repetition


if __name__ == "__main__":
    main()
