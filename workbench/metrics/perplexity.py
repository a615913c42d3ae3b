"""Perplexity: the exponential of the mean negative log-likelihood per scored token.

The sliding-window recipe in the transformers docs counts tokens wrongly (one per window
after the first) and leaves models that expect a BOS token without one; here every
token is scored exactly once, a BOS is put at each window start when the tokenizer adds
one, and the protocol (text, window, step, tokens scored) travels with the number,
because perplexities measured under different protocols are not comparable.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass
from typing import Callable

from workbench.core.errors import WorkbenchError

LOGITS_CHUNK_ELEMENTS = 2**24
"""Logits computed at once when scoring (64 MB in fp32): the full batch's logits (4 x 512 x 49,152 fp32
= 400 MB, and as much again for their log-softmax) would dominate the peak memory of every method.
Not smaller: the output head then runs as many small matrix products, which use a CPU's cores
less well than a few large ones, and scoring gets markedly slower."""


def nll_sum(logits, labels, divergence=None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of tokens scored, from full logits.

    `logits[:, t]` predicts token `t + 1`, so both are shifted; positions labelled -100 are
    not scored; log-probabilities are taken in fp32 whatever the model's dtype. `divergence`
    (a `divergence.Divergence`) also gets each scored position's log-probabilities."""
    targets = labels[:, 1:]
    scored = targets != -100
    return _score_rows(logits[:, :-1][scored], targets[scored], divergence)


def model_nll_sum(model, input_ids, labels, attention_mask=None, divergence=None) -> tuple[float, int]:
    """`nll_sum` of the model's logits on `input_ids`, without holding the whole batch's logits:
    the output head runs on the scored positions only, LOGITS_CHUNK_ELEMENTS logits at a time.
    The one scoring kernel of the workbench: perplexity, its KL against the reference
    (`divergence`, chunk by chunk in the same pass) and fine-tuning's held-out loss use it.

    Models whose logits are not simply the head applied to the decoder's last hidden state
    (logit scaling or soft-capping) are found by `_plain_head` and scored from full logits."""
    parts = _plain_head(model, input_ids, attention_mask)
    if parts is None:
        return nll_sum(
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, labels, divergence
        )
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    targets = labels[:, 1:]
    scored = targets != -100
    return _score_rows(hidden[:, :-1][scored], targets[scored], divergence, head)


def _score_rows(rows, targets, divergence=None, head=None) -> tuple[float, int]:
    """Summed NLL of `targets` over `rows` (logits, or hidden states when `head` is given),
    LOGITS_CHUNK_ELEMENTS logits at a time, into one buffer reused from chunk to chunk: on CPU a
    fresh 64 MB block costs its page faults every time, enough to slow scoring noticeably. A
    plain head writes its logits into the buffer and the log-softmax overwrites them there
    (a little faster than into a second buffer, and 64 MB less). With gradients on, fresh blocks. The log-softmax is shared with the KL
    (`divergence`)."""
    import torch

    vocab = head.out_features if head is not None else rows.shape[-1]
    step = max(1, min(LOGITS_CHUNK_ELEMENTS // vocab, len(targets)))
    reuse = not torch.is_grad_enabled()  # every caller scores under no_grad; autograd would keep the blocks
    buffer = torch.empty(step, vocab, dtype=torch.float32, device=rows.device) if reuse else None
    head_into_buffer = reuse and _plain_linear_on_cpu(head, rows)
    total = 0.0
    for start in range(0, len(targets), step):
        chunk, chunk_targets = rows[start : start + step], targets[start : start + step]
        n = len(chunk_targets)
        if head_into_buffer:
            logits = torch.matmul(chunk, head.weight.t(), out=buffer[:n])
        else:
            logits = (head(chunk) if head is not None else chunk).float()
        chunk_logp = torch.log_softmax(logits, dim=-1, out=buffer[:n]) if reuse else torch.log_softmax(logits, dim=-1)
        total -= chunk_logp.gather(1, chunk_targets[:, None]).sum().item()
        if divergence is not None:
            divergence.add(chunk_logp, chunk_targets)
    return total, len(targets)


def _plain_linear_on_cpu(head, rows) -> bool:
    """Whether `head(rows)` is exactly `rows @ head.weight.T` in fp32 on the CPU (a plain
    `nn.Linear`, no bias, no hooks), so that it can be written into a reused buffer."""
    import torch

    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and rows.device.type == "cpu"
        and head.weight.dtype == rows.dtype == torch.float32
        and head.weight.device.type == "cpu"
        and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
    )


_HEAD_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plain_head(model, input_ids, attention_mask):
    """(decoder, head) when the model's logits are `head(decoder(...)[0])`, checked once per model
    on the first 16 tokens of the first row; None otherwise."""
    if model not in _HEAD_CHECKED:
        _HEAD_CHECKED[model] = _check_plain_head(
            model, input_ids[:1, :16], None if attention_mask is None else attention_mask[:1, :16]
        )
    return _HEAD_CHECKED[model]


def _check_plain_head(model, ids, mask):
    import torch

    get_decoder, get_head = (getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None))
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or not hasattr(head, "out_features"):
        return None
    full = model(input_ids=ids, attention_mask=mask).logits.float()
    split = head(decoder(input_ids=ids, attention_mask=mask)[0]).float()
    if split.shape != full.shape:
        return None
    tolerance = 1e-2 * full.abs().max().item() + 1e-4  # same arithmetic; only a different matmul shape
    return (decoder, head) if torch.isfinite(split).all() and (split - full).abs().max().item() <= tolerance else None


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    max_length: int
    stride: int
    """The step actually used (may be smaller than asked: see `windows`)."""
    bos: bool

    def result_fields(self) -> dict:
        """The `Result` fields this metric fills."""
        return {"ppl": self.ppl}

    def protocol(self, text_name: str) -> dict:
        fields = asdict(self)
        del fields["ppl"], fields["nll_sum"]
        return {"text": text_name, **fields}


