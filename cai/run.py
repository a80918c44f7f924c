"""The run folder: the one owner of its paths, its ``run.json`` (a typed :class:`RunInfo`), its lock and its manifests.

Every command reaches a run folder through :class:`RunFolder`, so the file names, the checks that a folder is a run
folder, and the answer to "which model made this run" live here once. Paths written into ``run.json``, manifests and
cards are relative to the run folder where they point inside it (``data/card.json``), and relative to it with ``..``
where they point outside (the constitution file a run was generated with): a run folder moved together with what it
points at, or archived with its own files, still opens. Absolute paths written by older versions are still read.

Layout::

    RUN/run.json            RunInfo: constitution, model, prompts, backend, sampling, rounds
    RUN/records.jsonl       one Record a line (cai.core.record)
    RUN/superseded.jsonl    records whose key changed (a constitution edit), kept
    RUN/stages.jsonl        the model-call cache (cai.generate.store)
    RUN/errors.jsonl        requests that failed, prompts left out
    RUN/data/               training rows and their card (cai.data)
    RUN/helpful/            helpfulness answers mixed into SFT (a run folder of its own)
    RUN/adapters/<stage>/   a trained adapter and its manifest.json (cai.train)
    RUN/preferences.jsonl   one Preference a line: AI-feedback soft labels of answer pairs (cai.label)
    RUN/label/              the labeller's caches (samples.jsonl, judgements.jsonl), card.json, check.json
    RUN/eval/               answers, judgements, report.json, report.html (cai.evaluation)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cai.core.errors import RunFolderError, display_path
from cai.core.files import folder_lock, write_json_atomic

RUN_FILE = "run.json"
RECORDS = "records.jsonl"
SUPERSEDED = "superseded.jsonl"
STAGES = "stages.jsonl"
ERRORS = "errors.jsonl"
PREFERENCES = "preferences.jsonl"
LABEL_CHECK = "check.json"          # in LABEL_DIR: the labeller's check (``cai label RUN --check``)
REVIEWS = "reviews.jsonl"
DATA_DIR = "data"
HELPFUL_DIR = "helpful"
ADAPTERS_DIR = "adapters"
MANIFEST = "manifest.json"
EVAL_DIR = "eval"
LABEL_DIR = "label"
ITERATIONS_DIR = "iterations"


class ConstitutionRef(BaseModel):
    """Which constitution a run was generated with (its content hash identifies the version)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    version: str | None = None
    sha256: str | None = None
    path: str | None = None       # the file (absolute: it lies outside the run folder)


class RunInfo(BaseModel):
    """``run.json``: what made a run folder's records. Written by ``cai generate``, read by every later command.
    Unknown keys are ignored (a newer cai may add some); missing required ones are an error naming the file."""

    model_config = ConfigDict(extra="ignore")
    constitution: ConstitutionRef
    model: str                               # the model id as the backend reports it
    model_source: str | None = None          # the model as the user named it (``default``, a folder, a hub id)
    model_revision: str | None = None
    prompts: str | None = None               # the prompt file (absolute) or a hub dataset name
    backend: str = "local"
    base_urls: list[str] | None = None       # the endpoints of an openai-backend run
    dtype: str | None = None                 # what the local model computed in (None: fp32, or not local)
    rounds: int = 1
    sampling: dict[str, Any] = {}
    created_at: str | None = None
    updated_at: str | None = None
    cai_version: str | None = None


