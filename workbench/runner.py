"""The runner's two verbs, `build` and `measure`, and what every surface composes from them.

- `build(session, choice) -> Built`: parse and check the choice, calibrate, quantize (or
  load), attach a saved adapter when asked, count the storage before any forward pass;
  the model's working folder is removed by `Built.close()`.
- `measure(session, built) -> Measurements`: one warm-up forward pass (backends repack
  weights for their kernels there) with the memory it freed handed back, then perplexity,
  KL against the full-precision reference in the same pass (`workbench.divergence`), and
  decode speed.

`evaluate` is the one composition that turns a choice into a `Result` (peak memory around
both verbs; a method's own failure becomes an error row, never an exception). Where it runs
is the executors' business (`workbench.executors`: in this process, or in a fresh worker
process per method, the default). CLI compare, the panels and fine-tuning all go through here.
"""

from __future__ import annotations

import gc
import hashlib
import platform
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from . import allocator, data, divergence, methods, models, remote_code
from . import measure as measuring
from .config import EvalConfig, ModelSpec
from .errors import WorkbenchError
from .methods import Choice
from .results import Result

SPEED_PROMPT = "Quantization stores the weights of a neural network with fewer bits, so that"
SEED = 0


@dataclass
class Session:
    """What every method in a comparison shares: the model source, tokenizer and evaluation tokens."""

    source: models.ModelSource
    device: str
    tokenizer: object
    eval_text: data.Text
    eval_ids: list[int]
    bos_id: int | None
    eval: EvalConfig
    fingerprint: str
    """The model's content identity (`models.fingerprint`)."""
    text_sha: str
    """sha256 of the evaluation text: two files with one name are two texts."""

    @classmethod
    def open(cls, spec: ModelSpec, eval_cfg: EvalConfig, log: Callable[[str], None] = print) -> "Session":
        source = models.resolve(spec.name, spec.token, log, trust_remote_code=spec.trust_remote_code)
        return cls.from_source(source, spec.resolved_device(), eval_cfg)

    @classmethod
    def from_source(cls, source: models.ModelSource, device: str, eval_cfg: EvalConfig = EvalConfig()) -> "Session":
        """Check the model runs no code it ships unless trusted and is a causal LM that takes the
        protocol's windows, then tokenize the text."""
        remote_code.check(source)  # again: a source built by hand (fine-tuning, workers) skips `resolve`
        config = models.check_causal_lm(source)
        context = models.context_length(config)
        if context is not None and eval_cfg.max_length > context:
            raise WorkbenchError(f"max_length: {eval_cfg.max_length} tokens per window is beyond {source.label}'s context of "
                                 f"{context} tokens; use --max-length {context} or less.")
        tokenizer = models.load_tokenizer(source)
        text = data.read_text_file(eval_cfg.text_path) if eval_cfg.text_path else data.builtin_eval_text()
        data.check_eval_length(tokenizer, text, eval_cfg.max_tokens, eval_cfg.allow_long)
        ids = data.eval_tokens(tokenizer, text, eval_cfg.max_tokens)
        return cls(source, device, tokenizer, text, ids, measuring.expects_bos(tokenizer), eval_cfg,
                   models.fingerprint(source), hashlib.sha256(text.text.encode()).hexdigest()[:16])

    def planned_protocol(self) -> dict:
        """Every setting that changes a measured number; results are reused only when all match."""
        _, step = measuring.windows(len(self.eval_ids), self.eval.max_length, self.eval.stride, self.bos_id is not None)
        return {"text": self.eval_text.name, "text_sha": self.text_sha, "eval_tokens": len(self.eval_ids),
                "max_length": self.eval.max_length, "stride": step, "bos": self.bos_id is not None,
                "batch_size": self.eval.batch_for(self.device), "decode_tokens": self.eval.decode_tokens,
                "warm_up_tokens": len(self.speed_prompt())}

    def speed_prompt(self) -> list[int]:
        """The prompt of the warm-up pass and of the decode-speed runs, as token ids."""
        return self.tokenizer(SPEED_PROMPT, add_special_tokens=True)["input_ids"]

    # ------------------------------------------------------------ the KL reference

    def reference_method(self) -> str:
        """The method KL is measured against (`divergence.reference_method`): fp32 on CPU."""
        return divergence.reference_method(self.device)

    def is_reference(self, choice: Choice) -> bool:
        """Whether measuring `choice` records the reference distributions: the reference method, no adapter."""
        return choice.method.name == self.reference_method() and not choice.adapter

    def reference_key(self) -> dict:
        """Everything that changes the reference's recorded distributions; found again from the
        session alone, so a worker process rebuilt from (source, device, eval) finds the same file.
        The batch size is left out: it changes neither the windows nor their order."""
        protocol = self.planned_protocol()
        tokens = hashlib.sha256(",".join(map(str, self.eval_ids)).encode()).hexdigest()[:16]
        return {"format": divergence.FORMAT, "top_k": divergence.TOP_K, "tail_samples": divergence.TAIL_SAMPLES,
                "reference": self.reference_method(), "model": self.fingerprint, "device": self.device, "tokens_sha": tokens,
                **{name: protocol[name] for name in ("text_sha", "eval_tokens", "max_length", "stride", "bos")}}

    def reference_path(self) -> Path:
        return divergence.cache_path(self.reference_key())

    def load_reference(self) -> divergence.Reference | None:
        """The recorded reference distributions; None when not recorded; WorkbenchError when unusable."""
        return divergence.Reference.load(self.reference_path(), self.reference_key())


