"""No code shipped with a model runs unless the user says so.

A model folder or hub repo can ship Python files and name them in the `auto_map` of its
config.json or tokenizer_config.json (`"AutoModelForCausalLM": "my_model.MyModel"` means
"import my_model.py"). Importing such a file runs it with the user's rights. transformers
does so when asked with `trust_remote_code=True` (and asks interactively when it is not
told), and gptqmodel's loader imports it whatever it is told. So the workbench passes
`trust_remote_code` explicitly to every loader, False unless the user opted in, and
`check` refuses such a model before anything is loaded, naming the files it would run.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.core.errors import WorkbenchError

CONFIG_FILES = ("config.json", "tokenizer_config.json")
OPT_IN = (
    '--trust-remote-code (command line), tick "trust remote code" in the ModelPicker, '
    "or ModelSpec(..., trust_remote_code=True) in Python"
)


def check(source) -> None:
    """Raise a `WorkbenchError` when `source` (a `models.ModelSource`) ships code that loading
    would run and the user has not opted in; return quietly otherwise."""
    if source.trust_remote_code:
        return
    for filename in CONFIG_FILES:
        auto_map = _read_json(source, filename).get("auto_map")
        if auto_map:
            raise WorkbenchError(refusal(source.label, filename, auto_map))


def refusal(label: str, filename: str, auto_map) -> str:
    """The one message: which file would run, why, and how to allow it."""
    files = ", ".join(code_files(auto_map))
    entries = "; ".join(f"{key} -> {value}" for key, value in _entries(auto_map))
    return (
        f"model {label!r}: its {filename} asks to run Python code shipped with the model: {files} "
        f"(auto_map: {entries}). The workbench runs no code from a model unless you say so. Read that code first; "
        f"if you trust it, use {OPT_IN}."
    )


def code_files(auto_map) -> list[str]:
    """The files an `auto_map` would import: `my_model.MyModel` -> `my_model.py`, a module in a
    package `sub.mod.MyModel` -> `sub/mod.py`, and `org/repo--my_model.MyModel` (code from another
    hub repo) -> `my_model.py from org/repo`."""
    files = []
    for _, reference in _entries(auto_map):
        repo, _, reference = reference.rpartition("--")
        name = reference.rsplit(".", 1)[0].replace(".", "/") + ".py"
        name = f"{name} from {repo}" if repo else name
        if name not in files:
            files.append(name)
    return files


def _entries(auto_map) -> list[tuple[str, str]]:
    """(auto class, class reference) pairs; a tokenizer's entry is a [slow, fast] pair with gaps,
    and old tokenizer configs give that pair alone instead of a mapping."""
    if not isinstance(auto_map, dict):
        auto_map = {"AutoTokenizer": auto_map}
    pairs = []
    for key, value in auto_map.items():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if reference:
                pairs.append((str(key), str(reference)))
    return pairs


def _read_json(source, filename: str) -> dict:
    """A config file of the model as a dict; {} when there is none or it is not a JSON object
    (then transformers cannot read it either, and the loaders report that)."""
    path = Path(source.location) / filename if source.is_local else _hub_file(source, filename)
    if path is None or not Path(path).is_file():
        return {}
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _hub_file(source, filename: str) -> str | None:
    """One small file of a hub repo, fetched the way transformers' loaders fetch it (same cache,
    offline mode, token), so the check sees what they would; None when the repo has none.
    Network errors raise: a file that could not be checked is not passed as harmless."""
    from transformers.utils import cached_file

    return cached_file(source.location, filename, token=source.token, _raise_exceptions_for_missing_entries=False)