class RunFolder:
    """A run folder. ``RunFolder(path)`` names one (it may not exist yet: ``cai generate`` creates it);
    :meth:`open` names one that must already be a run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._info: RunInfo | None = None

    @classmethod
    def open(cls, root: str | Path) -> RunFolder:
        """A folder that ``cai generate`` made (it has a readable ``run.json``), or a clear error."""
        run = cls(root)
        run.info   # noqa: B018  (reads and checks run.json now, so the error comes before any work)
        return run

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # -- paths ------------------------------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def records(self) -> Path:
        return self.root / RECORDS

    @property
    def superseded(self) -> Path:
        return self.root / SUPERSEDED

    @property
    def stages(self) -> Path:
        return self.root / STAGES

    @property
    def errors(self) -> Path:
        return self.root / ERRORS

    @property
    def preferences(self) -> Path:
        return self.root / PREFERENCES

    @property
    def label_check(self) -> Path:
        """The labeller's check of its labels (``cai label RUN --check``): accuracy, calibration and position bias on
        pairs whose better answer is known, with their intervals."""
        return self.root / LABEL_DIR / LABEL_CHECK

    @property
    def reviews(self) -> Path:
        return self.root / REVIEWS

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    @property
    def helpful_dir(self) -> Path:
        """The helpfulness answers mixed into SFT (a run folder of its own)."""
        return self.root / HELPFUL_DIR

    @property
    def adapters_dir(self) -> Path:
        return self.root / ADAPTERS_DIR

    def adapter_dir(self, stage: str) -> Path:
        return self.adapters_dir / stage

    def manifest_path(self, stage: str) -> Path:
        return self.adapter_dir(stage) / MANIFEST

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def label_dir(self) -> Path:
        """The labeller's caches and cards (``cai label``)."""
        return self.root / LABEL_DIR

    @property
    def iterations_dir(self) -> Path:
        return self.root / ITERATIONS_DIR

    def shown(self, path: Path | None = None) -> str:
        """A path as error messages show it."""
        return display_path(path if path is not None else self.root)

    # -- run.json ---------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.run_file.exists()

    @property
    def info(self) -> RunInfo:
        if self._info is None:
            self._info = self.read_info()
        return self._info

    def read_info(self) -> RunInfo:
        """Read and check ``run.json``. Every way it can be wrong is a :class:`RunFolderError` naming the file."""
        if not self.root.is_dir():
            raise RunFolderError(f"{self.shown()} is not a folder", hint="Pass the --out folder of `cai generate`.")
        try:
            text = self.run_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunFolderError(f"{self.shown()} is not a cai run folder (no {RUN_FILE})",
                                 hint="Pass the --out folder of `cai generate`.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{self.shown(self.run_file)} is unreadable ({e})") from None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise RunFolderError(f"{self.shown(self.run_file)} is unreadable: line {getattr(e, 'lineno', '?')} is "
                                 f"not JSON ({e})",
                                 hint="Fix or delete it, or choose another folder.") from None
        try:
            return RunInfo.model_validate(obj)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(x) for x in first["loc"]) or "(top level)"
            raise RunFolderError(f"{self.shown(self.run_file)} is unreadable: field {field}: {first['msg']}",
                                 hint="This run.json was not written by cai generate; fix or delete it.") from None

    def write_info(self, info: RunInfo) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = info.model_dump(mode="json")
        if data["dtype"] is None:          # fp32 (or not local): run.json as it was before --dtype existed
            del data["dtype"]
        write_json_atomic(self.run_file, data)
        self._info = info

    # -- what the run is made of ------------------------------------------------------------------------------
    @property
    def model_source(self) -> str:
        """The model to load for this run's base: as the user named it, else the id the backend reported."""
        return self.info.model_source or self.info.model

    def constitution_file(self) -> Path | None:
        """The constitution file the run was generated with (None when run.json names none)."""
        return self.resolve(self.info.constitution.path)

    def prompts_source(self) -> str | None:
        """The prompt file as a path that opens from here, or a hub dataset name as it was given."""
        stored = self.info.prompts
        if not stored:
            return None
        path = self.resolve(stored)
        return str(path) if path is not None and path.exists() else stored

    # -- paths stored in files --------------------------------------------------------------------------------
    def rel(self, path: str | Path | None) -> str | None:
        """``path`` as stored in this folder's files: relative to the run folder when it lies inside it (so the folder
        can be moved, archived and served from anywhere), absolute when it lies outside (a constitution or prompt
        file elsewhere, which moving the run folder does not move)."""
        if path is None:
            return None
        p = Path(path).resolve()
        try:
            return p.relative_to(self.root.resolve()).as_posix() or "."
        except ValueError:
            return str(p)

    def resolve(self, stored: str | None) -> Path | None:
        """A path read from this folder's files: relative ones are relative to the run folder; absolute ones (older
        versions wrote those) are taken as they are."""
        if not stored:
            return None
        p = Path(stored)
        return p if p.is_absolute() else (self.root / p).resolve()

    # -- manifests and the lock -------------------------------------------------------------------------------
    def read_manifest(self, stage: str) -> dict | None:
        """The manifest of a finished adapter, or None when the stage has not finished."""
        path = self.manifest_path(stage)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            raise RunFolderError(f"{self.shown(path)} is unreadable",
                                 hint=f"Train the stage again with `cai train {stage} {self.shown()} "
                                      "--overwrite`.") from None

    def write_manifest(self, stage: str, manifest: dict) -> None:
        self.adapter_dir(stage).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path(stage), manifest)

    def finished_adapters(self) -> list[str]:
        """Stages with a finished adapter (a manifest), in name order."""
        if not self.adapters_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.adapters_dir.glob(f"*/{MANIFEST}"))

    @contextlib.contextmanager
    def lock(self, what: str, hint: str = "Wait for it to finish.") -> Iterator[None]:
        """Keep two cai processes out of this folder (a second one gets a clear error, not interleaved writes)."""
        with folder_lock(self.root, what, hint):
            yield
