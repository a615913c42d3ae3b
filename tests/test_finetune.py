"""QLoRA fine-tuning: config checks, data, and mechanics on the tiny model (seconds).

What training does to the real model (QLoRA vs plain LoRA, reload, merge) is tested in
test_qlora_cpu.py, where those runs are shared.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from workbench import finetune as ft
from workbench.core.errors import WorkbenchError
from workbench.metrics import tasks
from workbench.run import results
from workbench.run.session import Session
from workbench.sources import data, models


def _small_data(folder: Path, rows: int) -> str:
    """One .jsonl file of the first bundled training rows: its last 10% is held out and prompted (test speed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "small.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ft.load_rows(None)[0][:rows]), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(bundled_source):
    return models.load_tokenizer(bundled_source)


@pytest.fixture(scope="module")
def tiny_source(tiny_folder):
    return models.resolve(str(tiny_folder))


# ---------------------------------------------------------------------------- config and data


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"r": 0}, "r"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": 2e4}, "learning_rate"),
        ({"max_steps": 1.5}, "max_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"max_seq_len": 4}, "max_seq_len"),
        ({"target_modules": []}, "target_modules"),
        ({"prompt_template": "Q: {response} A: {instruction}"}, "prompt_template"),
        ({"data_path": "/no/such/file.jsonl"}, "data_path"),
        ({"base": "no-such-method"}, "unknown method"),
        ({"base": "bnb-nf4:group_size=64"}, "unknown parameter"),
        ({"base": "torchao-int4"}, "cannot train"),
    ],
)
def test_bad_config_values_are_refused_with_the_field_named(changes, field):
    with pytest.raises(WorkbenchError, match=field):
        ft.FinetuneConfig(**changes)


def test_config_defaults_and_round_trip():
    config = ft.FinetuneConfig(target_modules=["q_proj", "v_proj"])
    assert config.target_modules == ("q_proj", "v_proj")
    assert (config.base, config.r, config.alpha, config.max_steps) == ("bnb-nf4", 8, 16, 30)
    assert ft.FinetuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_untrainable_base_is_refused_before_loading(bundled_source):
    with pytest.raises(WorkbenchError, match="torchao-int4: PEFT cannot train"):
        ft.prepare_base(bundled_source, "torchao-int4", "cpu")


def test_bundled_set_loads_and_a_missing_folder_says_what_to_do(monkeypatch, tmp_path):
    train, heldout, prompts = ft.load_rows(None)
    assert (len(train), len(heldout), len(prompts)) == (320, 40, 5)
    monkeypatch.setattr(data, "FINETUNE_DIR", tmp_path / "gone")
    with pytest.raises(WorkbenchError, match="data_path=.*make_finetune_set"):
        ft.load_rows(None)


