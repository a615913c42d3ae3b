"""Sensitivity map: how much quantizing each block linear layer alone hurts the whole model.

A cell is one layer (block b, linear kind k) or, with `unit="block"`, all linears of block
b at once. Its end-to-end value is the exact KL divergence KL(baseline || quantized) of
the next-token distributions, in nats per token, on a short text; its proxy is the
layer's relative output error on the same tokens, ||X W^T - X W_q^T||^2 / ||X W^T||^2.

The text is the calibration text (`data.builtin_calibration_text`), never the evaluation
text: a mix chosen from a map drawn on the tokens perplexity is later measured on would
be tuned to them.

Speed: quantizing a layer in block b changes nothing before block b, so the baseline
runs once, keeping each block's input (and the keyword arguments the decoder layers get:
rotary embeddings, mask); a cell replays blocks b.. only. The KL needs the baseline
probabilities p and each cell's logits z: KL = sum p log p - p.z + logsumexp(z), and
p.z = h.(p @ W_head) with p @ W_head computed once, so per cell the head costs one matmul
and one logsumexp.

Honesty: a cell's weight is quantized and dequantized by the same arithmetic the real
backend uses (the method's `fake_quantize`; tests compare it with each backend's own
dequantized weight), so the map measures the error the method really makes. `method` is
the choice text of that method, kept with the map and in its cache key.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.sources import data, models

FakeQuantize = Callable[[object], object]
"""`weight -> dequantized weight`, exactly as a method's backend would store it (a method's
`fake_quantize`): the engine knows no method by name."""

UNITS = ("layer", "block")
KL_CHUNK_TOKENS = 512
"""Positions whose logits are held at once (512 x 49,152 fp32 = 100 MB): not smaller, since
smaller matrix products use a CPU's cores less well and make the map slower to build."""
SCHEMA = 1


# ---------------------------------------------------------------------------- the map


@dataclass(frozen=True)
class Cell:
    block: int
    kind: str
    """The linear kind (`q_proj`, ...), or `block` for all of the block's linears at once."""
    layers: tuple[str, ...]
    """Module names quantized together in this cell."""
    weights: int
    kl: float | None = None
    """KL(baseline || quantized), nats per token; None when only the proxy was computed."""
    proxy: float | None = None
    """Relative output error of the cell's layers on the captured activations (summed over them)."""


@dataclass(frozen=True)
class SensitivityMap:
    model: str
    fingerprint: str
    method: str
    """The choice text of the method each cell is quantized with."""
    text: str
    text_sha: str
    tokens: int
    unit: str
    cells: tuple[Cell, ...]
    proxy_s: float
    end_to_end_s: float | None

    @property
    def blocks(self) -> list[int]:
        return sorted({c.block for c in self.cells})

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(c.kind for c in self.cells))

    def grid(self, field: str = "kl") -> list[list[float | None]]:
        """`[block][kind]` values of `field` (`kl` or `proxy`), None where a cell is missing."""
        at = {(c.block, c.kind): getattr(c, field) for c in self.cells}
        return [[at.get((b, k)) for k in self.kinds] for b in self.blocks]

    def sums(self, field: str = "kl", by: str = "block") -> dict:
        """Per-block (`by="block"`) or per-kind sums of `field`."""
        out: dict = {}
        for c in self.cells:
            key = c.block if by == "block" else c.kind
            out[key] = out.get(key, 0.0) + (getattr(c, field) or 0.0)
        return out

    def spearman(self) -> float | None:
        """Spearman rank correlation between proxy and end-to-end values (None without both)."""
        pairs = [(c.proxy, c.kl) for c in self.cells if c.proxy is not None and c.kl is not None]
        if len(pairs) < 2:
            return None
        return spearman([p for p, _ in pairs], [k for _, k in pairs])

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, record: dict) -> "SensitivityMap":
        fields = {k: v for k, v in record.items() if k != "schema"}
        fields["cells"] = tuple(Cell(**{**c, "layers": tuple(c["layers"])}) for c in record["cells"])
        return cls(**fields)


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the ranks (ties get their average rank), without scipy."""
    import numpy as np

    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # average rank over ties
            tied = values == v
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def cells_of(model, unit: str = "layer", blocks: list[int] | None = None) -> list[Cell]:
    """The map's cells from `models.block_linears` (names `...layers.<b>.<...>.<kind>`)."""
    if unit not in UNITS:
        raise WorkbenchError(f"sensitivity map: unit {unit!r} is not one of {', '.join(UNITS)}.")
    by_block: dict[int, list[tuple[str, object]]] = {}
    for name, module in models.block_linears(model):
        block = _block_index(name)
        by_block.setdefault(block, []).append((name, module))
    wanted = sorted(by_block) if blocks is None else list(blocks)
    missing = [b for b in wanted if b not in by_block]
    if missing:
        raise WorkbenchError(
            f"sensitivity map: block(s) {missing} do not exist; the model has blocks 0-{max(by_block)}."
        )
    cells = []
    for b in wanted:
        layers = by_block[b]
        if unit == "block":
            cells.append(Cell(b, "block", tuple(n for n, _ in layers), sum(m.weight.numel() for _, m in layers)))
        else:
            cells.extend(Cell(b, n.rsplit(".", 1)[-1], (n,), m.weight.numel()) for n, m in layers)
    return cells


