"""Task accuracy through lm-evaluation-harness: a built model of any method is handed to lm-eval
as a model instance (`HFLM(pretrained=model)`), and the tasks run on it; each row gets each
task's metric with its standard error, as lm-eval computes them.

Tasks are named as lm-eval knows them (`arc_easy`, `lambada_openai`: their datasets come from the
Hugging Face Hub, so in Colab or wherever it is reachable), or are one of the workbench's offline
tasks (`OFFLINE`, files in the package, see data/README.md), or a user's own file
(`--tasks-file`): an lm-eval task YAML, or a JSONL of questions (`file_task_config`).

    wb_lastword,arc_easy:limit=200:fewshot=5     (`parse`; limit = at most that many documents)

Everything about a task list that can be wrong (lm-eval missing, an unknown name, a malformed
file) is found by `check` before any model loads. A task whose dataset cannot be reached is the
row's error, saying so.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Callable
from unittest.mock import patch

from workbench.core import files
from workbench.core.config import TaskSpec
from workbench.core.errors import WorkbenchError
from workbench.metrics.task_scores import TaskScores, main_metric
from workbench.sources.data import FINETUNE_DIR

LM_EVAL_PIN = "lm-eval==0.4.13"
TASKS_DIR = FINETUNE_DIR.parent / "tasks"
OFFLINE = {
    "wb_lastword": (
        TASKS_DIR / "lastword.jsonl",
        "LAMBADA's protocol on passages of the Python standard library's docstrings: the share of passages "
        "whose last word is the model's greedy continuation",
    ),
    "wb_heldout": (
        FINETUNE_DIR / "heldout.jsonl",
        "the fine-tuning set's 40 held-out questions, asked in the chat template as in fine-tuning: the share "
        "whose greedy answer starts with the right 'About N GB'",
    ),
}
"""The workbench's offline tasks: name -> (data file, what it measures)."""
OFFLINE_VERSION = 1
"""Version of the offline tasks' definitions (part of their identity, with their file's hash)."""
SETTINGS = {"limit": int, "fewshot": int}


def parse(text: str | None, task_files: list[str] | tuple = ()) -> tuple[TaskSpec, ...]:
    """`name[:limit=N][:fewshot=K],...` and task files into specs; an `error:`-ready message for bad syntax."""
    specs = []
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        name, *settings = item.split(":")
        values = {}
        for setting in settings:
            key, _, value = setting.partition("=")
            if key not in SETTINGS or not re.fullmatch(r"[1-9][0-9]*|0", value) or (key == "limit" and value == "0"):
                raise WorkbenchError(
                    f"--tasks {item!r}: {setting!r} is not a setting; use name[:limit=N][:fewshot=K] "
                    "with whole numbers (limit at least 1)."
                )
            values[key] = int(value)
        specs.append(TaskSpec(name.strip(), values.get("limit"), values.get("fewshot")))
    for path in task_files:
        specs.append(TaskSpec(_file_task_name(Path(path)), path=str(Path(path).expanduser().absolute())))
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        raise WorkbenchError(f"--tasks: {', '.join(sorted({n for n in names if names.count(n) > 1}))} named twice.")
    return tuple(specs)


def _file_task_name(path: Path) -> str:
    return "file_" + re.sub(r"[^A-Za-z0-9_]+", "_", path.stem).strip("_")


def lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return None


def check(specs: tuple[TaskSpec, ...]) -> None:
    """Before any model loads: lm-eval is installed, every name is known, every file is well formed."""
    if not specs:
        return
    if lm_eval_version() is None:
        raise WorkbenchError(f"--tasks needs lm-evaluation-harness: pip install {LM_EVAL_PIN}")
    unknown = [s.name for s in specs if _lm_eval_own(s)]
    if unknown:
        known = _lm_eval_task_names()
        missing = [name for name in unknown if name not in known]
        if missing:
            close = [k for k in sorted(known) if any(m in k for m in missing)][:5]
            raise WorkbenchError(
                f"--tasks: {', '.join(missing)} is not a task lm-eval {lm_eval_version()} knows"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; offline tasks: {', '.join(OFFLINE)}; or give your own file with --tasks-file."
            )
    for spec in specs:
        if spec.path:
            file_task_config(spec)


def _lm_eval_own(spec: TaskSpec) -> bool:
    """A task lm-eval defines (by name), not an offline task of ours or a user's file."""
    return spec.path is None and spec.name not in OFFLINE


