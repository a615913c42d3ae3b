"""Sweeps: grids of method settings, expanded into choices and run like a comparison.

A grid is a choice whose values may be comma lists: `rtn:bits=2,3,4,8:group_size=32,64`
is the cartesian product of its lists (8 cells), and a method name alone (`bnb-nf4`) is
one cell. Every cell is parsed and validated before any work, so a typo in the last grid
is an error naming that grid and value, not a failed row after an hour; cells that are
the same choice (the same canonical `Choice.text`: `rtn:bits=4` is `rtn`, its default)
are measured once. The cells then go through `runner.compare` like any comparison
(finished cells in the history are reused, the rest run on the executor given: worker
processes, or Ray tasks), and the result is read as a trade-off: the metric against
weight bytes, with its Pareto front (`tradeoff.pareto_front`, `charts.pareto_chart`).
"""

from __future__ import annotations

import itertools
from typing import Callable

from workbench import methods
from workbench.core.errors import WorkbenchError
from workbench.methods import Choice
from workbench.run.results import MB, Result
from workbench.run.tradeoff import metric_of, pareto_front, trade_off_points

EXAMPLE = '--grid "rtn:bits=2,3,4:group_size=32,64" --grid bnb-nf4'
MAX_CELLS = 64
"""More cells than this are refused unless asked for: each cell builds and measures the model once."""


def expand_grid(grid: str) -> list[Choice]:
    """Every cell of one grid, validated, in the order the lists are written (the last key varies fastest)."""
    name, *pairs = grid.strip().split(":")
    if not name.strip():
        raise WorkbenchError(f"--grid {grid!r}: no method named. Example: {EXAMPLE}")
    axes, keys = [], set()
    for pair in pairs:
        key, sep, values = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise WorkbenchError(f"--grid {grid!r}: settings are written key=value or key=v1,v2,..., got {pair!r}.")
        if key in keys:
            raise WorkbenchError(f"--grid {grid!r}: {key} is set twice; list all its values once, as {key}=a,b.")
        keys.add(key)
        options = [value.strip() for value in values.split(",")]
        if not all(options):
            raise WorkbenchError(
                f"--grid {grid!r}: {key}={values} has an empty value; separate values with single commas, as {key}=2,4."
            )
        axes.append([f"{key}={value}" for value in options])
    cells = []
    for combination in itertools.product(*axes):
        try:
            cells.append(methods.parse(":".join([name.strip(), *combination])))
        except WorkbenchError as exc:
            raise WorkbenchError(f"--grid {grid!r}: {exc}") from None
    return cells


def expand(grids: list[str], log: Callable[[str], None] = print, allow_large: bool = False) -> list[Choice]:
    """The cells of all grids, each distinct choice once, in the order first named; more than
    MAX_CELLS are refused unless `allow_large`."""
    if not grids:
        raise WorkbenchError(f"--grid: no grid given. Example: {EXAMPLE}")
    named = _count(grids)
    if named > MAX_CELLS and not allow_large:
        raise WorkbenchError(
            f"--grid: {named:,} cells; each builds and measures the model once (a minute or more on a CPU), so this "
            f"sweep would run for hours. Narrow the grids to {MAX_CELLS} cells or fewer, or pass --allow-large-sweep."
        )
    cells: dict[tuple, Choice] = {}
    for grid in grids:
        for cell in expand_grid(grid):
            if (cell.text, cell.adapter) in cells:
                log(f"note: {cell.label} is a cell of more than one grid (or named twice); measuring it once.")
            cells.setdefault((cell.text, cell.adapter), cell)
    return list(cells.values())


def _count(grids: list[str]) -> int:
    """How many cells the grids name, counted without building them (a product of list lengths)."""
    total = 0
    for grid in grids:
        cells = 1
        for pair in grid.split(":")[1:]:
            cells *= len(pair.partition("=")[2].split(","))
        total += cells
    return total


def format_front(results: list[Result], metric: str = "ppl") -> str:
    """The Pareto front as text, smallest weights first, with how many cells it was chosen from
    and how many were reused from the history."""
    name, _, value = metric_of(metric)
    front, points = pareto_front(results, metric), trade_off_points(results, metric)
    reused = sum(1 for r in results if r.reused_from)
    lines = [
        f"Pareto front, {name.lower()} vs weight MB ({len(front)} of {len(points)} cells with both; lower is better):"
    ]
    if not front:
        lines.append(f"  (no cell has both a {name.lower()} and weight bytes)")
    width = max((len(r.label) for r in front), default=0)
    for r in front:
        lines.append(f"  {r.label:<{width}}  {r.weight_bytes / MB:10.2f} MB  {name.lower()} {_number(value(r))}")
    lines.append(f"{reused} of {len(results)} cells reused from the history, {len(results) - reused} run now.")
    return "\n".join(lines)


def _number(value: float) -> str:
    """Four significant digits, without an exponent for the perplexities of collapsed models."""
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
