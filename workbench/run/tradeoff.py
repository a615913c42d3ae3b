"""What a trade-off puts against weight memory, and which results no other result beats.

Pure functions over results: the sweep ranks its cells with them, the charts draw them.
"""

from __future__ import annotations

import math

from workbench.core.errors import WorkbenchError
from workbench.run.results import Result


def _ok(results: list[Result]) -> list[Result]:
    return [r for r in results if r.error is None]


TRADE_OFF_METRICS = {
    # metric: (name, axis title, function of a result)
    "ppl": ("Perplexity", "perplexity (lower is better)", lambda r: r.ppl),
    "kl": ("KL divergence", "mean KL divergence to the baseline, nats/token (lower is better)", lambda r: r.kl_mean),
}
"""What a trade-off chart can put against weight memory; a result without the value is left out."""


def metric_of(metric: str):
    """(name, axis title, value function) of a trade-off metric; a clear error for an unknown one."""
    try:
        return TRADE_OFF_METRICS[metric]
    except KeyError:
        raise WorkbenchError(f"--metric {metric!r}: choose one of {', '.join(TRADE_OFF_METRICS)}.") from None


def trade_off_points(results: list[Result], metric: str = "ppl") -> list[Result]:
    """The successful results that have weight bytes and a finite value of `metric`."""
    value = metric_of(metric)[2]
    return [r for r in _ok(results) if r.weight_bytes and value(r) is not None and math.isfinite(value(r))]


def pareto_front(results: list[Result], metric: str = "ppl") -> list[Result]:
    """The points no other point beats: none has fewer weight bytes and a no-worse metric, or
    no more bytes and a better metric (both lower is better). Points with equal bytes and
    equal metric dominate neither, so both stay. Sorted by weight bytes, then metric."""
    value = metric_of(metric)[2]
    points = trade_off_points(results, metric)

    def dominated(p: Result) -> bool:
        return any(
            q.weight_bytes <= p.weight_bytes
            and value(q) <= value(p)
            and (q.weight_bytes < p.weight_bytes or value(q) < value(p))
            for q in points
        )

    return sorted((p for p in points if not dominated(p)), key=lambda r: (r.weight_bytes, value(r)))
