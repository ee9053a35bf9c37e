"""What a site does in a round, per model family: prepare its pairs, train locally, evaluate.

The ClientApp looks the task up by the model family the coordinator names. Supervised SR (CNNs and
transformers, 2D or 3D) is the default; families with their own local procedure (GAN, self-supervised)
register a task of their own with :func:`register_task`.
"""

from __future__ import annotations

from client.tasks.base import LocalTask, RoundJob, TrainResult

TASKS: dict[str, LocalTask] = {}


def register_task(*families: str):
    """Class decorator: the task serves these model families."""

    def decorate(cls: type[LocalTask]) -> type[LocalTask]:
        for family in families:
            TASKS[family] = cls()
        return cls

    return decorate


def task_for(family: str) -> LocalTask:
    """The task for a model family (supervised when the family registers none)."""
    from client.tasks import gan, smore, supervised  # noqa: F401  (each registers its families)

    return TASKS.get(family, TASKS["*"])


__all__ = ["LocalTask", "RoundJob", "TrainResult", "register_task", "task_for", "TASKS"]
