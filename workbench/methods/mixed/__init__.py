"""`mixed`: per-block (or per-layer) bits chosen from a sensitivity map under a size budget.

At build time the map is read from the cache or computed (`workbench.metrics.sensitivity`, on the
calibration text: never on the evaluation tokens the perplexity is then measured on), a
plan is chosen (`workbench.methods.mixed.planner`), and gptqmodel's RTN quantizes with per-module
`dynamic` overrides: the base config carries the smallest width, and each layer given
more bits gets `{"+:^<exact module name>$": {"bits": w}}` (gptqmodel 7.6 matches a `^...$`
literal exactly; `quantization/config.py` `_extract_literal_regex_pattern`). The
checkpoint is saved like `rtn` and reloaded by gptqmodel (transformers' GPTQ loader ignores
`dynamic`); its quantize_config.json keeps `dynamic`, so the chosen bits travel with the
saved model; the plan is also written as JSON next to the cached map and logged.

Only base=rtn for now: hqq's `quantize_model` takes one config per linear kind, not per
block, and a GPTQ base would need its calibration settings here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.methods import gptq
from workbench.methods.base import Choice, Method, Param, check_group_size, compute_bits
from workbench.methods.gptq import PIP, logs_outside_cwd, packed_storage, quantize_and_save, rtn_config, save_checkpoint
from workbench.methods.mixed import planner as mixed
from workbench.metrics import sensitivity
from workbench.sources import models


def parse_widths(text: str) -> tuple[int, ...]:
    """`"3,4,8"` -> (3, 4, 8), each a width RTN supports."""
    try:
        widths = mixed.check_widths(int(w) for w in str(text).split(",") if w.strip())
    except ValueError:
        raise WorkbenchError(f"mixed: widths={text!r} must be comma-separated integers, e.g. 3,4,8.") from None
    bad = [w for w in widths if w not in (2, 3, 4, 8)]
    if bad:
        raise WorkbenchError(f"mixed: widths {bad} are not supported by RTN; choose from 2, 3, 4, 8.")
    return widths


def stored_bits(width: int, group_size: int) -> float:
    """Stored bits per weight of an RTN layer at `width`, as `rtn` counts them (`packed_storage`
    reads the width from the params)."""
    return packed_storage(METHODS[0], {"bits": width, "group_size": group_size}, "cpu")[0]


def map_method(widths: tuple[int, ...], group_size: int) -> Choice:
    """The map a plan is chosen from: RTN at the smallest width, one layer or block at a time."""
    rtn = next(method for method in gptq.METHODS if method.name == "rtn")
    return Choice(rtn, rtn.resolve_params({"bits": widths[0], "group_size": group_size}))


def map_choice(widths: tuple[int, ...], group_size: int) -> str:
    """`map_method` as a choice text (`rtn:bits=3`)."""
    return map_method(widths, group_size).text


def choose(source, params: dict, log=print):
    """(plan, map) for these parameters, the map read from the cache or computed."""
    widths = parse_widths(params["widths"])
    group = params["group_size"]
    check_group_size("mixed", group, source)
    unit = "block" if params["granularity"] == "block" else "layer"
    method = map_method(widths, group)
    smap, _ = sensitivity.load_or_compute(
        source, method.method.fake_quantize(method.params), method.text, params["map_tokens"], unit, log=log
    )
    budget = mixed.budget_from_mb(params["budget_mb"], smap) if params["budget_mb"] > 0 else params["budget_bits"]
    chosen = mixed.plan(smap, budget, widths, params["granularity"], cost=lambda w: stored_bits(w, group))
    return (mixed.against_map(chosen) if params["placement"] == "against" else chosen), smap


def dynamic_overrides(chosen: mixed.Plan) -> dict:
    """gptqmodel `dynamic`: every layer above the smallest width, by its exact module name."""
    low = chosen.widths[0]
    return {f"+:^{re.escape(name)}$": {"bits": bits} for name, bits in chosen.layer_bits().items() if bits != low}


def _quantize(request):
    params = request.params
    chosen, smap = choose(request.source, params, request.log)
    request.log(f"[mixed] {chosen.summary()}")
    base = {"bits": chosen.widths[0], "group_size": params["group_size"], "sym": True}
    config = dataclasses.replace(rtn_config(base), dynamic=dynamic_overrides(chosen) or None)
    quantize_and_save(request, config)  # gptqmodel's own save: transformers' reload cannot load mixed bits
    _write_plan(chosen, smap, params, request.workdir, request.log)
    return _reload(request.workdir, request)


def _reload(folder, request):
    """Through gptqmodel's own loader: transformers' GPTQ path ignores `dynamic` and builds every
    layer at the base width (qweight size mismatch, measured), so a mixed checkpoint is refused.
    With the torch kernel (TorchLinear: every width; the one picked for fp32, TorchFusedLinear,
    takes 4-bit layers only), which loads in fp16 or bf16 only: fp16, which holds the fp16
    scales and the checkpoint's bf16 embeddings exactly (bf16 rounded the scales: outputs 3e-3
    off). Then everything but the quantized layers goes to the compute dtype `rtn` runs in
    (fp32 on CPU); the layers keep fp16 scales, as `rtn` stores them (fp32 ones cost 0.25 bits)."""
    import torch
    from gptqmodel import BACKEND, GPTQModel

    with logs_outside_cwd():
        wrapped = GPTQModel.load(
            str(folder),
            device=request.device,
            backend=BACKEND.TORCH,
            dtype=torch.float16,
            trust_remote_code=request.source.trust_remote_code,
        )
    model = wrapped.model.eval()
    _to_dtype_outside_quantized(model, models.compute_dtype(request.device))
    return model


def _to_dtype_outside_quantized(model, dtype) -> None:
    """Cast the floating-point tensors of every module that is not a gptqmodel quantized linear."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    for module in model.modules():
        if isinstance(module, BaseQuantLinear):
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)


