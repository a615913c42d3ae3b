"""Comparing methods: reuse what the history holds, measure the reference first, append each
result the moment it finishes.

Every surface (the CLI, the panels, the notebooks, sweeps) compares through `compare` with a
`History`, so the contract is written once: a row measured before with the same identity is
reused, the full-precision reference runs before the methods whose KL needs it, and nothing
finished is lost when a run is stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from workbench import methods
from workbench.core import files
from workbench.core.errors import WorkbenchError
from workbench.methods import Choice
from workbench.run import results
from workbench.run.executors import InProcess
from workbench.run.results import Result
from workbench.run.runner import Session, as_choice, failed, planned_key
from workbench.run.workers import WorkerProcesses


@dataclass
class History:
    """A results folder's `history.jsonl`: what was measured before, and where each new result
    goes the moment it finishes. Without a path it is kept in memory only."""

    path: Path | None = None
    kept: list[Result] = field(default_factory=list)
    """The results this object recorded, in the order they finished (and, kept in memory
    only, the ones it was given)."""

    def __post_init__(self):
        if self.path is not None:
            files.check_own_file(self.path, "history")  # a link or a FIFO is refused before any work

    @classmethod
    def in_folder(cls, folder: Path | str) -> "History":
        return cls(Path(folder) / "history.jsonl")

    def previous(self, log: Callable[[str], None] = print) -> Iterable[Result]:
        return results.iter_history(self.path, log) if self.path is not None else list(self.kept)

    def append(self, result: Result) -> None:
        if self.path is not None:
            results.append_history([result], self.path)
        self.kept.append(result)


def reusable(previous: Iterable[Result], log) -> dict[str, Result]:
    """The results that can be reused, by identity. When one identity was measured more than once
    with different values (a re-run after the backend's nondeterminism, or hand-edited lines), the
    latest line wins, the newest measurement, and the log says so."""
    done, differing = {}, set()
    for result in previous:
        if result.error is not None:
            continue
        key = result.key()
        earlier = done.get(key)
        if earlier is not None and _values(earlier) != _values(result):
            differing.add(result.label)
        done[key] = result
    if differing:
        log(
            f"history: {', '.join(sorted(differing))} measured more than once with one identity and different values; "
            "the latest line is used (--rerun measures again)."
        )
    return done


def _values(result: Result) -> tuple:
    return (result.ppl, result.kl_mean, result.weight_bytes, result.bits_per_weight)


def executor_for(in_process: bool, library_log: Callable[[str], None] | None = None):
    """This process (notebooks that keep a model) or a fresh worker per method (the default)."""
    return InProcess() if in_process else WorkerProcesses(library_log=library_log)


def compare(
    session: Session,
    choices: list[Choice | str],
    history: History | None = None,
    rerun: bool = False,
    log: Callable[[str], None] = print,
    progress=None,
    should_stop: Callable[[], bool] = lambda: False,
    executor=None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Each choice's result, in order. A configuration already in `history` (without error and
    with the same identity) is reused unless `rerun`; the others run on `executor` (default:
    a fresh worker process each), and each newly measured result is appended to `history`
    the moment it finishes (then given to `on_result`).

    KL needs the reference's recorded distributions (`Session.reference_method`, fp32 on CPU),
    so the reference runs first, on its own, before the others start. When they are not
    recorded for this session and another method is to be measured, the reference is measured
    even if not asked for (its row comes first: Δ ppl % needs it too), or measured again
    instead of reused from the history; each of these is logged with the reason."""
    executor = executor or WorkerProcesses()
    history = history if history is not None else History()
    files.remove_stale_folders(log)
    done = reusable(history.previous(log), log)
    slots: list[Result | None] = []
    pending: list[tuple[int, Choice]] = []
    reused_reference = None
    for choice in choices:
        try:
            parsed = as_choice(choice)
        except WorkbenchError as exc:
            slots.append(failed(session, str(choice), str(exc)))
            continue
        reused = None if rerun else done.get(planned_key(session, parsed))
        if reused:
            log(
                f"[{reused.label}] already measured with this model, text and protocol ({reused.timestamp}); reusing it. Re-run to measure again."
            )
            slots.append(replace(reused, reused_from=reused.timestamp))
            if session.is_reference(parsed):
                reused_reference = (len(slots) - 1, parsed)
            continue
        slots.append(None)
        pending.append((len(slots) - 1, parsed))
    pending = _reference_first(session, slots, pending, reused_reference, log)

    def finished(index: int, result: Result) -> None:
        slots[index] = result
        history.append(result)
        if on_result:
            on_result(result)

    first = pending[:1] if pending and session.is_reference(pending[0][1]) else []
    executor.run(session, first, finished, log, progress, should_stop)  # the others read what it records
    executor.run(session, pending[len(first) :], finished, log, progress, should_stop)
    if any(slot is None for slot in slots):
        log("Cancelled: the remaining methods were not run.")
    return [slot for slot in slots if slot is not None]


def _reference_first(session: Session, slots: list, pending: list[tuple[int, Choice]], reused_reference, log) -> list:
    """`pending` with the reference's run first; the reference added (a new first slot) or taken
    back from reuse when its distributions are missing and another method would use them."""
    reference = [entry for entry in pending if session.is_reference(entry[1])]
    if reference:
        return reference + [entry for entry in pending if entry not in reference]
    wanted = any(choice.method.unavailable_reason(session.device) is None for _, choice in pending)
    if not wanted or _reference_recorded(session, log):
        return pending
    name = session.reference_method()
    if reused_reference is not None:
        slots[reused_reference[0]] = None
        log(
            f"[{name}] measuring it again instead of reusing it: the KL columns need its next-token distributions, "
            f"which are not recorded in {session.reference_path()}."
        )
        return [reused_reference] + pending
    log(
        f"[{name}] measuring the full-precision reference first: the KL columns compare each method's next-token "
        "distributions with its, and they are not recorded yet for this model, text and protocol."
    )
    slots.insert(0, None)
    return [(0, methods.parse(name))] + [(index + 1, choice) for index, choice in pending]


def _reference_recorded(session: Session, log) -> bool:
    """The reference distributions are on disk and usable (an unusable file is logged and recorded again)."""
    try:
        return session.load_reference() is not None
    except WorkbenchError as exc:
        log(f"[{session.reference_method()}] {exc} Recording them again.")
        return False
