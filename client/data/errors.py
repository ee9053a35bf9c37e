"""Errors raised on bad input, and the record of a file that was skipped.

Every message names the file (or site folder), the problem, and what to do about it
(:class:`shared_models.errors.ExplainedError`), so that a hospital's operator can fix the input without reading code.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared_models.errors import ExplainedError


class ScanError(ExplainedError, ValueError):
    """One scan (file or DICOM series) cannot be used."""


class SiteError(ExplainedError, RuntimeError):
    """A whole site folder (or its ``site.toml``) cannot be used."""


class SitesFolderError(ExplainedError, FileNotFoundError):
    """The folder that holds a federation's site folders is missing or holds no site folder."""


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
