"""No code shipped with a model runs unless the user says so (workbench.sources.remote_code).

The hostile model is the tiny Llama folder with an `auto_map` (in config.json, or only in
tokenizer_config.json) naming `evil_model.py`, a file that writes a marker file when it is
imported. Every surface must refuse it with one message naming the file and the opt-in,
and the marker must never appear; with the opt-in the model's code does run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import methods
from workbench.cli import main
from workbench.core.config import ModelSpec
from workbench.core.errors import WorkbenchError
from workbench.sources import models, remote_code

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""
CONFIG_MAP = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
TOKENIZER_MAP = {"AutoTokenizer": [None, "evil_model.EvilTokenizer"]}
FAST = ["--max-length", "128", "--max-tokens", "64", "--decode-tokens", "0"]


def one_method_per_family() -> list[str]:
    first = {}
    for method, _ in methods.available():
        first.setdefault(method.family, method.name)
    return list(first.values())


def _add_auto_map(folder: Path, filename: str, auto_map) -> None:
    path = folder / filename
    config = json.loads(path.read_text(encoding="utf-8"))
    config["auto_map"] = auto_map
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


@pytest.fixture(params=["config.json", "tokenizer_config.json"])
def evil(request, tiny_folder, tmp_path) -> Path:
    """A loadable tiny model whose config.json (or only its tokenizer_config.json) points at evil_model.py."""
    folder = tmp_path / "evil-llama"
    shutil.copytree(tiny_folder, folder)
    (folder / "evil_model.py").write_text(EVIL_CODE.format(marker=str(tmp_path / "MARKER")), encoding="utf-8")
    _add_auto_map(folder, request.param, CONFIG_MAP if request.param == "config.json" else TOKENIZER_MAP)
    yield folder
    assert not (tmp_path / "MARKER").exists(), "the model's own code ran without the opt-in"


def _cli_refuses(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "evil_model.py" in err and "--trust-remote-code" in err, err
    return err


def test_the_message_names_the_file_the_config_and_the_opt_in(evil):
    with pytest.raises(WorkbenchError) as refused:
        models.resolve(str(evil))
    message = str(refused.value)
    filename = next(name for name in remote_code.CONFIG_FILES if "auto_map" in json.loads((evil / name).read_text()))
    assert f"its {filename} asks to run Python code shipped with the model: evil_model.py" in message
    assert "--trust-remote-code" in message and '"trust remote code"' in message
    assert message.count("evil_model.py") == 1  # one file named once, though two classes come from it


@pytest.mark.parametrize("method", one_method_per_family())
def test_compare_refuses_for_every_method_family(method, evil, tmp_path, capsys):
    out = tmp_path / "out"
    _cli_refuses(
        [
            "compare",
            "--model",
            str(evil),
            "--methods",
            method,
            "--in-process",
            "--device",
            "cpu",
            "--out",
            str(out),
            *FAST,
        ],
        capsys,
    )
    assert not (out / "history.jsonl").exists()  # refused before anything was measured


def test_compare_in_worker_processes_refuses_too(evil, tmp_path, capsys):
    _cli_refuses(
        [
            "compare",
            "--model",
            str(evil),
            "--methods",
            "fp32,rtn",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
            *FAST,
        ],
        capsys,
    )


def test_estimate_refuses(evil, capsys):
    _cli_refuses(["estimate", "--model", str(evil), "--device", "cpu"], capsys)


def test_model_picker_refuses_unless_trust_remote_code_is_ticked(evil):
    from workbench.panels import ModelPicker

    picker = ModelPicker(default=str(evil), device="cpu")
    assert picker.trust_remote_code.value is False and picker.spec().trust_remote_code is False
    with pytest.raises(WorkbenchError, match=r"evil_model\.py.*trust remote code"):
        picker.run()
    assert picker.job.states == ["idle", "running", "error"]
    picker.trust_remote_code.value = True
    spec = picker.spec()
    assert spec.trust_remote_code is True
    assert models.resolve(spec.name, trust_remote_code=spec.trust_remote_code).trust_remote_code is True


def test_fine_tuning_panel_refuses(evil, tmp_path):
    from workbench.finetune import FinetuneConfig
    from workbench.panels import FineTunePanel, ModelPicker

    panel = FineTunePanel(
        ModelPicker(default=str(evil), device="cpu"), FinetuneConfig(max_steps=1), out_dir=str(tmp_path)
    )
    panel.button.click()
    assert panel.job.wait(900) == "error"
    assert "evil_model.py" in panel.job.error and "trust remote code" in panel.job.error
    assert panel.trained is None


def test_fine_tuning_from_a_hand_built_source_refuses(evil, tmp_path):
    """`finetune.finetune` takes a `ModelSource`; one built by hand, without `resolve`, is checked too."""
    from workbench import finetune

    config = finetune.FinetuneConfig(max_steps=1, output_dir=str(tmp_path / "run"))
    with pytest.raises(WorkbenchError, match=r"evil_model\.py"):
        finetune.finetune(models.ModelSource("evil", str(evil)), config, "cpu", log=lambda m: None)
    assert not (tmp_path / "run" / "adapter").exists()


def test_trusted_sources_pass_the_check(evil):
    source = models.resolve(str(evil), trust_remote_code=True)
    assert source.trust_remote_code and source.saved_copy(evil / "elsewhere").trust_remote_code
    remote_code.check(source)  # returns without raising
    with pytest.raises(WorkbenchError):
        remote_code.check(models.ModelSource("evil", str(evil)))


def test_a_model_without_auto_map_passes(tiny_folder):
    remote_code.check(models.ModelSource("tiny", str(tiny_folder)))


def test_code_files_reads_every_form_of_auto_map():
    assert remote_code.code_files({"AutoConfig": "cfg.MyConfig", "AutoModelForCausalLM": "modeling.MyModel"}) == [
        "cfg.py",
        "modeling.py",
    ]
    assert remote_code.code_files({"AutoTokenizer": ["tok.Slow", None]}) == ["tok.py"]
    assert remote_code.code_files(["tok.Slow", "tok.Fast"]) == ["tok.py"]  # old tokenizer configs: the pair alone
    assert remote_code.code_files({"AutoModel": "other/repo--modeling.MyModel"}) == ["modeling.py from other/repo"]


def test_model_spec_trust_remote_code_is_off_by_default_and_must_be_a_bool():
    assert ModelSpec().trust_remote_code is False
    with pytest.raises(WorkbenchError, match="trust_remote_code"):
        ModelSpec(trust_remote_code="yes")


def test_with_the_opt_in_the_models_own_code_runs(tiny_folder, tmp_path):
    """The opt-in reaches the loaders: `estimate --trust-remote-code` builds the model's own classes,
    so its code runs (in a subprocess, so the test process and the user's module cache stay clean)."""
    folder = tmp_path / "custom-llama"
    shutil.copytree(tiny_folder, folder)
    marker = tmp_path / "MARKER"
    (folder / "evil_model.py").write_text(EVIL_CODE.format(marker=str(marker)), encoding="utf-8")
    _add_auto_map(folder, "config.json", CONFIG_MAP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workbench",
            "estimate",
            "--model",
            str(folder),
            "--device",
            "cpu",
            "--trust-remote-code",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.read_text() == "the model's own code ran"
    assert json.loads(done.stdout)["total_params"] > 0