def test_user_jsonl_and_csv_are_read_and_split(tmp_path):
    rows = [{"instruction": f"q{i}, with a comma", "response": f"a{i}"} for i in range(20)]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text(
        "instruction,response\n" + "".join(f'"{r["instruction"]}",{r["response"]}\n' for r in rows), encoding="utf-8"
    )
    for path in (jsonl, csv_file):
        train, heldout, prompts = ft.load_rows(str(path))
        assert train == rows[:18] and heldout == rows[18:] and prompts == rows[18:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": "y"}), encoding="utf-8")
    with pytest.raises(WorkbenchError, match="row 1: needs non-empty 'instruction'"):
        ft.load_rows(str(bad))


def test_only_response_tokens_are_scored(tokenizer):
    row = {
        "instruction": "How big is a 7B model in 4-bit?",
        "response": "About 3.5 GB: 7 billion weights x 4 bits / 8 = 3.5 GB.",
    }
    for template, prompt_start, answer_end in (
        (None, "<|im_start|>system", "<|im_end|>\n"),
        (ft.PLAIN_TEMPLATE, "### Instruction:", tokenizer.eos_token),
    ):
        [example] = ft.encode(tokenizer, template, [row], 128)
        scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        unscored = [t for t, label in zip(example["input_ids"], example["labels"]) if label == -100]
        assert tokenizer.decode(scored) == row["response"] + answer_end
        assert tokenizer.decode(unscored).startswith(prompt_start) and row["instruction"] in tokenizer.decode(unscored)
        assert example["labels"][: len(unscored)] == [-100] * len(unscored)
    with pytest.raises(WorkbenchError, match="Raise max_seq_len"):
        ft.encode(tokenizer, None, [row], 16)


# ---------------------------------------------------------------------------- mechanics (tiny model)


def test_training_changes_only_the_adapter_and_stop_ends_it(tiny_source, tokenizer):
    config = ft.FinetuneConfig(max_steps=8, learning_rate=1e-3, max_seq_len=96)
    model = ft.attach_lora(ft.prepare_base(tiny_source, config.base, "cpu"), config)
    assert ft.block_linear_names(model) == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    seen = []
    losses, stopped = ft.train(
        model,
        tokenizer,
        ft.encode(tokenizer, None, ft.load_rows(None)[0][:32], 96),
        config,
        "cpu",
        on_loss=lambda step, loss: seen.append((step, loss)),
        should_stop=lambda: len(seen) >= 2,
    )
    assert stopped and losses == seen and [step for step, _ in losses] == [1, 2, 3]  # Stop is read after each step
    after = model.state_dict()
    base = [name for name in before if "lora_" not in name]
    lora_b = [name for name in before if "lora_B" in name]
    assert base and lora_b
    assert all(after[name].dtype == before[name].dtype and after[name].equal(before[name]) for name in base)
    assert all(not after[name].equal(before[name]) for name in lora_b)  # B starts at zero; training moved it
    trainable, total = ft.parameter_counts(model)
    assert 0 < trainable < total / 10


def test_merge_refusals_are_checked_before_any_loading(tmp_path, tiny_source):
    reasons = {
        "gptq": "PEFT cannot merge a LoRA adapter into packed int weights",
        "awq": "into packed int weights",
        "quanto-int8": "silently drops the adapter",
    }
    for choice, reason in reasons.items():
        folder = tmp_path / choice
        folder.mkdir()
        (folder / ft.CONFIG_FILE).write_text(json.dumps({"base": choice}), encoding="utf-8")
        with pytest.raises(WorkbenchError, match=f"cannot merge an adapter trained on {choice}: .*{reason}"):
            ft.merge_to_dequantized(tiny_source, folder)
    assert ft.merge_refusal("bnb-nf4") is None and ft.merge_refusal("fp32") is None


def test_tiny_pipeline_reloads_merges_and_deploys(tmp_path, tiny_source, tiny_session, monkeypatch):
    monkeypatch.chdir(tmp_path)  # gptqmodel writes a logs/ folder into the working directory
    config = ft.FinetuneConfig(
        max_steps=2,
        max_seq_len=96,
        max_new_tokens=4,
        output_dir=str(tmp_path / "run"),
        data_path=_small_data(tmp_path / "data", rows=40),
    )
    run = ft.finetune(tiny_source, config, log=lambda _: None)
    report = run.report
    assert [step for step, _ in report.losses] == [1, 2] and report.steps == 2 and not report.stopped_early
    assert len(report.generations_before) == len(report.generations_after) == len(report.prompts) == 4
    assert math.isclose(report.heldout_ppl_after, math.exp(report.heldout_loss_after))
    assert Path(report.adapter_dir, "adapter_model.safetensors").is_file()
    _, loss = ft.reload_adapter(
        tiny_source, report.adapter_dir, expected_loss=report.heldout_loss_after, log=lambda _: None
    )
    assert loss == pytest.approx(report.heldout_loss_after, rel=ft.RELOAD_RTOL)
    merge = ft.merge_to_dequantized(tiny_source, report.adapter_dir, trained=run.model, log=lambda _: None)
    assert merge.merged_loss == pytest.approx(merge.unmerged_loss, rel=ft.MERGE_RTOL)
    assert json.loads(Path(merge.merged_dir, "config.json").read_text())["dtype"] == "float16"
    record = json.loads(Path(merge.merged_dir, ft.MERGED_FROM_FILE).read_text())
    # The base model is recorded (a .gguf base is the template of the merged folder's GGUF; this one has none).
    assert record["model"] == {"label": tiny_source.label, "location": tiny_source.location, "gguf": ""}
    with_task = Session.from_source(
        tiny_session.source, "cpu", replace(tiny_session.eval, tasks=tasks.parse("wb_heldout:limit=3"))
    )
    rows = ft.deploy_compare(with_task, merge.merged_dir, methods=("rtn",), log=lambda _: None)
    # the base's comparison measures its full-precision reference first unless its distributions are recorded (KL)
    rows = rows[1:] if rows[0].label == "fp32" else rows
    assert [r.label for r in rows] == ["bnb-nf4", "bnb-nf4+lora", "merged fp32", "merged rtn"]
    assert all(r.error is None and r.ppl and math.isfinite(r.ppl) for r in rows), [r.error for r in rows]
    assert len({r.protocol["n_tokens"] for r in rows}) == 1 and rows[-1].kl_mean > 0 and rows[2].kl_mean == 0
    # the held-out questions as a task on every row: base, trained, merged and re-quantized
    assert all(r.tasks["wb_heldout"]["n"] == 3 for r in rows), [r.tasks for r in rows]
    table = results.format_table(rows)
    assert "bnb-nf4+lora" in table and "merged rtn" in table and "wb_heldout" in table
