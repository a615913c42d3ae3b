"""`export`: build and measure one method, then write what it built where a user deploys it.

For a GGUF method that is the .gguf file itself (llama.cpp, LM Studio, Ollama), a minimal Ollama
`Modelfile` (the chat template travels inside the GGUF) and the measured row (`results.json`),
so the numbers go with the file they were measured on. The row is measured on the very file that
is copied out, in the same run.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workbench import methods
from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.run import results, runner
from workbench.run.results import MB, Result
from workbench.run.session import Session

MODELFILE = "Modelfile"
ROW_FILE = "results.json"


@dataclass(frozen=True)
class Exported:
    result: Result
    files: list[Path]


def exportable() -> list[str]:
    return [m.name for m in methods.REGISTRY.values() if m.exports]


def check_exportable(choice: methods.Choice) -> methods.Choice:
    if choice.method.exports is None:
        raise WorkbenchError(
            f"{choice.method.name}: cannot be exported as a file; methods that can: {', '.join(exportable())}."
        )
    return choice


def export(session: Session, choice: methods.Choice | str, out: Path, log: Callable[[str], None] = print) -> Exported:
    """Measure `choice` on `session` (its reference first when its distributions are not recorded,
    for KL), then copy the built files into `out` with a Modelfile and the row. Nothing in `out`
    is replaced: an existing file there is an error, before any work."""
    choice = check_exportable(runner.as_choice(choice))
    out = Path(out).expanduser().absolute()
    files.check_writable(out, f"--out {str(out)!r}")
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "-", session.source.label).strip("-.") or "model"
    taken = [p for p in (out / MODELFILE, out / ROW_FILE) if p.exists()] + list(out.glob(f"{prefix}-*"))
    if taken:
        raise WorkbenchError(
            f"--out {str(out)!r} already holds {taken[0].name}; give an empty folder (nothing is replaced)."
        )
    if not session.is_reference(choice) and session.load_reference() is None:
        log(f"[export] measuring {session.reference_method()} first: the KL columns compare with it")
        runner.evaluate(session, session.reference_method(), log)
    evaluated = runner.evaluate(session, choice, log, keep=True)
    if evaluated.result.error:
        raise WorkbenchError(f"{choice.label}: {evaluated.result.error}")
    with evaluated.built as built:
        out.mkdir(parents=True, exist_ok=True)
        written = [
            _copy(path, out / f"{prefix}-{path.name}") for path in choice.method.exports(built.workdir, choice.params)
        ]
    ggufs = [path for path in written if path.suffix == ".gguf"]
    if ggufs:
        files.write_text(out / MODELFILE, modelfile(ggufs[0], evaluated.result))
        written.append(out / MODELFILE)
    results.write_json([evaluated.result], out / ROW_FILE)
    written.append(out / ROW_FILE)
    return Exported(evaluated.result, written)


def _copy(source: Path, target: Path) -> Path:
    partial = target.with_name(target.name + ".partial")
    try:
        shutil.copyfile(source, partial)
        partial.rename(target)  # atomic: an interrupted copy never looks finished
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise files.write_error(target, exc, "cannot write the exported file") from None
    return target


def modelfile(gguf: Path, result: Result) -> str:
    """A minimal Ollama Modelfile: the file, and what was measured on it as comments."""
    tag = gguf.stem.lower()
    return (
        f"# {result.label} of {result.model}, exported by Quantization Workbench.\n"
        f"# Measured on this file ({result.kernel}): perplexity {result.ppl:.2f} on {result.protocol['n_tokens']} "
        f"tokens of {result.protocol['text']}, weights {result.weight_bytes / MB:.1f} MB; the row is in {ROW_FILE}.\n"
        f"# Use it with: ollama create {tag} -f {MODELFILE}  (the chat template is inside the GGUF file)\n"
        f"FROM ./{gguf.name}\n"
    )
