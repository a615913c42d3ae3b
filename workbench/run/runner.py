"""The runner's two verbs, `build` and `measure`, and what every surface composes from them.

- `build(session, choice) -> Built`: parse and check the choice, calibrate, quantize (or
  load), attach a saved adapter when asked, count the storage before any forward pass;
  the model's working folder is removed by `Built.close()`.
- `measure(session, built) -> Measurements`: one warm-up forward pass (`prepare`: backends
  repack weights for their kernels there) with the memory it freed handed back, then perplexity,
  KL against the full-precision reference in the same pass (`workbench.metrics.divergence`), and
  decode speed.

`evaluate` is the one composition that turns a choice into a `Result` (two peaks: the
build's, warm-up included, and the run's; a method's own failure becomes an error row, never
an exception). Where it runs is the executors' business (`workbench.run.executors`: in this process, or in a fresh worker
process per method, the default). CLI compare, the panels and fine-tuning all go through here.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
import traceback
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from workbench import methods
from workbench.core import allocator, files
from workbench.core.errors import WorkbenchError
from workbench.methods import Choice
from workbench.metrics import divergence, memory, perplexity, speed, task_scores, tasks
from workbench.run.results import Result
from workbench.run.session import SEED, SPEED_PROMPT, Session, backend_of, environment  # noqa: F401 (runner.Session)
from workbench.sources import data, hub

# ---------------------------------------------------------------------------- the two verbs


@dataclass
class Built:
    """A quantized (or loaded) model ready to measure, with the folder it may live in."""

    choice: Choice
    model: Any
    workdir: Path
    load_s: float
    """Seconds to load and quantize (calibration included)."""
    storage: memory.Storage
    """Counted before any forward pass."""
    details: dict | None = None
    """What the method chose while building (`Method.details`)."""
    warm_up_s: float | None = None
    """The warm-up forward pass (`prepare`); None before it."""

    def close(self) -> None:
        """Drop the model and its working folder, and give the memory back."""
        self.model = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        free_memory()

    def __enter__(self) -> "Built":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_choice(choice: Choice | str) -> Choice:
    return choice if isinstance(choice, Choice) else methods.parse(choice)


def build(session: Session, choice: Choice | str, log: Callable[[str], None] = print) -> Built:
    """Quantize (or load) the session's model with one method; raises `WorkbenchError` or the backend's error."""
    import torch

    choice = as_choice(choice)
    method = choice.method
    reason = method.unavailable_reason(session.device)
    if reason:
        raise WorkbenchError(f"{method.name}: {reason}")
    log(f"[{choice.label}] quantizing {session.source.label} on {session.device}...")
    torch.manual_seed(SEED)
    workdir = files.scratch_folder("build")
    try:
        start = time.perf_counter()
        calibration = None
        if method.needs_calibration:
            calibration = data.calibration_blocks(
                session.tokenizer, choice.params["samples"], choice.params["block_tokens"]
            )
        model = method.quantize(
            methods.QuantizeRequest(session.source, choice.params, session.device, workdir, calibration, log)
        )
        if choice.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, choice.adapter).eval()
        load_s = time.perf_counter() - start
        if method.file_storage:
            storage = method.file_storage(workdir, choice.params)
        else:
            storage = memory.storage(model, method.side_tensors)
        details = method.details(workdir, choice.params) if method.details else None
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log(f"[{choice.label}] quantized in {load_s:.1f} s")
    return Built(choice, model, workdir, load_s, storage, details)


@dataclass(frozen=True)
class Measurements:
    perplexity: perplexity.Perplexity
    eval_s: float
    speed: speed.Speed | None
    warm_up_s: float
    """The forward pass before measuring (`speed.warm_up`): counted with the load time."""
    divergence: divergence.Stats | None = None
    """KL and top-1 agreement against the reference; None when its distributions are not recorded."""
    tasks: task_scores.TaskScores | None = None
    """Task accuracy (`measure_tasks`), measured after the run peak; None when none was asked for."""

    def result_fields(self) -> dict:
        """What each metric measured, as `Result` fields: every field here whose value has
        `result_fields()` (a metric's value type) contributes its own."""
        values = [getattr(self, f.name) for f in fields(self)]
        return {
            "eval_s": self.eval_s,
            **{k: v for value in values if hasattr(value, "result_fields") for k, v in value.result_fields().items()},
        }


def measure(
    session: Session,
    built: Built,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> Measurements:
    """A warm-up forward pass, then perplexity under the session's protocol with KL against the
    reference in the same pass, then decode speed (when asked for). Measuring the reference
    itself records its distributions for the other methods (and its own KL, measured: 0)."""
    label = built.choice.label
    prompt = session.speed_prompt()
    warm_up_s = prepare(session, built)
    log(f"[{label}] measuring perplexity on {len(session.eval_ids)} tokens...")
    kl = _divergence_for(session, built.choice, log)
    start = time.perf_counter()
    ppl = perplexity.perplexity(
        built.model,
        session.eval_ids,
        session.eval.max_length,
        session.eval.stride,
        session.eval.batch_for(session.device),
        session.bos_id,
        progress=(lambda done, total: progress(label, done, total)) if progress else None,
        divergence=kl,
    )
    eval_s = time.perf_counter() - start
    if kl is not None and kl.reference is None:
        _save_reference(session, kl, label, log)
    stats = kl.stats() if kl is not None else None
    decode = None
    if session.eval.decode_tokens:
        decode = speed.decode_speed(built.model, prompt, session.eval.decode_tokens, session.tokenizer.pad_token_id)
    shown = f", KL {stats.kl_mean:.4f} nats, top-1 same {100 * stats.top1_agreement:.1f}%" if stats else ""
    log(f"[{label}] perplexity {ppl.ppl:.2f}{shown} in {eval_s:.1f} s")
    return Measurements(ppl, eval_s, decode, warm_up_s, stats)


def measure_tasks(session: Session, built: Built, log: Callable[[str], None] = print) -> task_scores.TaskScores:
    """The session's tasks on the built model, through lm-eval."""
    return tasks.run(built.model, session.tokenizer, session.eval.tasks, session.eval.batch_for(session.device), log)


def prepare(session: Session, built: Built) -> float:
    """The warm-up forward pass, once (backends repack weights for their kernels here), then what
    quantizing and repacking freed goes back to the system, and the weight files' pages leave
    the resident set (`allocator.drop_file_pages`); returns the warm-up's seconds."""
    if built.warm_up_s is None:
        built.warm_up_s = speed.warm_up(built.model, session.speed_prompt())
        allocator.release_freed()
        if session.device == "cpu":  # weights the built model reads again come back, and count, in the run
            allocator.drop_file_pages([hub.local_folder(session.source), built.workdir])
    return built.warm_up_s


def _divergence_for(session: Session, choice: Choice, log) -> divergence.Divergence | None:
    """Record (the reference itself), compare with the recorded reference, or None (not recorded:
    the perplexity is still measured, the KL columns stay empty)."""
    if session.is_reference(choice):
        return divergence.Divergence.recording()
    try:
        reference = session.load_reference()
    except WorkbenchError as exc:
        log(f"[{choice.label}] KL not measured: {exc}")
        return None
    if reference is None:
        log(
            f"[{choice.label}] KL not measured: {session.reference_method()}'s next-token distributions are not recorded "
            "for this model, text and protocol (measuring it records them; `compare` does that first)."
        )
        return None
    return divergence.Divergence.against(reference)


def _save_reference(session: Session, kl: divergence.Divergence, label: str, log) -> None:
    """Keep what the reference run recorded; a failed write costs the other methods their KL, not this row."""
    path = session.reference_path()
    try:
        kl.recorded_reference().save(path, session.reference_key())
    except WorkbenchError as exc:
        log(f"[{label}] the next-token distributions for KL were not saved: {exc}")
        return
    log(f"[{label}] next-token distributions saved for KL ({path.stat().st_size / 2**20:.1f} MB, {path})")


# ---------------------------------------------------------------------------- composition


@dataclass
class Evaluated:
    """A run's record, and the built model when the caller asked to keep it."""

    result: Result
    built: Built | None = None


def evaluate(
    session: Session,
    choice: Choice | str,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
    keep: bool = False,
    mode: str = "in-process",
) -> Evaluated:
    """build + measure one choice into a `Result`. Never raises for a method's own failure:
    the result carries the message in `error`. `keep` returns the built model too (the
    caller closes it); `mode` says where this ran (shown in the table)."""
    try:
        choice = as_choice(choice)
    except WorkbenchError as exc:
        return Evaluated(failed(session, str(choice), str(exc), mode=mode))
    built = None
    try:
        allocator.release_freed()  # both peaks count from a baseline without earlier garbage
        with allocator.large_blocks_apart(session.device) as apart:
            with memory.PeakMemory(session.device, mode in ("worker", "ray"), apart) as build_peak:
                built = build(session, choice, log)
                prepare(session, built)
            with memory.PeakMemory(session.device, False, apart, build_peak.baseline_bytes) as run_peak:
                measured = measure(session, built, log, progress)
            if session.eval.tasks:  # after the run peak: lm-eval's own working set is not the model's
                measured = dataclasses.replace(measured, tasks=measure_tasks(session, built, log))
    except BaseException as exc:
        if built is not None:
            built.close()  # Ctrl-C and SIGTERM too: no working folder is left behind
        if not isinstance(exc, Exception):
            raise
        return Evaluated(failed(session, choice, error_message(exc, choice, log), mode=mode))
    result = _result(session, built, measured, memory.phase_fields(build_peak, run_peak), mode)
    if keep:
        return Evaluated(result, built)
    built.close()
    return Evaluated(result)


def run_method(
    session: Session,
    choice: Choice | str,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> Result:
    """`evaluate` in this process, the result only."""
    return evaluate(session, choice, log, progress).result


def _result(session: Session, built: Built, measured: Measurements, peaks: dict, mode: str) -> Result:
    choice = built.choice
    kl_protocol = (
        {
            "kl_reference": session.reference_method(),
            "kl_top_k": divergence.TOP_K,
            "kl_tail_samples": divergence.TAIL_SAMPLES,
        }
        if measured.divergence
        else {}
    )
    return Result(
        model=session.source.label,
        method=choice.method.name,
        label=choice.label,
        family=choice.method.family,
        bits=choice.method.bits_for(choice.params),
        params=choice.params,
        adapter=choice.adapter,
        device=session.device,
        model_fingerprint=session.fingerprint,
        backend=backend_of(choice.method),
        mode=mode,
        **built.storage.result_fields(),
        **peaks,
        **measured.result_fields(),
        load_s=built.load_s + measured.warm_up_s,
        kernel=f"{choice.method.kernel}: {built.storage.kernel}",
        details=built.details,
        protocol={**session.planned_protocol(), **measured.perplexity.protocol(session.eval_text.name), **kl_protocol},
        calibration=_calibration_record(choice),
        environment=environment(session.device, choice.method),
        model_note=session.source.note,
        timestamp=now(),
    )


def failed(session: Session, choice: Choice | str, message: str, mode: str = "in-process") -> Result:
    """An error row: the choice as far as it was understood, and the message."""
    if isinstance(choice, Choice):
        method, label, params, adapter = choice.method, choice.label, choice.params, choice.adapter
    else:
        method, label, params, adapter = None, choice, {}, None
    return Result(
        model=session.source.label,
        method=method.name if method else label,
        label=label,
        family=method.family if method else "",
        bits=method.bits_for(params) if method else 0,
        params=params,
        adapter=adapter,
        device=session.device,
        model_fingerprint=session.fingerprint,
        backend=backend_of(method),
        mode=mode,
        protocol=session.planned_protocol(),
        error=message,
        environment=environment(session.device, method),
        model_note=session.source.note,
        timestamp=now(),
    )


def planned_key(session: Session, choice: Choice) -> str:
    """The identity a result of this choice in this session will have (see `Result.key`)."""
    return failed(session, choice, "").key()


def error_message(exc: Exception, choice: Choice, log) -> str:
    import torch

    if isinstance(exc, WorkbenchError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return f"{choice.label}: out of GPU memory. Try a lower-bit method or a smaller model (`python -m workbench estimate`)."
    log(traceback.format_exc())  # a library failed: keep the trace in the log, go on with the other methods
    return f"{choice.label} failed inside {choice.method.backend or 'transformers'}: {type(exc).__name__}: {str(exc)[:300]}"


def _calibration_record(choice: Choice) -> dict | None:
    if not choice.method.needs_calibration:
        return None
    return {
        "text": data.builtin_calibration_text().name,
        "samples": choice.params["samples"],
        "block_tokens": choice.params["block_tokens"],
    }


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
