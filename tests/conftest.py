"""Shared fixtures: a tiny Llama built from a config (mechanics, seconds) and the real offline model
(effects a learner comes to see). Everything runs offline on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SLOWEST_FILES = (
    "tests/test_tasks.py",
    "tests/test_real_model.py",
    "tests/test_gguf.py",
    "notebooks/04_merge_and_deploy.ipynb",
    "tests/test_qlora_cpu.py",
    "tests/test_methods.py",
    "notebooks/05_where_bits_matter.ipynb",
    "tests/test_hostile.py",
    "tests/test_mixed.py",
    "notebooks/03_qlora_finetune.ipynb",
    "tests/test_ray_executor.py",
    "tests/test_panels_on_ipywidgets7.py",
)
"""Run first, longest first (1.5-5 minutes each on 2 cores, from --durations): `make test`'s
pytest workers (three) take a file at a time in this order (`--no-loadscope-reorder`; pytest-xdist's own
order, most tests first, started the notebooks last), and a long file started last kept one
worker busy alone."""


MODEL_FIXTURES = {"bundled_source", "tiny_folder"}
"""Fixtures that load a real tokenizer or model: a test that uses one (even through another
fixture) is marked `model`, and `make check` leaves it to `make test`."""


def pytest_collection_modifyitems(config, items):
    import torch

    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or not item.nodeid.startswith("tests/"):
            item.add_marker(pytest.mark.model)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """A pytest worker that dies cannot say why: the failure gets the kernel's last words about
    killed or crashed processes (the OOM killer, a segfault) and the memory the machine had left."""
    report.longrepr = f"{report.longrepr}\n{why_processes_died()}"


def why_processes_died() -> str:
    import re
    import subprocess

    try:
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout.splitlines()
        said = [line for line in kernel if re.search(r"killed process|out of memory|segfault|oom-kill", line, re.I)]
    except (OSError, subprocess.SubprocessError) as exc:
        said = [f"(dmesg could not be read: {exc})"]
    meminfo = Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []
    left = [line for line in meminfo if line.startswith(("MemTotal", "MemAvailable"))]
    return "\n".join(["kernel log about killed processes:", *(said[-8:] or ["(nothing)"]), *left])


@pytest.fixture(scope="session")
def bundled_source():
    from workbench.sources import models

    return models.resolve("bundled")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, bundled_source):
    """A 2-block Llama with random weights and the real SmolLM2 tokenizer, saved as a model folder.

    Layer widths are multiples of 64 so every grouped method applies; 96-wide MLP inputs
    are avoided on purpose (see test for group-size errors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.sources import models

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = models.load_tokenizer(bundled_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_session(tiny_folder):
    from workbench.core.config import EvalConfig, ModelSpec
    from workbench.run import runner

    return runner.Session.open(
        ModelSpec(str(tiny_folder), device="cpu"),
        EvalConfig(max_length=128, stride=128, max_tokens=512, decode_tokens=8),
    )


@pytest.fixture(scope="module")
def tiny_model(tiny_session):
    """The tiny Llama loaded in full precision on the CPU (one per test module)."""
    from workbench.sources import models

    return models.load_model(tiny_session.source, "cpu")


@pytest.fixture
def custom():
    """The test methods of tests/custom_method.py (crash, hang, NaN...), registered from outside the package."""
    import custom_method

    custom_method.register_all()
    yield custom_method
    custom_method.unregister_all()