def _lm_eval_task_names() -> set[str]:
    from lm_eval.tasks import TaskManager

    return set(TaskManager().all_tasks)


def protocol(specs: tuple[TaskSpec, ...]) -> list[dict]:
    """What identifies each task's number: name, limit, few-shot count, the data's hash for
    offline and file tasks, and lm-eval's version (its tasks' versions go with it)."""
    return [
        {
            "task": s.name,
            "limit": s.limit,
            "fewshot": s.num_fewshot,
            "data_sha": _data_sha(s),
            "lm_eval": lm_eval_version(),
        }
        for s in specs
    ]


def _data_sha(spec: TaskSpec) -> str | None:
    path = Path(spec.path) if spec.path else OFFLINE[spec.name][0] if spec.name in OFFLINE else None
    if path is None:
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"{digest} v{OFFLINE_VERSION}" if spec.name in OFFLINE else digest


# ---------------------------------------------------------------------------- task configs


def _mean_of(metric: str, **options) -> list[dict]:
    """lm-eval's `metric_list` for one metric averaged over documents (its standard error in closed form)."""
    return [{"metric": metric, "aggregation": "mean", "higher_is_better": True, **options}]


def _json_task(name: str, path: Path, **config) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "metadata": {"version": float(OFFLINE_VERSION)},
        **config,
    }


def offline_task_config(name: str) -> dict:
    """wb_lastword: lm-eval's `lambada_openai` settings (log-likelihood of the last word; `acc`
    = the word is the greedy continuation) on the offline passages. Without lambada's perplexity
    metric: its standard error is bootstrapped in a process pool, which a worker cannot start.

    wb_heldout: each held-out instruction as the user's turn of the chat template (`run` asks
    lm-eval to apply it, as fine-tuning does), greedy generation to the end of the line, and
    `exact_match` of the first "About N GB" in it with the response's."""
    if name == "wb_heldout":
        return _json_task(
            name,
            OFFLINE[name][0],
            output_type="generate_until",
            doc_to_text="{{instruction}}",
            doc_to_target="{{response.split(':')[0]}}",
            generation_kwargs={"until": ["\n"], "do_sample": False, "max_gen_toks": 32},
            filter_list=[
                {
                    "name": "about",
                    "filter": [
                        {"function": "regex", "regex_pattern": r"(About [0-9.]+ [MG]B)"},
                        {"function": "take_first"},
                    ],
                }
            ],
            metric_list=_mean_of("exact_match"),
        )
    return _json_task(
        name,
        OFFLINE[name][0],
        output_type="loglikelihood",
        doc_to_text="{{context}}",
        doc_to_target="{{target}}",
        metric_list=_mean_of("acc"),
    )


def file_task_config(spec: TaskSpec) -> dict:
    """A user's task file as an lm-eval task config: an lm-eval YAML as it is, or a JSONL whose
    lines are all multiple choice ({"question", "choices", "answer": index or the choice's text},
    scored by log-likelihood, `acc`) or all open questions ({"question", "answer"}: greedy
    generation up to a new line, `exact_match` after trimming)."""
    path = Path(spec.path)
    if not path.is_file():
        raise WorkbenchError(f"--tasks-file {str(path)!r}: no such file.")
    if path.suffix in (".yaml", ".yml"):
        return _yaml_task(path, spec.name)
    if path.suffix != ".jsonl":
        raise WorkbenchError(f"--tasks-file {path.name}: give an lm-eval task .yaml or a .jsonl of questions.")
    rows = _jsonl_rows(path)
    multiple_choice = ["choices" in row for row in rows]
    if any(multiple_choice) and not all(multiple_choice):
        line = multiple_choice.index(not multiple_choice[0]) + 1
        raise WorkbenchError(f"--tasks-file {path.name} line {line}: mixes multiple-choice and open questions.")
    if multiple_choice[0]:
        return _json_task(
            spec.name,
            _normalized_choices(path, rows),
            output_type="multiple_choice",
            doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_choice="{{choices}}",
            doc_to_target="{{answer}}",
            metric_list=_mean_of("acc"),
        )
    return _json_task(
        spec.name,
        path,
        output_type="generate_until",
        doc_to_text="Question: {{question}}\nAnswer:",
        doc_to_target="{{answer}}",
        target_delimiter=" ",
        generation_kwargs={"until": ["\n"], "do_sample": False, "max_gen_toks": 64},
        metric_list=_mean_of("exact_match", ignore_case=True),
    )


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"--tasks-file {path.name} line {number}: not JSON ({exc.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "answer" not in row:
            raise WorkbenchError(f'--tasks-file {path.name} line {number}: needs "question" (text) and "answer".')
        choices = row.get("choices")
        if choices is not None:
            answer = row["answer"]
            valid = isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)
            if not valid or not (answer in choices or isinstance(answer, int) and 0 <= answer < len(choices)):
                raise WorkbenchError(
                    f'--tasks-file {path.name} line {number}: "choices" must be two or more texts and "answer" '
                    "one of them or its index."
                )
        elif not isinstance(row["answer"], str):
            raise WorkbenchError(f'--tasks-file {path.name} line {number}: "answer" must be text.')
        rows.append(row)
    if not rows:
        raise WorkbenchError(f"--tasks-file {path.name}: no questions in it.")
    return rows


