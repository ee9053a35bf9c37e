"""Errors raised on bad input, and the record of a file that was skipped.

Every message names the file (or site folder), the problem, and what to do about it, so that a hospital's
operator can fix the input without reading code.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike


class _ExplainedError(Exception):
    """Base: ``path`` (file or folder), ``problem`` (what is wrong) and ``hint`` (what to do)."""

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


class ScanError(_ExplainedError, ValueError):
    """One scan (file or DICOM series) cannot be used."""


class SiteError(_ExplainedError, RuntimeError):
    """A whole site folder (or its ``site.toml``) cannot be used."""


@dataclass(frozen=True)
class Skipped:
    """A file or DICOM series left out of a site, with the reason (problem and what to do)."""

    path: str
    reason: str

    @classmethod
    def from_error(cls, error: ScanError) -> Skipped:
        return cls(error.path, error.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
