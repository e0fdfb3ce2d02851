"""The synthetic tasks, by name."""

from __future__ import annotations

from collections.abc import Callable

from training.tasks.base import Batch, Task
from training.tasks.language import LanguageTask
from training.tasks.sensor import SensorTask

_FACTORIES: dict[str, Callable[[], Task]] = {"language": LanguageTask, "sensor": SensorTask}
TASK_NAMES: tuple[str, ...] = tuple(_FACTORIES)


class UnknownTaskError(ValueError):
    """A task name that is not one of TASK_NAMES."""


def get_task(name: str) -> Task:
    """The task called `name` with its default configuration."""
    if name not in _FACTORIES:
        raise UnknownTaskError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    return _FACTORIES[name]()


__all__ = ["TASK_NAMES", "Batch", "LanguageTask", "SensorTask", "Task", "UnknownTaskError", "get_task"]
