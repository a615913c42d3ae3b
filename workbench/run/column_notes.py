"""The columns and footnotes of the table that depend on what was measured: task accuracy and KL.

Kept apart from `results` (the record, its history and the table's fixed columns) so that each
module stays short; `results.table_rows` and `results.footnotes` call these with `Result`s (not
imported here: `results` imports this module).
"""

from __future__ import annotations


def task_columns(results: list) -> list[tuple[str, str, str]]:
    """(task, metric, column name) of every task any row measured, in the order first seen."""
    seen = {}
    for r in results:
        for task, score in (r.tasks or {}).items():
            seen.setdefault(task, score["metric"])
    return [(task, metric, f"{task} {metric} %") for task, metric in seen.items()]


def task_cell(result, task: str, metric: str) -> str:
    """The metric in percent ± its standard error, e.g. "58.0 ± 4.9"."""
    score = (result.tasks or {}).get(task)
    if not score or score["metric"] != metric:
        return ""
    stderr = f" ± {100 * score['stderr']:.1f}" if score.get("stderr") is not None else ""
    return f"{100 * score['value']:.1f}{stderr}"


def task_note(done: list) -> list[str]:
    """What the task columns are: lm-eval's metric in percent ± its standard error, on how many documents."""
    with_tasks = [r for r in done if r.tasks]
    if not with_tasks:
        return []
    described = []
    for task, score in {t: s for r in with_tasks for t, s in r.tasks.items()}.items():
        described.append(f"{task} ({score['metric']}, {score['n']} documents, {score['fewshot']}-shot)")
    version = next((t.get("lm_eval") for r in with_tasks for t in r.protocol.get("tasks", [])), None)
    return [
        f"Task columns: lm-evaluation-harness {version}, the task's metric in % ± one standard error: "
        f"{'; '.join(described)}. Higher is better; differences within about two standard errors are noise."
    ]


def kl_note(done: list) -> list[str]:
    """What the KL columns are: against which reference, on which tokens, and the approximation."""
    with_kl = [r for r in done if r.kl_mean is not None]
    if not with_kl:
        return []
    references = sorted({str(r.protocol.get("kl_reference")) for r in with_kl})
    p = with_kl[0].protocol
    blank = (
        " Blank: measured before the reference's distributions were recorded; re-run to fill."
        if len(with_kl) < len(done)
        else ""
    )
    return [
        f"KL mean / p99: KL divergence (nats per token) of each method's next-token distribution from "
        f"{' / '.join(references)}'s, mean and 99th percentile over the same {p.get('n_tokens')} scored tokens; "
        "top-1 same %: tokens whose most likely next token is unchanged. The reference's distribution is kept as its "
        f"top {p.get('kl_top_k')} tokens plus {p.get('kl_tail_samples')} tokens drawn from the rest (an estimate within "
        f"about 1% of the exact mean KL on SmolLM2-135M; see workbench.metrics.divergence). Lower KL is better.{blank}"
    ]
