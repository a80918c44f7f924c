"""The live set of constitutions the HTTP service serves; edits on disk are picked up without a restart.

This is a service layer: it knows nothing of FastAPI. The app builds one :class:`ConstitutionRegistry` in its lifespan
and starts :func:`~server.constitutions.watch.watch` as a background task; the critique pipeline calls
:meth:`ConstitutionRegistry.get`, the admin routes :meth:`ConstitutionRegistry.listing` and
:meth:`ConstitutionRegistry.info`.

Sources are constitution files and folders (what a folder contributes, and how an edit is noticed:
:mod:`server.constitutions.files`).

Start-up is strict: any file that does not validate, two files declaring one ``name:``, a source that does not exist,
or no constitution at all raises :class:`~cai.core.errors.ConstitutionError` listing every problem (``file:line:
field: message``, as :func:`~cai.core.constitution.load_constitution` words them). After that the service is never
taken down by an edit: a file that no longer validates keeps its last good version serving and is reported by
:meth:`ConstitutionRegistry.errors` (and logged as a WARNING once per distinct failure) until it loads again.

Consistency. All state a reader sees (name -> :class:`Loaded`, path -> :class:`LoadError`) lives in one immutable view
object; a refresh builds the next view aside and swaps it in with one assignment, so readers take no lock and never see
a half-applied change. Refreshes are serialised by a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from cai.core.constitution import Constitution
from cai.core.errors import ConstitutionError, Issue
from server.admin.protocol import ConstitutionInfo, ConstitutionList, LoadErrorInfo, PrincipleInfo
from server.constitutions.files import FileState, Loaded, LoadError, WatchedFiles, now


@dataclass(frozen=True)
class _View:
    loaded: dict[str, Loaded]       # name -> Loaded, sorted by name
    errors: dict[str, LoadError]    # path -> LoadError, sorted by path


# ---------------------------------------------------------------------------------------------------------------
# The registry


class ConstitutionRegistry(WatchedFiles):
    """Constitutions loaded from files and folders, reloaded on :meth:`refresh` (see the module docstring)."""

    def __init__(self, sources: list[str | Path], min_interval: float = 0.5, log: logging.Logger | None = None):
        super().__init__()
        self.min_interval = float(min_interval)   # seconds between two unforced refreshes
        self.log = log or logging.getLogger("server.constitutions")
        self._lock = threading.Lock()
        self._view = _View({}, {})
        self._last_refresh = float("-inf")             # time.monotonic() of the last refresh
        self._startup([Path(s) for s in sources])

    # -- reading (lock-free: one attribute read of an immutable view) ---------------------------------------

    def get(self, name: str) -> Constitution:
        """The constitution called ``name``. An unknown name first triggers one (throttled) :meth:`refresh`, so a
        file added a moment ago is found; still unknown: ``KeyError(name)``."""
        return self._loaded(name).constitution

    def names(self) -> list[str]:
        return list(self._view.loaded)

    def snapshot(self) -> dict[str, Loaded]:
        """name -> :class:`Loaded`, all from one view (later refreshes never change it)."""
        return dict(self._view.loaded)

    def errors(self) -> dict[str, LoadError]:
        """path -> the last failed load of that file (cleared when the file loads again, or is deleted)."""
        return dict(self._view.errors)

    def info(self, name: str) -> ConstitutionInfo:
        """What is served as ``name`` (``KeyError`` if unknown, as :meth:`get`). Its ``error`` is set when the
        file's latest edit did not load, i.e. what is served is older than the file."""
        loaded = self._loaded(name)
        return _info(loaded, self._view.errors.get(loaded.path))

    def listing(self) -> ConstitutionList:
        """Everything, from one consistent view: every constitution (sorted by name) and every file (or source
        folder) whose latest state did not load, whether or not an older version of it is serving (sorted by path)."""
        view = self._view
        return ConstitutionList(data=[_info(loaded, view.errors.get(loaded.path)) for loaded in view.loaded.values()],
                                errors=[_error_info(e) for e in view.errors.values()])

    def describe(self, name: str | None = None) -> dict:
        """:meth:`info` (with a name) or :meth:`listing` (without), as JSON-ready dicts::

            {"name", "version", "description", "sha256", "path", "loaded_at",
             "principles": [{"id", "sha256", "tags", "weight"}], "exemplars": <count>,
             "error": null | {"path", "message", "issues", "at"}}

            {"data": [<one description per constitution>], "errors": [{"path", "message", "issues", "at"}, ...]}
        """
        return (self.info(name) if name is not None else self.listing()).model_dump(mode="json")

    def _loaded(self, name: str) -> Loaded:
        loaded = self._view.loaded.get(name)
        if loaded is None:
            self.refresh()
            loaded = self._view.loaded.get(name)
            if loaded is None:
                raise KeyError(name)
        return loaded

    # -- refreshing --------------------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> list[str]:
        """Re-stat the sources (at most once per ``min_interval`` seconds unless ``force``), re-read the files whose
        stat changed, and swap in the new mapping. Returns the names added, removed or whose content changed."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_refresh < self.min_interval:
                return []
            self._last_refresh = now
            return self._refresh_locked()

    def _startup(self, sources: list[Path]) -> None:
        if not sources:
            raise ConstitutionError("no constitution sources given: name constitution files or folders")
        issues: list[Issue] = []
        for path in sources:
            if not path.exists():
                issues.append(Issue("no such file or folder", str(path)))
            self._sources.append((path, path.is_dir()))
        if issues:
            raise ConstitutionError("cannot load the constitutions", issues)
        with self._lock:
            self._last_refresh = time.monotonic()
            files, source_errors = self._scan()
            for error in source_errors.values():
                issues += [Issue(text) for text in error.issues]
            claimed: dict[str, FileState] = {}
            for f in files.values():
                if f.parsed is None:
                    issues += list(f.issues)
                    continue
                name = f.parsed.constitution.name
                first = claimed.setdefault(name, f)
                if first is not f:
                    issues.append(Issue(f"constitution name {name!r} is also declared in {first.shown}", f.shown,
                                        f.name_line, "name"))
            if issues:
                raise ConstitutionError("cannot load the constitutions", issues)
            if not claimed:
                shown = ", ".join(str(p) for p, _ in self._sources)
                raise ConstitutionError(f"no constitution found in {shown}",
                                        hint="a folder is searched for *.yaml and *.yml files directly inside it")
            self._files = {key: replace(f, serving=f.parsed) for key, f in files.items()}
            self._view = _View(dict(sorted((name, f.parsed) for name, f in claimed.items()
                                           if f.parsed is not None)), {})
        for name, loaded in self._view.loaded.items():
            self.log.info("loaded constitution %r from %s (sha256 %s)", name, loaded.path,
                          loaded.constitution.sha256[:12])

    def _refresh_locked(self) -> list[str]:
        old_view, old_files = self._view, self._files
        files, errors = self._scan()

        # What each file would serve: its current content if it validates, else its last good version. A file whose
        # new content claims a name another file holds is refused (keeps its last good version); when every claimant
        # of a name is new, all are refused. Reverting can only bring back names of the old, conflict-free mapping,
        # so this ends.
        wanted = {key: f.parsed if f.parsed is not None else f.serving for key, f in files.items()}
        refused: dict[str, tuple[str, str]] = {}   # key -> (name, the file holding it)
        while True:
            claims: dict[str, list[str]] = defaultdict(list)
            for key, loaded in wanted.items():
                if loaded is not None:
                    claims[loaded.constitution.name].append(key)
            conflict = False
            for name, keys in claims.items():
                if len(keys) < 2:
                    continue
                changing = [k for k in keys if wanted[k] is not files[k].serving]
                holders = [k for k in keys if k not in changing] or keys
                for key in changing:
                    other = next(k for k in holders if k != key)
                    refused[key] = (name, files[other].shown)
                    wanted[key] = files[key].serving
                    conflict = True
            if not conflict:
                break

        at = now()
        for key, f in files.items():
            if f.error is not None:
                errors[f.shown] = f.error
            elif key in refused:
                name, other = refused[key]
                message = f"constitution name {name!r} is already declared in {other}; this edit is not applied"
                error = LoadError(f.shown, message, [str(Issue(message, f.shown, f.name_line, "name"))], at)
                errors[f.shown] = error
        for path, error in errors.items():   # an unchanged failure keeps its first time and is not logged again
            if error.same_failure(old_view.errors.get(path)):
                errors[path] = old_view.errors[path]

        files = {key: replace(f, serving=wanted[key]) for key, f in files.items()}
        serving = {s.constitution.name: s for s in (f.serving for f in files.values()) if s is not None}
        view = _View(dict(sorted(serving.items())), dict(sorted(errors.items())))
        self._files, self._view = files, view   # _files is only read under the lock; readers see _view alone

        self._log_changes(old_files, files, old_view, view)
        changed = [name for name in sorted(set(old_view.loaded) | set(view.loaded))
                   if _identity(old_view.loaded.get(name)) != _identity(view.loaded.get(name))]
        return changed

    # -- logging -------------------------------------------------------------------------------------------------

    def _log_changes(self, old_files: dict[str, FileState], files: dict[str, FileState], old_view: _View,
                     view: _View) -> None:
        for key, f in old_files.items():
            if key not in files and f.serving is not None:
                self.log.info("%s was deleted: constitution %r is no longer served", f.shown,
                              f.serving.constitution.name)
        for key, f in files.items():
            before = old_files[key].serving if key in old_files else None
            now = f.serving
            if now is None or _identity(before) == _identity(now):
                continue
            c = now.constitution
            if before is None:
                self.log.info("loaded constitution %r from %s (sha256 %s)", c.name, f.shown, c.sha256[:12])
            elif before.constitution.name != c.name:
                self.log.info("%s: constitution %r is now %r (sha256 %s)", f.shown, before.constitution.name,
                              c.name, c.sha256[:12])
            elif before.constitution.sha256 != c.sha256:
                self.log.info("reloaded constitution %r from %s (sha256 %s -> %s)", c.name, f.shown,
                              before.constitution.sha256[:12], c.sha256[:12])
        for path, error in view.errors.items():
            if old_view.errors.get(path) is error:
                continue
            serving = next((s for s in view.loaded.values() if s.path == path), None)
            more = f" (and {len(error.issues) - 1} more)" if len(error.issues) > 1 else ""
            keeps = (f"still serving the last good version of {serving.constitution.name!r}" if serving
                     else "nothing is served from it")
            self.log.warning("constitution file %s did not load: %s%s; %s", path, error.issues[0], more, keeps)
        for path in old_view.errors:
            if path not in view.errors and any(f.shown == path for f in files.values()):
                self.log.info("%s loads again", path)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _identity(loaded: Loaded | None) -> tuple | None:
    # what makes a served version different for the caller: its content and where it comes from
    return None if loaded is None else (loaded.constitution.sha256, loaded.path)


def _info(loaded: Loaded, error: LoadError | None) -> ConstitutionInfo:
    c = loaded.constitution
    return ConstitutionInfo(
        name=c.name, version=c.version, description=c.description, sha256=c.sha256, path=loaded.path,
        loaded_at=loaded.loaded_at,
        principles=[PrincipleInfo(id=p.id, sha256=p.sha256, tags=list(p.tags), weight=p.weight)
                    for p in c.principles],
        exemplars=len(c.exemplars),
        error=_error_info(error) if error is not None else None)


def _error_info(error: LoadError) -> LoadErrorInfo:
    return LoadErrorInfo(path=error.path, message=error.message, issues=list(error.issues), at=error.at)
