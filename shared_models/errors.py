"""The one error type that explains itself: which file or folder, what is wrong with it, and what to do.

Every part of fedsr raises subclasses of :class:`ExplainedError` for bad input (a scan, a site folder, its
``site.toml``, a checkpoint, a site's state file), so that an operator can fix the input without reading code.
Subclasses add the built-in base their callers catch (``ValueError``, ``RuntimeError``, ``FileNotFoundError``).

The message names a path: never send it off a site as it is (use :attr:`ExplainedError.reason`, which leaves
the path out).
"""

from __future__ import annotations

from os import PathLike


class ExplainedError(Exception):
    """Base: ``path`` (file or folder), ``problem`` (what is wrong) and ``hint`` (what to do).

    The message is ``"{path}: {problem}. {hint}"``.
    """

    def __init__(self, path: str | PathLike[str], problem: str, hint: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        super().__init__(f"{self.path}: {problem}. {hint}")

    @property
    def reason(self) -> str:
        """The message without the path: problem and hint."""
        return f"{self.problem}. {self.hint}"

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Exceptions pickle through ``args`` (the message) by default, which this __init__ does not accept;
        # Ray and multiprocessing pickle exceptions raised in workers.
        return type(self), (self.path, self.problem, self.hint)
