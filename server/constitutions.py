"""The live set of constitutions the HTTP service serves; edits on disk are picked up without a restart.

This is a service layer: it knows nothing of FastAPI. The app builds one :class:`ConstitutionRegistry` in its lifespan
and starts :func:`watch` as a background task; routes call :meth:`ConstitutionRegistry.get` and
:meth:`ConstitutionRegistry.describe`.

Sources are constitution files and folders. A folder contributes every ``*.yaml`` / ``*.yml`` regular file directly
inside it, in name order; other files (a README) and dotfiles (editor swap and lock files such as ``.#x.yaml``) are
ignored. A file named explicitly is loaded whatever its suffix.

Start-up is strict: any file that does not validate, two files declaring one ``name:``, a source that does not exist,
or no constitution at all raises :class:`~cai.core.errors.ConstitutionError` listing every problem (``file:line:
field: message``, as :func:`~cai.core.constitution.load_constitution` words them). After that the service is never
taken down by an edit: a file that no longer validates keeps its last good version serving and is reported by
:meth:`ConstitutionRegistry.errors` (and logged as a WARNING once per distinct failure) until it loads again.

Noticing edits. :meth:`~ConstitutionRegistry.refresh` stats every file (cheap) and reads only those whose stat
signature (mtime_ns, size, inode, ctime_ns) differs from the last read: an in-place write changes mtime or size, a
save by rename changes the inode. Two writes within one mtime tick (1 s or 2 s on some file systems) with the same
size would look alike, so, as git does with its "racily clean" entries, a read made less than 2 s after the file's
mtime is not trusted: such a file is read again on each refresh (whatever its stat) until a read comes 2 s or more
after its mtime. A re-read whose bytes have the same sha256 as the last read changes nothing. A half-written or empty
file (an editor mid-save) simply fails validation and keeps the last good version; the finished write changes the stat
again and is read on the next refresh.

Consistency. All state a reader sees (name -> :class:`Loaded`, path -> :class:`LoadError`) lives in one immutable view
object; a refresh builds the next view aside and swaps it in with one assignment, so readers take no lock and never see
a half-applied change. Refreshes are serialised by a lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from cai.core.constitution import Constitution, parse_constitution
from cai.core.errors import ConstitutionError, Issue

SUFFIXES = (".yaml", ".yml")
RACY_NS = 2_000_000_000   # a read less than this long after the file's mtime may miss a same-tick, same-size write

_NAME_LINE = re.compile(r"^name\s*:", re.MULTILINE)


def _stat(path: str) -> os.stat_result:
    # one place for every stat of a watched file (tests count the calls)
    return os.stat(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# What readers see


@dataclass(frozen=True)
class LoadError:
    """A file (or source folder) that does not load: the edit was not applied. ``issues`` are ``file:line: field:
    message`` strings; ``at`` (ISO time, UTC) is when this failure was first seen."""

    path: str
    message: str
    issues: list[str]
    at: str

    def to_json(self) -> dict:
        return {"path": self.path, "message": self.message, "issues": list(self.issues), "at": self.at}

    def _same_failure(self, other: LoadError | None) -> bool:
        return other is not None and (other.message, other.issues) == (self.message, self.issues)


@dataclass(frozen=True)
class Loaded:
    """A constitution being served, with the file it came from (``path`` as the sources spell it), the file's
    ``mtime_ns`` and ``size`` (bytes) when it was read, and when it was loaded (ISO time, UTC)."""

    constitution: Constitution
    path: str
    mtime_ns: int
    size: int
    loaded_at: str


@dataclass(frozen=True)
class _View:
    loaded: dict[str, Loaded]       # name -> Loaded, sorted by name
    errors: dict[str, LoadError]    # path -> LoadError, sorted by path


@dataclass(frozen=True)
class _File:
    """What the registry knows of one watched file (replaced, never mutated; touched only under the lock)."""

    key: str                        # absolute path: identity of the file
    shown: str                      # the path as the sources spell it: used in every message
    signature: tuple | None = None  # (mtime_ns, size, ino, ctime_ns) at the last read; None: read again
    digest: str | None = None       # sha256 of the bytes last read
    racy: bool = True               # the last read came < RACY_NS after the mtime: read again even if stat is equal
    parsed: Loaded | None = None    # what the current content loads as; None when it does not validate
    error: LoadError | None = None  # why the current content does not load (read or validation)
    issues: tuple[Issue, ...] = ()  # the same, structured (for the start-up error)
    name_line: int | None = None    # line of `name:` in the current content
    serving: Loaded | None = None   # what this file contributes to the served mapping


# ---------------------------------------------------------------------------------------------------------------
# The registry


class ConstitutionRegistry:
    """Constitutions loaded from files and folders, reloaded on :meth:`refresh` (see the module docstring)."""

    def __init__(self, sources: list[str | Path], min_interval: float = 0.5, log: logging.Logger | None = None):
        self.min_interval = float(min_interval)   # seconds between two unforced refreshes
        self.log = log or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._sources: list[tuple[Path, bool]] = []   # (path as given, is a folder)
        self._files: dict[str, _File] = {}
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

    def describe(self, name: str | None = None) -> dict:
        """JSON-ready descriptions.

        For one name (``KeyError`` if unknown, as :meth:`get`)::

            {"name", "version", "description", "sha256", "path", "loaded_at",
             "principles": [{"id", "sha256", "tags", "weight"}], "exemplars": <count>,
             "error": null | {"path", "message", "issues", "at"}}

        ``error`` is set when the file's latest edit did not load, i.e. what is served is older than the file.
        Without a name, everything from one consistent view::

            {"data": [<one description per constitution, sorted by name>],
             "errors": [{"path", "message", "issues", "at"}, ... sorted by path]}

        ``errors`` lists every file (or source folder) whose latest state did not load, whether or not an older
        version of it is serving.
        """
        if name is not None:
            loaded = self._loaded(name)
            return _describe(loaded, self._view.errors.get(loaded.path))
        view = self._view
        return {"data": [_describe(loaded, view.errors.get(loaded.path)) for loaded in view.loaded.values()],
                "errors": [e.to_json() for e in view.errors.values()]}

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
            claimed: dict[str, _File] = {}
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

        at = _now()
        for key, f in files.items():
            if f.error is not None:
                errors[f.shown] = f.error
            elif key in refused:
                name, other = refused[key]
                message = f"constitution name {name!r} is already declared in {other}; this edit is not applied"
                error = LoadError(f.shown, message, [str(Issue(message, f.shown, f.name_line, "name"))], at)
                errors[f.shown] = error
        for path, error in errors.items():   # an unchanged failure keeps its first time and is not logged again
            if error._same_failure(old_view.errors.get(path)):
                errors[path] = old_view.errors[path]

        files = {key: replace(f, serving=wanted[key]) for key, f in files.items()}
        serving = {s.constitution.name: s for s in (f.serving for f in files.values()) if s is not None}
        view = _View(dict(sorted(serving.items())), dict(sorted(errors.items())))
        self._files, self._view = files, view   # _files is only read under the lock; readers see _view alone

        self._log_changes(old_files, files, old_view, view)
        changed = [name for name in sorted(set(old_view.loaded) | set(view.loaded))
                   if _identity(old_view.loaded.get(name)) != _identity(view.loaded.get(name))]
        return changed

    # -- scanning the disk -------------------------------------------------------------------------------------

    def _scan(self) -> tuple[dict[str, _File], dict[str, LoadError]]:
        """Stat every watched file, read those that changed; files that vanished are left out. Returns the new file
        states and the errors of the sources themselves (a watched folder that is gone or unreadable)."""
        files: dict[str, _File] = {}
        source_errors: dict[str, LoadError] = {}
        for path, is_dir in self._sources:
            if not is_dir:
                listing = [path]
            else:
                try:
                    listing = sorted((p for p in path.iterdir()
                                      if p.suffix in SUFFIXES and not p.name.startswith(".")), key=lambda p: p.name)
                except OSError as e:
                    message = f"cannot list the constitution folder {path}: {e.strerror or e}"
                    source_errors[str(path)] = LoadError(str(path), message, [message], _now())
                    continue
            for p in listing:
                key = os.path.abspath(p)
                if key in files:
                    continue
                f = self._check(key, str(p), self._files.get(key), explicit=not is_dir)
                if f is not None:
                    files[key] = f
        return files, source_errors

    def _check(self, key: str, shown: str, prev: _File | None, explicit: bool) -> _File | None:
        """The file's new state: ``prev`` when its stat shows no change, else what a fresh read gives; None if it
        is gone (or, in a folder, no longer a regular file)."""
        try:
            st = _stat(key)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            return self._unreadable(key, shown, prev, e)
        if not explicit and not _is_regular(st):
            return None
        if prev is not None and prev.signature == _signature(st) and not prev.racy:
            return prev
        return self._read(key, shown, prev)

    def _read(self, key: str, shown: str, prev: _File | None) -> _File | None:
        try:
            with open(key, "rb") as fh:
                st = os.fstat(fh.fileno())   # the stat of what is read (a rename-replace cannot slip in between)
                data = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            e = OSError(f"{shown} is a folder; give a constitution .yaml file")
            return self._unreadable(key, shown, prev, e)
        except OSError as e:
            return self._unreadable(key, shown, prev, e)
        racy = time.time_ns() - st.st_mtime_ns < RACY_NS
        digest = hashlib.sha256(data).hexdigest()
        base = prev if prev is not None else _File(key, shown)
        if prev is not None and prev.digest == digest:
            return replace(prev, signature=_signature(st), racy=racy)
        name_line = None
        try:
            text = data.decode("utf-8")
            match = _NAME_LINE.search(text)
            if match:
                name_line = text.count("\n", 0, match.start()) + 1
            constitution = parse_constitution(text, shown)
        except UnicodeDecodeError as e:
            error = ConstitutionError(f"{shown} is not UTF-8 text ({e.reason} at byte {e.start})")
            return self._failed(base, error, _signature(st), digest, racy, name_line)
        except ConstitutionError as error:
            return self._failed(base, error, _signature(st), digest, racy, name_line)
        loaded = Loaded(constitution, shown, st.st_mtime_ns, len(data), _now())
        return replace(base, signature=_signature(st), digest=digest, racy=racy, parsed=loaded, error=None,
                       issues=(), name_line=name_line)

    @staticmethod
    def _failed(base: _File, error: ConstitutionError, signature: tuple | None, digest: str | None, racy: bool,
                name_line: int | None) -> _File:
        issues = tuple(error.issues) or (Issue(error.message),)
        load_error = LoadError(base.shown, error.message, [str(i) for i in issues], _now())
        return replace(base, signature=signature, digest=digest, racy=racy, parsed=None, error=load_error,
                       issues=issues, name_line=name_line)

    def _unreadable(self, key: str, shown: str, prev: _File | None, e: OSError) -> _File:
        # signature None: read again on every refresh until it can be read
        error = ConstitutionError(f"cannot read {shown}: {e.strerror or e}")
        return self._failed(prev if prev is not None else _File(key, shown), error, None, None, True, None)

    # -- logging -------------------------------------------------------------------------------------------------

    def _log_changes(self, old_files: dict[str, _File], files: dict[str, _File], old_view: _View,
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


def _signature(st: os.stat_result) -> tuple:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _identity(loaded: Loaded | None) -> tuple | None:
    # what makes a served version different for the caller: its content and where it comes from
    return None if loaded is None else (loaded.constitution.sha256, loaded.path)


def _describe(loaded: Loaded, error: LoadError | None) -> dict:
    c = loaded.constitution
    return {
        "name": c.name,
        "version": c.version,
        "description": c.description,
        "sha256": c.sha256,
        "path": loaded.path,
        "loaded_at": loaded.loaded_at,
        "principles": [{"id": p.id, "sha256": p.sha256, "tags": list(p.tags), "weight": p.weight}
                       for p in c.principles],
        "exemplars": len(c.exemplars),
        "error": error.to_json() if error is not None else None,
    }


async def watch(registry: ConstitutionRegistry, interval: float = 1.0) -> None:
    """Refresh ``registry`` every ``interval`` seconds, forever, in a worker thread (the event loop never blocks on
    the disk). Start it as a background task in the app's lifespan and cancel it on shutdown. An unexpected exception
    is logged (with its traceback once per distinct failure) and the watch goes on."""
    last_failure: str | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(registry.refresh)
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
            if failure != last_failure:
                registry.log.exception("constitution refresh failed (retrying every %ss)", interval)
            else:
                registry.log.debug("constitution refresh failed again: %s", failure)
            last_failure = failure
        else:
            last_failure = None
