"""The only module that reads text: evaluation text, calibration blocks, fine-tuning sets.

Offline, evaluation and calibration use real English prose that every CPython ships:
the standard library's `pydoc_data.topics` (79 help topics, ~465k characters). The
evaluation text is taken from the first half and calibration from the second half, so
the two never overlap. Any other UTF-8 text file can be given as the evaluation text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from workbench.core.errors import WorkbenchError

BUILTIN_NAME = "pydoc-topics"
MIN_EVAL_TOKENS = 32
LONG_EVAL_TOKENS = 1_000_000
"""More evaluation tokens than this are refused unless asked for (hours per method); wikitext-2's
test split, the GPTQ papers' protocol, is about 300k."""
TOKENIZE_BYTES_PER_TOKEN = 650
"""Peak memory of tokenizing, per token: a fast tokenizer keeps ids, offsets and token strings
for every token of the text at once (a fast BPE tokenizer's peak on a long text, rounded up)."""
DEFAULT_EVAL_TOKENS = 4096


@dataclass(frozen=True)
class Text:
    name: str
    """How the text is labelled in every result."""
    text: str
    """The text, or only as much of its beginning as the protocol can use (see `read_text_file`)."""
    sha: str = ""
    """sha256 of the whole text (its first 16 hex digits): part of a result's identity."""
    total_chars: int = 0
    """Characters in the whole text, of which `text` holds the first."""

    def __post_init__(self):
        if not self.sha:
            object.__setattr__(self, "sha", hashlib.sha256(self.text.encode()).hexdigest()[:16])
        if not self.total_chars:
            object.__setattr__(self, "total_chars", len(self.text))

    @property
    def whole(self) -> bool:
        return len(self.text) == self.total_chars