def _write_plan(chosen: mixed.Plan, smap, params: dict, workdir, log) -> None:
    """The plan as JSON in the checkpoint folder (it goes along when the model is saved) and in
    the map cache (it outlives the working folder), so a table can show it on demand."""
    record = json.dumps(
        {
            "params": params,
            "map": {"method": smap.method, "tokens": smap.tokens, "text": smap.text},
            "summary": chosen.summary(),
            "plan": chosen.to_dict(),
        },
        indent=1,
    )
    digest = hashlib.sha256(json.dumps([smap.fingerprint, params], sort_keys=True).encode()).hexdigest()[:16]
    folder = sensitivity.default_folder() / "plans"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise files.write_error(folder, exc, "cannot create the plans folder") from None
    files.write_text(workdir / PLAN_FILE, record)
    files.write_text(folder / f"{digest}.json", record)
    log(f"[mixed] plan written to {folder / f'{digest}.json'}")


PLAN_FILE = "mixed_plan.json"


def _details(workdir, params) -> dict:
    """The chosen plan, for the result: one summary line, the stored bits and each layer's bits."""
    record = json.loads((workdir / PLAN_FILE).read_text(encoding="utf-8"))
    return {
        "summary": record["summary"],
        "stored_bits": record["plan"]["stored_bits"],
        "map": record["map"],
        "layer_bits": record["plan"]["layer_bits"],
    }


def _storage(method, params, device):
    """At most the budget: the plan spends up to `budget_bits` stored bits per weight."""
    return params["budget_bits"], compute_bits(device)


METHODS = (
    Method(
        name="mixed",
        family="gptq",
        bits=3,
        backend="gptqmodel",
        pip=PIP,
        summary="Per-block bits from a sensitivity map under a size budget (RTN in GPTQ's format, per-module overrides).",
        params=(
            Param("base", "rtn", "The quantizer each layer is given its bits with.", ("rtn",)),
            Param(
                "budget_bits",
                3.5,
                "Mean stored bits per block-linear weight, scales included (3-bit at group 64 costs 3.35).",
                minimum=1.0,
            ),
            Param("budget_mb", 0.0, "Budget in MB of block-linear weights instead (0: use budget_bits).", minimum=0.0),
            Param("widths", "3,4,8", "Widths to choose from, comma-separated."),
            Param("group_size", 64, "Weights per scale group (every width).", gptq.GROUP_SIZES),
            Param("granularity", "block", "Choose bits per block or per layer.", mixed.GRANULARITIES),
            Param("map_tokens", 512, "Calibration-text tokens the sensitivity map is measured on.", minimum=32),
            Param(
                "placement",
                "map",
                "map: most sensitive get more bits; against: the same widths on the least sensitive (a control).",
                ("map", "against"),
            ),
        ),
        quantize=_quantize,
        save=save_checkpoint,
        reload=_reload,
        kernel="gptqmodel",
        storage=_storage,
        storage_note="the budget is an upper bound; the plan may spend a little less",
        details=_details,
        limits=(
            "Builds a sensitivity map on first use (minutes on a CPU for a small model; a per-layer map several "
            "times longer than a per-block one), then reuses it from the cache.",
        ),
    ),
)
