"""Run one method, or compare several, on one model: quantize, measure, record.

This is the core call every surface makes. A failing method never stops a
comparison: its error is recorded in the result's `error` field and the next one runs.
"""

from __future__ import annotations

import gc
import platform
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

from . import data, measure, methods, models
from .config import EvalConfig, ModelSpec
from .errors import WorkbenchError
from .results import Result, config_key

SPEED_PROMPT = "Quantization stores the weights of a neural network with fewer bits, so that"
SEED = 0


@dataclass
class Session:
    """What every method in a comparison shares: the model source, tokenizer and evaluation tokens."""

    spec: ModelSpec
    device: str
    source: models.ModelSource
    tokenizer: object
    eval_text: data.Text
    eval_ids: list[int]
    bos_id: int | None
    eval: EvalConfig

    @classmethod
    def open(cls, spec: ModelSpec, eval_cfg: EvalConfig, log: Callable[[str], None] = print) -> "Session":
        device = spec.resolved_device()
        source = models.resolve(spec.name, spec.token, log)
        tokenizer = models.load_tokenizer(source)
        text = data.read_text_file(eval_cfg.text_path) if eval_cfg.text_path else data.builtin_eval_text()
        ids = data.eval_tokens(tokenizer, text, eval_cfg.max_tokens)
        return cls(spec, device, source, tokenizer, text, ids, measure.expects_bos(tokenizer), eval_cfg)

    def planned_protocol(self) -> dict:
        _, step = measure.windows(len(self.eval_ids), self.eval.max_length, self.eval.stride, self.bos_id is not None)
        return {"text": self.eval_text.name, "eval_tokens": len(self.eval_ids), "max_length": self.eval.max_length,
                "stride": step, "bos": self.bos_id is not None}