def _block_index(name: str) -> int:
    """The block number in a block linear's module name (the first all-digit part)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise WorkbenchError(f"sensitivity map: cannot tell which block layer {name!r} belongs to.")


def map_tokens(tokenizer, tokens: int) -> tuple[data.Text, list[int]]:
    """The map's text (the calibration text, never the evaluation text) and its first `tokens` ids."""
    text = data.builtin_calibration_text()
    return text, data.calibration_blocks(tokenizer, 1, tokens, text)[0]


def compute(
    source: models.ModelSource,
    quantize: FakeQuantize,
    method: str,
    tokens: int = 512,
    unit: str = "layer",
    blocks: list[int] | None = None,
    end_to_end: bool = True,
    log: Callable[[str], None] = print,
) -> SensitivityMap:
    """The map of `quantize` (the fake-quantizer of `method`, a choice text such as `rtn:bits=3`)
    on `source`: the proxy always, the end-to-end KL unless `end_to_end=False`."""
    import torch

    tokenizer = models.load_tokenizer(source)
    text, ids = map_tokens(tokenizer, tokens)
    model = models.load_model(source, "cpu")
    cells = cells_of(model, unit, blocks)
    modules = dict(model.named_modules())
    input_ids = torch.tensor([ids])
    log(f"sensitivity: {len(cells)} cells of {method} on {tokens} tokens of {text.name}")
    with torch.inference_mode():
        start = time.perf_counter()
        proxies = proxy_errors(model, modules, cells, quantize, input_ids)
        proxy_s = time.perf_counter() - start
        log(f"sensitivity: proxy map in {proxy_s:.1f} s")
        kls, end_to_end_s = [None] * len(cells), None
        if end_to_end:
            start = time.perf_counter()
            kls = end_to_end_kl(model, modules, cells, quantize, input_ids, log)
            end_to_end_s = time.perf_counter() - start
            log(f"sensitivity: end-to-end map in {end_to_end_s:.1f} s")
    done = tuple(Cell(c.block, c.kind, c.layers, c.weights, kl, proxy) for c, kl, proxy in zip(cells, kls, proxies))
    return SensitivityMap(
        source.label, models.fingerprint(source), method, text.name, text.sha, tokens, unit, done, proxy_s, end_to_end_s
    )


def proxy_errors(model, modules: dict, cells: list[Cell], quantize, input_ids) -> list[float]:
    """One baseline forward; each cell layer's relative output error under its quantized weight,
    computed in a forward hook from the layer's own input (nothing is stored)."""
    wanted = {name for c in cells for name in c.layers}
    errors: dict[str, float] = {}

    def hook(name):
        def measure(module, inputs, output):
            x = inputs[0].reshape(-1, module.in_features)
            delta = x @ (quantize(module.weight) - module.weight).T
            errors[name] = float(delta.pow(2).sum() / output.pow(2).sum().clamp(min=1e-30))

        return measure

    handles = [modules[name].register_forward_hook(hook(name)) for name in wanted]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [sum(errors[name] for name in c.layers) for c in cells]


