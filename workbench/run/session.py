"""A comparison's session: what every method in it shares (model source, tokenizer, evaluation
tokens, protocol, the full-precision reference), and the environment a result records.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from workbench import methods
from workbench.core.config import EvalConfig, ModelSpec
from workbench.core.errors import WorkbenchError
from workbench.methods import Choice
from workbench.metrics import divergence, perplexity, tasks
from workbench.sources import data, models, remote_code

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
        session = cls.from_source(source, spec.resolved_device(), eval_cfg, log)
        models.empty_model(
            source
        )  # a config transformers reads but cannot build a model from: refused here, not per method
        return session

    @classmethod
    def from_source(
        cls, source: models.ModelSource, device: str, eval_cfg: EvalConfig = EvalConfig(), log: Callable | None = None
    ) -> "Session":
        """Check the model runs no code it ships unless trusted and is a causal LM that takes the
        protocol's windows, then tokenize the text (`log` is told how much of a text file is used)."""
        remote_code.check(source)  # again: a source built by hand (fine-tuning, workers) skips `resolve`
        config = models.check_causal_lm(source)
        context = models.context_length(config)
        if context is not None and eval_cfg.max_length > context:
            raise WorkbenchError(
                f"max_length: {eval_cfg.max_length} tokens per window is beyond {source.label}'s context of "
                f"{context} tokens; use --max-length {context} or less."
            )
        tokenizer = models.load_tokenizer(source)
        text = data.builtin_eval_text()
        if eval_cfg.text_path:
            keep = data.chars_to_keep(eval_cfg.max_tokens, eval_cfg.allow_long)
            text = data.read_text_file(eval_cfg.text_path, keep)
        data.check_eval_length(tokenizer, text, eval_cfg.max_tokens, eval_cfg.allow_long)
        if not eval_cfg.max_tokens and not text.whole:  # all of it, and the check found it short enough
            text = data.read_text_file(eval_cfg.text_path)
        ids = data.eval_tokens(tokenizer, text, eval_cfg.max_tokens)
        if eval_cfg.text_path and log:
            log(
                f"eval text {text.name}: {len(ids):,} tokens scored, taken from the start of its "
                f"{text.total_chars:,} characters"
            )
        return cls(
            source,
            device,
            tokenizer,
            text,
            ids,
            perplexity.expects_bos(tokenizer),
            eval_cfg,
            models.fingerprint(source),
            text.sha,
        )

    def planned_protocol(self) -> dict:
        """Every setting that changes a measured number; results are reused only when all match."""
        _, step = perplexity.windows(
            len(self.eval_ids), self.eval.max_length, self.eval.stride, self.bos_id is not None
        )
        return {
            "text": self.eval_text.name,
            "text_sha": self.text_sha,
            "eval_tokens": len(self.eval_ids),
            "max_length": self.eval.max_length,
            "stride": step,
            "bos": self.bos_id is not None,
            "batch_size": self.eval.batch_for(self.device),
            "decode_tokens": self.eval.decode_tokens,
            "warm_up_tokens": len(self.speed_prompt()),
            **({"tasks": tasks.protocol(self.eval.tasks)} if self.eval.tasks else {}),
        }

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
        return {
            "format": divergence.FORMAT,
            "top_k": divergence.TOP_K,
            "tail_samples": divergence.TAIL_SAMPLES,
            "reference": self.reference_method(),
            "model": self.fingerprint,
            "device": self.device,
            "tokens_sha": tokens,
            **{name: protocol[name] for name in ("text_sha", "eval_tokens", "max_length", "stride", "bos")},
        }

    def reference_path(self) -> Path:
        return divergence.cache_path(self.reference_key())

    def load_reference(self) -> divergence.Reference | None:
        """The recorded reference distributions; None when not recorded; WorkbenchError when unusable."""
        return divergence.Reference.load(self.reference_path(), self.reference_key())


def environment(device: str, method: methods.Method | None) -> dict:
    import torch

    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    env = {
        "device_name": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "seed": SEED,
    }
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