def environment(device: str, method: methods.Method) -> dict:
    import torch

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    env = {"device_name": name, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": version("transformers"), "seed": SEED}
    if method.pip:
        package = method.pip.split()[2].split("=")[0]
        env[package] = version(package)
    return env


@dataclass
class Measured:
    """A run's record, and the quantized model itself when the caller asked to keep it."""

    result: Result
    model: object | None = None
    workdir: Path | None = None
    """Where a kept model's checkpoint lives (gptq/awq); the caller removes it with the model."""


def run_method(session: Session, choice: str, log: Callable[[str], None] = print,
               progress: Callable[[str, int, int], None] | None = None) -> Result:
    """Quantize with one method (`name` or `name:key=value:...`) and measure it. Never raises for
    a method's own failure: the result carries the message in `error`."""
    return measure_method(session, choice, log, progress).result


def measure_method(session: Session, choice: str, log: Callable[[str], None] = print,
                   progress: Callable[[str, int, int], None] | None = None, keep_model: bool = False) -> Measured:
    """`run_method`, optionally keeping the quantized model (panels reuse it for generation)."""
    import torch

    method, params, label = None, {}, choice
    try:
        method, params = methods.parse_choice(choice)
        label = methods.label(method, params)
    except WorkbenchError as exc:
        return Measured(_failed(session, label, method, params, str(exc)))
    reason = method.unavailable_reason(session.device)
    if reason:
        return Measured(_failed(session, label, method, params, f"{method.name}: {reason}"))
    log(f"[{label}] quantizing {session.source.label} on {session.device}...")
    torch.manual_seed(SEED)
    workdir, model = Path(tempfile.mkdtemp(prefix="workbench-")), None
    try:
        with measure.PeakMemory(session.device) as peak:
            start = time.perf_counter()
            model = _quantize(session, method, params, workdir, log)
            load_s = time.perf_counter() - start
            log(f"[{label}] quantized in {load_s:.1f} s; measuring perplexity on {len(session.eval_ids)} tokens...")
            start = time.perf_counter()
            ppl = measure.perplexity(model, session.eval_ids, session.eval.max_length, session.eval.stride,
                                     session.eval.batch_size, session.bos_id,
                                     progress=(lambda done, total: progress(label, done, total)) if progress else None)
            eval_s = time.perf_counter() - start
            speed = None
            if session.eval.decode_tokens:
                prompt = session.tokenizer(SPEED_PROMPT, add_special_tokens=True)["input_ids"]
                speed = measure.decode_speed(model, prompt, session.eval.decode_tokens, session.tokenizer.pad_token_id)
            sizes = (measure.weight_bytes(model), measure.linear_bits_per_weight(model), measure.kernel_name(model))
    except Exception as exc:
        model = None
        shutil.rmtree(workdir, ignore_errors=True)
        free_memory()
        return Measured(_failed(session, label, method, params, _error_message(exc, label, method, log)))
    if not keep_model:
        model = None
        shutil.rmtree(workdir, ignore_errors=True)
        free_memory()
    log(f"[{label}] perplexity {ppl.ppl:.2f} in {eval_s:.1f} s")
    result = Result(
        model=session.source.label, method=label, family=method.family, bits=method.bits_for(params), params=params,
        device=session.device, ppl=ppl.ppl, weight_bytes=sizes[0], bits_per_weight=sizes[1], peak_bytes=peak.peak_bytes,
        peak_kind=peak.kind, load_s=load_s, eval_s=eval_s,
        prefill_ms=speed.prefill_ms if speed else None, decode_tokens_per_s=speed.decode_tokens_per_s if speed else None,
        kernel=f"{method.kernel}: {sizes[2]}", protocol={**session.planned_protocol(), **ppl.protocol(session.eval_text.name)},
        calibration=_calibration_record(method, params), environment=environment(session.device, method),
        model_note=session.source.note, timestamp=_now(),
    )
    return Measured(result, model, workdir if keep_model else None)


def _quantize(session: Session, method: methods.Method, params: dict, workdir: Path, log):
    calibration = None
    if method.needs_calibration:
        calibration = data.calibration_blocks(session.tokenizer, params["samples"], params["block_tokens"])
    return method.quantize(methods.QuantizeRequest(session.source, params, session.device, workdir, calibration, log))


@dataclass(frozen=True)
class Generation:
    method: str
    text: str = ""
    tokens_per_s: float | None = None
    error: str | None = None


def generate(session: Session, choice: str, prompt: str, max_new_tokens: int = 40, log=print) -> Generation:
    """Quantize with one method and answer `prompt` greedily (chat template when the model has one)."""
    import torch

    label, method, workdir = choice, None, Path(tempfile.mkdtemp(prefix="workbench-"))
    try:
        method, params = methods.parse_choice(choice)
        label = methods.label(method, params)
        reason = method.unavailable_reason(session.device)
        if reason:
            raise WorkbenchError(f"{method.name}: {reason}")
        model = _quantize(session, method, params, workdir, log)
        ids = prompt_ids(session.tokenizer, prompt)
        inputs = torch.tensor([ids], device=next(model.parameters()).device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=session.tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
        new = out[0, len(ids):]
        return Generation(label, session.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new) / seconds)
    except Exception as exc:
        return Generation(label, error=_error_message(exc, label, method, log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        free_memory()


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids for a user prompt: through the chat template for instruction-tuned models."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def _error_message(exc: Exception, label: str, method: methods.Method, log) -> str:
    import torch

    if isinstance(exc, WorkbenchError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return f"{label}: out of GPU memory. Try a lower-bit method or a smaller model (`python -m workbench estimate`)."
    log(traceback.format_exc())  # a library failed: keep the trace in the log, go on with the other methods
    backend = (method.backend if method else None) or "transformers"
    return f"{label} failed inside {backend}: {type(exc).__name__}: {str(exc)[:300]}"


def compare(session: Session, choices: list[str], previous: list[Result] = (), rerun: bool = False,
            log: Callable[[str], None] = print, progress=None, should_stop: Callable[[], bool] = lambda: False) -> list[Result]:
    """Run each method in turn. A configuration already in `previous` (without error) is reused
    unless `rerun`. `should_stop` is checked between methods (cancel)."""
    done = {r.key(): r for r in previous if r.error is None}
    results = []
    for choice in choices:
        if should_stop():
            log("Cancelled: the remaining methods were not run.")
            break
        reused = None if rerun else _find_previous(session, choice, done)
        if reused:
            log(f"[{reused.method}] already measured with this protocol ({reused.timestamp}); reusing it. Re-run to measure again.")
            results.append(reused)
            continue
        results.append(run_method(session, choice, log, progress))
    return results


def _find_previous(session: Session, choice: str, done: dict) -> Result | None:
    try:
        method, params = methods.parse_choice(choice)
    except WorkbenchError:
        return None
    key = config_key(session.source.label, methods.label(method, params), params, session.device, session.planned_protocol())
    return done.get(key)


def _calibration_record(method: methods.Method, params: dict) -> dict | None:
    if not method.needs_calibration:
        return None
    return {"text": data.builtin_calibration_text().name, "samples": params["samples"], "block_tokens": params["block_tokens"]}


def _failed(session: Session, label: str, method, params: dict, message: str) -> Result:
    return Result(model=session.source.label, method=label, family=method.family if method else "", bits=method.bits_for(params) if method else 0,
                  params=params, device=session.device, protocol=session.planned_protocol(), error=message,
                  environment=environment(session.device, method) if method else {}, model_note=session.source.note, timestamp=_now())


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
