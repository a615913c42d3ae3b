"""After training: reload an adapter, merge it exactly, and compare deployed variants.

Why this shape:
- The adapter is trained against the *quantized* weights. Merging it into 4-bit weights
  re-quantizes them (PEFT warns about rounding), so the exact merge loads the base in
  full precision, attaches the adapter and merges there; the merged model then differs
  from the trained one only by the base's quantization error, which is measured.
- Merges that come out wrong are refused before any work (`Method.merge_refusal`): PEFT
  cannot merge into GPTQ or AWQ packed weights, and its merge into optimum-quanto silently
  drops the adapter.
- Every check is a held-out loss (`train.heldout_loss`), the number the training reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from workbench import methods
from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.finetune.config import CONFIG_FILE, FinetuneConfig
from workbench.finetune.data import encode
from workbench.finetune.train import heldout_loss, prepare_base
from workbench.sources import data as texts
from workbench.sources import models
from workbench.sources.gguf_from_hf import MERGED_FROM_FILE, merged_from_record

RELOAD_RTOL = 1e-4
"""A reloaded adapter on a freshly quantized base must give the same held-out loss: bnb's
quantization is deterministic, so only float summation order may differ."""
MERGE_RTOL = 1e-4
"""Merged vs unmerged adapter on the same fp base: W + BA computed once instead of per call."""


def saved_config(adapter_dir) -> FinetuneConfig:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise WorkbenchError(
            f"adapter {str(adapter_dir)!r}: no {CONFIG_FILE}; give the folder `finetune` saved (…/adapter)."
        )
    return FinetuneConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _heldout_for(source, config: FinetuneConfig):
    tokenizer = models.load_tokenizer(source)
    return tokenizer, encode(
        tokenizer, config.prompt_template, texts.load_rows(config.data_path)[1], config.max_seq_len
    )


def load_adapter_model(source, adapter_dir, device: str = "cpu", log=print):
    """A freshly prepared base with the saved adapter attached (frozen, for evaluation/serving)."""
    from peft import PeftModel

    config = saved_config(adapter_dir)
    base = prepare_base(source, config.base, device, log=log)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def reload_adapter(source, adapter_dir, device: str = "cpu", expected_loss: float | None = None, log=print):
    """(model, held-out loss) after reloading; raises when it differs from `expected_loss` by more than RELOAD_RTOL."""
    model = load_adapter_model(source, adapter_dir, device, log)
    tokenizer, heldout = _heldout_for(source, saved_config(adapter_dir))
    loss = heldout_loss(model, heldout, tokenizer.pad_token_id)
    if expected_loss is not None and abs(loss - expected_loss) > RELOAD_RTOL * abs(expected_loss):
        raise WorkbenchError(
            f"adapter {str(adapter_dir)!r}: reloaded held-out loss {loss:.6f} differs from the trained {expected_loss:.6f}; the adapter did not round-trip."
        )
    return model, loss


def merge_refusal(choice: str) -> str | None:
    """Why an adapter trained on this base cannot be merged (None when it can)."""
    method, _ = methods.parse_choice(choice)
    reason = method.merge_refusal  # part of each method's contract (workbench/methods/)
    return f"cannot merge an adapter trained on {method.name}: {reason}." if reason else None


@dataclass(frozen=True)
class MergeReport:
    """Held-out losses around the exact merge (nats per response token)."""

    adapter_loss: float
    """Quantized base + adapter: the model that was trained."""
    base_gap: float
    """|fp base - quantized base| without the adapter: the quantization error on this data."""
    unmerged_loss: float
    """fp base + adapter, not merged."""
    merged_loss: float
    difference: float
    """|merged - adapter_loss|: what merging into full precision changes for the user."""
    tolerance: float
    within_tolerance: bool
    merged_dir: str


def merge_tolerance(base_gap: float) -> float:
    """Allowed |merged - trained| held-out loss difference: 2 x the base's quantization gap + 0.02 nats.

    The adapter learned its update against the 4-bit weights; on the fp weights the same
    update meets W_fp instead of W_q, so the loss moves by about the base's own quantization
    error (its gap without adapter), which can partly cancel or add to what the adapter
    learned: hence the factor 2. The 0.02 nats cover bases whose gap is ~0 (8-bit, fp).
    A correct merge of an nf4-trained adapter lands a few hundredths of a nat from the trained
    model, well inside the tolerance; a merge that lost the adapter lands near the fp base's
    loss, further away than what training moved, and fails the check. The merge arithmetic
    itself is checked much tighter (merged vs unmerged fp model, MERGE_RTOL)."""
    return 2 * base_gap + 0.02


def merge_to_dequantized(
    source, adapter_dir, out_dir=None, device: str = "cpu", trained=None, log=print
) -> MergeReport:
    """Exact merge: fp base + adapter, `merge_and_unload`, checked on held-out loss, saved in fp16.

    `trained` is the quantized base + this adapter already in memory (from `finetune` or
    `reload_adapter`; not checked to match `adapter_dir`); None loads it again. Raises when merged and unmerged fp models disagree
    (a broken merge; nothing is saved); a gap to the trained model above `merge_tolerance`
    is logged and reported in `within_tolerance`, with both numbers."""
    import torch
    from peft import PeftModel

    config = saved_config(adapter_dir)
    refusal = merge_refusal(config.base)
    if refusal:
        raise WorkbenchError(refusal)
    out = Path(out_dir).expanduser() if out_dir else Path(adapter_dir).parent / "merged-fp16"
    files.check_writable(out, f"merge out_dir {str(out)!r}")  # before the work, not after it
    tokenizer, heldout = _heldout_for(source, config)
    loss = lambda model: heldout_loss(model, heldout, tokenizer.pad_token_id)  # noqa: E731
    quantized = trained if trained is not None else load_adapter_model(source, adapter_dir, device, log)
    adapter_loss = loss(quantized.eval())
    with quantized.disable_adapter():
        quantized_base = loss(quantized)
    del quantized, trained
    full = PeftModel.from_pretrained(models.load_model(source, device, dtype=torch.float32), str(adapter_dir)).eval()
    unmerged = loss(full)
    with full.disable_adapter():
        fp_base = loss(full)
    merged = full.merge_and_unload()
    merged_loss = loss(merged)
    if abs(merged_loss - unmerged) > MERGE_RTOL * abs(unmerged):
        raise WorkbenchError(
            f"merge: held-out loss {merged_loss:.6f} after merge_and_unload but {unmerged:.6f} before; the merge is wrong, nothing was saved."
        )
    gap, difference = abs(fp_base - quantized_base), abs(merged_loss - adapter_loss)
    tolerance = merge_tolerance(gap)
    if difference > tolerance:
        log(
            f"[merge] warning: merged fp loss {merged_loss:.4f} vs trained {adapter_loss:.4f} differs by more than {tolerance:.4f} "
            f"(the base's own quantization gap is {gap:.4f}); compare both before deploying the merge."
        )
    merged.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MERGED_FROM_FILE).write_text(
        json.dumps(merged_from_record(source, adapter_dir, config.base)), encoding="utf-8"
    )
    log(
        f"[merge] held-out loss: {config.base}+adapter {adapter_loss:.4f}, merged fp {merged_loss:.4f} (base gap {gap:.4f}); saved fp16 to {out}"
    )
    return MergeReport(
        adapter_loss, gap, unmerged, merged_loss, difference, tolerance, difference <= tolerance, str(out)
    )


# ---------------------------------------------------------------------------- deploy


def deploy_compare(
    session, merged_folder, methods: tuple[str, ...] = ("gptq",), adapter_dir=None, log=print, executor=None
) -> list:
    """The fine-tuning story as rows measured under the session's protocol like every comparison
    (`compare.compare`: a fresh worker per row by default): the quantized base before training,
    the trained model (base + adapter), the merged model in full precision, and the merged model
    quantized by each method. With tasks in the protocol each row gets its accuracy too.
    `results.format_table(...)` shows them."""
    from workbench.core.config import ModelSpec
    from workbench.run import runner
    from workbench.run.compare import compare

    merged_folder = Path(merged_folder)
    if adapter_dir is None:
        adapter_dir = json.loads((merged_folder / MERGED_FROM_FILE).read_text(encoding="utf-8"))["adapter_dir"]
    merged_spec = ModelSpec(
        str(merged_folder), device=session.device, trust_remote_code=session.source.trust_remote_code
    )
    merged = runner.Session.open(merged_spec, session.eval, log)
    trained = adapter_choice(adapter_dir)
    rows = compare(session, [saved_config(adapter_dir).base, trained], log=log, executor=executor)
    full_precision = merged.reference_method()
    deployed = compare(
        merged, [full_precision, *(m for m in methods if m != full_precision)], log=log, executor=executor
    )
    return rows + [replace(result, label=f"merged {result.label}") for result in deployed]


def adapter_choice(adapter_dir):
    """The quantized base + this adapter, as a choice the runner builds and measures like any method (`<base>+lora`)."""
    return methods.parse(saved_config(adapter_dir).base, adapter=str(adapter_dir))
