"""Answers from a built model: the GeneratePanel builds each method once and asks it prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass

from workbench.run.runner import Built, error_message
from workbench.run.session import Session


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
            out = built.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=session.tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - start
    except Exception as exc:
        return Generation(label, error=error_message(exc, built.choice, log))
    new = out[0, len(ids) :]
    return Generation(label, session.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new) / seconds)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids for a user prompt: through the chat template for instruction-tuned models."""
    if getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
    return tokenizer(prompt)["input_ids"]
