"""Task accuracy through lm-evaluation-harness (`workbench.metrics.tasks`): task lists and files
checked before any model loads, the user's own questions on a tiny model, lm-eval's own number
equal to the row's on the real model, and the offline last-word task showing quantization."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.core.config import EvalConfig, ModelSpec, TaskSpec
from workbench.core.errors import WorkbenchError
from workbench.metrics import task_scores, tasks
from workbench.run import executors, results, runner
from workbench.run.compare import compare

QUESTIONS = Path(__file__).resolve().parents[1] / "data" / "example_questions.jsonl"


def quiet(message):
    pass


def test_a_task_list_is_parsed_with_its_settings():
    specs = tasks.parse("wb_lastword:limit=20, arc_easy:fewshot=5:limit=100", [str(QUESTIONS)])
    assert specs == (
        TaskSpec("wb_lastword", 20, None),
        TaskSpec("arc_easy", 100, 5),
        TaskSpec("file_example_questions", path=str(QUESTIONS)),
    )
    assert tasks.parse(None) == ()


@pytest.mark.parametrize(
    "text, message",
    [
        ("wb_lastword:limit=0", "limit at least 1"),
        ("wb_lastword:limit=ten", "not a setting"),
        ("wb_lastword:shots=5", "not a setting"),
        ("wb_lastword,wb_lastword:limit=5", "wb_lastword named twice"),
    ],
)
def test_a_bad_task_list_is_refused(text, message):
    with pytest.raises(WorkbenchError, match=message):
        tasks.parse(text)


def write(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


MC = {"question": "2 + 2?", "choices": ["3", "4"], "answer": "4"}
BAD_FILES = {
    "not json": (["{oops"], "line 1: not JSON"),
    "no answer": ([{"question": "q"}], 'line 1: needs "question"'),
    "answer not a choice": ([{**MC, "answer": "5"}], 'line 1: "choices" must be two or more'),
    "index out of range": ([{**MC, "answer": 2}], 'line 1: "choices" must be two or more'),
    "mixed": ([MC, {"question": "q", "answer": "a"}], "line 2: mixes multiple-choice and open questions"),
    "empty": ([""], "no questions in it"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_malformed_questions_file_is_refused_with_its_line(tmp_path, case):
    lines, message = BAD_FILES[case]
    path = write(tmp_path / "mine.jsonl", lines)
    with pytest.raises(WorkbenchError, match=message):
        tasks.check(tasks.parse(None, [str(path)]))


def test_a_yaml_task_needs_what_lm_eval_needs(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("task: mine\ndataset_path: json\n")
    with pytest.raises(WorkbenchError, match="needs output_type, doc_to_text"):
        tasks.check(tasks.parse(None, [str(path)]))


def test_answers_given_as_text_become_indices_and_the_users_file_is_untouched():
    before = QUESTIONS.read_bytes()
    config = tasks.file_task_config(tasks.parse(None, [str(QUESTIONS)])[0])
    rows = [json.loads(line) for line in Path(config["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert config["output_type"] == "multiple_choice" and len(rows) == 20
    assert all(
        row["choices"][row["answer"]] == json.loads(line)["answer"]
        for row, line in zip(rows, before.decode().splitlines())
    )
    assert QUESTIONS.read_bytes() == before


def test_the_held_out_task_scores_the_first_about_n_gb_of_an_answer():
    """wb_heldout's target and filter, through lm-eval's own task object: a fine-tuned answer
    scores 1 only when its "About N GB" is the response's."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.filters.extraction import RegexFilter

    task = ConfigurableTask(config=tasks.offline_task_config("wb_heldout"))
    docs = list(task.test_docs())
    assert len(docs) == 40 and task.doc_to_target(docs[0]) == "About 500 MB"
    (regex, _take_first), *_ = (stage.filters for stage in task._filters)
    pattern = regex.keywords["regex_pattern"]
    answers = ["About 500 MB: 125 million weights x 32 bits / 8 = 500 MB.", "Roughly half a gigabyte."]
    extracted = list(RegexFilter(regex_pattern=pattern).apply([answers], docs[:1]))[0]
    assert [task.process_results(docs[0], [e])["exact_match"] for e in extracted] == [1.0, 0.0]
    assert task.process_results(docs[0], ["About 50 MB"])["exact_match"] == 0.0


