"""Benchmark (d): each notebook with its own defaults, headless, as a course maintainer runs it.

Executes every notebook in notebooks/ in a fresh kernel (no WB_ overrides), times each, checks
each cell's output is quiet (the nbval check in notebooks/conftest.py), and prints the
notebooks slowest last with the workshop goal (under 5 minutes each on 2 CPU cores).
Run: .venv/bin/python bench/notebook_times.py [notebooks/02_compare_methods.ipynb ...]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import record

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 300


def _cell_noise():
    spec = importlib.util.spec_from_file_location("notebook_checks", ROOT / "notebooks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cell_noise


def run(path: Path, cell_noise) -> tuple[float, list[str], list[tuple[float, int]]]:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()
    wall = time.perf_counter() - start
    problems, slow = [], []
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        problems += [f"cell {number}: {p}" for p in cell_noise(cell.get("outputs"))]
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            from datetime import datetime

            began, ended = (
                datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply")
            )
            slow.append(((ended - began).total_seconds(), number))
    return wall, problems, sorted(slow)[-3:]


def main() -> None:
    for name in [k for k in os.environ if k.startswith("WB_")]:
        del os.environ[name]  # the notebooks' own defaults
    paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    cell_noise, rows = _cell_noise(), []
    for path in paths:
        wall, problems, slow = run(path, cell_noise)
        rows.append((wall, path.name, problems, slow))
        print(f"{path.name}: {wall:.0f} s", flush=True)
    print(f"\n{'notebook':34} {'wall s':>7}  {'goal':>6}  slowest cells (s)")
    for wall, name, problems, slow in sorted(rows):
        cells = ", ".join(f"#{n} {s:.0f}" for s, n in reversed(slow))
        print(f"{name:34} {wall:7.0f}  {'ok' if wall < GOAL_S else 'OVER':>6}  {cells}")
        for problem in problems:
            print(f"    not quiet: {problem}")
    print(
        f"\nslowest: {rows and max(rows)[1]} at {max(rows)[0]:.0f} s = {max(rows)[0] / GOAL_S:.2f} of the {GOAL_S} s goal"
    )
    slowest_s, slowest = max(rows)[:2]
    summary = {
        "notebooks": len(rows),
        "slowest notebook": slowest,
        "slowest wall time (s)": record.goal(round(slowest_s), f"< {GOAL_S}"),
        "cells not quiet": sum(len(problems) for _, _, problems, _ in rows),
    }
    details = [
        {
            "notebook": name,
            "wall time (s)": round(wall),
            "slowest cells (s)": [f"#{n} {s:.0f}" for s, n in reversed(slow)],
            "not quiet": problems,
        }
        for wall, name, problems, slow in sorted(rows)
    ]
    record.save("notebook_times", summary, details)


if __name__ == "__main__":
    main()
