"""Moved to `workbench.run.executors` and `workbench.run.workers` and `workbench.run.ray_tasks`; this name is kept for one release."""

from workbench._moved import moved_to

moved_to(__name__, "workbench.run.executors", "workbench.run.workers", "workbench.run.ray_tasks")
