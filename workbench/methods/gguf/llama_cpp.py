"""llama.cpp through cyllama's prebuilt bindings: its quantizer, and its runtime as a model the
workbench can measure.

cyllama 0.2.18 ships llama.cpp (release b9190) compiled for CPUs in a manylinux wheel, so nothing
is compiled on install (llama-cpp-python is a source distribution that takes tens of minutes to
build). `LlamaCppModel` is called where the workbench calls a transformers model: `model(input_ids=...)`
returns every position's logits, each row decoded alone from an empty KV cache, and `timed_greedy`
times greedy decoding with llama.cpp's own sampler.
"""

from __future__ import annotations

import array
import time
from pathlib import Path
from types import SimpleNamespace

from workbench.core.errors import WorkbenchError

RELEASE = "llama.cpp b9190 (cyllama 0.2.18)"


def _bindings():
    import cyllama.llama.llama_cpp as bindings

    bindings.disable_logging()  # llama.cpp prints every tensor it loads to stderr otherwise
    return bindings


def quantize_file(source: Path, out: Path, ftype: int, threads: int) -> None:
    """llama.cpp's `llama_model_quantize`: its own per-tensor type rules for the file type."""
    bindings = _bindings()
    params = bindings.LlamaModelQuantizeParams()
    params.ftype = ftype
    params.nthread = threads
    try:
        bindings.model_quantize(str(source), str(out), params)
    except RuntimeError as exc:
        raise WorkbenchError(f"llama.cpp could not quantize {source.name}: {exc}") from None


def _model_class(bindings):
    class Model(bindings.LlamaModel):
        """cyllama 0.2.18's `LlamaContext.get_logits_ith` asks its model for `n_vocab`, which
        `LlamaModel` lacks: the vocabulary has it."""

        @property
        def n_vocab(self) -> int:
            return self.get_vocab().n_vocab

    return Model


class LlamaCppModel:
    """A GGUF file loaded into llama.cpp's runtime (read into memory, not mapped, so that its
    memory counts like every other row's)."""

    scoring_batch = 1
    """Windows scored at once: every position's logits of one window are held twice (llama.cpp's
    output buffer and the tensor they are copied into), so one window at a time."""

    def __init__(self, path: Path, threads: int):
        import torch

        bindings = self._bindings = _bindings()
        params = bindings.LlamaModelParams()
        params.use_mmap = False
        try:
            self._model = _model_class(bindings)(str(path), params)
        except Exception as exc:
            raise WorkbenchError(f"llama.cpp could not load {path.name}: {exc}") from None
        self.vocab_size = self._model.n_vocab
        self.threads = threads
        self._context, self._n_ctx = None, 0
        self._where = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # inputs stay on the CPU

    def parameters(self):
        yield self._where

    def close(self) -> None:
        """Free llama.cpp's context, then its model (again: nothing). Left to Python, a garbage
        cycle could free them the other way round: cyllama's context holds its model by a
        reference that the cycle collector may drop first, and freeing a context reads its model.
        Finalizers run before the collector clears anything, hence `__del__`."""
        context, model = getattr(self, "_context", None), getattr(self, "_model", None)
        self._context, self._model, self._n_ctx = None, None, 0
        if context is not None:
            context.close()
        if model is not None:
            model.close()

    __del__ = close

    def _context_for(self, n_tokens: int):
        """A context that decodes `n_tokens` at once with logits for each, with an empty KV cache."""
        if self._model is None:
            raise WorkbenchError("this llama.cpp model was closed.")
        if n_tokens > self._n_ctx:
            if self._context is not None:
                self._context.close()  # the smaller one first (and never used again if the next fails)
                self._context, self._n_ctx = None, 0
            params = self._bindings.LlamaContextParams()
            params.n_ctx = params.n_batch = params.n_ubatch = max(n_tokens, 64)
            params.n_threads = params.n_threads_batch = self.threads
            self._context = self._bindings.LlamaContext(self._model, params)
            self._n_ctx = params.n_ctx
        self._context.kv_cache_clear()
        return self._context

    def _decode(self, ids: list[int], start: int, all_logits: bool):
        batch = self._bindings.LlamaBatch(n_tokens=len(ids), embd=0, n_seq_max=1)
        for offset, token in enumerate(ids):
            batch.add(token, start + offset, [0], all_logits or offset == len(ids) - 1)
        self._context.decode(batch)

    def __call__(self, input_ids, attention_mask=None, use_cache=False, **_):
        import torch

        if attention_mask is not None and not bool(attention_mask.all()):
            raise WorkbenchError("llama.cpp rows score unpadded windows only.")
        rows = input_ids.tolist()
        logits = torch.empty(len(rows), len(rows[0]), self.vocab_size, dtype=torch.float32)
        for r, ids in enumerate(rows):
            self._context_for(len(ids))
            self._decode(ids, 0, all_logits=True)
            for position in range(len(ids)):
                # cyllama hands each row over as a list of floats: through array's buffer it is copied
                # in 1 ms, where torch.tensor(list) took 7 ms (a third of a 512-token row's time).
                values = array.array("f", self._context.get_logits_ith(position))
                logits[r, position] = torch.frombuffer(values, dtype=torch.float32)
        return SimpleNamespace(logits=logits)

    def timed_greedy(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
        """(seconds to the first new token, seconds for the rest) of greedy decoding, KV cache on."""
        context = self._context_for(len(prompt_ids) + new_tokens)
        sampler = self._bindings.LlamaSampler()
        sampler.add_greedy()
        start = time.perf_counter()
        self._decode(prompt_ids, 0, all_logits=False)
        token = sampler.sample(context, -1)
        first = time.perf_counter()
        for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
            self._decode([token], position, all_logits=False)
            token = sampler.sample(context, -1)
        return first - start, time.perf_counter() - first
