"""The generated fine-tuning set in workbench/datasets/finetune/ (package data): reproducible, held out by fact, arithmetically right."""

from __future__ import annotations

import importlib.util
import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
FINETUNE = Path(__file__).resolve().parents[1] / "workbench" / "datasets" / "finetune"
FILES = ("train.jsonl", "heldout.jsonl", "prompts.json")

PARAMS_RE = re.compile(r"\b(\d+(?:\.\d+)?)(?:([MB])\b| (million|billion)\b)")
BITS_RE = re.compile(r"\b(fp32|fp16|bf16|int8)\b|\b(\d+)-bit\b|\b(\d+) bits per weight\b")
NAMED_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}
ANSWER_RE = re.compile(
    r"About (\d+(?:\.\d)?) (GB|MB): (\d+(?:\.\d+)?) (million|billion) weights x (\d+) bits / 8 = (\d+(?:\.\d+)?) (GB|MB)\."
)
SCALE = {"M": Decimal(10) ** 6, "million": Decimal(10) ** 6, "B": Decimal(10) ** 9, "billion": Decimal(10) ** 9}
UNIT = {"MB": Decimal(10) ** 6, "GB": Decimal(10) ** 9}


def _script():
    spec = importlib.util.spec_from_file_location("make_finetune_set", DATA / "make_finetune_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (FINETUNE / name).read_text(encoding="utf-8").splitlines()]


def _fact(instruction: str) -> tuple[Decimal, int]:
    """(parameter count, bits) parsed back from a question."""
    params = PARAMS_RE.findall(instruction)
    bits = BITS_RE.findall(instruction)
    assert len(params) == 1 and len(bits) == 1, instruction
    number, short_unit, long_unit = params[0]
    name, dash_bits, per_weight_bits = bits[0]
    n_bits = NAMED_BITS[name] if name else int(dash_bits or per_weight_bits)
    return Decimal(number) * SCALE[short_unit or long_unit], n_bits


@pytest.fixture(scope="module")
def train():
    return _jsonl("train.jsonl")


@pytest.fixture(scope="module")
def heldout():
    return _jsonl("heldout.jsonl")


@pytest.fixture(scope="module")
def prompts():
    return json.loads((FINETUNE / "prompts.json").read_text(encoding="utf-8"))


def test_script_reproduces_committed_files_byte_for_byte(tmp_path):
    script = _script()
    first, second = tmp_path / "a", tmp_path / "b"
    script.main(first)
    script.main(second)
    for name in FILES:
        committed = (FINETUNE / name).read_bytes()
        assert (first / name).read_bytes() == committed, name
        assert (second / name).read_bytes() == committed, name
    assert sorted(p.name for p in first.iterdir()) == sorted(FILES)


def test_rows_have_only_instruction_and_response(train, heldout, prompts):
    for row in train + heldout + prompts:
        assert list(row) == ["instruction", "response"]
        assert row["instruction"].strip() and row["response"].startswith("About ")


def test_train_and_heldout_share_no_instruction_and_no_fact(train, heldout):
    train_instructions = [row["instruction"] for row in train]
    heldout_instructions = [row["instruction"] for row in heldout]
    assert len(set(train_instructions)) == len(train_instructions)
    assert len(set(heldout_instructions)) == len(heldout_instructions)
    assert not set(train_instructions) & set(heldout_instructions)
    train_facts = {_fact(i) for i in train_instructions}
    heldout_facts = {_fact(i) for i in heldout_instructions}
    assert not train_facts & heldout_facts
    # Held-out facts are unseen combinations of parameter counts and bit widths seen in training.
    for params, bits in heldout_facts:
        assert any(p == params for p, _ in train_facts) and any(b == bits for _, b in train_facts)


@pytest.mark.parametrize("name", ["train.jsonl", "heldout.jsonl", "prompts.json"])
def test_every_answer_is_arithmetically_right(name):
    rows = json.loads((FINETUNE / name).read_text()) if name.endswith(".json") else _jsonl(name)
    for row in rows:
        params, bits = _fact(row["instruction"])
        match = ANSWER_RE.fullmatch(row["response"])
        assert match, row["response"]
        about, about_unit, number, unit_word, shown_bits, exact, exact_unit = match.groups()
        # The arithmetic restates the question's fact ...
        assert Decimal(number) * SCALE[unit_word] == params, row
        assert int(shown_bits) == bits, row
        # ... and its result is right, in decimal units, MB below 1 GB.
        nbytes = params * bits / 8
        assert about_unit == exact_unit == ("GB" if nbytes >= UNIT["GB"] else "MB"), row
        assert Decimal(exact) * UNIT[exact_unit] == nbytes, row
        assert Decimal(about) == (nbytes / UNIT[about_unit]).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP), row


def test_sizes_are_as_documented(train, heldout, prompts):
    assert len(train) == 320 and len(heldout) == 40 and len(prompts) == 5
    train_facts = [_fact(row["instruction"]) for row in train]
    heldout_facts = [_fact(row["instruction"]) for row in heldout]
    assert len(set(train_facts)) == 64 and len(set(heldout_facts)) == 8
    assert all(train_facts.count(f) == 5 for f in set(train_facts))
    assert all(heldout_facts.count(f) == 5 for f in set(heldout_facts))
    # 12 parameter counts x 6 bit widths, all covered; held-out facts: distinct sizes, every bit width.
    assert len(set(train_facts) | set(heldout_facts)) == 72
    assert len({p for p, _ in heldout_facts}) == 8
    assert {b for _, b in heldout_facts} == {32, 16, 8, 4, 3, 2}
    # Prompts are held-out examples of 5 different facts.
    assert all(p in heldout for p in prompts)
    assert len({_fact(p["instruction"]) for p in prompts}) == 5
    assert len(_script().TEMPLATES) >= 5
    assert sum((FINETUNE / name).stat().st_size for name in FILES) < 200_000


def test_the_package_finds_the_set_it_ships():
    from workbench.sources import data

    assert data.data_folder().resolve() == FINETUNE.resolve()  # via importlib.resources, as in an installed wheel
