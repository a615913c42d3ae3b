"""Moved to `workbench.run.runner` and `workbench.run.compare`; this name is kept for one release."""

from workbench._moved import moved_to

moved_to(__name__, "workbench.run.runner", "workbench.run.compare")


def compare(
    session,
    choices,
    previous=(),
    rerun=False,
    log=print,
    progress=None,
    should_stop=lambda: False,
    executor=None,
    on_result=None,
):
    """The old signature: `previous` is a list of results instead of a `History`."""
    from workbench.run.compare import History
    from workbench.run.compare import compare as compare_with_history

    return compare_with_history(
        session, choices, History(kept=list(previous)), rerun, log, progress, should_stop, executor, on_result
    )