def builtin_corpus() -> str:
    """All pydoc topics, in a fixed (sorted) order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def builtin_eval_text() -> Text:
    corpus = builtin_corpus()
    return Text(f"{BUILTIN_NAME} (first half)", corpus[: len(corpus) // 2])


def builtin_calibration_text() -> Text:
    corpus = builtin_corpus()
    return Text(f"{BUILTIN_NAME} (second half)", corpus[len(corpus) // 2 :])


READ_CHUNK_BYTES = 1 << 20


def read_text_file(path: str, keep_chars: int | None = None) -> Text:
    """A user's plain UTF-8 text file, with an actionable error for every way it can be wrong.

    Read in chunks: the whole file is checked (UTF-8), counted and hashed (the identity of what
    was measured on it), but only its first `keep_chars` characters are kept (None: all), so a
    huge file costs a read, not its size in memory. Line ends are read as Python's text mode
    reads them (\r\n and \r become \n)."""
    import codecs

    file = Path(path).expanduser()
    if not file.is_file():
        raise WorkbenchError(f"eval text {path!r}: no such file.")
    decoder = codecs.getincrementaldecoder("utf-8")()
    digest, kept, total, offset, carry = hashlib.sha256(), [], 0, 0, ""
    with file.open("rb") as data:
        while chunk := data.read(READ_CHUNK_BYTES):
            try:
                text = carry + decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise WorkbenchError(
                    f"eval text {path!r}: not UTF-8 text (byte {offset + exc.start}). Save it as UTF-8 plain text."
                ) from None
            offset += len(chunk)
            carry = "\r" if text.endswith("\r") else ""  # a \r\n may straddle two chunks
            text = (text[:-1] if carry else text).replace("\r\n", "\n").replace("\r", "\n")
            digest.update(text.encode())
            total += len(text)
            if keep_chars is None or sum(map(len, kept)) < keep_chars:
                kept.append(text)
    try:
        tail = (carry + decoder.decode(b"", final=True)).replace("\r", "\n")
    except UnicodeDecodeError:
        raise WorkbenchError(
            f"eval text {path!r}: not UTF-8 text (it ends inside a character). Save it as UTF-8 plain text."
        ) from None
    digest.update(tail.encode())
    total, kept = total + len(tail), kept + [tail]
    text = "".join(kept) if keep_chars is None else "".join(kept)[:keep_chars]
    if not text.strip():
        raise WorkbenchError(
            f"eval text {path!r}: the file is empty. Give a file with at least a few paragraphs of text."
        )
    return Text(file.name, text, digest.hexdigest()[:16], total)


CHARS_PER_TOKEN_BOUND = 8
"""Characters read per token wanted: English prose takes about 4 a token, so twice that is plenty."""


def chars_to_keep(max_tokens: int, allow_long: bool) -> int | None:
    """How much of an evaluation file to keep in memory: what `eval_tokens` can use, or for all of
    it (max_tokens 0) at most what `check_eval_length` lets through without `allow_long`."""
    if max_tokens:
        return max_tokens * CHARS_PER_TOKEN_BOUND
    return None if allow_long else LONG_EVAL_TOKENS * CHARS_PER_TOKEN_BOUND


def eval_tokens(tokenizer, text: Text, max_tokens: int) -> list[int]:
    """Token ids of the evaluation text (no special tokens), cut to `max_tokens` (0 = all)."""
    # Tokenize only a generous prefix: ~4 characters per token in English prose.
    chars = text.text if not max_tokens else text.text[: max_tokens * CHARS_PER_TOKEN_BOUND]
    ids = tokenizer(chars, add_special_tokens=False)["input_ids"]
    ids = ids[:max_tokens] if max_tokens else ids
    if len(ids) < MIN_EVAL_TOKENS:
        raise WorkbenchError(
            f"eval text {text.name!r}: only {len(ids)} tokens; perplexity needs at least {MIN_EVAL_TOKENS}. Give a longer text."
        )
    return ids


def check_eval_length(tokenizer, text: Text, max_tokens: int, allow_long: bool = False) -> None:
    """Refuse, before tokenizing it, an evaluation that would take hours and GBs (e.g. all of a
    50 MB file), with the estimate and how to go ahead; `allow_long` goes ahead."""
    if allow_long or 0 < max_tokens <= LONG_EVAL_TOKENS:
        return
    sample = text.text[:20_000]
    chars_per_token = len(sample) / max(1, len(tokenizer(sample, add_special_tokens=False)["input_ids"]))
    tokens = int(text.total_chars / chars_per_token)
    if max_tokens:
        tokens = min(tokens, max_tokens)
    if tokens <= LONG_EVAL_TOKENS:
        return
    which = "all of it (--max-tokens 0)" if not max_tokens else f"--max-tokens {max_tokens:,}"
    raise WorkbenchError(
        f"eval text {text.name!r}: about {tokens:,} tokens to score with {which}; each method's evaluation would take "
        f"{tokens / DEFAULT_EVAL_TOKENS:,.0f}x as long as with the default {DEFAULT_EVAL_TOKENS:,} tokens, and tokenizing it "
        f"needs about {tokens * TOKENIZE_BYTES_PER_TOKEN / 2**30:.1f} GB of memory. Set --max-tokens (e.g. {DEFAULT_EVAL_TOKENS}), "
        "or pass --allow-long-eval (EvalConfig(allow_long=True)) to measure it all."
    )


def calibration_blocks(tokenizer, samples: int, block_tokens: int, text: Text | None = None) -> list[list[int]]:
    """`samples` consecutive blocks of exactly `block_tokens` token ids from the calibration text."""
    text = text or builtin_calibration_text()
    needed = samples * block_tokens
    ids = tokenizer(text.text[: needed * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise WorkbenchError(
            f"calibration: {text.name!r} has {len(ids)} tokens, fewer than {samples} blocks x {block_tokens}. Lower the sample count or block length."
        )
    return [ids[i * block_tokens : (i + 1) * block_tokens] for i in range(samples)]


# ---------------------------------------------------------------------------- fine-tuning sets
# {instruction, response} rows. The bundled set ships inside the package (package data), so
# `importlib.resources` finds it in an editable install and in an installed wheel alike.


def _bundled_finetune_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("workbench") / "datasets" / "finetune"))


FINETUNE_DIR = _bundled_finetune_dir()
"""The bundled fine-tuning set: train.jsonl, heldout.jsonl, prompts.json (see data/README.md)."""


def data_folder() -> Path:
    """The bundled fine-tuning set, with an actionable error when the package was installed without it."""
    if not (FINETUNE_DIR / "train.jsonl").is_file():
        raise WorkbenchError(
            f"fine-tuning data: the bundled set is not at {FINETUNE_DIR} (the package was installed without its "
            "datasets/ package data). Give data_path=<your .jsonl/.csv>, or regenerate it with `python data/make_finetune_set.py`."
        )
    return FINETUNE_DIR


def read_rows(path: Path) -> list[dict]:
    """{instruction, response} rows from a .jsonl, .json (a list) or .csv file, with errors that name the row."""
    import csv
    import json

    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkbenchError(f"fine-tuning data {str(path)!r}: not valid UTF-8 JSON lines / CSV ({exc}).") from None
    except OSError as exc:
        raise WorkbenchError(f"fine-tuning data {str(path)!r}: cannot read it ({exc.strerror or exc}).") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row[k].strip() for k in ("instruction", "response")
        ):
            raise WorkbenchError(
                f"fine-tuning data {str(path)!r}, row {number}: needs non-empty 'instruction' and 'response' fields."
            )
    if not rows:
        raise WorkbenchError(f"fine-tuning data {str(path)!r}: no rows.")
    return [{"instruction": r["instruction"], "response": r["response"]} for r in rows]


def load_rows(data_path: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, fixed prompts) from a folder (train.jsonl [heldout.jsonl, prompts.json]),
    one file, or None for the bundled set. A single file keeps its last 10% (at least 1) as held-out."""
    path = Path(data_path).expanduser() if data_path else data_folder()
    if path.is_dir():
        train = read_rows(path / "train.jsonl")
        heldout = read_rows(path / "heldout.jsonl") if (path / "heldout.jsonl").is_file() else None
    else:
        train, heldout = read_rows(path), None
    if heldout is None:
        if len(train) < 2:
            raise WorkbenchError(
                f"fine-tuning data {str(path)!r}: needs at least 2 rows (one is held out for evaluation)."
            )
        cut = max(1, len(train) // 10)
        train, heldout = train[:-cut], train[-cut:]
    prompts = read_rows(path / "prompts.json") if path.is_dir() and (path / "prompts.json").is_file() else heldout[:5]
    return train, heldout, prompts
