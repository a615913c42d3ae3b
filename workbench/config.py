"""Moved to `workbench.core.config`; this name is kept for one release."""

from workbench._moved import moved_to

moved_to(__name__, "workbench.core.config")
