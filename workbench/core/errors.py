"""The one exception type the workbench raises for problems a person can fix.

Every surface (CLI, panels, notebooks) shows a `WorkbenchError` as a plain message,
without a traceback: the message names the input, what was wrong and what to do.
Anything else that escapes is a bug and keeps its traceback.
"""


class WorkbenchError(Exception):
    """An expected failure with a message meant for the user."""
