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
    def iterated(self, run: Path, report: dict) -> None: ...


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


# ---------------------------------------------------------------------------------------------------------------
# The models a step loads: the run's own (base, adapters) and a reader of probabilities (the judge, the labeller)


@dataclass
class ModelSpec:
    """Who reads probabilities (``cai eval``'s judge, ``cai label``'s feedback model): ``local`` (a transformers
    model: the run's base unless ``model`` names another) or ``openai`` (an endpoint that returns log-probabilities).
    """

    backend: str = "local"
    model: str | None = None
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 32
    batch_size: int = 16            # local: questions per forward pass


class RunModels:
    """A run's models, loaded when first needed: its base (kept: the answerer, and the default reader) and one
    adapter at a time (merged into its base)."""

    def __init__(self, folder, ui: Ui, device: str | None, dtype: str | None = None):
        self.folder, self.ui, self.device = folder, ui, device
        self.dtype = dtype or folder.info.dtype          # the run's own, unless asked otherwise
        self._base: Any = None
        self._adapter: Any = None

    def base(self):
        if self._base is None:
            from cai.backends import make_backend

            info = self.folder.info
            options: dict[str, Any] = ({"base_urls": info.base_urls or [], "api_key_env": "OPENAI_API_KEY"}
                                       if info.backend == "openai" else {})
            with self.ui.status(f"loading model {self.folder.model_source} ..."):
                self._base = make_backend(info.backend, self.folder.model_source, device=self.device,
                                          dtype=self.dtype, **options)
        return self._base

    def adapter(self, path: Path, name: str):
        """``path`` merged into the run's base (the previous adapter is let go first: one in memory at a time)."""
        from cai.core.errors import CaiError

        if self.folder.info.backend != "local":
            raise CaiError(f"{name}: an adapter runs on a local model, and this run was generated with the "
                           f"{self.folder.info.backend} backend")
        from cai.backends.local import LocalBackend

        self._adapter = None
        with self.ui.status(f"loading adapter {name} (merged into its base) ..."):
            self._adapter = LocalBackend(self.folder.model_source, device=self.device, adapter=str(path),
                                         dtype=self.dtype)
        return self._adapter

    def reader(self, spec: ModelSpec, what: str):
        """The model ``spec`` names, for reading probabilities: ``("openai", OpenAIBackend)`` or ``("local",
        LocalBackend)`` (the run's base when ``spec`` names no other). ``what``: "judge" or "feedback", for the
        flags the messages name."""
        from cai.core.errors import CaiError

        flag = f"--{what}"
        if spec.backend == "openai":
            from cai.backends.openai import OpenAIBackend

            if not spec.base_urls or not spec.model:
                raise CaiError(f"{flag}-backend openai needs {flag}-base-url URL and {flag}-model NAME")
            check_reachable(spec.base_urls, what, f"{flag}-base-url")
            return "openai", OpenAIBackend(spec.model, base_urls=spec.base_urls, api_key_env=spec.api_key_env,
                                           concurrency=spec.concurrency, max_retries=2)
        if spec.backend != "local":
            raise CaiError(f"{flag}-backend must be local or openai, got {spec.backend!r}")
        if spec.model in (None, self.folder.model_source) and self.folder.info.backend == "local":
            return "local", self.base()
        if spec.model is None:
            raise CaiError(f"the run was generated with the {self.folder.info.backend} backend: name a local {what} "
                           f"model with {flag}-model, or use {flag}-backend openai")
        from cai.backends.local import LocalBackend

        with self.ui.status(f"loading {what} model {spec.model} ..."):
            return "local", LocalBackend(spec.model, device=self.device)


def check_reachable(urls: list[str], what: str = "judge", flag: str = "--judge-base-url") -> None:
    """Fail at once, with the address, when no endpoint answers at all (instead of after every retry)."""
    import httpx

    from cai.core.errors import CaiError

    reasons = []
    for url in urls:
        try:
            httpx.get(url.rstrip("/") + "/models", timeout=5.0)
            return
        except httpx.HTTPError as e:
            reasons.append(f"{url}: {type(e).__name__}")
    raise CaiError(f"the {what} endpoint is unreachable ({'; '.join(reasons)})",
                   hint=f"Check {flag} (it usually ends in /v1) and that the server is up.")
