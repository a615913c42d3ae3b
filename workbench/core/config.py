"""Typed settings shared by every surface (CLI, panels, notebooks, tests).

Each dataclass validates itself in `__post_init__`, so a bad value is reported where
it is typed, with the field's name, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.core.errors import WorkbenchError


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and where to run it."""

    name: str = "smollm2-135m"
    """Short name (`smollm2-135m`, alias `bundled`), hub id, local folder or `.gguf` file."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu` or `cuda`."""
    token: str | None = field(default=None, repr=False, compare=False)
    """Hugging Face token for gated models. Never printed, logged or stored."""
    trust_remote_code: bool = False
    """Allow Python code shipped with the model (its config's `auto_map`) to run; off: such a model is refused."""

    def __post_init__(self):
        if not isinstance(self.trust_remote_code, bool):
            raise WorkbenchError(f"trust_remote_code: must be True or False, got {self.trust_remote_code!r}.")
        if not self.name or not self.name.strip():
            raise WorkbenchError(
                "model: empty name. Give a short name (e.g. 'bundled'), a hub id, a folder or a .gguf file."
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise WorkbenchError(f"device: {self.device!r} is not one of auto, cpu, cuda.")

    def resolved_device(self) -> str:
        """The device the work will actually run on."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise WorkbenchError(
                "device: 'cuda' was asked for but no CUDA GPU is visible. Use --device cpu, or in Colab: Runtime -> Change runtime type -> GPU."
            )
        return self.device


@dataclass(frozen=True)
class TaskSpec:
    """A task to measure accuracy on (`workbench.metrics.tasks`): an lm-eval task name, an offline
    task of the workbench, or a user's file."""

    name: str
    limit: int | None = None
    """At most this many documents (lm-eval's `limit`); None = all."""
    num_fewshot: int | None = None
    """Examples in the prompt; None = the task's own default."""
    path: str | None = None
    """The user's task file (`--tasks-file`), absolute."""


@dataclass(frozen=True)
class EvalConfig:
    """How perplexity is measured. The values travel with every result as its protocol."""

    max_length: int = 512
    """Tokens per window, BOS included when the model expects one."""
    stride: int = 512
    """Tokens the window moves each step; `stride == max_length` means no overlap."""
    max_tokens: int = 4096
    """Evaluate on at most this many tokens from the start of the evaluation text (0 = all)."""
    batch_size: int | None = None
    """Windows per forward pass; None: chosen for the device (`auto_batch_size`)."""
    text_path: str | None = None
    """A UTF-8 text file to evaluate on; None = the built-in offline text (pydoc topics)."""
    decode_tokens: int = 32
    """New tokens generated to measure decode throughput (0 = skip the speed measurement; else at least 8)."""
    allow_long: bool = False
    """Measure an evaluation of more than `data.LONG_EVAL_TOKENS` tokens (refused by default: hours per method)."""
    tasks: tuple[TaskSpec, ...] = ()
    """Tasks whose accuracy is measured after perplexity, through lm-eval (`workbench.metrics.tasks`)."""

    def __post_init__(self):
        for name in ("max_length", "stride", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise WorkbenchError(f"{name}: must be a positive integer, got {getattr(self, name)}.")
        if self.max_length < 8:
            raise WorkbenchError(f"max_length: {self.max_length} is too short to measure perplexity; use 128 or more.")
        if self.stride > self.max_length:
            raise WorkbenchError(
                f"stride: {self.stride} is larger than max_length {self.max_length}; tokens would be skipped. Use stride <= max_length."
            )
        if self.max_tokens < 0 or self.decode_tokens < 0:
            raise WorkbenchError("max_tokens and decode_tokens must be 0 or more.")
        if 0 < self.decode_tokens < 8:
            raise WorkbenchError(
                f"decode_tokens: {self.decode_tokens} new tokens are too few to time (timer noise dominates); "
                "use 8 or more, or 0 to skip the speed measurement."
            )

    def batch_for(self, device: str) -> int:
        return self.batch_size or auto_batch_size(device)

    def protocol(self) -> dict:
        return {"max_length": self.max_length, "stride": self.stride}


def auto_batch_size(device: str) -> int:
    """Windows per forward pass when none is asked for. CPU: 4, since batching a few windows is
    faster than one at a time (larger matrix products use the cores better) and more gains
    little; the logits are computed in 64 MB chunks, so a larger batch costs activations
    only. CUDA: 16, since a GPU needs many rows in flight to be busy and 16 windows of 512
    tokens hold well under 1 GB of activations for models of a few billion parameters."""
    return 16 if device == "cuda" else 4
