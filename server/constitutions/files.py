"""One watched constitution file: its state, and how a refresh finds out whether it changed.

A scan (:class:`WatchedFiles`) stats every file of the sources (cheap) and reads only those whose stat signature
(mtime_ns, size, inode, ctime_ns) differs from the last read: an in-place write changes mtime or size, a save by
rename changes the inode. Two writes within one mtime tick (1 s or 2 s on some file systems) with the same size would
look alike, so, as git does with its "racily clean" entries, a read made less than 2 s after the file's mtime is not
trusted: such a file is read again on each refresh (whatever its stat) until a read comes 2 s or more after its
mtime. A re-read whose bytes have the same sha256 as the last read changes nothing. A half-written or empty file (an
editor mid-save) simply fails validation; the finished write changes the stat again and is read on the next refresh.

A folder contributes every ``*.yaml`` / ``*.yml`` regular file directly inside it, in name order; other files (a
README) and dotfiles (editor swap and lock files such as ``.#x.yaml``) are ignored. A file named explicitly is loaded
whatever its suffix.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from cai.core.constitution import Constitution, parse_constitution
from cai.core.errors import ConstitutionError, Issue
from cai.core.safe_yaml import MAX_YAML_BYTES

SUFFIXES = (".yaml", ".yml")
RACY_NS = 2_000_000_000   # a read less than this long after the file's mtime may miss a same-tick, same-size write

_NAME_LINE = re.compile(r"^name\s*:", re.MULTILINE)


def _stat(path: str) -> os.stat_result:
    # one place for every stat of a watched file (tests count the calls)
    return os.stat(path)


def now() -> str:
    """The time now, as the registry records it (ISO, UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# What the registry keeps of each file


@dataclass(frozen=True)
class LoadError:
    """A file (or source folder) that does not load: the edit was not applied. ``issues`` are ``file:line: field:
    message`` strings; ``at`` (ISO time, UTC) is when this failure was first seen."""

    path: str
    message: str
    issues: list[str]
    at: str

    def same_failure(self, other: LoadError | None) -> bool:
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
class FileState:
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
# Scanning the disk


class WatchedFiles:
    """The files of some sources (files and folders) and what was last read from each; :meth:`_scan` finds what
    changed (see the module docstring). Touched only under the subclass's refresh lock."""

    def __init__(self) -> None:
        self._sources: list[tuple[Path, bool]] = []   # (path as given, is a folder)
        self._files: dict[str, FileState] = {}        # absolute path -> its state

    def _scan(self) -> tuple[dict[str, FileState], dict[str, LoadError]]:
        """Stat every watched file, read those that changed; files that vanished are left out. Returns the new file
        states and the errors of the sources themselves (a watched folder that is gone or unreadable)."""
        files: dict[str, FileState] = {}
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
                    source_errors[str(path)] = LoadError(str(path), message, [message], now())
                    continue
            for p in listing:
                key = os.path.abspath(p)
                if key in files:
                    continue
                f = self._check(key, str(p), self._files.get(key), explicit=not is_dir)
                if f is not None:
                    files[key] = f
        return files, source_errors

    def _check(self, key: str, shown: str, prev: FileState | None, explicit: bool) -> FileState | None:
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

    def _read(self, key: str, shown: str, prev: FileState | None) -> FileState | None:
        try:
            with open(key, "rb") as fh:
                st = os.fstat(fh.fileno())   # the stat of what is read (a rename-replace cannot slip in between)
                data = fh.read(MAX_YAML_BYTES + 1)   # never more than a constitution may be: bounded memory
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            e = OSError(f"{shown} is a folder; give a constitution .yaml file")
            return self._unreadable(key, shown, prev, e)
        except OSError as e:
            return self._unreadable(key, shown, prev, e)
        racy = time.time_ns() - st.st_mtime_ns < RACY_NS
        digest = hashlib.sha256(data).hexdigest()
        base = prev if prev is not None else FileState(key, shown)
        if prev is not None and prev.digest == digest:
            return replace(prev, signature=_signature(st), racy=racy)
        name_line = None
        if len(data) > MAX_YAML_BYTES:
            error = ConstitutionError(f"invalid constitution {shown}", [Issue(
                f"the file is {st.st_size:,} bytes; a constitution may be at most 1 MiB ({MAX_YAML_BYTES:,} bytes)",
                shown)])
            return self._failed(base, error, _signature(st), digest, racy, name_line)
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
        loaded = Loaded(constitution, shown, st.st_mtime_ns, len(data), now())
        return replace(base, signature=_signature(st), digest=digest, racy=racy, parsed=loaded, error=None,
                       issues=(), name_line=name_line)

    @staticmethod
    def _failed(base: FileState, error: ConstitutionError, signature: tuple | None, digest: str | None, racy: bool,
                name_line: int | None) -> FileState:
        issues = tuple(error.issues) or (Issue(error.message),)
        load_error = LoadError(base.shown, error.message, [str(i) for i in issues], now())
        return replace(base, signature=signature, digest=digest, racy=racy, parsed=None, error=load_error,
                       issues=issues, name_line=name_line)

    def _unreadable(self, key: str, shown: str, prev: FileState | None, e: OSError) -> FileState:
        # signature None: read again on every refresh until it can be read
        error = ConstitutionError(f"cannot read {shown}: {e.strerror or e}")
        return self._failed(prev if prev is not None else FileState(key, shown), error, None, None, True, None)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _signature(st: os.stat_result) -> tuple:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)

