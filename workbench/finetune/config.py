"""What a fine-tuning run is asked to do: one frozen, validated config, checked before any model is loaded.

The same dataclass is used by the panels, notebooks, tests and the adapter folder (saved
next to the weights as CONFIG_FILE, so reload and merge rebuild the very same base).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from workbench import methods
from workbench.core.errors import WorkbenchError

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{response}"
CONFIG_FILE = "workbench_finetune.json"
"""The config that trained an adapter, saved in its folder."""


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
    """None = the bundled set (workbench/datasets/finetune); a folder with train.jsonl [heldout.jsonl, prompts.json];
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
        for name, minimum in (
            ("r", 1),
            ("alpha", 1),
            ("max_steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("max_seq_len", 16),
            ("seed", 0),
            ("max_new_tokens", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise WorkbenchError(f"finetune {name}: must be an integer >= {minimum}, got {value!r}.")
        if not isinstance(self.gradient_checkpointing, bool):
            raise WorkbenchError(
                f"finetune gradient_checkpointing: must be True or False, got {self.gradient_checkpointing!r}."
            )
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise WorkbenchError(f"finetune dropout: must be in [0, 1), got {self.dropout!r}; 0.05 is usual.")
        if not isinstance(self.learning_rate, (int, float)) or not 0 < self.learning_rate <= 0.1:
            raise WorkbenchError(
                f"finetune learning_rate: must be in (0, 0.1], got {self.learning_rate!r}; LoRA usually uses 1e-4 to 1e-3."
            )
        if self.target_modules is not None:
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
            if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
                raise WorkbenchError(
                    f"finetune target_modules: give layer names such as ['q_proj', 'v_proj'], or None for all; got {self.target_modules!r}."
                )
            object.__setattr__(self, "target_modules", targets)
        template = self.prompt_template
        if template is not None and not (
            template.count("{instruction}") == 1
            and template.count("{response}") == 1
            and template.index("{instruction}") < template.index("{response}")
        ):
            raise WorkbenchError(
                "finetune prompt_template: must contain {instruction} once and then {response} once, "
                f"e.g. {PLAIN_TEMPLATE!r}; or None for the tokenizer's chat template."
            )
        if self.data_path is not None:
            path = Path(self.data_path).expanduser()
            if not (path.is_dir() or (path.is_file() and path.suffix in (".jsonl", ".csv"))):
                raise WorkbenchError(
                    f"finetune data_path {self.data_path!r}: not a folder or a .jsonl/.csv file. "
                    "Give a file with instruction and response columns, or None for the bundled set."
                )
            if path.is_dir() and not (path / "train.jsonl").is_file():
                raise WorkbenchError(
                    f"finetune data_path {self.data_path!r}: the folder has no train.jsonl. A data folder holds "
                    "train.jsonl (and optionally heldout.jsonl, prompts.json); or give one .jsonl/.csv file."
                )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def refuse_untrainable(method) -> None:
    if not method.trainable:
        raise WorkbenchError(
            f"{method.name}: PEFT cannot train LoRA adapters on this method's weights "
            f"(family {method.family}). Pick bnb-nf4 (QLoRA), bnb-int8, hqq, torchao-int8 or fp32 as the base."
        )
