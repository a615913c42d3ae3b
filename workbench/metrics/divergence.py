"""How far a model's next-token distributions are from the full-precision reference's.

Perplexity only looks at the probability of the token that came next; two models with the
same perplexity can disagree on everything else. For each scored evaluation token the
workbench also reports KL(P_ref || Q) in nats, where P_ref is the reference's (the unquantized
model's) next-token distribution and Q the measured model's, and whether the reference's most
likely token is still the model's most likely one (the statistics llama.cpp's perplexity tool
prints: mean KL, its 99th percentile, "same top p").

The reference's distributions are recorded once per model, text and protocol, in the same
forward pass that measures its perplexity, and kept on disk (`Reference`, a small safetensors
file under `models.cache_dir() / "baselines"`). A full distribution per token would be 4096 x
49,152 floats (800 MB); what is kept per scored token is:

- the TOP_K most likely tokens and their log-probabilities (fp32, int32 ids),
- the log of the probability mass outside them (the tail),
- TAIL_SAMPLES tokens drawn from the reference's tail (in proportion to their probability,
  seeded) and their log-probabilities,
- the token that came next (to check both runs score the same tokens in the same order).

About 780 bytes a token: 3.2 MB for 4096 tokens.

The KL of a token is then estimated as

    KL ~= sum_{i in top-k} p_i (log p_i - log q_i) + r_P * mean_s (log p_s - log q_s)

where r_P is the reference's tail mass and s the tail samples: the head is exact and the tail
term is an unbiased Monte Carlo estimate of sum_{j in tail} p_j log(p_j / q_j). Each token's
estimate is raised to the lumped-tail lower bound

    sum_{i in top-k} p_i (log p_i - log q_i) + r_P (log r_P - log r_Q)

(r_Q: the model's mass outside the reference's top k; the tail seen as a single outcome, a
lower bound of the exact KL by the log-sum inequality), which only moves it closer to the
exact value. The sampled tail term matters: a small model's tail holds a tenth of the mass
or more, so the lumped bound alone underestimates the mean KL by roughly a tenth to a fifth
at k = 64 (more at smaller k), while the estimate stays within about 1% of the exact mean KL
and a few percent of its 99th percentile. tests/test_divergence.py checks the estimate
against the exact KL on a real model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from workbench.core import files
from workbench.core.errors import WorkbenchError

TOP_K = 64
"""Most likely reference tokens kept exactly per scored token."""
TAIL_SAMPLES = 32
"""Tokens drawn from the reference's tail per scored token, for the tail's share of the KL."""
FORMAT = 1
"""Version of the file layout: part of the cache key, so a new layout never reads an old file."""
SEED = 0
BLOCK_ROWS = 32
"""Scored positions per step of the KL statistics: 32 x 49,152 fp32 temporaries are 6 MB, where a
whole 64 MB logit chunk per temporary would add 128 MB to the peak memory of every evaluation."""
REFERENCES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""The unquantized method that loads a model in each compute dtype (`workbench.methods.baseline`)."""
TENSORS = ("targets", "top_ids", "top_logp", "tail_logp", "sample_ids", "sample_logp")
IDS = ("targets", "top_ids", "sample_ids")
"""Token ids: int64 in memory (what `gather` takes), int32 on disk."""


def reference_method(device: str) -> str:
    """The method whose distributions KL is measured against: the device's full-precision
    compute dtype (`models.compute_dtype`), fp32 on CPU, bf16 (or fp16) on GPU; the same
    model every other method starts from."""
    from workbench.sources import models

    return REFERENCES[str(models.compute_dtype(device)).removeprefix("torch.")]


def cache_path(key: dict) -> Path:
    """Where the reference distributions for `key` live: named by a hash of everything that
    changes them, so any change of model, text, tokens or windows is another file."""
    import hashlib

    from workbench.sources import models

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return models.cache_dir() / "baselines" / f"{key['reference']}-{digest}.safetensors"


