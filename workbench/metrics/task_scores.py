"""What a task run gives back: each task's main metric with its standard error and per-document
scores (`main_metric`, from lm-eval's output), and the paired difference of two rows on one task.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.core.config import TaskSpec
from workbench.core.errors import WorkbenchError


@dataclass(frozen=True)
class TaskScores:
    """Each task's main metric with its standard error, as lm-eval reported them."""

    scores: dict
    """task -> {metric, value, stderr, n, version, fewshot, limit, per_document}"""

    def result_fields(self) -> dict:
        return {"tasks": self.scores}


def main_metric(out: dict, spec: TaskSpec) -> dict:
    """The task's first metric (lm-eval's order: `acc` before `acc_norm` or `perplexity`) and its stderr."""
    (name, values), *_ = out["results"].items()
    metric_key = next(k for k in values if "," in k and "_stderr," not in k)
    metric, _, filter_name = metric_key.partition(",")
    stderr = values.get(f"{metric}_stderr,{filter_name}")
    samples = out.get("n-samples", {}).get(name, {})
    logged = sorted(
        (s for s in out.get("samples", {}).get(name, []) if s.get("filter") == filter_name), key=lambda s: s["doc_id"]
    )
    per_document = [s.get(metric) for s in logged]
    value = float(values[metric_key])
    if not _averages_to(per_document, value):
        per_document = None  # a corpus metric (perplexity aggregates log-likelihoods, not scores)
    return {
        "metric": metric,
        "value": value,
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        "n": int(samples.get("effective", 0)),
        "version": str(out.get("versions", {}).get(name, "")),
        "fewshot": int(out.get("n-shot", {}).get(name, 0) or 0),
        "limit": spec.limit,
        "per_document": [float(v) for v in per_document] if per_document else None,  # in document order
    }


def _averages_to(scores: list, value: float) -> bool:
    """Whether `scores` are per-document numbers whose mean is the task's `value` (acc, exact_match)."""
    if not scores or not all(isinstance(v, (int, float)) for v in scores):
        return False
    return abs(sum(scores) / len(scores) - value) <= 1e-9 * max(1.0, abs(value))


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """Score `a` minus score `b` (two rows' entries for one task, same documents) and the standard
    error of that difference from the per-document differences. Where two methods mostly get the same
    documents right and the same ones wrong, this error is far smaller than the rows' own errors combined."""
    if not a.get("per_document") or not b.get("per_document") or len(a["per_document"]) != len(b["per_document"]):
        raise WorkbenchError("tasks: a paired difference needs both rows' per-document scores on the same documents.")
    differences = [x - y for x, y in zip(a["per_document"], b["per_document"])]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    return mean, (variance / n) ** 0.5