def environment(device: str, method: methods.Method | None) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    env = {"device_name": name, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": _version("transformers"), "seed": SEED}
    if method is not None and method.package:
        env[method.package] = _version(method.package)
    return env


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def backend_of(method: methods.Method | None) -> str:
    """The library (and version) that did the work: part of a result's identity."""
    package = (method.package if method else None) or "transformers"
    return f"{package} {_version(package)}"


# ---------------------------------------------------------------------------- the two verbs

@dataclass
class Built:
    """A quantized (or loaded) model ready to measure, with the folder it may live in."""

    choice: Choice
    model: Any
    workdir: Path
    load_s: float
    """Seconds to load and quantize (calibration included)."""
    storage: measuring.Storage
    """Counted before any forward pass."""
    details: dict | None = None
    """What the method chose while building (`Method.details`)."""

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
    workdir = Path(tempfile.mkdtemp(prefix="workbench-"))
    try:
        start = time.perf_counter()
        calibration = None
        if method.needs_calibration:
            calibration = data.calibration_blocks(session.tokenizer, choice.params["samples"], choice.params["block_tokens"])
        model = method.quantize(methods.QuantizeRequest(session.source, choice.params, session.device, workdir, calibration, log))
        if choice.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, choice.adapter).eval()
        load_s = time.perf_counter() - start
        storage = measuring.storage(model, method.side_tensors)
        details = method.details(workdir) if method.details else None
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log(f"[{choice.label}] quantized in {load_s:.1f} s")
    return Built(choice, model, workdir, load_s, storage, details)


@dataclass(frozen=True)
class Measurements:
    perplexity: measuring.Perplexity
    eval_s: float
    speed: measuring.Speed | None
    warm_up_s: float
    """The forward pass before measuring (`measure.warm_up`): counted with the load time."""
    divergence: divergence.Stats | None = None
    """KL and top-1 agreement against the reference; None when its distributions are not recorded."""


def measure(session: Session, built: Built, log: Callable[[str], None] = print,
                  progress: Callable[[str, int, int], None] | None = None) -> Measurements:
    """A warm-up forward pass, then perplexity under the session's protocol with KL against the
    reference in the same pass, then decode speed (when asked for). Measuring the reference
    itself records its distributions for the other methods (and its own KL, measured: 0)."""
    label = built.choice.label
    prompt = session.speed_prompt()
    warm_up_s = measuring.warm_up(built.model, prompt)  # backends repack weights for their kernels here
    allocator.release_freed()  # what quantizing and repacking freed goes back to the system before scoring
    log(f"[{label}] measuring perplexity on {len(session.eval_ids)} tokens...")
    kl = _divergence_for(session, built.choice, log)
    start = time.perf_counter()
    ppl = measuring.perplexity(built.model, session.eval_ids, session.eval.max_length, session.eval.stride,
                             session.eval.batch_for(session.device), session.bos_id,
                             progress=(lambda done, total: progress(label, done, total)) if progress else None,
                             divergence=kl)
    eval_s = time.perf_counter() - start
    if kl is not None and kl.reference is None:
        _save_reference(session, kl, label, log)
    stats = kl.stats() if kl is not None else None
    speed = None
    if session.eval.decode_tokens:
        speed = measuring.decode_speed(built.model, prompt, session.eval.decode_tokens, session.tokenizer.pad_token_id)
    shown = f", KL {stats.kl_mean:.4f} nats, top-1 same {100 * stats.top1_agreement:.1f}%" if stats else ""
    log(f"[{label}] perplexity {ppl.ppl:.2f}{shown} in {eval_s:.1f} s")
    return Measurements(ppl, eval_s, speed, warm_up_s, stats)


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
        log(f"[{choice.label}] KL not measured: {session.reference_method()}'s next-token distributions are not recorded "
            "for this model, text and protocol (measuring it records them; `compare` does that first).")
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