@dataclass(frozen=True)
class Stats:
    """Per-token divergence statistics of one evaluation."""

    kl_mean: float
    """Mean KL(P_ref || Q) per scored token, nats."""
    kl_p99: float
    """99th percentile of the per-token KL, nats."""
    top1_agreement: float
    """Share of scored tokens whose reference top-1 token is also the model's top-1 (0..1)."""
    n_tokens: int

    def result_fields(self) -> dict:
        """The `Result` fields this metric fills."""
        return {"kl_mean": self.kl_mean, "kl_p99": self.kl_p99, "top1_agreement": self.top1_agreement}


@dataclass(frozen=True)
class Reference:
    """The reference's compact next-token distributions, one row per scored token in scoring order."""

    targets: object
    top_ids: object
    top_logp: object
    tail_logp: object
    sample_ids: object
    sample_logp: object

    def __len__(self) -> int:
        return len(self.targets)

    def rows(self, start: int, stop: int) -> "Reference":
        return Reference(*(getattr(self, name)[start:stop] for name in TENSORS))

    def to(self, device) -> "Reference":
        return Reference(*(getattr(self, name).to(device) for name in TENSORS))

    def save(self, path: Path, key: dict) -> None:
        """Write atomically (a temporary file renamed over `path`): a crash leaves the old file or none."""
        from safetensors.torch import save

        stored = {name: getattr(self, name).cpu() for name in TENSORS}
        data = save(
            {name: (tensor.int() if name in IDS else tensor).contiguous() for name, tensor in stored.items()},
            metadata={"format": str(FORMAT), "key": json.dumps(key, sort_keys=True)},
        )
        temp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except OSError as exc:
            if temp:
                Path(temp).unlink(missing_ok=True)
            raise files.write_error(path, exc) from None

    @classmethod
    def load(cls, path: Path, key: dict) -> "Reference | None":
        """The distributions saved for `key`; None when there are none. A file that cannot be
        read, or was saved for something else, is a WorkbenchError that says to delete it."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:
                metadata = stored.metadata() or {}
                tensors = {name: stored.get_tensor(name) for name in TENSORS}
            tensors = {name: tensor.long() if name in IDS else tensor for name, tensor in tensors.items()}
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise WorkbenchError(
                f"{path}: the reference distributions cannot be read ({type(exc).__name__}: "
                f"{str(exc)[:120]}); delete the file and measure the reference again."
            ) from None
        if metadata.get("key") != json.dumps(key, sort_keys=True):
            raise WorkbenchError(
                f"{path}: these reference distributions were saved for another model, text or "
                "protocol; delete the file and measure the reference again."
            )
        return cls(**tensors)


def token_kl(logp, ref: Reference):
    """Per-token KL estimate and lumped-tail lower bound (see the module docstring), and top-1
    agreement, of a model's log-probabilities `logp` (n x vocab, fp32) against n reference rows."""
    import torch

    head = (ref.top_logp.exp() * (ref.top_logp - logp.gather(1, ref.top_ids))).sum(-1)
    tail_mass = ref.tail_logp.exp()
    model_tail = logp.scatter(1, ref.top_ids, float("-inf")).logsumexp(-1)
    has_tail = tail_mass > 0  # no tail (vocabulary <= k, or it underflowed): its terms are 0, not 0 * inf
    lumped = torch.where(has_tail, tail_mass * (ref.tail_logp - model_tail), 0.0)
    sampled = torch.zeros_like(head)
    if ref.sample_ids.shape[1]:
        sampled = torch.where(has_tail, tail_mass * (ref.sample_logp - logp.gather(1, ref.sample_ids)).mean(-1), 0.0)
    lower = (head + lumped).clamp_min(0.0)  # >= 0 in exact arithmetic: a KL over k + 1 outcomes
    estimate = torch.maximum(head + sampled, lower)
    same = logp.gather(1, ref.top_ids[:, :1]).squeeze(1) >= logp.max(-1).values  # ties count as the same
    return estimate, lower, same