def windows(n: int, max_length: int, stride: int, bos: bool) -> tuple[list[tuple[int, int, int]], int]:
    """Windows `(begin, end, first_scored)` over n tokens, and the step used.

    Each token is scored exactly once, in the first window that has context for it.
    With a BOS the window holds `max_length - 1` text tokens and its first token is
    scored (the BOS is its context). Without one, a window's first token has no context,
    so consecutive windows must overlap by at least one token and the very first token
    of the text is never scored.
    """
    body = max_length - 1 if bos else max_length
    step = min(stride, body) if bos else min(stride, body - 1)
    result, scored_until, begin = [], 0 if bos else 1, 0
    while True:
        end = min(begin + body, n)
        result.append((begin, end, scored_until))
        scored_until = end
        if end >= n:
            return result, step
        begin += step


def perplexity(
    model,
    token_ids: list[int],
    max_length: int,
    stride: int,
    batch_size: int = 4,
    bos_token_id: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    divergence=None,
) -> Perplexity:
    """Sliding-window perplexity of `model` on `token_ids`, batched over equal-length windows.
    `divergence` (a `divergence.Divergence`) collects KL against the reference in the same pass;
    the windows fix the order of the scored tokens, so two runs with one protocol line up.

    A non-finite result (a model that overflows or collapsed to NaN) is an error, never a number."""
    import torch

    bos = bos_token_id is not None
    spans, step = windows(len(token_ids), max_length, stride, bos)
    batch_size = min(batch_size, getattr(model, "scoring_batch", batch_size))  # llama.cpp: one window at a time
    device = next(model.parameters()).device
    total, n_scored, done = 0.0, 0, 0
    for batch in _equal_length_batches(spans, batch_size):
        rows, labels = [], []
        for begin, end, first in batch:
            ids = ([bos_token_id] if bos else []) + token_ids[begin:end]
            offset = 1 if bos else 0  # position of text token `begin` inside the row
            label = [-100] * len(ids)
            for pos in range(first - begin + offset, len(ids)):
                label[pos] = ids[pos]
            rows.append(ids)
            labels.append(label)
        inputs = torch.tensor(rows, device=device)
        with torch.no_grad():  # not inference_mode: quanto's kernels fail under it
            nll, count = model_nll_sum(model, inputs, torch.tensor(labels, device=device), divergence=divergence)
        total, n_scored, done = total + nll, n_scored + count, done + len(batch)
        if progress:
            progress(done, len(spans))
    ppl = math.exp(total / n_scored) if math.isfinite(total) and total / n_scored < 700 else math.inf
    if not math.isfinite(ppl):
        raise WorkbenchError(
            f"perplexity is not finite (mean NLL {total / n_scored:.4g} nats over {n_scored} tokens): "
            "the quantized model's outputs overflowed or collapsed, so there is no number to report."
        )
    return Perplexity(ppl, total, n_scored, len(spans), max_length, step, bos)


def _equal_length_batches(spans, batch_size):
    batch = []
    for span in spans:
        if batch and (len(batch) == batch_size or span[1] - span[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def expects_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one at the start of a text by itself, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None
