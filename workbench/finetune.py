"""QLoRA / LoRA fine-tuning on a quantized base: train, evaluate before/after, reload, merge, deploy.

Why this shape:
- The base comes from the method registry, so "QLoRA" is simply LoRA on the `bnb-nf4`
  method; any method PEFT can train on (`Method.trainable`) works the same way.
- Training goes through transformers' `Trainer`; a callback forwards each logged loss to
  the caller and honours a Stop button. There is no hand-written loop to get wrong.
- The loss is on response tokens only (labels -100 on the prompt): the model is taught
  to answer, not to repeat questions. Held-out loss is measured the same way.
- The adapter is trained against the *quantized* weights. Merging it into 4-bit weights
  re-quantizes them (PEFT warns about rounding), so the exact merge loads the base in
  full precision, attaches the adapter and merges there; the merged model then differs
  from the trained one only by the base's quantization error, which is measured.
- Merges that come out wrong are refused before any work: PEFT cannot merge into GPTQ or
  AWQ packed weights, and its merge into optimum-quanto silently drops the adapter.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import measure, methods, models
from .errors import WorkbenchError

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "finetune"
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{response}"
CONFIG_FILE = "workbench_finetune.json"
MERGED_FROM_FILE = "workbench_merged_from.json"
RELOAD_RTOL = 1e-4
"""A reloaded adapter on a freshly quantized base must give the same held-out loss: bnb's
quantization is deterministic, so only float summation order may differ."""
MERGE_RTOL = 1e-4
"""Merged vs unmerged adapter on the same fp base: W + BA computed once instead of per call."""
_SERVE_INSTEAD = "serve the base with the adapter attached, or train on a bitsandbytes base (bnb-nf4) to merge"
REFUSED_MERGES = {
    "gptq": f"PEFT cannot merge a LoRA adapter into GPTQ's packed int weights (it raises); {_SERVE_INSTEAD}",
    "awq": f"PEFT cannot merge a LoRA adapter into AWQ's packed int weights (it raises); {_SERVE_INSTEAD}",
    "quanto": "PEFT's merge into an optimum-quanto model silently drops the adapter (the held-out loss returns "
              f"to the base's, measured); {_SERVE_INSTEAD}",
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs; validated here, before any model is loaded."""

    base: str = "bnb-nf4"
    """Method the base is loaded with (`name` or `name:key=value`); bnb-nf4 = QLoRA."""
    r: int = 8
    """LoRA rank: trainable parameters grow linearly with it."""
    alpha: int = 16
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training, in [0, 1)."""
    target_modules: tuple[str, ...] | None = None
    """Layer names to adapt; None = every linear layer inside the blocks (q/k/v/o/gate/up/down for Llama)."""
    max_steps: int = 30
    """Optimizer steps."""
    learning_rate: float = 2e-4
    """Peak learning rate (linear decay to 0)."""
    batch_size: int = 4
    """Examples per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step (effective batch = batch_size * grad_accum)."""
    max_seq_len: int = 128
    """Tokens per example, prompt included; longer examples are cut."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less activation memory, one extra forward per step."""
    seed: int = 0
    """Seeds LoRA initialisation, data order and dropout."""
    data_path: str | None = None
    """None = the bundled set (data/finetune); a folder with train.jsonl [heldout.jsonl, prompts.json];
    or one .jsonl/.csv file with instruction/response columns (its last 10% is held out)."""
    prompt_template: str | None = None
    """None = the tokenizer's chat template, else PLAIN_TEMPLATE; a custom one needs {instruction} then {response}."""
    output_dir: str | None = None
    """Where the adapter is saved (in `adapter/`); None = a new temporary folder."""
    max_new_tokens: int = 40
    """Tokens generated for each fixed prompt before and after training."""

    def __post_init__(self):
        method, _ = methods.parse_choice(self.base)  # raises for unknown names and bad parameters
        refuse_untrainable(method)
        for name, minimum in (("r", 1), ("alpha", 1), ("max_steps", 1), ("batch_size", 1), ("grad_accum", 1),
                              ("max_seq_len", 16), ("seed", 0), ("max_new_tokens", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise WorkbenchError(f"finetune {name}: must be an integer >= {minimum}, got {value!r}.")
        if not isinstance(self.gradient_checkpointing, bool):
            raise WorkbenchError(f"finetune gradient_checkpointing: must be True or False, got {self.gradient_checkpointing!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise WorkbenchError(f"finetune dropout: must be in [0, 1), got {self.dropout!r}; 0.05 is usual.")
        if not isinstance(self.learning_rate, (int, float)) or not 0 < self.learning_rate <= 0.1:
            raise WorkbenchError(f"finetune learning_rate: must be in (0, 0.1], got {self.learning_rate!r}; LoRA usually uses 1e-4 to 1e-3.")
        if self.target_modules is not None:
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
            if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
                raise WorkbenchError(f"finetune target_modules: give layer names such as ['q_proj', 'v_proj'], or None for all; got {self.target_modules!r}.")
            object.__setattr__(self, "target_modules", targets)
        template = self.prompt_template
        if template is not None and not (template.count("{instruction}") == 1 and template.count("{response}") == 1
                                         and template.index("{instruction}") < template.index("{response}")):
            raise WorkbenchError("finetune prompt_template: must contain {instruction} once and then {response} once, "
                                 f"e.g. {PLAIN_TEMPLATE!r}; or None for the tokenizer's chat template.")
        if self.data_path is not None:
            path = Path(self.data_path).expanduser()
            if not (path.is_dir() or (path.is_file() and path.suffix in (".jsonl", ".csv"))):
                raise WorkbenchError(f"finetune data_path {self.data_path!r}: not a folder or a .jsonl/.csv file. "
                                     "Give a file with instruction and response columns, or None for the bundled set.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def refuse_untrainable(method) -> None:
    if not method.trainable:
        raise WorkbenchError(f"{method.name}: PEFT cannot train LoRA adapters on this method's weights "
                             f"(family {method.family}). Pick bnb-nf4 (QLoRA), bnb-int8, hqq, torchao-int8 or fp32 as the base.")


# ---------------------------------------------------------------------------- data

def data_folder() -> Path:
    """The bundled set, next to the package (works for editable installs; a wheel does not ship it)."""
    if not (DATA_DIR / "train.jsonl").is_file():
        raise WorkbenchError(f"fine-tuning data: the bundled set is not at {DATA_DIR} (the package was installed without the "
                             "repository's data/ folder). Give data_path=<your .jsonl/.csv>, or regenerate it with `python data/make_finetune_set.py`.")
    return DATA_DIR


def read_rows(path: Path) -> list[dict]:
    """{instruction, response} rows from a .jsonl or .csv file, with errors that name the line."""
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
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip() for k in ("instruction", "response")):
            raise WorkbenchError(f"fine-tuning data {str(path)!r}, row {number}: needs non-empty 'instruction' and 'response' fields.")
    if not rows:
        raise WorkbenchError(f"fine-tuning data {str(path)!r}: no rows.")
    return [{"instruction": r["instruction"], "response": r["response"]} for r in rows]


def load_rows(data_path: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, fixed prompts). A single file keeps its last 10% (at least 1) as held-out."""
    path = Path(data_path).expanduser() if data_path else data_folder()
    if path.is_dir():
        train = read_rows(path / "train.jsonl")
        heldout = read_rows(path / "heldout.jsonl") if (path / "heldout.jsonl").is_file() else None
    else:
        train, heldout = read_rows(path), None
    if heldout is None:
        if len(train) < 2:
            raise WorkbenchError(f"fine-tuning data {str(path)!r}: needs at least 2 rows (one is held out for evaluation).")
        cut = max(1, len(train) // 10)
        train, heldout = train[:-cut], train[-cut:]
    prompts = read_rows(path / "prompts.json") if path.is_dir() and (path / "prompts.json").is_file() else heldout[:5]
    return train, heldout, prompts


def split_example(tokenizer, template: str | None, instruction: str, response: str = "") -> tuple[str, str]:
    """(prompt text, response text incl. end-of-turn): the cut between what is scored and what is not."""
    if template is None and getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": instruction}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise WorkbenchError("finetune: this tokenizer's chat template does not put the answer after the prompt; "
                                 f"set prompt_template, e.g. {PLAIN_TEMPLATE!r}.")
        return prompt, full[len(prompt):]
    head, tail = (template or PLAIN_TEMPLATE).split("{response}")
    bos = tokenizer.bos_token if measure.expects_bos(tokenizer) is not None else ""
    return bos + head.replace("{instruction}", instruction), response + tail + (tokenizer.eos_token or "")


def encode(tokenizer, template: str | None, rows: list[dict], max_seq_len: int) -> list[dict]:
    """Token ids and labels per example; labels are -100 on the prompt so only the answer is scored.

    Prompt and answer are tokenized separately and concatenated, so the cut is exact."""
    examples = []
    for row in rows:
        prompt, answer = split_example(tokenizer, template, row["instruction"], row["response"])
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"])[:max_seq_len]
        if len(ids) > len(prompt_ids):
            examples.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids):]})
    if not examples:
        raise WorkbenchError(f"finetune max_seq_len={max_seq_len}: every prompt fills it, so no answer token is left to learn. Raise max_seq_len.")
    return examples


def collate(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    def collate_batch(batch: list[dict]) -> dict:
        import torch

        width = max(len(x["input_ids"]) for x in batch)
        pad = [width - len(x["input_ids"]) for x in batch]
        return {"input_ids": torch.tensor([x["input_ids"] + [pad_id] * n for x, n in zip(batch, pad)]),
                "attention_mask": torch.tensor([[1] * len(x["input_ids"]) + [0] * n for x, n in zip(batch, pad)]),
                "labels": torch.tensor([x["labels"] + [-100] * n for x, n in zip(batch, pad)])}
    return collate_batch


# ---------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class Evaluation:
    heldout_loss: float
    """Mean negative log-likelihood per response token of the held-out set (nats)."""
    heldout_ppl: float
    generations: tuple[str, ...]


def heldout_loss(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean loss over all response tokens (not a mean of per-batch means,
    which would weight short answers more)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    nll, count, make = 0.0, 0, collate(pad_id)
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in make(examples[start:start + batch_size]).items()}
        with torch.no_grad():  # not inference_mode: quanto's kernels fail under it
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # logits[:, t] predicts token t+1
        nll += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return nll / count


def generate(model, tokenizer, template: str | None, instructions: list[str], max_new_tokens: int) -> tuple[str, ...]:
    """Greedy answers, one prompt at a time (no padding to get wrong)."""
    import torch

    device, answers = next(model.parameters()).device, []
    for instruction in instructions:
        prompt, _ = split_example(tokenizer, template, instruction)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return tuple(answers)


def evaluate(model, tokenizer, config: FinetuneConfig, heldout: list[dict], prompts: list[dict]) -> Evaluation:
    """Held-out loss and perplexity, and greedy answers to the fixed prompts (dropout off)."""
    model.eval()
    loss = heldout_loss(model, heldout, tokenizer.pad_token_id)
    texts = ()
    if config.max_new_tokens:
        texts = generate(model, tokenizer, config.prompt_template, [p["instruction"] for p in prompts], config.max_new_tokens)
    return Evaluation(loss, math.exp(loss), texts)


# ---------------------------------------------------------------------------- model

def prepare_base(source: models.ModelSource, choice: str, device: str, gradient_checkpointing: bool = False, log=print):
    """The base model loaded through the method registry, ready for an adapter."""
    from . import data

    method, params = methods.parse_choice(choice)
    refuse_untrainable(method)
    reason = method.unavailable_reason(device)
    if reason:
        raise WorkbenchError(f"{method.name}: {reason}")
    calibration = None
    if method.needs_calibration:
        calibration = data.calibration_blocks(models.load_tokenizer(source), params["samples"], params["block_tokens"])
    workdir = Path(tempfile.mkdtemp(prefix="workbench-ft-"))
    try:
        model = method.quantize(methods.QuantizeRequest(source, params, device, workdir, calibration, log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # loaded weights stay readable (open files on POSIX)
    if method.family == "bitsandbytes":
        from peft import prepare_model_for_kbit_training

        # Casts norms/embeddings to fp32 and makes inputs require grads for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def block_linear_names(model) -> tuple[str, ...]:
    """Short names of the linear layers inside the blocks (lm_head excluded): LoRA's default targets.

    Detected by `in_features`, so quantized linears (bnb, GPTQ, HQQ) count too; PEFT's
    wrappers (`base_layer`, `lora_A`...) are skipped, so it also works on an adapted model."""
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p == "base_layer" or p.startswith("lora_") for p in parts):  # PEFT's own sub-layers
            continue
        if isinstance(getattr(module, "in_features", None), int) and len(parts) > 1 and parts[-1] != "lm_head":
            names.add(parts[-1])
    return tuple(sorted(names))


def attach_lora(model, config: FinetuneConfig):
    """Wrap the base with fresh LoRA adapters; only these are trainable."""
    import torch
    from peft import LoraConfig, get_peft_model

    available = block_linear_names(model)
    targets = config.target_modules or available
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise WorkbenchError(f"finetune target_modules: {', '.join(unknown)} not found in this model; its block layers are {', '.join(available)}.")
    torch.manual_seed(config.seed)  # LoRA's A matrices are initialised at random
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(targets),
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; bnb 4-bit packs two weights per stored byte, PEFT counts them right."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- training

def _callback(on_loss, should_stop, losses: list, stopped: list):
    from transformers import TrainerCallback

    class ForwardLosses(TrainerCallback):
        """Each logged training loss goes to `on_loss(step, loss)`; `should_stop()` ends training after a step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))
                on_loss(state.global_step, float(logs["loss"]))

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop():
                stopped.append(state.global_step)
                control.should_training_stop = True

    return ForwardLosses()


def _checkpointing_args(arguments_class, enabled: bool) -> dict:
    """Gradient checkpointing settings under whichever name this transformers uses
    (5.23 renamed them `activation_checkpointing*`; Colab's 5.15 may predate that)."""
    if not enabled:
        return {}
    name = "activation_checkpointing" if "activation_checkpointing" in arguments_class.__dataclass_fields__ else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def train(model, tokenizer, examples: list[dict], config: FinetuneConfig, device: str,
          on_loss: Callable[[int, float], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> tuple[list[tuple[int, float]], bool]:
    """Train the adapters with `Trainer`; returns the (step, loss) log and whether Stop ended it early."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    scratch = Path(tempfile.mkdtemp(prefix="workbench-trainer-"))
    cuda = device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(scratch), max_steps=config.max_steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        **_checkpointing_args(TrainingArguments, config.gradient_checkpointing), seed=config.seed, data_seed=config.seed,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",  # paged 8-bit Adam needs CUDA
        bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=False,
    )
    losses, stopped = [], []
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate(tokenizer.pad_token_id),
                      callbacks=[_callback(on_loss or (lambda step, loss: None), should_stop or (lambda: False), losses, stopped)])
    trainer.remove_callback(PrinterCallback)  # losses go to on_loss; keep stdout clean for the CLI
    try:
        trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        model.eval()
    return losses, bool(stopped)


@dataclass(frozen=True)
class FinetuneReport:
    """What a run did and what it changed: the record a panel, notebook or test reads."""

    model: str
    base: str
    config: dict
    losses: tuple[tuple[int, float], ...]
    """(optimizer step, training loss) as logged every step."""
    steps: int
    stopped_early: bool
    heldout_loss_before: float
    heldout_loss_after: float
    heldout_ppl_before: float
    heldout_ppl_after: float
    prompts: tuple[str, ...]
    references: tuple[str, ...]
    generations_before: tuple[str, ...]
    generations_after: tuple[str, ...]
    trainable_params: int
    total_params: int
    train_s: float
    s_per_step: float
    peak_bytes: int
    peak_kind: str
    adapter_dir: str


@dataclass
class Finetuned:
    report: FinetuneReport
    model: object
    tokenizer: object


def finetune(source: models.ModelSource, config: FinetuneConfig, device: str = "cpu",
             on_loss: Callable[[int, float], None] | None = None, should_stop: Callable[[], bool] | None = None,
             log: Callable[[str], None] = print) -> Finetuned:
    """Load the base, attach LoRA, evaluate, train, evaluate again, save the adapter."""
    tokenizer = models.load_tokenizer(source)
    train_rows, heldout_rows, prompts = load_rows(config.data_path)
    train_set = encode(tokenizer, config.prompt_template, train_rows, config.max_seq_len)
    heldout = encode(tokenizer, config.prompt_template, heldout_rows, config.max_seq_len)
    model = attach_lora(prepare_base(source, config.base, device, config.gradient_checkpointing, log), config)
    log(f"[finetune] {config.base} + LoRA r={config.r}: {parameter_counts(model)[0]:,} trainable parameters; evaluating before training...")
    before = evaluate(model, tokenizer, config, heldout, prompts)
    with measure.PeakMemory(device) as peak:
        start = time.perf_counter()
        losses, stopped = train(model, tokenizer, train_set, config, device, on_loss, should_stop)
        train_s = time.perf_counter() - start
    after = evaluate(model, tokenizer, config, heldout, prompts)
    log(f"[finetune] held-out loss {before.heldout_loss:.3f} -> {after.heldout_loss:.3f} in {train_s:.0f} s")
    adapter_dir = save_adapter(model, config)
    steps = losses[-1][0] if losses else 0
    report = FinetuneReport(
        source.label, config.base, config.to_dict(), tuple(losses), steps, stopped, before.heldout_loss, after.heldout_loss,
        before.heldout_ppl, after.heldout_ppl, tuple(p["instruction"] for p in prompts), tuple(p["response"] for p in prompts),
        before.generations, after.generations, *parameter_counts(model), train_s, train_s / max(steps, 1),
        peak.peak_bytes, peak.kind, str(adapter_dir))
    return Finetuned(report, model, tokenizer)


# ---------------------------------------------------------------------------- save, reload, merge

def save_adapter(model, config: FinetuneConfig) -> Path:
    """Adapter weights plus the config that made them (reload and merge read it back)."""
    root = Path(config.output_dir).expanduser() if config.output_dir else Path(tempfile.mkdtemp(prefix="workbench-finetune-"))
    folder = root / "adapter"
    model.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
    return folder


def saved_config(adapter_dir) -> FinetuneConfig:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise WorkbenchError(f"adapter {str(adapter_dir)!r}: no {CONFIG_FILE}; give the folder `finetune` saved (…/adapter).")
    return FinetuneConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _heldout_for(source, config: FinetuneConfig):
    tokenizer = models.load_tokenizer(source)
    return tokenizer, encode(tokenizer, config.prompt_template, load_rows(config.data_path)[1], config.max_seq_len)


def load_adapter_model(source, adapter_dir, device: str = "cpu", log=print):
    """A freshly prepared base with the saved adapter attached (frozen, for evaluation/serving)."""
    from peft import PeftModel

    config = saved_config(adapter_dir)
    base = prepare_base(source, config.base, device, log=log)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def reload_adapter(source, adapter_dir, device: str = "cpu", expected_loss: float | None = None, log=print):
    """(model, held-out loss) after reloading; raises when it differs from `expected_loss` by more than RELOAD_RTOL."""
    model = load_adapter_model(source, adapter_dir, device, log)
    tokenizer, heldout = _heldout_for(source, saved_config(adapter_dir))
    loss = heldout_loss(model, heldout, tokenizer.pad_token_id)
    if expected_loss is not None and abs(loss - expected_loss) > RELOAD_RTOL * abs(expected_loss):
        raise WorkbenchError(f"adapter {str(adapter_dir)!r}: reloaded held-out loss {loss:.6f} differs from the trained {expected_loss:.6f}; the adapter did not round-trip.")
    return model, loss


def merge_refusal(choice: str) -> str | None:
    """Why an adapter trained on this base cannot be merged (None when it can)."""
    method, _ = methods.parse_choice(choice)
    reason = REFUSED_MERGES.get(method.family)
    return f"cannot merge an adapter trained on {method.name}: {reason}." if reason else None


@dataclass(frozen=True)
class MergeReport:
    """Held-out losses around the exact merge (nats per response token)."""

    adapter_loss: float
    """Quantized base + adapter: the model that was trained."""
    base_gap: float
    """|fp base - quantized base| without the adapter: the quantization error on this data."""
    unmerged_loss: float
    """fp base + adapter, not merged."""
    merged_loss: float
    difference: float
    """|merged - adapter_loss|: what merging into full precision changes for the user."""
    tolerance: float
    within_tolerance: bool
    merged_dir: str


def merge_tolerance(base_gap: float) -> float:
    """Allowed |merged - trained| held-out loss difference: 2 x the base's quantization gap + 0.02 nats.

    The adapter learned its update against the 4-bit weights; on the fp weights the same
    update meets W_fp instead of W_q, so the loss moves by about the base's own quantization
    error (its gap without adapter), which can partly cancel or add to what the adapter
    learned: hence the factor 2. The 0.02 nats cover bases whose gap is ~0 (8-bit, fp).
    Measured on SmolLM2-135M, nf4, bundled set (2 CPU cores): 10 steps, 40 held-out examples:
    trained 2.0059, merged fp 2.0216 (difference 0.016), gap 0.131, tolerance 0.281;
    8 steps, 16 examples: 2.0568 vs 2.0510 (0.006), gap 0.125. A merge that lost the adapter
    would land near the fp base's loss (2.448 there, 0.44 away) and fail the check; the merge
    arithmetic itself is checked much tighter (merged vs unmerged fp model, MERGE_RTOL)."""
    return 2 * base_gap + 0.02


def merge_to_dequantized(source, adapter_dir, out_dir=None, device: str = "cpu", trained=None, log=print) -> MergeReport:
    """Exact merge: fp base + adapter, `merge_and_unload`, checked on held-out loss, saved in fp16.

    `trained` is the quantized base + this adapter already in memory (from `finetune` or
    `reload_adapter`; not checked to match `adapter_dir`); None loads it again. Raises when merged and unmerged fp models disagree
    (a broken merge; nothing is saved); a gap to the trained model above `merge_tolerance`
    is logged and reported in `within_tolerance`, with both numbers."""
    import torch
    from peft import PeftModel

    config = saved_config(adapter_dir)
    refusal = merge_refusal(config.base)
    if refusal:
        raise WorkbenchError(refusal)
    tokenizer, heldout = _heldout_for(source, config)
    loss = lambda model: heldout_loss(model, heldout, tokenizer.pad_token_id)  # noqa: E731
    quantized = trained if trained is not None else load_adapter_model(source, adapter_dir, device, log)
    adapter_loss = loss(quantized.eval())
    with quantized.disable_adapter():
        quantized_base = loss(quantized)
    del quantized, trained
    full = PeftModel.from_pretrained(models.load_model(source, device, dtype=torch.float32), str(adapter_dir)).eval()
    unmerged = loss(full)
    with full.disable_adapter():
        fp_base = loss(full)
    merged = full.merge_and_unload()
    merged_loss = loss(merged)
    if abs(merged_loss - unmerged) > MERGE_RTOL * abs(unmerged):
        raise WorkbenchError(f"merge: held-out loss {merged_loss:.6f} after merge_and_unload but {unmerged:.6f} before; the merge is wrong, nothing was saved.")
    gap, difference = abs(fp_base - quantized_base), abs(merged_loss - adapter_loss)
    tolerance = merge_tolerance(gap)
    if difference > tolerance:
        log(f"[merge] warning: merged fp loss {merged_loss:.4f} vs trained {adapter_loss:.4f} differs by more than {tolerance:.4f} "
            f"(the base's own quantization gap is {gap:.4f}); compare both before deploying the merge.")
    out = Path(out_dir).expanduser() if out_dir else Path(adapter_dir).parent / "merged-fp16"
    merged.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MERGED_FROM_FILE).write_text(json.dumps({"adapter_dir": str(Path(adapter_dir).resolve()), "base": config.base}), encoding="utf-8")
    log(f"[merge] held-out loss: {config.base}+adapter {adapter_loss:.4f}, merged fp {merged_loss:.4f} (base gap {gap:.4f}); saved fp16 to {out}")
    return MergeReport(adapter_loss, gap, unmerged, merged_loss, difference, tolerance, difference <= tolerance, str(out))


# ---------------------------------------------------------------------------- deploy

def deploy_compare(session, merged_folder, methods: tuple[str, ...] = ("gptq",), adapter_dir=None, log=print) -> list:
    """Results for the trained model (quantized base + adapter) and the merged model quantized by
    each method, measured under the session's protocol: `results.format_table(...)` shows them."""
    from . import runner
    from .config import ModelSpec

    merged_folder = Path(merged_folder)
    if adapter_dir is None:
        adapter_dir = json.loads((merged_folder / MERGED_FROM_FILE).read_text(encoding="utf-8"))["adapter_dir"]
    merged = runner.Session.open(ModelSpec(str(merged_folder), device=session.device), session.eval, log)
    rows = [adapter_result(session, adapter_dir, log)]
    for choice in methods:  # (shadows the module name here only)
        result = runner.run_method(merged, choice, log)
        rows.append(replace(result, method=f"merged {result.method}"))
    return rows


def adapter_result(session, adapter_dir, log=print):
    """A `Result` for the quantized base + adapter, measured like `runner.measure_method` measures."""
    from . import runner
    from .results import Result

    method, params = methods.parse_choice(saved_config(adapter_dir).base)
    with measure.PeakMemory(session.device) as peak:
        start = time.perf_counter()
        model = load_adapter_model(session.source, adapter_dir, session.device, log)
        load_s, start = time.perf_counter() - start, time.perf_counter()
        ppl = measure.perplexity(model, session.eval_ids, session.eval.max_length, session.eval.stride,
                                 session.eval.batch_size, session.bos_id)
        eval_s = time.perf_counter() - start
        speed = None
        if session.eval.decode_tokens:
            prompt = session.tokenizer(runner.SPEED_PROMPT, add_special_tokens=True)["input_ids"]
            speed = measure.decode_speed(model, prompt, session.eval.decode_tokens, session.tokenizer.pad_token_id)
    return Result(
        model=session.source.label, method=f"{methods.label(method, params)}+lora", family=method.family,
        bits=method.bits_for(params), params=params, device=session.device, ppl=ppl.ppl,
        weight_bytes=measure.weight_bytes(model), bits_per_weight=measure.linear_bits_per_weight(model),
        peak_bytes=peak.peak_bytes, peak_kind=peak.kind, load_s=load_s, eval_s=eval_s,
        prefill_ms=speed.prefill_ms if speed else None, decode_tokens_per_s=speed.decode_tokens_per_s if speed else None,
        kernel=f"{method.kernel}+lora: {measure.kernel_name(model)}",
        protocol={**session.planned_protocol(), **ppl.protocol(session.eval_text.name)},
        environment=runner.environment(session.device, method), model_note=session.source.note,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
