"""Result records: one frozen record per (model, method, parameters, protocol) run.

Records carry their environment and protocol so a number is never shown without how
it was measured. They are appended to a JSONL history (nothing is lost between runs),
exported to JSON/CSV, and rendered as a text table in the style of Hugging Face's
quantization benchmark tables.
"""

from __future__ import annotations

import csv
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from workbench.core import files
from workbench.run import column_notes

MB = 1024 * 1024


SCHEMA = 2
"""Version of the record layout; records of another version are skipped when reading history."""

IDENTITY_PROTOCOL = (
    "text",
    "text_sha",
    "eval_tokens",
    "max_length",
    "stride",
    "bos",
    "batch_size",
    "decode_tokens",
    "warm_up_tokens",
    "tasks",
)
"""The protocol settings that are part of a result's identity (everything that changes a number)."""


@dataclass(frozen=True)
class Result:
    model: str
    """Display name of the model; its identity is `model_fingerprint`."""
    method: str
    """Registry name of the method (identity); `label` is for people."""
    family: str
    bits: int
    params: dict
    device: str
    label: str = ""
    """Display label: the method name plus non-default parameters (and +lora for an adapter)."""
    adapter: str | None = None
    """A LoRA adapter folder attached to the quantized base, if any."""
    model_fingerprint: str = ""
    backend: str = ""
    """The library and version that did the work."""
    mode: str = ""
    """Where it was measured: `worker` (a fresh process for this method) or `in-process`."""
    ppl: float | None = None
    kl_mean: float | None = None
    """Mean KL divergence (nats per scored token) of the next-token distribution from the
    full-precision reference's (`protocol["kl_reference"]`), on the perplexity's tokens; None
    when the reference's distributions were not recorded (see `workbench.metrics.divergence`)."""
    kl_p99: float | None = None
    """99th percentile of the per-token KL, nats: the worst tokens, which the mean hides."""
    top1_agreement: float | None = None
    """Share (0..1) of scored tokens whose most likely next token is the reference's most likely one."""
    weight_bytes: int | None = None
    """Bytes of the stored tensors, counted before any forward pass."""
    bits_per_weight: float | None = None
    """Mean storage bits per weight of the block linears (scales, zeros and adapters included)."""
    peak_bytes: int | None = None
    """CUDA max allocated on GPU; on CPU the peak RSS of the process that measured it."""
    peak_above_baseline_bytes: int | None = None
    """Peak minus what that process held before loading the model (imports, tokenizer, text):
    the larger of the build peak and the run peak."""
    peak_reserved_bytes: int | None = None
    """CUDA max reserved (GPU only)."""
    peak_kind: str = ""
    build_peak_bytes: int | None = None
    """Peak above that baseline while loading the source weights, quantizing and warming up:
    what it takes to make the model."""
    run_peak_bytes: int | None = None
    """Peak above the same baseline while scoring and decoding with the built model, after the
    build's freed memory went back to the system: what it takes to use it (weights, activations,
    KV cache). None in records measured before it was measured apart."""
    load_s: float | None = None
    """Seconds to load and quantize (calibration included), and the warm-up forward pass where
    backends repack weights for their kernels (`measure.warm_up`)."""
    eval_s: float | None = None
    prefill_ms: float | None = None
    decode_tokens_per_s: float | None = None
    """Median over repetitions (at least 3, and at least 0.5 s of decoding)."""
    decode_spread: float | None = None
    """max / min decode rate over the repetitions."""
    decode_repeats: int | None = None
    kernel: str = ""
    tasks: dict | None = None
    """Task accuracy through lm-eval: task -> {metric, value, stderr, n, version, fewshot, limit}
    (`workbench.metrics.tasks`); None when no task was asked for."""
    protocol: dict = field(default_factory=dict)
    """Perplexity protocol: text (and its hash), max_length, stride, n_tokens, n_windows, bos, batch and decode settings."""
    calibration: dict | None = None
    details: dict | None = None
    """What the method chose while building (`mixed`: a summary and the bits of each layer)."""
    environment: dict = field(default_factory=dict)
    model_note: str = ""
    error: str | None = None
    timestamp: str = ""
    reused_from: str | None = None
    """Set when this row was taken from the history instead of measured again: the original timestamp."""
    schema: int = SCHEMA

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.method)

    @property
    def ms_per_token(self) -> float | None:
        return 1000 / self.decode_tokens_per_s if self.decode_tokens_per_s else None

    def identity(self) -> dict:
        """Same identity = the same model content, text, method, settings, protocol and backend."""
        return {
            "model": self.model_fingerprint,
            "method": self.method,
            "params": self.params,
            "adapter": self.adapter,
            "device": self.device,
            "backend": self.backend,
            "protocol": {k: self.protocol.get(k) for k in IDENTITY_PROTOCOL},
        }

    def key(self) -> str:
        return json.dumps(self.identity(), sort_keys=True)

    def to_dict(self) -> dict:
        return {**asdict(self), "ms_per_token": self.ms_per_token}

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        """A record read back (history, reuse): refused with ValueError unless every field has
        the type it is written with, and every measured number is finite and not negative."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for name, kinds in RECORD_TYPES.items():
            if name not in values and name not in REQUIRED:
                continue  # an older record without this field: the default
            value = values.get(name)
            wrong_type = not isinstance(value, kinds) or isinstance(value, bool)
            if (name in REQUIRED or name not in NULLABLE) and value is None or value is not None and wrong_type:
                raise ValueError(f"{name}: {value!r} is not a {kinds}")
            check_json_value(name, value, scalars_only=name in SCALAR_DICTS)
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and not (math.isfinite(value) and value >= 0)
            ):
                raise ValueError(f"{name}: {value!r} is not a finite, non-negative number")
        if values.get("ppl") is not None and values["ppl"] < 1:
            raise ValueError(f"ppl: {values['ppl']!r} is below 1, which no perplexity can be")
        return cls(**values)


NUMBER = (int, float)


def _record_types() -> tuple[dict, set]:
    """The type each field of a record is written with, read from `Result`'s annotations (a
    float field takes an int too), and the fields that may be None: a new field is checked
    without another edit."""
    kinds, nullable = {}, set()
    for name, hint in typing.get_type_hints(Result).items():
        options = typing.get_args(hint) or (hint,)
        kind = next(k for k in options if k is not type(None))
        kinds[name] = NUMBER if kind is float else kind
        if type(None) in options:
            nullable.add(name)
    return kinds, nullable


RECORD_TYPES, NULLABLE = _record_types()
SCALAR_DICTS = ("params", "protocol", "environment", "calibration")
"""Fields whose values are single settings: a list or dict inside them is refused."""
MAX_NESTING = 6
"""Depth of the dicts and lists a record may hold (`details` of `mixed` has two levels)."""
INT_LIMIT = 2**63


def check_json_value(name: str, value, depth: int = 0, scalars_only: bool = False) -> None:
    """A value read back from a record: JSON scalars, lists and string-keyed dicts no deeper than
    MAX_NESTING, every number finite and within 64 bits. Raises ValueError naming the field."""
    if isinstance(value, dict | list):
        if depth >= MAX_NESTING or scalars_only and depth:
            raise ValueError(f"{name}: nested too deep")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict) and not isinstance(key, str):
                raise ValueError(f"{name}: key {key!r} is not a string")
            check_json_value(f"{name}.{key}", item, depth + 1, scalars_only)
    elif isinstance(value, float) and not math.isfinite(value) or isinstance(value, int) and abs(value) >= INT_LIMIT:
        raise ValueError(f"{name}: {value!r} is not a usable number")
    elif not (value is None or isinstance(value, str | int | float)):
        raise ValueError(f"{name}: a {type(value).__name__} is not a JSON value")


REQUIRED = ("model", "method", "family", "bits", "params", "device")


def append_history(results: list[Result], path: Path) -> None:
    """One line per record, each written with a single flushed append: a crash leaves the whole line or none."""
    for result in results:
        files.append_line(path, json.dumps(result.to_dict(), allow_nan=False))


UNUSABLE_LINE = (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError)
"""What one line of a history can raise while it is read and checked: it is skipped, never fatal."""


def read_history(path: Path, log=None) -> list[Result]:
    """All records of a history file (see `iter_history`)."""
    return list(iter_history(path, log))


def iter_history(path: Path, log=None) -> Iterator[Result]:
    """The records of a history file, read a line at a time (a long history is never held whole).
    Lines that cannot be used (cut short, not JSON, another schema, a field of the wrong type at
    any depth) are skipped, never rewritten; `log` is told how many and which at the end. A
    history that is not a regular file is refused."""
    file = files.open_own_text(path, "history")
    if file is None:
        return
    skipped = []
    with file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                    raise ValueError("another schema")
                record = Result.from_dict(data)
            except UNUSABLE_LINE:
                skipped.append(number)
                continue
            yield record
    if skipped and log:
        shown = ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else "")
        log(
            f"history {path}: skipped {len(skipped)} line(s) that could not be used (line {shown}); they are left as they are."
        )


def baseline_of(results: list[Result]) -> Result | None:
    """The successful unquantized run (16 bits or more) with the most bits, fp32 when it was run, is the reference."""
    done = [r for r in results if r.error is None and r.ppl is not None and r.bits >= 16 and not r.adapter]
    return max(done, key=lambda r: r.bits, default=None)


def delta_ppl_pct(result: Result, baseline: Result | None) -> float | None:
    if result.ppl is None or baseline is None or baseline.ppl is None or result is baseline:
        return None
    return 100 * (result.ppl / baseline.ppl - 1)


def table_rows(results: list[Result]) -> list[dict]:
    """Rows with units in the column names: what the table, CSV and charts show."""
    base = baseline_of(results)
    task_columns = column_notes.task_columns(results)
    rows = []
    for r in results:
        delta = delta_ppl_pct(r, base)
        rows.append(
            {
                "method": r.label,
                "bits": r.bits,
                "group size": r.params.get("group_size", ""),
                "kernel": r.kernel,
                "load s": _round(r.load_s, 1),
                "ms/token": _round(r.ms_per_token, 1),
                "tok/s": _round(r.decode_tokens_per_s, 1),
                "tok/s spread": "" if r.decode_spread is None else f"x{r.decode_spread:.2f}",
                "build peak MB": _round(r.build_peak_bytes / MB if r.build_peak_bytes else None, 0),
                "run peak MB": _round(r.run_peak_bytes / MB if r.run_peak_bytes else None, 0),
                "weight MB": _round(r.weight_bytes / MB if r.weight_bytes else None, 1),
                "bits/weight": _round(r.bits_per_weight, 2),
                "perplexity": _round(r.ppl, 2),
                "Δ ppl %": "" if delta is None else f"{delta:+.1f}",
                "KL mean (nats)": _round(r.kl_mean, 4),
                "KL p99": _round(r.kl_p99, 4),
                "top-1 same %": _round(None if r.top1_agreement is None else 100 * r.top1_agreement, 1),
                **{column: column_notes.task_cell(r, task, metric) for task, metric, column in task_columns},
                "run in": r.mode + (f", reused from {r.reused_from}" if r.reused_from else ""),
                "error": r.error or "",
            }
        )
    return rows


def _round(value, digits):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "" if value is None else str(value)
    return round(value, digits) if digits else int(round(value))


def format_table(results: list[Result]) -> str:
    """A fixed-width text table plus the footnotes that say how the numbers were measured."""
    rows = table_rows(results)
    if not rows:
        return "(no results)"
    columns = [c for c in rows[0] if c != "error" or any(r["error"] for r in rows)]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    widths["error"] = min(widths.get("error", 0), 80)
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    for row in rows:
        lines.append("  ".join(str(row[c])[: widths[c]].ljust(widths[c]) for c in columns))
    return "\n".join(lines + [""] + footnotes(results))


def footnotes(results: list[Result]) -> list[str]:
    notes = []
    done = [r for r in results if r.error is None]
    if done:
        p, first = done[0].protocol, done[0]
        notes.append(
            f"Perplexity: {p.get('text')}, {p.get('n_tokens')} tokens scored, windows of {p.get('max_length')} "
            f"tokens, step {p.get('stride')}, BOS at each window: {p.get('bos')}. Lower is better."
        )
        notes.append(
            f"Peak MB: {first.peak_kind} above what the measuring process held before loading the model (imports, "
            "tokenizer, text). Build peak: loading the source weights, quantizing and one warm-up pass (what it takes "
            "to make the model). Run peak: scoring and decoding with the built model, after the build's freed memory "
            "went back (what it takes to use it). 'run in: worker' = a fresh process per method, so earlier methods "
            "cannot inflate them. Weight MB: bytes of the stored tensors "
            "(scales and zeros included), counted before the first forward pass. load s: load and quantize, and one "
            "warm-up forward pass (where backends repack weights for their kernels) before anything is timed."
        )
        notes.append(
            f"tok/s: greedy decode, batch 1, KV cache on, {p.get('decode_tokens')} new tokens; median of at least "
            "3 repetitions and 0.5 s of decoding; spread = fastest / slowest repetition."
        )
        if first.model_note:
            notes.append(f"Model: {first.model_note}.")
        base = baseline_of(results)
        if base is not None:
            notes.append(
                f"Δ ppl % is relative to {base.method}. Device: {first.environment.get('device_name', first.device)}."
            )
        notes.extend(column_notes.kl_note(done))
        notes.extend(column_notes.task_note(done))
    return notes


def format_details(results: list[Result], layers: bool = True) -> str:
    """What each method chose while building (`Result.details`), e.g. mixed precision's bits per
    layer: shown on demand (`compare --details`, the report), since it is long."""
    lines = []
    for r in results:
        if not r.details:
            continue
        lines.append(f"{r.label}: {r.details.get('summary', '')}")
        if layers:
            lines.extend(f"    {name}: {bits}-bit" for name, bits in r.details.get("layer_bits", {}).items())
    return "\n".join(lines)


def write_json(results: list[Result], path: Path) -> None:
    """Replaced atomically: a failed write leaves the previous file whole."""
    files.write_text(path, json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False))


def write_csv(results: list[Result], path: Path) -> None:
    flat = []
    for r in results:
        row = r.to_dict()
        for name in ("params", "protocol", "calibration", "details", "environment"):
            row[name] = json.dumps(row[name], sort_keys=True)
        flat.append(row)
    with files.atomic_open(path, newline="") as out:  # replaced atomically, like results.json
        writer = csv.DictWriter(out, fieldnames=list(flat[0]) if flat else ["method"])
        writer.writeheader()
        writer.writerows(flat)