def record(logp, targets, generator) -> Reference:
    """The reference rows for a chunk of log-probabilities (n x vocab, fp32)."""
    import torch

    vocab = logp.shape[-1]
    top_logp, top_ids = logp.topk(min(TOP_K, vocab), dim=-1)
    tail = logp.scatter(1, top_ids, float("-inf"))
    tail_logp = tail.logsumexp(-1)
    samples = TAIL_SAMPLES if vocab > TOP_K else 0
    weights = (tail - tail_logp[:, None]).exp().nan_to_num(0.0)
    weights[weights.sum(-1) == 0] = 1.0  # a row with no tail mass: any draw, its term is multiplied by 0
    sample_ids = (
        torch.multinomial(weights, samples, replacement=True, generator=generator)
        if samples
        else torch.zeros(len(logp), 0, dtype=torch.long, device=logp.device)
    )
    return Reference(targets, top_ids, top_logp, tail_logp, sample_ids, logp.gather(1, sample_ids))


class Divergence:
    """Collects per-token KL and top-1 agreement chunk by chunk, inside the perplexity kernel
    (`measure.model_nll_sum` calls `add` with each chunk's log-probabilities: no second forward).

    `Divergence.against(reference)` compares with saved reference rows, consumed in scoring
    order; `Divergence.recording()` records this model as the reference and compares it with
    what it just recorded, through the same code (so its KL of 0 is measured, not assumed)."""

    def __init__(self, reference: Reference | None):
        self.reference, self.recorded, self.position = reference, [], 0
        self.kl, self.same, self.generator = [], [], None

    @classmethod
    def against(cls, reference: Reference) -> "Divergence":
        return cls(reference)

    @classmethod
    def recording(cls) -> "Divergence":
        return cls(None)

    def add(self, logp, targets) -> None:
        """One chunk: `logp` (n x vocab fp32 log-probabilities of n scored positions), `targets` (n).
        Taken BLOCK_ROWS rows at a time, so that the full-vocabulary temporaries (the tail's
        logsumexp, the sampling weights) are small blocks instead of copies of the whole chunk."""
        import torch

        if self.reference is None and self.generator is None:
            self.generator = torch.Generator(device=logp.device).manual_seed(SEED)
        for start in range(0, len(targets), BLOCK_ROWS):
            block, block_targets = (logp[start : start + BLOCK_ROWS], targets[start : start + BLOCK_ROWS])
            if self.reference is None:
                rows = record(block, block_targets, self.generator)
                self.recorded.append(rows)
            else:
                rows = self._next_rows(block_targets)
            kl, _, same = token_kl(block, rows)
            self.kl.append(kl.double().cpu())
            self.same.append(same.cpu())

    def _next_rows(self, targets) -> Reference:
        """The reference's rows for the next len(targets) scored tokens, refused unless they
        are the same tokens: a mismatch means they were recorded on other tokens or windows."""
        start, stop = self.position, self.position + len(targets)
        if stop > len(self.reference):
            raise WorkbenchError(
                f"KL: this evaluation scores more tokens than the reference distributions hold "
                f"({len(self.reference)}); they were recorded under another protocol. Measure the reference again."
            )
        rows = self.reference.rows(start, stop).to(targets.device)
        if not bool((rows.targets == targets).all()):
            raise WorkbenchError(
                f"KL: scored tokens {start}-{stop - 1} are not the tokens the reference distributions "
                "were recorded on (another text, tokenizer or window layout); measure the reference again."
            )
        self.position = stop
        return rows

    def stats(self) -> Stats:
        """The summary, once every chunk is in; refused when fewer tokens were scored than the reference holds."""
        import torch

        if self.reference is not None and self.position != len(self.reference):
            raise WorkbenchError(
                f"KL: {self.position} tokens were scored but the reference distributions hold "
                f"{len(self.reference)}; they were recorded under another protocol. Measure the reference again."
            )
        kl, same = torch.cat(self.kl), torch.cat(self.same)
        return Stats(kl.mean().item(), torch.quantile(kl, 0.99).item(), same.double().mean().item(), len(kl))

    def recorded_reference(self) -> Reference:
        """What `recording()` recorded, all chunks in scoring order."""
        import torch

        return Reference(*(torch.cat([getattr(rows, name) for rows in self.recorded]) for name in TENSORS))