def test_an_unknown_task_is_one_error_line_before_any_model_loads(capsys, tmp_path):
    start = time.monotonic()
    code = main(
        ["compare", "--model", "bundled", "--methods", "fp32", "--tasks", "lambada_opnai", "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: --tasks: lambada_opnai is not a task lm-eval")
    assert "wb_lastword" in err[-1] and "--tasks-file" in err[-1]
    assert not any("quantizing" in line for line in err) and not list(tmp_path.iterdir())
    assert time.monotonic() - start < 300  # an index of lm-eval's tasks, no model


def test_rows_without_tasks_keep_their_identity_and_tasks_change_it():
    row = results.Result("m", "fp32", "float", 32, {}, "cpu", protocol={"text": "t", "max_length": 512})
    with_tasks = results.Result(
        "m", "fp32", "float", 32, {}, "cpu", protocol={"text": "t", "max_length": 512, "tasks": [{"task": "x"}]}
    )
    assert row.identity()["protocol"]["tasks"] is None  # what a record written before tasks reads as
    assert row.key() != with_tasks.key()


def test_a_paired_difference_counts_only_the_documents_where_two_rows_disagree():
    same = [1.0] * 90 + [0.0] * 10
    a = {"per_document": same}
    b = {"per_document": same[:85] + [0.0] * 5 + same[90:]}  # b misses 5 that a gets right
    difference, stderr = task_scores.paired_difference(a, b)
    assert difference == pytest.approx(0.05)
    assert stderr == pytest.approx((sum((x - 0.05) ** 2 for x in [1.0] * 5 + [0.0] * 95) / 99 / 100) ** 0.5)
    unpaired = (0.9 * 0.1 / 99 + 0.85 * 0.15 / 99) ** 0.5
    assert stderr < unpaired / 2  # pairing removes the documents both get right or both miss
    assert task_scores.paired_difference(a, a) == (0.0, 0.0)
    with pytest.raises(WorkbenchError, match="same documents"):
        task_scores.paired_difference(a, {"per_document": same[:50]})


# ---------------------------------------------------------------------------- on models


@pytest.mark.model
def test_your_own_questions_give_accuracy_with_its_standard_error_per_method(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny_folder), "--methods", "fp32,rtn:bits=4", "--max-tokens", "128", "--decode-tokens", "0"]
    assert main(["compare", *args, "--tasks-file", str(QUESTIONS), "--in-process", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    for row in rows:
        score = row["tasks"]["file_example_questions"]
        assert score["metric"] == "acc" and score["n"] == 20 and 0 <= score["value"] <= 1
        assert score["stderr"] == pytest.approx((score["value"] * (1 - score["value"]) / 19) ** 0.5)
        assert set(score["per_document"]) <= {0.0, 1.0} and len(score["per_document"]) == 20
        assert sum(score["per_document"]) / 20 == pytest.approx(score["value"])
        assert row["protocol"]["tasks"][0]["data_sha"]  # the file's content is part of the identity
    assert "file_example_questions acc %" in capsys.readouterr().out


PERPLEXITY_TASK = """task: mine
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


@pytest.mark.model
def test_a_bootstrapped_standard_error_is_computed_inside_a_worker(tiny_folder, tmp_path):
    """lm-eval bootstraps perplexity's standard error in a process pool, which a worker (a daemonic
    process) cannot start: there it is computed in the worker itself."""
    passages = tasks.OFFLINE["wb_lastword"][0].read_text().splitlines()[:30]
    (tmp_path / "passages.jsonl").write_text("\n".join(passages) + "\n")
    task = tmp_path / "mine.yaml"
    task.write_text(PERPLEXITY_TASK.format(data=tmp_path / "passages.jsonl"))
    args = ["--model", str(tiny_folder), "--methods", "fp32", "--max-tokens", "128", "--decode-tokens", "0"]
    assert main(["compare", *args, "--tasks-file", f"{task}", "--out", str(tmp_path / "out")]) == 0
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert row["error"] is None
    score = row["tasks"]["file_mine"]
    assert score["metric"] == "perplexity" and score["n"] == 30 and score["stderr"] > 0
    assert score["per_document"] is None  # a corpus metric has no per-document score


@pytest.mark.model
def test_lm_eval_run_directly_gives_the_rows_number(bundled_source):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from workbench.sources import models

    spec = TaskSpec("wb_lastword", limit=40)
    session = runner.Session.open(
        ModelSpec("bundled", device="cpu"), EvalConfig(max_tokens=128, decode_tokens=0, tasks=(spec,)), quiet
    )
    (row,) = compare(session, ["fp32"], log=quiet, executor=executors.InProcess())
    lm = HFLM(
        pretrained=models.load_model(bundled_source, "cpu"),
        tokenizer=models.load_tokenizer(bundled_source),
        batch_size=4,
    )
    direct = lm_eval.simple_evaluate(
        model=lm, tasks=[tasks.offline_task_config("wb_lastword")], limit=40, verbosity="ERROR", log_samples=True
    )
    values = direct["results"]["wb_lastword"]
    assert row.tasks["wb_lastword"]["value"] == values["acc,none"]
    assert row.tasks["wb_lastword"]["stderr"] == values["acc_stderr,none"]
    assert row.tasks["wb_lastword"]["n"] == 40
    direct_documents = sorted(direct["samples"]["wb_lastword"], key=lambda s: s["doc_id"])
    assert row.tasks["wb_lastword"]["per_document"] == [float(s["acc"]) for s in direct_documents]


@pytest.mark.model
def test_2_bit_rounding_collapses_the_last_word_task_and_fp32_beats_chance_on_questions():
    """The first 100 passages: fp32 finds about half the last words, 2-bit round-to-nearest almost
    none, many standard errors apart. The full order (fp32, bnb-int8, bnb-nf4, 2-bit on all 500
    passages, minutes) is bench/task_accuracy.py's: fp32 56.8%, int8 57.0%, nf4 53.8%, 2-bit 0.2%.
    The same rows answer the 20 example questions (four choices each): fp32 above chance (60% measured)."""
    questions = tasks.parse(None, [str(QUESTIONS)])
    session = runner.Session.open(
        ModelSpec("bundled", device="cpu"),
        EvalConfig(max_tokens=128, decode_tokens=0, tasks=(TaskSpec("wb_lastword", limit=100), *questions)),
        quiet,
    )
    rows = compare(session, ["fp32", "rtn:bits=2"], log=quiet, executor=executors.InProcess())
    fp32, two_bit = (row.tasks["wb_lastword"] for row in rows)
    assert fp32["n"] == two_bit["n"] == 100
    assert fp32["value"] > 0.3 and two_bit["value"] < 0.05
    assert fp32["value"] - two_bit["value"] > 6 * (fp32["stderr"] ** 2 + two_bit["stderr"] ** 2) ** 0.5
    answered = rows[0].tasks["file_example_questions"]
    assert answered["n"] == 20 and answered["value"] - 0.25 > 2 * answered["stderr"]
