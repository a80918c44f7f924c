"""Errors a user can fix. The CLI prints them as one clear message each, never as a traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Issue:
    """One thing wrong with an input, with where it is (file, 1-based line, dotted field)."""

    message: str
    file: str | None = None
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "")
        parts = [p for p in (where, self.field) if p]
        return (": ".join(parts) + ": " if parts else "") + self.message


class CaiError(Exception):
    """Base of every error a user can act on. ``issues`` lists each problem found (maybe several)."""

    def __init__(self, message: str, issues: list[Issue] | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.issues = list(issues or [])
        self.hint = hint

    def __str__(self) -> str:
        lines = [self.message] + [f"  {i}" for i in self.issues]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class ConstitutionError(CaiError):
    """A constitution file that does not validate (or cannot be read)."""


class PromptFileError(CaiError):
    """A prompt file that cannot be read, or has bad lines in strict mode."""


class ModelError(CaiError):
    """A model that cannot be found or loaded."""


class ContextLengthError(CaiError):
    """One or more prompts do not fit the model's context window."""


class RunFolderError(CaiError):
    """An output folder that conflicts with this run (another constitution or model, a lock)."""


def display_path(path: str | Path) -> str:
    """A path as the user typed it, relative to the working directory where possible."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


class DataError(CaiError):
    """Records that cannot become training data (none, all flagged, nothing left after filtering)."""


class ConfigError(CaiError):
    """A training config (YAML recipe or flag) that names an unknown key or a value out of range."""


class TrainingError(CaiError):
    """Training that cannot start (no chat template, no SFT adapter) or had to stop (non-finite loss, out of memory)."""
