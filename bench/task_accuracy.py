"""Benchmark: what quantization costs on a task, with its standard error (issue 25's order).

The offline last-word task (`wb_lastword`, LAMBADA's protocol, all 500 passages) through
lm-evaluation-harness on the bundled model, each method in its own worker: fp32, bnb-int8,
bnb-nf4 and 2-bit round-to-nearest. Expected order: fp32 >= bnb-int8 (within noise) > bnb-nf4,
and 2-bit near chance. Prints each accuracy ± standard error and each neighbouring pair's difference
twice: in the rows' own standard errors combined (unpaired), and in the standard error of the
per-passage differences (paired: both methods read the same passages, so only the passages where
they disagree count).
Run: .venv/bin/python bench/task_accuracy.py [--methods fp32,bnb-int8,bnb-nf4,rtn:bits=2] [--limit N]
"""

from __future__ import annotations

import argparse

from workbench.core.config import EvalConfig, ModelSpec, TaskSpec
from workbench.metrics import task_scores
from workbench.run import runner
from workbench.run.compare import compare

import record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="fp32,bnb-int8,bnb-nf4,rtn:bits=2")
    parser.add_argument("--limit", type=int, default=None, help="at most this many passages (default: all 500)")
    args = parser.parse_args()

    spec = TaskSpec("wb_lastword", limit=args.limit)
    session = runner.Session.open(
        ModelSpec("bundled", device="cpu"), EvalConfig(max_tokens=128, decode_tokens=0, tasks=(spec,)), print
    )
    rows = compare(session, args.methods.split(","), log=print)
    failed = [r for r in rows if r.error]
    if failed:
        raise SystemExit(f"{failed[0].label}: {failed[0].error}")
    scores = {r.label: r.tasks["wb_lastword"] for r in rows}
    print()
    for label, score in scores.items():
        print(f"{label:14s} {100 * score['value']:5.1f}% ± {100 * score['stderr']:.1f}  (n={score['n']})")
    labels = list(scores)
    summary = {f"{label} acc (%)": round(100 * scores[label]["value"], 1) for label in labels}
    for a, b in zip(labels, labels[1:]):
        difference, paired_stderr = task_scores.paired_difference(scores[a], scores[b])
        errors = difference / (scores[a]["stderr"] ** 2 + scores[b]["stderr"] ** 2) ** 0.5
        paired = difference / paired_stderr if paired_stderr else float("inf")
        print(
            f"{a} - {b}: {100 * difference:+.1f} points = {errors:+.1f} standard errors unpaired, "
            f"{paired:+.1f} paired (± {100 * paired_stderr:.1f} points)"
        )
        summary[f"{a} - {b} (standard errors)"] = round(errors, 1)
        summary[f"{a} - {b} (paired standard errors)"] = round(paired, 1)
    details = [
        {
            "method": r.label,
            "acc": r.tasks["wb_lastword"]["value"],
            "stderr": r.tasks["wb_lastword"]["stderr"],
            "n": r.tasks["wb_lastword"]["n"],
            "weight MB": round(r.weight_bytes / 2**20, 1),
        }
        for r in rows
    ]
    record.save("task_accuracy", summary, details, [f"wb_lastword, {details[0]['n']} passages, lm-eval"])


if __name__ == "__main__":
    main()
