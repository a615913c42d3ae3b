"""Generate the small fine-tuning set in workbench/datasets/finetune/ (stdlib only, deterministic).

It ships inside the package (package data), so an installed wheel has it too.

Every example asks how much memory the weights of a model take at a given bit width and
answers in one fixed format that shows the arithmetic:

    About 3.5 GB: 7 billion weights x 4 bits / 8 = 3.5 GB.

Sizes are weights only (parameters x bits / 8 bytes; no quantization scales, activations
or KV cache) in decimal units: 1 GB = 1e9 bytes, 1 MB = 1e6 bytes. Results under 1 GB are
given in MB. The number after "About" is the exact result rounded half up to one decimal.

Whole (parameter count, bit width) facts are held out: held-out prompts use the same
question templates and answer format as training, but their facts never appear in training.

    python data/make_finetune_set.py            # rewrites workbench/datasets/finetune/ byte-for-byte
"""

from __future__ import annotations

import json
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

SEED = 0
OUT_DIR = Path(__file__).resolve().parents[1] / "workbench" / "datasets" / "finetune"

# Parameter counts as written in questions: (short form, number, unit word).
PARAMS = [
    ("125M", "125", "million"),
    ("135M", "135", "million"),
    ("350M", "350", "million"),
    ("0.5B", "0.5", "billion"),
    ("1.1B", "1.1", "billion"),
    ("1.5B", "1.5", "billion"),
    ("3B", "3", "billion"),
    ("7B", "7", "billion"),
    ("8B", "8", "billion"),
    ("13B", "13", "billion"),
    ("34B", "34", "billion"),
    ("70B", "70", "billion"),
]
UNIT_WORDS = {"million": Decimal(10) ** 6, "billion": Decimal(10) ** 9}

# Bit widths and the names a question may use for them.
BIT_NAMES = {32: ["fp32"], 16: ["fp16", "bf16"], 8: ["int8"], 4: ["4-bit"], 3: ["3-bit"], 2: ["2-bit"]}
BITS = list(BIT_NAMES)

# {short}: "7B"; {long}: "7 billion"; {name}: "fp16", "int8", "4-bit"; {bits}: 4.
TEMPLATES = [
    "How much memory do the weights of a {short}-parameter model take in {name}?",
    "What is the weight memory of a {short} model stored in {name}?",
    "How big are the weights of a model with {long} parameters at {bits} bits per weight?",
    "I store a {short} model in {name}. How much memory do its weights use?",
    "Estimate the weight size of a {short} model at {name} precision.",
    "{short} parameters in {name}: how much memory for the weights?",
    "How much RAM do I need just for the weights of a model with {long} parameters in {name}?",
    "What size are the weights of a {short} LLM with {bits}-bit weights?",
]

TEMPLATES_PER_FACT = 5
HELDOUT_FACTS = 8
PROMPTS = 5


def _num(value: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 3.5, 67.5, 2.625, 140."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def answer(number: str, unit_word: str, bits: int) -> str:
    """The one answer format: 'About X GB: N billion weights x B bits / 8 = Y GB.'"""
    nbytes = Decimal(number) * UNIT_WORDS[unit_word] * bits / 8
    unit, scale = ("GB", Decimal(10) ** 9) if nbytes >= Decimal(10) ** 9 else ("MB", Decimal(10) ** 6)
    exact = nbytes / scale
    about = exact.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"About {_num(about)} {unit}: {number} {unit_word} weights x {bits} bits / 8 = {_num(exact)} {unit}."


def question(rng: random.Random, template: str, param: tuple[str, str, str], bits: int) -> str:
    short, number, unit_word = param
    return template.format(short=short, long=f"{number} {unit_word}", name=rng.choice(BIT_NAMES[bits]), bits=bits)


def build(rng: random.Random) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, heldout, prompts): lists of {"instruction", "response"}."""
    # Held-out facts: distinct parameter counts, every bit width at least once.
    held_params = rng.sample(PARAMS, HELDOUT_FACTS)
    held_bits = BITS + rng.sample(BITS, HELDOUT_FACTS - len(BITS))
    rng.shuffle(held_bits)
    held = list(zip(held_params, held_bits))
    held_set = set(held)

    def examples(facts):
        rows = []
        for param, bits in facts:
            for template in rng.sample(TEMPLATES, TEMPLATES_PER_FACT):
                rows.append(
                    {"instruction": question(rng, template, param, bits), "response": answer(param[1], param[2], bits)}
                )
        return rows

    train = examples([(p, b) for p in PARAMS for b in BITS if (p, b) not in held_set])
    heldout = examples(held)
    rng.shuffle(train)
    # Before/after prompts: the first example of each of the first PROMPTS held-out facts.
    prompts = [heldout[i * TEMPLATES_PER_FACT] for i in range(PROMPTS)]
    rng.shuffle(heldout)
    return train, heldout, prompts


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))


def main(out_dir: Path = OUT_DIR) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout, prompts = build(random.Random(SEED))
    _write(out_dir / "train.jsonl", "".join(json.dumps(row) + "\n" for row in train))
    _write(out_dir / "heldout.jsonl", "".join(json.dumps(row) + "\n" for row in heldout))
    _write(out_dir / "prompts.json", json.dumps(prompts, indent=2) + "\n")
    print(f"wrote {len(train)} train, {len(heldout)} held-out, {len(prompts)} prompts to {out_dir}")


if __name__ == "__main__":
    main()
