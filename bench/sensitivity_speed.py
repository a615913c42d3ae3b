"""Benchmark: the sensitivity map's speed on 2 CPU cores, and how well the proxy ranks layers.

The full SmolLM2 map (30 blocks x 7 linear kinds = 210 cells) of rtn:bits=3:group_size=64 on
512 calibration tokens, computed fresh (no cache): the proxy (layer output error) and the
end-to-end KL. Prints both wall times, Spearman(proxy, end-to-end), and last the ratios to
the goals (end-to-end <= 180 s, proxy <= 30 s; a ratio <= 1 meets it).
Run: .venv/bin/python bench/sensitivity_speed.py [--blocks 0,15,29] [--tokens 512] [--method ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from workbench.report.sensitivity import report
from workbench.run import maps
from workbench.sources import models

import record

GOAL_END_TO_END_S = 180.0
GOAL_PROXY_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--method", default="rtn:bits=3:group_size=64")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--blocks", default=None, help="comma-separated blocks for a smoke run (default: all)")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
    source = models.resolve(args.model)
    print(f"torch threads: {torch.get_num_threads()}")
    start = time.perf_counter()
    smap = maps.compute(source, args.method, args.tokens, "layer", blocks)
    total = time.perf_counter() - start
    print(report(smap))
    print(f"wall time with loading: {total:.1f} s")
    note = f" (smoke run: {len(smap.cells)} cells, the goals are for the full map)" if blocks else ""
    print(
        f"end-to-end: {smap.end_to_end_s:.1f} s / goal {GOAL_END_TO_END_S:.0f} s = {smap.end_to_end_s / GOAL_END_TO_END_S:.2f}{note}"
    )
    print(f"proxy: {smap.proxy_s:.1f} s / goal {GOAL_PROXY_S:.0f} s = {smap.proxy_s / GOAL_PROXY_S:.2f}{note}")

    def figure(seconds: float, goal_s: float):
        """A smoke run's times are not held to the full map's goals."""
        return round(seconds, 1) if blocks else record.goal(round(seconds, 1), f"<= {goal_s:.0f}")

    rho = smap.spearman()
    summary = {
        "cells": len(smap.cells),
        "end-to-end map (s)": figure(smap.end_to_end_s, GOAL_END_TO_END_S),
        "proxy map (s)": figure(smap.proxy_s, GOAL_PROXY_S),
        "Spearman(proxy, end-to-end)": None if rho is None else round(rho, 3),
        "wall time with loading (s)": round(total, 1),
    }
    notes = [f"{smap.model}, {smap.method}, {smap.tokens} calibration tokens{note}"]
    record.save("sensitivity_speed", summary, notes=notes)


if __name__ == "__main__":
    main()
