"""Training LoRA adapters on a quantized base (QLoRA on bnb-nf4), evaluated before and after.

Why this shape:
- The base comes from the method registry, so "QLoRA" is simply LoRA on the `bnb-nf4`
  method; any method PEFT can train on (`Method.trainable`) works the same way.
- Training goes through transformers' `Trainer`; a callback forwards each logged loss to
  the caller and honours a Stop button. There is no hand-written loop to get wrong.
- Held-out loss is measured on response tokens only, as the training loss is, with the
  project's one NLL kernel (`perplexity.model_nll_sum`).
- The adapter is saved with the config that trained it, so reload and merge (merge.py)
  rebuild the very same base.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workbench import methods
from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.finetune.config import CONFIG_FILE, FinetuneConfig, refuse_untrainable
from workbench.finetune.data import collate, encode, split_example
from workbench.metrics import memory, perplexity
from workbench.sources import data as texts
from workbench.sources import models, remote_code


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

    device = next(model.parameters()).device
    nll, count, make = 0.0, 0, collate(pad_id)
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in make(examples[start : start + batch_size]).items()}
        with torch.no_grad():  # not inference_mode: quanto's kernels fail under it
            batch_nll, batch_count = perplexity.model_nll_sum(
                model, batch["input_ids"], batch["labels"], batch["attention_mask"]
            )
        nll, count = nll + batch_nll, count + batch_count
    return nll / count


def generate(model, tokenizer, template: str | None, instructions: list[str], max_new_tokens: int) -> tuple[str, ...]:
    """Greedy answers, one prompt at a time (no padding to get wrong)."""
    import torch

    device, answers = next(model.parameters()).device, []
    for instruction in instructions:
        prompt, _ = split_example(tokenizer, template, instruction)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return tuple(answers)


def evaluate(model, tokenizer, config: FinetuneConfig, heldout: list[dict], prompts: list[dict]) -> Evaluation:
    """Held-out loss and perplexity, and greedy answers to the fixed prompts (dropout off)."""
    model.eval()
    loss = heldout_loss(model, heldout, tokenizer.pad_token_id)
    texts = ()
    if config.max_new_tokens:
        texts = generate(
            model, tokenizer, config.prompt_template, [p["instruction"] for p in prompts], config.max_new_tokens
        )
    return Evaluation(loss, math.exp(loss), texts)


# ---------------------------------------------------------------------------- model


def prepare_base(source: models.ModelSource, choice: str, device: str, gradient_checkpointing: bool = False, log=print):
    """The base built by the runner (`runner.build`, as for any measurement), then prepared for
    an adapter by its method (bitsandbytes: PEFT's k-bit preparation and the CPU repacking guard,
    before anything evaluates it)."""
    from workbench.run import runner

    method, _ = methods.parse_choice(choice)
    refuse_untrainable(method)
    built = runner.build(runner.Session.from_source(source, device), choice, log)
    shutil.rmtree(built.workdir, ignore_errors=True)  # loaded weights stay readable (open files on POSIX)
    return method.prepare_for_training(built.model, gradient_checkpointing)


def block_linear_names(model) -> tuple[str, ...]:
    """Short names of the block linear layers (`models.block_linears`): LoRA's default targets."""
    return tuple(sorted({name.rsplit(".", 1)[-1] for name, _ in models.block_linears(model)}))


def attach_lora(model, config: FinetuneConfig):
    """Wrap the base with fresh LoRA adapters; only these are trainable."""
    import torch
    from peft import LoraConfig, get_peft_model

    available = block_linear_names(model)
    targets = config.target_modules or available
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise WorkbenchError(
            f"finetune target_modules: {', '.join(unknown)} not found in this model; its block layers are {', '.join(available)}."
        )
    torch.manual_seed(config.seed)  # LoRA's A matrices are initialised at random
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
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
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in arguments_class.__dataclass_fields__
        else "gradient_checkpointing"
    )
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def train(
    model,
    tokenizer,
    examples: list[dict],
    config: FinetuneConfig,
    device: str,
    on_loss: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[tuple[int, float]], bool]:
    """Train the adapters with `Trainer`; returns the (step, loss) log and whether Stop ended it early."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    scratch = Path(tempfile.mkdtemp(prefix="workbench-trainer-"))
    cuda = device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(scratch),
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        **_checkpointing_args(TrainingArguments, config.gradient_checkpointing),
        seed=config.seed,
        data_seed=config.seed,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",  # paged 8-bit Adam needs CUDA
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    losses, stopped = [], []
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=collate(tokenizer.pad_token_id),
        callbacks=[_callback(on_loss or (lambda step, loss: None), should_stop or (lambda: False), losses, stopped)],
    )
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


def finetune(
    source: models.ModelSource,
    config: FinetuneConfig,
    device: str = "cpu",
    on_loss: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] = print,
) -> Finetuned:
    """Load the base, attach LoRA, evaluate, train, evaluate again, save the adapter."""
    remote_code.check(source)  # before the tokenizer: no code shipped with the model runs unless trusted
    if config.output_dir:  # found now, not after training with the adapter lost
        files.check_writable(Path(config.output_dir).expanduser(), f"finetune output_dir {config.output_dir!r}")
    tokenizer = models.load_tokenizer(source)
    train_rows, heldout_rows, prompts = texts.load_rows(config.data_path)
    train_set = encode(tokenizer, config.prompt_template, train_rows, config.max_seq_len)
    heldout = encode(tokenizer, config.prompt_template, heldout_rows, config.max_seq_len)
    model = attach_lora(prepare_base(source, config.base, device, config.gradient_checkpointing, log), config)
    log(
        f"[finetune] {config.base} + LoRA r={config.r}: {parameter_counts(model)[0]:,} trainable parameters; evaluating before training..."
    )
    before = evaluate(model, tokenizer, config, heldout, prompts)
    with memory.PeakMemory(device) as peak:
        start = time.perf_counter()
        losses, stopped = train(model, tokenizer, train_set, config, device, on_loss, should_stop)
        train_s = time.perf_counter() - start
    after = evaluate(model, tokenizer, config, heldout, prompts)
    log(f"[finetune] held-out loss {before.heldout_loss:.3f} -> {after.heldout_loss:.3f} in {train_s:.0f} s")
    adapter_dir = save_adapter(model, config)
    steps = losses[-1][0] if losses else 0
    report = FinetuneReport(
        source.label,
        config.base,
        config.to_dict(),
        tuple(losses),
        steps,
        stopped,
        before.heldout_loss,
        after.heldout_loss,
        before.heldout_ppl,
        after.heldout_ppl,
        tuple(p["instruction"] for p in prompts),
        tuple(p["response"] for p in prompts),
        before.generations,
        after.generations,
        *parameter_counts(model),
        train_s,
        train_s / max(steps, 1),
        peak.peak_bytes,
        peak.kind,
        str(adapter_dir),
    )
    return Finetuned(report, model, tokenizer)


def save_adapter(model, config: FinetuneConfig) -> Path:
    """Adapter weights plus the config that made them (reload and merge read it back)."""
    root = (
        Path(config.output_dir).expanduser()
        if config.output_dir
        else Path(tempfile.mkdtemp(prefix="workbench-finetune-"))
    )
    folder = root / "adapter"
    try:
        model.save_pretrained(folder)
    except OSError as exc:
        raise files.write_error(folder, exc, "cannot save the adapter") from None
    files.write_text(folder / CONFIG_FILE, json.dumps(config.to_dict(), indent=2))
    return folder
