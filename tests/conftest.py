"""Shared fixtures: a tiny Llama built from a config (mechanics, seconds) and the real offline model
(effects a learner comes to see). Everything runs offline on the CPU."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
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


LAST_WORDS = "WORKBENCH_PYTEST_LAST_WORDS"
"""The folder (set by xdist's controller, inherited by its workers) where each pytest worker keeps
its last words: the tests it started, its memory, and Python's traceback if a fatal signal or a
SIGTERM ends it."""


_own_folder: list[str] = []
"""The last-words folder this process made (xdist's controller): only it removes the folder. A pytest
run inside a test inherits the variable; it once removed the folder, and the next worker that
replaced a dead one could not start (INTERNALERROR, and the rest of the suite never ran)."""


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler plugin, which writes to stderr
def pytest_configure(config):
    worker = getattr(config, "workerinput", None)
    if worker is None:
        if config.getoption("numprocesses", None):
            os.environ[LAST_WORDS] = tempfile.mkdtemp(prefix="workbench-pytest-")
            _own_folder.append(os.environ[LAST_WORDS])
            _requeue_only_unfinished_files()
        return
    if os.environ.get(LAST_WORDS):
        # A plugin, not this conftest's own hook: those see only the tests under tests/, not the notebooks.
        config.pluginmanager.register(LastWords(Path(os.environ[LAST_WORDS]) / f"{worker['workerid']}.log"))


def _requeue_only_unfinished_files() -> None:
    """pytest-xdist 3.8.0 with `--dist loadfile` hangs at the end of a run in which a worker died: it
    puts every file the dead worker had, finished ones included, back on the queue, and a worker
    handed a file with nothing left to run waits forever (pytest-dev/pytest-xdist#1378, open; a
    fresh-clone `make test` hung so). Here only files with tests left go back, and the test the worker
    died on is not run again by its replacement (pytest-dev/pytest-xdist#1371): it is reported as
    crashed, and `make test` runs it again alone."""
    from xdist.scheduler.loadscope import LoadScopeScheduling

    def remove_node(self, node):
        workload = self.assigned_work.pop(node)
        pending = [(scope, nodeid) for scope, tests in workload.items() for nodeid, done in tests.items() if not done]
        if not pending:
            return None
        scope, crashitem = pending[0]  # the first test not finished is the one it was running
        workload[scope][crashitem] = True
        self.workqueue.update({scope: tests for scope, tests in workload.items() if not all(tests.values())})
        for other in self.assigned_work:
            self._reschedule(other)
        return crashitem

    LoadScopeScheduling.remove_node = remove_node


def pytest_unconfigure(config):
    if _own_folder:
        folder = _own_folder.pop()
        os.environ.pop(LAST_WORDS, None)
        if not _crashed:  # after a crash the logs stay, whole, where its report says
            shutil.rmtree(folder, ignore_errors=True)


class LastWords:
    """A pytest worker's log: each test as it starts, with the worker's memory; Python's traceback
    of every thread if a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) or a SIGTERM ends it."""

    def __init__(self, path: Path):
        import faulthandler
        import signal

        path.parent.mkdir(parents=True, exist_ok=True)  # a worker must start even if a test removed it
        self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (open until the process ends)
        self.file.write(f"pid {os.getpid()}\n")
        faulthandler.enable(self.file, all_threads=True)
        faulthandler.register(signal.SIGTERM, self.file, all_threads=True, chain=True)

    def pytest_runtest_logstart(self, nodeid, location):
        self.file.write(f"{time.strftime('%H:%M:%S')} rss {_rss_mb():,.0f} MB  {nodeid}\n")


def _rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


CRASHED = "WORKBENCH_PYTEST_CRASHED"
"""A file named by `make test`: when the only failures of a run are tests whose pytest worker died,
it gets them (a notebook whole), and `make test` runs them again, alone, in a fresh process."""

_crashed: list[str] = []
_failed: set[str] = set()
_reported: set[str] = set()


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """A pytest worker that dies cannot say why: its failure gets how it ended (its exit status or
    signal), its last words (the files it ran, a traceback if a signal ended it), the kernel's lines
    about killed or crashed processes and the memory the machine had left."""
    _crashed.append(crashitem)
    report.longrepr = "\n".join(
        [str(report.longrepr), how_it_ended(report.node), *last_words(report.node), why_processes_died()]
    )


def pytest_runtest_logreport(report):
    _reported.add(report.nodeid)
    if report.failed:
        _failed.add(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Name the crashed tests for a rerun only when the run ended normally with failures, all of them
    crashes, and every test collected was reported: after an internal error or an interruption the
    other tests did not all run."""
    path = os.environ.get(CRASHED)
    ended_normally = exitstatus == pytest.ExitCode.TESTS_FAILED and len(_reported) >= session.testscollected
    if path and ended_normally and _crashed and _failed <= set(_crashed) and not hasattr(session.config, "workerinput"):
        again = dict.fromkeys(n.split("::")[0] if n.startswith("notebooks/") else n for n in _crashed)
        Path(path).write_text("".join(f"{nodeid}\n" for nodeid in again), encoding="utf-8")


def how_it_ended(node) -> str:
    import signal
    import subprocess

    popen = getattr(getattr(node.gateway, "_io", None), "popen", None)
    if popen is None:
        return "exit status: unknown (not a local process)"
    try:
        status = popen.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return f"exit status: none, process {popen.pid} still runs 30 s later"
    if status < 0:
        return f"exit status: killed by signal {-status} ({signal.Signals(-status).name})"
    return f"exit status: {status} (it exited: no signal)"


def last_words(node) -> list[str]:
    """The files the worker ran, its last tests with its memory, and what it said after them."""
    import re

    folder = os.environ.get(LAST_WORDS)
    path = Path(folder) / f"{node.gateway.id}.log" if folder else None
    if path is None or not path.exists():
        return ["its last words: (none kept)"]
    said = path.read_text(encoding="utf-8", errors="replace").splitlines()
    started = [i for i, line in enumerate(said) if re.match(r"\d\d:\d\d:\d\d rss ", line)]
    files = dict.fromkeys(said[i].split("  ", 1)[1].split("::")[0] for i in started)
    after = said[started[-1] + 1 :] if started else said
    return [
        f"files it ran: {', '.join(files)}",
        "its last tests:",
        *(said[i] for i in started[-5:]),
        f"what it said after them ({len(after)} lines, all in {path}):",
        *current_thread_first(after)[:80],
    ]


def current_thread_first(lines: list[str]) -> list[str]:
    """faulthandler's dump with the thread that received the signal first (after the "Fatal Python
    error" line, if any): with gptqmodel's, torch's and Ray's threads it can come last."""
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is None:
        return lines
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    head = 1 if lines[0].startswith("Fatal Python error") else 0
    return lines[:head] + lines[start:end] + lines[head:start] + lines[end:]


def why_processes_died() -> str:
    import re
    import subprocess

    wanted = r"killed process|out of memory|segfault|oom-kill|traps:|general protection|invalid opcode"
    try:
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
        said = [line for line in dmesg.stdout.splitlines() if re.search(wanted, line, re.I)]
        if dmesg.returncode:
            said.append(f"(dmesg failed, exit {dmesg.returncode}: {dmesg.stderr.strip()[:200]})")
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
