"""Generate the offline last-word task in workbench/datasets/tasks/lastword.jsonl (stdlib only,
deterministic for one CPython version).

LAMBADA's protocol (Paperno et al., 2016) on text that ships with every CPython and that the
workbench never measures perplexity or calibrates on: the docstrings of the standard library's
own modules, classes and functions, read from the source files with `ast` (nothing is imported).
A passage is the start of one docstring paragraph, 20 to 150 words up to the end of one of its
sentences (the last such end that qualifies); the task is to predict its last word from
everything before it. As in LAMBADA, the passages kept are those whose last word needs the
passage: a word of four letters or more that already appeared earlier in the passage (LAMBADA's
targets are in their context about 80% of the time), so a model that reads its context well
can find it, and a damaged one loses it.

Each line is {"context": ..., "target": ..., "source": "module.py"}; the target starts with a
space (the word as the next token sees it), the context ends right before it.

    python data/make_lastword_task.py     # rewrites workbench/datasets/tasks/lastword.jsonl
"""

from __future__ import annotations

import ast
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

SEED = 0
PASSAGES = 500
OUT = Path(__file__).resolve().parents[1] / "workbench" / "datasets" / "tasks" / "lastword.jsonl"
SKIPPED_FOLDERS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "pydoc_data", "ensurepip"}
"""Tests (code-like text), IDLE, and pydoc_data: its topics are the perplexity and calibration text."""
MIN_WORDS, MAX_WORDS, MIN_TARGET_LETTERS = 20, 150, 4


def docstrings(root: Path):
    """(file, docstring) of every module, class and function under `root`, files in sorted order."""
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_FOLDERS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text:
                    yield path.relative_to(root).as_posix(), text


def prose(paragraph: str) -> str | None:
    """One paragraph as a line of prose, or None when it looks like code, a table or a list."""
    lines = paragraph.strip().splitlines()
    if any(line.startswith((" ", "\t", ">>>", "-", "*", "|", "=", ":")) for line in lines):
        return None
    text = " ".join(line.strip() for line in lines)
    if re.search(r"[{}<>\[\]\\`@#$%^~]|\.\.\.|::|\w\.\w", text):  # code, markup, dotted names
        return None
    return text


def passage(text: str) -> dict | None:
    """The paragraph up to the last sentence end whose last word qualifies, or None."""
    for end in reversed([m.end() for m in re.finditer(r"[A-Za-z]\.(?=\s|$)", text)]):
        item = _ending_at(text[:end])
        if item:
            return item
    return None


def _ending_at(text: str) -> dict | None:
    match = re.fullmatch(r"(.*\S)\s+([A-Za-z]+)\.", text)
    if not match:
        return None
    context, word = match.groups()
    words = context.split()
    if not (MIN_WORDS <= len(words) + 1 <= MAX_WORDS) or len(word) < MIN_TARGET_LETTERS:
        return None
    if word.lower() not in {w.strip(".,;:!?()\"'").lower() for w in words}:
        return None
    return {"context": context, "target": " " + word}


def main() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, candidates = set(), []
    for name, text in docstrings(root):
        for paragraph in re.split(r"\n\s*\n", text):
            line = prose(paragraph)
            item = passage(line) if line else None
            if item and item["context"] not in seen:
                seen.add(item["context"])
                candidates.append({**item, "source": name})
    chosen = random.Random(SEED).sample(candidates, min(PASSAGES, len(candidates)))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8", newline="\n") as out:
        for item in chosen:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"{len(chosen)} of {len(candidates)} passages from the docstrings of CPython {version}'s library -> {OUT}")


if __name__ == "__main__":
    main()
