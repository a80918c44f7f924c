"""What every step of the workflow shares: how it talks to the person at the terminal (:class:`Ui`) and what a
step whose work is saved as it finishes does when Ctrl-C or a full disk stops it (:func:`resumable`).

The default :class:`Ui` says nothing, so a library caller gets the same work without a terminal; the CLI's draws
progress bars and tables. Inside :func:`resumable`, Ctrl-C or a full disk end in :class:`Interrupted` or
:class:`DiskFull`, which say what was kept and how to go on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.files import disk_full_errno

RESUME = "run the same command again to continue"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during work that is saved as it finishes: ``kept`` says where, ``resume`` how to go on."""

    def __init__(self, kept: str, resume: str = RESUME):
        super().__init__(f"{kept}; {resume}")
        self.kept, self.resume = kept, resume


class DiskFull(OSError):
    """No space left (or a quota reached) during work that is saved as it finishes."""

    def __init__(self, error: OSError, kept: str, resume: str = RESUME):
        super().__init__(error.errno, error.strerror, error.filename)
        self.kept, self.resume = kept, resume


@contextlib.contextmanager
def resumable(kept: str, resume: str = RESUME, interrupt: bool = True) -> Iterator[None]:
    """Turn Ctrl-C (unless ``interrupt`` is False) and a full disk inside the block into errors that say what was
    kept; the innermost block wins."""
    try:
        yield
    except (Interrupted, DiskFull):
        raise
    except KeyboardInterrupt:
        if not interrupt:
            raise
        raise Interrupted(kept, resume) from None
    except OSError as e:
        if disk_full_errno(e) is not None:
            raise DiskFull(e, kept, resume) from e
        raise


class Ui:
    """What the steps tell the terminal. This one says nothing; the CLI's draws bars and tables."""

    def status(self, text: str) -> AbstractContextManager[Any]:
        """A line shown while a slow step without progress runs (loading a model)."""
        return contextlib.nullcontext()

    def note(self, text: str, label: str | None = None) -> None:
        """A line for the person: ``label`` (``skipped``, ``note``) marks one they may want to act on."""

    def bar(self) -> AbstractContextManager[Any]:
        """A progress display; inside it, ``.generate(label)``, ``.train(stage)``, ``.eval()`` and ``.label()`` give
        the callbacks the library reports to."""
        return contextlib.nullcontext(_Silent())

    def generated(self, summary, bad_rows: list) -> None: ...
    def dry_run(self, report, backend: str) -> None: ...
    def built(self, card) -> None: ...
    def trained(self, stage: str, out: Path, manifest: dict) -> None: ...
    def evaluated(self, run: Path, report: dict, seconds: float) -> None: ...
    def labelled(self, run: Path, result: Any) -> None: ...
    def checked(self, run: Path, report: dict) -> None: ...


class _Silent:
    def generate(self, label: str = "records"):
        from cai.generate.runner import Progress

        return Progress()

    def train(self, stage: str):
        from cai.train.trainer import TrainProgress

        return TrainProgress()

    def eval(self):
        from cai.evaluation.runner import EvalProgress

        return EvalProgress()

    def label(self):
        return lambda kind, done, total: None


@dataclass
class Endpoints:
    """How to reach the model of a run made with ``--backend openai``."""

    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 64
    timeout: float = 120.0
    max_retries: int = 6

    def options(self) -> dict:
        return {"base_urls": self.base_urls, "api_key_env": self.api_key_env, "concurrency": self.concurrency,
                "timeout": self.timeout, "max_retries": self.max_retries}
