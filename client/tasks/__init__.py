"""What a site does in a round, per model family: prepare its pairs, train locally, evaluate.

The ClientApp asks the family's registry entry (``shared_models.registry``) for its task, a ``"module:Class"``
path; paired supervised SR (:class:`client.tasks.supervised.SupervisedTask`) is the default, and families with
a local procedure of their own extend it.
"""

from __future__ import annotations

import functools
import importlib

from client.tasks.base import LocalTask, RoundJob, TrainResult
from shared_models.registry import family


@functools.cache
def task_for(name: str) -> LocalTask:
    """The local task of the model family ``name`` (one instance per process)."""
    path = family(name).task
    module, _, attribute = path.partition(":")
    task = getattr(importlib.import_module(module), attribute)()
    if not isinstance(task, LocalTask):
        raise TypeError(f"model family {name!r}: its task {path} is not a client.tasks.LocalTask")
    return task


__all__ = ["LocalTask", "RoundJob", "TrainResult", "task_for"]