def _normalized_choices(path: Path, rows: list[dict]) -> Path:
    """The rows with every answer as an index, in a file beside lm-eval's cache (the user's file is not touched)."""
    from workbench.sources.source import cache_dir

    fixed = [
        {**r, "answer": r["answer"] if isinstance(r["answer"], int) else r["choices"].index(r["answer"])} for r in rows
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fixed)
    out = cache_dir() / "tasks" / f"{path.stem}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(out, text)
    return out


def _yaml_task(path: Path, name: str) -> dict:
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise WorkbenchError(f"--tasks-file {path.name}: not valid YAML ({str(exc).splitlines()[0]}).") from None
    missing = [key for key in ("output_type", "doc_to_text") if not isinstance(config, dict) or key not in config]
    if missing:
        raise WorkbenchError(f"--tasks-file {path.name}: an lm-eval task needs {', '.join(missing)}.")
    return {**config, "task": name}


# ---------------------------------------------------------------------------- running


def run(model, tokenizer, specs: tuple[TaskSpec, ...], batch_size: int, log: Callable[[str], None]) -> TaskScores:
    """Every task of `specs` on `model` (a transformers model, any method), one lm-eval call each."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not hasattr(model, "config") or not hasattr(model, "device"):
        raise WorkbenchError("tasks: this runtime is not a transformers model; measure tasks with runtime=torch.")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # lm-eval's own task index (its thousands of YAML files: 16 s on 2 cores) only for its own tasks
    manager, scores = TaskManager(include_defaults=any(map(_lm_eval_own, specs))), {}
    for spec in specs:
        log(f"[tasks] {spec.name}" + (f" (at most {spec.limit} documents)" if spec.limit else "") + "...")
        if spec.path:
            task = file_task_config(spec)
        elif spec.name in OFFLINE:
            task = offline_task_config(spec.name)
        else:
            task = spec.name
        try:
            with _bootstrap_without_a_pool():
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[task],
                    num_fewshot=spec.num_fewshot,
                    limit=spec.limit,
                    task_manager=manager,
                    log_samples=True,  # each document's score, for paired comparisons of two rows
                    apply_chat_template=spec.name == "wb_heldout" and bool(getattr(tokenizer, "chat_template", None)),
                    verbosity="ERROR",
                    random_seed=0,
                    numpy_random_seed=0,
                    torch_random_seed=0,
                    fewshot_random_seed=0,
                )
        except (ConnectionError, OSError) as exc:
            raise WorkbenchError(
                f"tasks: {spec.name}'s dataset cannot be reached from here ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}); offline tasks: {', '.join(OFFLINE)}, or --tasks-file."
            ) from None
        scores[spec.name] = main_metric(out, spec)
        shown = scores[spec.name]
        error = f" ± {shown['stderr']:.4f}" if shown["stderr"] is not None else " (no standard error)"
        log(f"[tasks] {spec.name}: {shown['metric']} {shown['value']:.4f}{error} (n={shown['n']})")
    return TaskScores(scores)


def _bootstrap_without_a_pool():
    """In a worker (a daemonic process, which may not start children) lm-eval bootstraps the
    standard errors of metrics like perplexity in this process instead of a process pool
    (its `DISABLE_MULTIPROC`); set only for the call, and only there."""
    if multiprocessing.current_process().daemon:
        return patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"})
    return nullcontext()
