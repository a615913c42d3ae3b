"""QLoRA / LoRA fine-tuning on a quantized base: train, evaluate before/after, reload, merge, deploy.

One package, four roles: `config` (what a run is asked to do, validated before loading),
`data` (rows -> token ids and labels), `train` (base, adapters, Trainer, evaluation) and
`merge` (reload, exact merge, deploy comparison). Reading the rows from files belongs to
`workbench.sources.data`, the project's one module that reads text. The names below are the
public API, so `from workbench import finetune as ft; ft.finetune(...)` reads as before.
"""

from workbench.finetune.config import CONFIG_FILE, PLAIN_TEMPLATE, FinetuneConfig, refuse_untrainable
from workbench.finetune.data import collate, encode, split_example
from workbench.finetune.merge import (
    MERGE_RTOL,
    MERGED_FROM_FILE,
    RELOAD_RTOL,
    MergeReport,
    adapter_choice,
    deploy_compare,
    load_adapter_model,
    merge_refusal,
    merge_to_dequantized,
    merge_tolerance,
    reload_adapter,
    saved_config,
)
from workbench.finetune.train import (
    Evaluation,
    Finetuned,
    FinetuneReport,
    attach_lora,
    block_linear_names,
    evaluate,
    finetune,
    generate,
    heldout_loss,
    parameter_counts,
    prepare_base,
    save_adapter,
    train,
)
from workbench.sources.data import FINETUNE_DIR as DATA_DIR
from workbench.sources.data import data_folder, load_rows, read_rows

__all__ = [
    "CONFIG_FILE",
    "DATA_DIR",
    "MERGED_FROM_FILE",
    "MERGE_RTOL",
    "PLAIN_TEMPLATE",
    "RELOAD_RTOL",
    "Evaluation",
    "FinetuneConfig",
    "FinetuneReport",
    "Finetuned",
    "MergeReport",
    "adapter_choice",
    "attach_lora",
    "block_linear_names",
    "collate",
    "data_folder",
    "deploy_compare",
    "encode",
    "evaluate",
    "finetune",
    "generate",
    "heldout_loss",
    "load_adapter_model",
    "load_rows",
    "merge_refusal",
    "merge_to_dequantized",
    "merge_tolerance",
    "parameter_counts",
    "prepare_base",
    "read_rows",
    "refuse_untrainable",
    "reload_adapter",
    "save_adapter",
    "saved_config",
    "split_example",
    "train",
]