def evaluate(session: Session, choice: Choice | str, log: Callable[[str], None] = print,
             progress: Callable[[str, int, int], None] | None = None, keep: bool = False,
             mode: str = "in-process") -> Evaluated:
    """build + measure one choice into a `Result`. Never raises for a method's own failure:
    the result carries the message in `error`. `keep` returns the built model too (the
    caller closes it); `mode` says where this ran (shown in the table)."""
    try:
        choice = as_choice(choice)
    except WorkbenchError as exc:
        return Evaluated(failed(session, str(choice), str(exc), mode=mode))
    built = None
    try:
        with allocator.large_blocks_apart(session.device) as apart, \
                measuring.PeakMemory(session.device, mode in ("worker", "ray"), apart) as peak:
            built = build(session, choice, log)
            measured = measure(session, built, log, progress)
    except BaseException as exc:
        if built is not None:
            built.close()  # Ctrl-C and SIGTERM too: no working folder is left behind
        if not isinstance(exc, Exception):
            raise
        return Evaluated(failed(session, choice, error_message(exc, choice, log), mode=mode))
    result = _result(session, built, measured, peak, mode)
    if keep:
        return Evaluated(result, built)
    built.close()
    return Evaluated(result)


def run_method(session: Session, choice: Choice | str, log: Callable[[str], None] = print,
               progress: Callable[[str, int, int], None] | None = None) -> Result:
    """`evaluate` in this process, the result only."""
    return evaluate(session, choice, log, progress).result


def _result(session: Session, built: Built, measured: Measurements, peak: measuring.PeakMemory, mode: str) -> Result:
    choice, speed, stats = built.choice, measured.speed, measured.divergence
    kl_protocol = {"kl_reference": session.reference_method(), "kl_top_k": divergence.TOP_K,
                   "kl_tail_samples": divergence.TAIL_SAMPLES} if stats else {}
    return Result(
        model=session.source.label, method=choice.method.name, label=choice.label, family=choice.method.family,
        bits=choice.method.bits_for(choice.params), params=choice.params, adapter=choice.adapter, device=session.device,
        model_fingerprint=session.fingerprint, backend=backend_of(choice.method), mode=mode,
        ppl=measured.perplexity.ppl, kl_mean=stats.kl_mean if stats else None, kl_p99=stats.kl_p99 if stats else None,
        top1_agreement=stats.top1_agreement if stats else None, weight_bytes=built.storage.weight_bytes, bits_per_weight=built.storage.bits_per_weight,
        peak_bytes=peak.peak_bytes, peak_above_baseline_bytes=peak.above_baseline_bytes, peak_reserved_bytes=peak.reserved_bytes,
        peak_kind=peak.kind, load_s=built.load_s + measured.warm_up_s, eval_s=measured.eval_s,
        prefill_ms=speed.prefill_ms if speed else None, decode_tokens_per_s=speed.decode_tokens_per_s if speed else None,
        decode_spread=speed.decode_spread if speed else None, decode_repeats=speed.repeats if speed else None,
        kernel=f"{choice.method.kernel}: {built.storage.kernel}", details=built.details,
        protocol={**session.planned_protocol(), **measured.perplexity.protocol(session.eval_text.name), **kl_protocol},
        calibration=_calibration_record(choice), environment=environment(session.device, choice.method),
        model_note=session.source.note, timestamp=now(),
    )


def failed(session: Session, choice: Choice | str, message: str, mode: str = "in-process") -> Result:
    """An error row: the choice as far as it was understood, and the message."""
    if isinstance(choice, Choice):
        method, label, params, adapter = choice.method, choice.label, choice.params, choice.adapter
    else:
        method, label, params, adapter = None, choice, {}, None
    return Result(model=session.source.label, method=method.name if method else label, label=label,
                  family=method.family if method else "", bits=method.bits_for(params) if method else 0, params=params,
                  adapter=adapter, device=session.device, model_fingerprint=session.fingerprint, backend=backend_of(method),
                  mode=mode, protocol=session.planned_protocol(), error=message,
                  environment=environment(session.device, method), model_note=session.source.note, timestamp=now())


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
    return {"text": data.builtin_calibration_text().name, "samples": choice.params["samples"],
            "block_tokens": choice.params["block_tokens"]}


# ---------------------------------------------------------------------------- comparing

