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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MB = 1024 * 1024


@dataclass(frozen=True)
class Result:
    model: str
    method: str
    """Display label: the method name plus non-default parameters."""
    family: str
    bits: int
    params: dict
    device: str
    ppl: float | None = None
    weight_bytes: int | None = None
    bits_per_weight: float | None = None
    """Mean storage bits per weight of the block linears (scales and zeros included)."""
    peak_bytes: int | None = None
    peak_kind: str = ""
    """What `peak_bytes` measures: CUDA max allocated, or the process peak RSS on CPU."""
    load_s: float | None = None
    """Seconds to load and quantize (calibration included)."""
    eval_s: float | None = None
    prefill_ms: float | None = None
    decode_tokens_per_s: float | None = None
    kernel: str = ""
    protocol: dict = field(default_factory=dict)
    """Perplexity protocol: text, max_length, stride, n_tokens, n_windows, bos."""
    calibration: dict | None = None
    environment: dict = field(default_factory=dict)
    model_note: str = ""
    error: str | None = None
    timestamp: str = ""

    @property
    def ms_per_token(self) -> float | None:
        return 1000 / self.decode_tokens_per_s if self.decode_tokens_per_s else None

    def key(self) -> str:
        return config_key(self.model, self.method, self.params, self.device, self.protocol)

    def to_dict(self) -> dict:
        return {**asdict(self), "ms_per_token": self.ms_per_token}

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def config_key(model: str, method: str, params: dict, device: str, protocol: dict) -> str:
    """Identity of an experiment: the same key means the same model, method, settings and protocol."""
    measured = {k: protocol.get(k) for k in ("text", "eval_tokens", "max_length", "stride", "bos")}
    return json.dumps([model, method, params, device, measured], sort_keys=True)


def append_history(results: list[Result], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        for result in results:
            out.write(json.dumps(result.to_dict()) + "\n")


def read_history(path: Path) -> list[Result]:
    if not path.is_file():
        return []
    return [Result.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def baseline_of(results: list[Result]) -> Result | None:
    """The successful unquantized run with the most bits (fp32 when it was run) is the reference."""
    done = [r for r in results if r.error is None and r.ppl is not None and r.family == "baseline"]
    return max(done, key=lambda r: r.bits, default=None)


def delta_ppl_pct(result: Result, baseline: Result | None) -> float | None:
    if result.ppl is None or baseline is None or baseline.ppl is None or result is baseline:
        return None
    return 100 * (result.ppl / baseline.ppl - 1)


def table_rows(results: list[Result]) -> list[dict]:
    """Rows with units in the column names: what the table, CSV and charts show."""
    base = baseline_of(results)
    rows = []
    for r in results:
        delta = delta_ppl_pct(r, base)
        rows.append({
            "method": r.method,
            "bits": r.bits,
            "group size": r.params.get("group_size", ""),
            "kernel": r.kernel,
            "load s": _round(r.load_s, 1),
            "ms/token": _round(r.ms_per_token, 1),
            "tok/s": _round(r.decode_tokens_per_s, 1),
            "peak MB": _round(r.peak_bytes / MB if r.peak_bytes else None, 0),
            "weight MB": _round(r.weight_bytes / MB if r.weight_bytes else None, 1),
            "bits/weight": _round(r.bits_per_weight, 2),
            "perplexity": _round(r.ppl, 2),
            "Δ ppl %": "" if delta is None else f"{delta:+.1f}",
            "error": r.error or "",
        })
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
        notes.append(f"Perplexity: {p.get('text')}, {p.get('n_tokens')} tokens scored, windows of {p.get('max_length')} "
                     f"tokens, step {p.get('stride')}, BOS at each window: {p.get('bos')}. Lower is better.")
        notes.append(f"Peak MB: {first.peak_kind} during load + evaluation. Weight MB: bytes of the stored tensors "
                     "(scales and zeros included). tok/s: greedy decode, batch 1, KV cache on.")
        if first.model_note:
            notes.append(f"Model: {first.model_note}.")
        base = baseline_of(results)
        if base is not None:
            notes.append(f"Δ ppl % is relative to {base.method}. Device: {first.environment.get('device_name', first.device)}.")
    return notes


def write_json(results: list[Result], path: Path) -> None:
    path.write_text(json.dumps([r.to_dict() for r in results], indent=2), encoding="utf-8")


def write_csv(results: list[Result], path: Path) -> None:
    flat = []
    for r in results:
        row = r.to_dict()
        for name in ("params", "protocol", "calibration", "environment"):
            row[name] = json.dumps(row[name], sort_keys=True)
        flat.append(row)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(flat[0]) if flat else ["method"])
        writer.writeheader()
        writer.writerows(flat)
