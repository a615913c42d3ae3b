"""Benchmark (d): what a sweep costs over the same cells run one by one (goal <= 1.05).

The same small grid, twice through the command line, each way with a fresh output folder
(so nothing is reused): once as one `sweep` (grid expansion, every cell through the
runner, the history, the Pareto front and its report), once as one `compare` call per
cell. Both use the default executor (a fresh worker per cell); an untimed call first does
the imports (this process's and the fork server's) that only the first call would pay, and
`--rounds` (2) alternates which way goes first. The perplexities must agree between the two ways; the ratio is
printed last. Run: .venv/bin/python bench/sweep_overhead.py [--model bundled]
[--grid "hqq:bits=2,4" --grid bnb-nf4 ...] [--tokens 512]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

from workbench.cli import main as cli
from workbench.run import sweep

import record

DEFAULT_GRIDS = ["hqq:bits=2,4", "bnb-nf4", "bnb-int8"]


def timed(argv: list[str], log) -> float:
    """Wall time of one CLI call, its output into `log`; a failed call ends the benchmark."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = cli(argv)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(argv)}; see {log.name}")
    return time.perf_counter() - start


def perplexities(folder: Path) -> list[float]:
    return [row["ppl"] for row in json.loads((folder / "results.json").read_text())]


def one_round(
    round_: int, grids: list[str], cells: list, common: list[str], root: Path, log
) -> tuple[float, list[float]]:
    """Both ways once, each into fresh folders; odd rounds run the cells one by one first, so
    that neither way always runs first (a warm page cache, a CPU that just sped up)."""

    def as_sweep() -> list[float]:
        return [
            timed(
                ["sweep", *common, *[a for g in grids for a in ("--grid", g)], "--out", str(root / f"sweep{round_}")],
                log,
            )
        ]

    def one_by_one() -> list[float]:
        return [
            timed(["compare", *common, "--methods", cell.text, "--out", str(root / f"cell{round_}-{i}")], log)
            for i, cell in enumerate(cells)
        ]

    if round_ % 2:
        one_s = one_by_one()
        return as_sweep()[0], one_s
    return as_sweep()[0], one_by_one()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument(
        "--grid", action="append", default=None, help=f"repeatable (default: {' '.join(DEFAULT_GRIDS)})"
    )
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="both ways this many times, alternating which goes first")
    args = parser.parse_args()
    grids = args.grid or DEFAULT_GRIDS
    cells = sweep.expand(grids, log=lambda m: None)
    common = ["--model", args.model, "--max-tokens", str(args.tokens), "--decode-tokens", str(args.decode_tokens)]

    root = Path(tempfile.mkdtemp(prefix="workbench-bench-sweep-"))
    with (root / "cli.log").open("w", encoding="utf-8") as log:
        # untimed: this process's own imports and the fork server's, which only the first call would pay
        timed(["compare", *common, "--methods", cells[0].text, "--out", str(root / "warm-up")], log)
        rounds = [one_round(i, grids, cells, common, root, log) for i in range(args.rounds)]
    sweep_s = sum(s for s, _ in rounds)
    one_s = [sum(column) for column in zip(*(cells_s for _, cells_s in rounds))]
    separate = [ppl for i in range(len(cells)) for ppl in perplexities(root / f"cell0-{i}")]
    same = all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(perplexities(root / "sweep0"), separate, strict=True))
    print(f"output and logs: {root}")
    print(f"{'cell':28} {'one by one s (all rounds)':>25}")
    for cell, seconds in zip(cells, one_s):
        print(f"{cell.label:28} {seconds:25.1f}")
    print(f"\nsame perplexities both ways (to 1e-6): {'yes' if same else 'NO'}")
    print(
        f"wall time over {args.rounds} round(s): sweep {sweep_s:.1f} s, the {len(cells)} cells one by one {sum(one_s):.1f} s"
    )
    print(f"ratio sweep / one by one wall time: {sweep_s / sum(one_s):.2f}x (goal <= 1.05)")
    summary = {
        "same perplexities both ways (to 1e-6)": same,
        "sweep wall time (s)": round(sweep_s, 1),
        "cells one by one wall time (s)": round(sum(one_s), 1),
        "ratio sweep / one by one wall time (x)": record.goal(round(sweep_s / sum(one_s), 2), "<= 1.05"),
    }
    rows = [
        {"cell": cell.label, "one by one, all rounds (s)": round(seconds, 1)} for cell, seconds in zip(cells, one_s)
    ]
    notes = [f"grids {' '.join(grids)}, {args.tokens} tokens, {args.rounds} round(s)"]
    record.save("sweep_overhead", summary, rows, notes)


if __name__ == "__main__":
    main()
