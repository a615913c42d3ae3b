"""Turning {instruction, response} rows into what the model sees: token ids, labels, batches.

The loss is on response tokens only (labels -100 on the prompt): the model is taught to
answer, not to repeat questions. Prompt and answer are tokenized separately and
concatenated, so the cut between scored and unscored tokens is exact. Reading the rows
from files is `workbench.sources.data`'s job, not this module's.
"""

from __future__ import annotations

from typing import Callable

from workbench.core.errors import WorkbenchError
from workbench.finetune.config import PLAIN_TEMPLATE
from workbench.metrics import perplexity


def split_example(tokenizer, template: str | None, instruction: str, response: str = "") -> tuple[str, str]:
    """(prompt text, response text incl. end-of-turn): the cut between what is scored and what is not."""
    if template is None and getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": instruction}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise WorkbenchError(
                "finetune: this tokenizer's chat template does not put the answer after the prompt; "
                f"set prompt_template, e.g. {PLAIN_TEMPLATE!r}."
            )
        return prompt, full[len(prompt) :]
    head, tail = (template or PLAIN_TEMPLATE).split("{response}")
    bos = tokenizer.bos_token if perplexity.expects_bos(tokenizer) is not None else ""
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
            examples.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids) :]})
    if not examples:
        raise WorkbenchError(
            f"finetune max_seq_len={max_seq_len}: every prompt fills it, so no answer token is left to learn. Raise max_seq_len."
        )
    return examples


def collate(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""

    def collate_batch(batch: list[dict]) -> dict:
        import torch

        width = max(len(x["input_ids"]) for x in batch)
        pad = [width - len(x["input_ids"]) for x in batch]
        return {
            "input_ids": torch.tensor([x["input_ids"] + [pad_id] * n for x, n in zip(batch, pad)]),
            "attention_mask": torch.tensor([[1] * len(x["input_ids"]) + [0] * n for x, n in zip(batch, pad)]),
            "labels": torch.tensor([x["labels"] + [-100] * n for x, n in zip(batch, pad)]),
        }

    return collate_batch