class Replay:
    """The baseline run once, then blocks b.. replayed from block b's saved input.

    Decoder layers are called as the model calls them: the keyword arguments the first
    layer received (rotary embeddings, mask, positions) are captured and passed again."""

    def __init__(self, model, input_ids):
        import torch

        decoder = model.get_decoder()
        self.layers, self.norm, self.head = (
            getattr(decoder, "layers", None),
            getattr(decoder, "norm", None),
            model.get_output_embeddings(),
        )
        if self.layers is None or self.norm is None or self.head is None:
            raise WorkbenchError(
                f"sensitivity map: {type(model).__name__} does not have decoder.layers / decoder.norm / an "
                "output head; the end-to-end map replays those (Llama-style models)."
            )
        self.inputs, self.kwargs = self._capture(model, input_ids)
        self.hidden = self._final_hidden(0)
        logits = self.head(self.hidden)
        self.lse = torch.logsumexp(logits, -1)
        p = torch.softmax(logits, -1)
        self.mass = p.sum(-1)  # 1 up to rounding, which matters at KLs of 1e-4
        self.p_head = p @ self.head.weight  # p.z = h.(p @ W) (+ p.bias, the same for every cell)

    def _capture(self, model, input_ids):
        inputs, kwargs = [], {}

        def keep(module, args, kw):
            hidden = args[0] if args else kw["hidden_states"]
            inputs.append(hidden)
            if not kwargs:
                kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

        handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in self.layers]
        try:
            model(input_ids=input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return inputs, kwargs

    def _final_hidden(self, block: int):
        hidden = self.inputs[block]
        for layer in self.layers[block:]:
            out = layer(hidden, **self.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.norm(hidden)[0]

    def kl(self, block: int) -> float:
        """Mean KL(baseline || current weights) per token, replaying from `block`.

        KL = sum p (z0 - lse0) - sum p (z - lse) = mass (lse - lse0) - (h - h0).(p @ W): written
        in differences from the baseline, so no large terms cancel in fp32 (the textbook
        sum p log p - p.z + lse was off by 1e-4 nats, the size of a q_proj cell)."""
        import torch

        hidden = self._final_hidden(block)
        total = 0.0
        for start in range(0, hidden.shape[0], KL_CHUNK_TOKENS):
            rows = slice(start, start + KL_CHUNK_TOKENS)
            lse = torch.logsumexp(self.head(hidden[rows]), -1)
            shift = ((hidden[rows] - self.hidden[rows]) * self.p_head[rows]).sum(-1)
            total += float((self.mass[rows] * (lse - self.lse[rows]) - shift).sum())
        return total / hidden.shape[0]


def end_to_end_kl(model, modules: dict, cells: list[Cell], quantize, input_ids, log=print) -> list[float]:
    """Each cell's KL: its layers' weights swapped for their fake-quantized copies, blocks b..
    replayed, the weights put back."""
    replay = Replay(model, input_ids)
    out = []
    for i, cell in enumerate(cells):
        originals = {name: modules[name].weight.data for name in cell.layers}
        try:
            for name, weight in originals.items():
                modules[name].weight.data = quantize(weight)
            out.append(replay.kl(cell.block))
        finally:
            for name, weight in originals.items():
                modules[name].weight.data = weight
        if (i + 1) % 30 == 0:
            log(f"sensitivity: {i + 1}/{len(cells)} cells")
    return out


# ---------------------------------------------------------------------------- cache


def cache_key(fingerprint: str, text_sha: str, tokens: int, method: str, unit: str, blocks: list[int] | None) -> str:
    """Everything that changes a map's numbers: model content, text, tokens, method, cell set."""
    identity = json.dumps([SCHEMA, fingerprint, text_sha, tokens, method, unit, blocks], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def default_folder() -> Path:
    """Where maps computed at build time (the `mixed` method) are kept: the user cache."""
    return models.cache_dir() / "sensitivity"


def _cached_map(path: Path, log) -> SensitivityMap | None:
    """The map cached at `path`; None when there is none, or it cannot be used (said, then computed again)."""
    try:
        text = files.read_own_text(path, "sensitivity map")
        return None if text is None else SensitivityMap.from_dict(json.loads(text))
    except (WorkbenchError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        log(f"sensitivity: the cached map {path} cannot be used ({str(exc)[:200]}); computing it again.")
        return None


def load_or_compute(
    source: models.ModelSource,
    quantize: FakeQuantize,
    method: str,
    tokens: int = 512,
    unit: str = "layer",
    blocks: list[int] | None = None,
    folder: Path | None = None,
    rerun: bool = False,
    end_to_end: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[SensitivityMap, Path]:
    """The cached map when one with the same identity exists (and has what is asked), else
    compute it and save it atomically as `<folder>/<key>.json`."""
    folder = Path(folder) if folder is not None else default_folder()
    key = cache_key(
        models.fingerprint(source),
        data.builtin_calibration_text().sha,
        tokens,
        method,
        unit,
        sorted(blocks) if blocks is not None else None,
    )
    path = folder / f"{key}.json"
    cached = None if rerun else _cached_map(path, log)
    if cached is not None and (cached.end_to_end_s is not None or not end_to_end):
        log(f"sensitivity: reusing {path}")
        return cached, path
    smap = compute(
        source, quantize, method, tokens, unit, sorted(blocks) if blocks is not None else None, end_to_end, log
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise files.write_error(folder, exc, "cannot create the sensitivity folder") from None
    files.write_text(path, json.dumps(smap.to_dict(), indent=1))
    return smap, path