def compare(session: Session, choices: list[Choice | str], previous: list[Result] = (), rerun: bool = False,
            log: Callable[[str], None] = print, progress=None, should_stop: Callable[[], bool] = lambda: False,
            executor=None, on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Each choice's result, in order. A configuration already in `previous` (without error and
    with the same identity) is reused unless `rerun`; the others run on `executor` (default:
    a fresh worker process each). `on_result` gets every newly measured result the moment it
    finishes (the CLI and panels append it to the history there).

    KL needs the reference's recorded distributions (`Session.reference_method`, fp32 on CPU),
    so the reference runs first, on its own, before the others start. When they are not
    recorded for this session and another method is to be measured, the reference is measured
    even if not asked for (its row comes first: Δ ppl % needs it too), or measured again
    instead of reused from `previous`; each of these is logged with the reason."""
    from .executors import WorkerProcesses

    executor = executor or WorkerProcesses()
    done = {r.key(): r for r in previous if r.error is None}
    slots: list[Result | None] = []
    pending: list[tuple[int, Choice]] = []
    reused_reference = None
    for choice in choices:
        try:
            parsed = as_choice(choice)
        except WorkbenchError as exc:
            slots.append(failed(session, str(choice), str(exc)))
            continue
        reused = None if rerun else done.get(planned_key(session, parsed))
        if reused:
            log(f"[{reused.label}] already measured with this model, text and protocol ({reused.timestamp}); reusing it. Re-run to measure again.")
            slots.append(replace(reused, reused_from=reused.timestamp))
            if session.is_reference(parsed):
                reused_reference = (len(slots) - 1, parsed)
            continue
        slots.append(None)
        pending.append((len(slots) - 1, parsed))
    pending = _reference_first(session, slots, pending, reused_reference, log)

    def finished(index: int, result: Result) -> None:
        slots[index] = result
        if on_result:
            on_result(result)

    first = pending[:1] if pending and session.is_reference(pending[0][1]) else []
    executor.run(session, first, finished, log, progress, should_stop)  # the others read what it records
    executor.run(session, pending[len(first):], finished, log, progress, should_stop)
    if any(slot is None for slot in slots):
        log("Cancelled: the remaining methods were not run.")
    return [slot for slot in slots if slot is not None]


def _reference_first(session: Session, slots: list, pending: list[tuple[int, Choice]], reused_reference, log) -> list:
    """`pending` with the reference's run first; the reference added (a new first slot) or taken
    back from reuse when its distributions are missing and another method would use them."""
    reference = [entry for entry in pending if session.is_reference(entry[1])]
    if reference:
        return reference + [entry for entry in pending if entry not in reference]
    wanted = any(choice.method.unavailable_reason(session.device) is None for _, choice in pending)
    if not wanted or _reference_recorded(session, log):
        return pending
    name = session.reference_method()
    if reused_reference is not None:
        slots[reused_reference[0]] = None
        log(f"[{name}] measuring it again instead of reusing it: the KL columns need its next-token distributions, "
            f"which are not recorded in {session.reference_path()}.")
        return [reused_reference] + pending
    log(f"[{name}] measuring the full-precision reference first: the KL columns compare each method's next-token "
        "distributions with its, and they are not recorded yet for this model, text and protocol.")
    slots.insert(0, None)
    return [(0, methods.parse(name))] + [(index + 1, choice) for index, choice in pending]


def _reference_recorded(session: Session, log) -> bool:
    """The reference distributions are on disk and usable (an unusable file is logged and recorded again)."""
    try:
        return session.load_reference() is not None
    except WorkbenchError as exc:
        log(f"[{session.reference_method()}] {exc} Recording them again.")
        return False


# ---------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class Generation:
    method: str
    text: str = ""
    tokens_per_s: float | None = None
    error: str | None = None


def generate_with(session: Session, built: Built, prompt: str, max_new_tokens: int = 40, log=print) -> Generation:
    """Answer `prompt` greedily with a built model (chat template when the model has one): the
    GeneratePanel builds each method once and reuses it for the next prompt."""
    import torch

    label = built.choice.label
    try:
        ids = prompt_ids(session.tokenizer, prompt)
        inputs = torch.tensor([ids], device=next(built.model.parameters()).device)
        start = time.perf_counter()
        with torch.no_grad():
            out = built.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=session.tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
    except Exception as exc:
        return Generation(label, error=error_message(exc, built.choice, log))
    new = out[0, len(ids):]
    return Generation(label, session.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new) / seconds)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids for a user prompt: through the chat template for instruction-tuned models."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
