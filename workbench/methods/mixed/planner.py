"""Mixed precision from a sensitivity map: which layers get how many bits under a size budget.

The budget is the mean stored bits per block-linear weight, counted as the backend stores
them (a 3-bit RTN layer at group 64 costs 3 + 19/64 + 0.05 bits, see
`methods.gptq.packed_storage`), or MB of those weights. Every unit (a block, or one layer)
starts at the smallest width; the greedy step upgrades the unit whose estimated KL drop per
extra stored bit is largest, until no upgrade fits. A unit's KL at width w is estimated from
the map's value s (measured at the smallest width w0) as s * 4^-(w - w0): one more bit
halves the rounding step, a quarter of the squared error. So 3 -> 4 (gain 0.75 s for ~1
bit) comes before 4 -> 8 (0.25 s for 4 bits), as it should: 8-bit blocks paid for with
3-bit ones do not beat uniform 4-bit.

`against_map` places the same widths on the least sensitive units instead (within units of
equal size, so the weight bytes are the same): the control of the effect test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

from workbench.core.errors import WorkbenchError
from workbench.metrics.sensitivity import SensitivityMap

GRANULARITIES = ("block", "layer")
MB = 1e6


@dataclass(frozen=True)
class Unit:
    """What one width is chosen for: a block's linears or one layer."""

    name: str
    """`block 3` or the layer's module name."""
    layers: tuple[str, ...]
    weights: int
    sensitivity: float


@dataclass(frozen=True)
class Plan:
    granularity: str
    widths: tuple[int, ...]
    budget_bits: float
    units: tuple[Unit, ...]
    bits: tuple[int, ...]
    """The width of each unit, in `units` order."""
    stored_bits: float
    """Mean stored bits per block-linear weight the plan costs (scales included)."""
    placement: str = "map"

    def layer_bits(self) -> dict[str, int]:
        """Module name -> bits, for every block linear."""
        return {layer: w for unit, w in zip(self.units, self.bits) for layer in unit.layers}

    def count(self) -> dict[int, int]:
        """How many units get each width."""
        return {w: sum(b == w for b in self.bits) for w in self.widths}

    def summary(self) -> str:
        """One line a table can show: units per width and the stored bits."""
        parts = []
        for w in self.widths:
            names = [u.name.replace("block ", "") for u, b in zip(self.units, self.bits) if b == w]
            if names:
                shown = ", ".join(names) if len(names) <= 12 else f"{len(names)} {self.granularity}s"
                parts.append(f"{w}-bit: {shown}")
        return f"{'; '.join(parts)} ({self.stored_bits:.3f} bits/weight stored, placed {self.placement})"

    def to_dict(self) -> dict:
        return {**asdict(self), "layer_bits": self.layer_bits()}


def units_of(smap: "SensitivityMap", granularity: str) -> list[Unit]:
    """The map's cells grouped into units; a unit's sensitivity is the sum of its cells' KL."""
    if granularity not in GRANULARITIES:
        raise WorkbenchError(f"mixed: granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}.")
    if any(c.kl is None for c in smap.cells):
        raise WorkbenchError(
            "mixed: the sensitivity map has no end-to-end KL values (a proxy-only map); compute the full map."
        )
    if granularity == "layer":
        if smap.unit != "layer":
            raise WorkbenchError(
                "mixed: per-layer bits need a per-layer map (unit='layer'); this map quantized whole blocks."
            )
        return [Unit(c.layers[0], c.layers, c.weights, c.kl) for c in smap.cells]
    blocks: dict[int, list] = {}
    for c in smap.cells:
        blocks.setdefault(c.block, []).append(c)
    return [
        Unit(
            f"block {b}",
            tuple(layer for c in cells for layer in c.layers),
            sum(c.weights for c in cells),
            sum(c.kl for c in cells),
        )
        for b, cells in sorted(blocks.items())
    ]


def check_widths(widths) -> tuple[int, ...]:
    widths = tuple(sorted({int(w) for w in widths}))
    if len(widths) < 2:
        raise WorkbenchError(f"mixed: widths {widths} leave nothing to choose; give at least two, e.g. 3,4,8.")
    return widths


def budget_from_mb(budget_mb: float, smap: "SensitivityMap") -> float:
    """MB (10^6 bytes) of block-linear weights, scales included, as mean stored bits per weight."""
    return budget_mb * MB * 8 / sum(c.weights for c in smap.cells)


def plan(
    smap: "SensitivityMap",
    budget_bits: float,
    widths=(3, 4, 8),
    granularity: str = "block",
    cost: Callable[[int], float] = float,
) -> Plan:
    """Per-unit widths whose mean stored bits (`cost(width)` per weight) stay within `budget_bits`,
    most KL saved per stored bit first (see the module docstring)."""
    widths = check_widths(widths)
    units = units_of(smap, granularity)
    low, high = cost(widths[0]), cost(widths[-1])
    if budget_bits < low - 1e-9:
        raise WorkbenchError(
            f"mixed: a budget of {budget_bits:g} bits per weight is below the smallest width: {widths[0]}-bit "
            f"weights already cost {low:.3f} bits each with their scales. Raise the budget or add a smaller width."
        )
    if budget_bits > high + 1e-9:
        raise WorkbenchError(
            f"mixed: a budget of {budget_bits:g} bits per weight is above the largest width ({widths[-1]}-bit: "
            f"{high:.3f} bits with scales); use uniform {widths[-1]}-bit, or add a wider width."
        )
    total = sum(u.weights for u in units)
    level = [0] * len(units)
    spent = low * total
    while True:
        best, best_rate = (None, -1.0)  # an upgrade that saves nothing still beats leaving the budget unspent
        for i, u in enumerate(units):
            if level[i] + 1 == len(widths):
                continue
            now, nxt = widths[level[i]], widths[level[i] + 1]
            extra = u.weights * (cost(nxt) - cost(now))
            gain = u.sensitivity * (4.0 ** -(now - widths[0]) - 4.0 ** -(nxt - widths[0]))
            if spent + extra <= budget_bits * total + 1e-6 and gain / extra > best_rate:
                best, best_rate = i, gain / extra
        if best is None:
            break
        spent += units[best].weights * (cost(widths[level[best] + 1]) - cost(widths[level[best]]))
        level[best] += 1
    return Plan(granularity, widths, budget_bits, tuple(units), tuple(widths[step] for step in level), spent / total)


def against_map(chosen: Plan) -> Plan:
    """The same widths given to the least sensitive units: within each set of equal-size units,
    the widest width goes to the least sensitive one. Same weight bytes, opposite placement."""
    bits = list(chosen.bits)
    sizes = sorted({u.weights for u in chosen.units})
    for size in sizes:
        members = [i for i, u in enumerate(chosen.units) if u.weights == size]
        widths = sorted((chosen.bits[i] for i in members), reverse=True)
        for i, w in zip(sorted(members, key=lambda i: chosen.units[i].sensitivity), widths):
            bits[i] = w
    return replace(chosen, bits=tuple(bits), placement="against the map")
