"""Files a run folder is made of: JSONL written whole lines at a time and fsynced, atomic replacement, a folder lock.

Writes append whole lines, one ``write`` per batch, then ``fsync``: a ``kill -9`` can at worst leave one torn last line,
which the next open cuts off (``repair_tail``). Whole files are replaced atomically (a temporary file, fsynced,
renamed over the old one). ``folder_lock`` keeps two cai processes out of one folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cai.core.errors import RunFolderError, display_path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Read a JSONL file written by this module: (line number, object) pairs. A torn last line (no newline: a write
    cut short by a kill) is skipped; any other unreadable line is an error naming its line."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    complete = lines[:-1]      # the piece after the last newline is empty, or a torn line
    for n, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{display_path(path)}:{n}: unreadable line ({e})",
                                 hint="This line was not written by cai (a kill only ever tears the last line). "
                                      "Remove or fix it by hand.") from None


def read_models(path: Path, model: Any, what: str) -> list:
    """Every line of a JSONL file of this module's writing, validated as the pydantic ``model``; a line that is not
    one is an error naming the file, the line and ``what`` it should have been."""
    out = []
    for n, obj in read_jsonl(path):
        try:
            out.append(model.model_validate(obj))
        except Exception as e:
            raise RunFolderError(f"{display_path(path)}:{n}: not a valid {what}: {str(e).splitlines()[0]}") from None
    return out


def repair_tail(path: Path) -> int:
    """Cut a torn last line (bytes after the final newline) off the file. Returns the bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        # scan back from the end for the last newline; torn tails are at most one batch of lines
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx != -1:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        if keep == size:
            return 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def json_line(obj: dict) -> str:
    # ensure_ascii keeps lone surrogates and odd bytes from breaking the UTF-8 file; one object, one line
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n"


def append_lines(path: Path, objs: list[dict]) -> None:
    data = "".join(json_line(o) for o in objs).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (a temporary file, fsynced, renamed over it): a reader or a kill
    sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class KeyedLog:
    """An append-only ``{"key": ..., "value": ...}`` JSONL file: work that is expensive to redo (``cai eval``'s
    answers and judgements), saved as it finishes. Each :meth:`add` is one write plus fsync, so a kill loses at most
    the batch in flight; a torn last line is cut off on open. Deleting the file only costs recomputation."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self.values: dict[str, Any] = {}
        for n, obj in read_jsonl(path):
            if not isinstance(obj, dict) or "key" not in obj or "value" not in obj:
                raise RunFolderError(f"{display_path(path)}:{n}: not a cache entry (no key/value)",
                                     hint=f"Delete {display_path(path)}: it only saves recomputation.")
            self.values[obj["key"]] = obj["value"]

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def add(self, entries: dict[str, Any]) -> None:
        fresh = {k: v for k, v in entries.items() if k not in self.values}
        if fresh:
            append_lines(self.path, [{"key": k, "value": v} for k, v in fresh.items()])
            self.values.update(fresh)


@contextlib.contextmanager
def folder_lock(root: Path, what: str, hint: str = "Wait for it to finish.") -> Iterator[None]:
    """Keep two cai processes out of one folder (a second one gets a clear error, not interleaved writes)."""
    root.mkdir(parents=True, exist_ok=True)
    lock = open(root / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RunFolderError(f"{display_path(root)} is in use by another cai process ({what})", hint=hint) from None
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


# ---------------------------------------------------------------------------------------------------------------
# A full disk

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "storagefull", "os error 28", "errno 28")
# torch.save on a full disk says only "file write failed" / "unexpected pos"; it counts as a full disk when the
# filesystem it wrote to has less than this left
_NEARLY_FULL_BYTES = 64 * 2**20
_WRITE_FAILED_WORDS = ("file write failed", "unexpected pos", "iostream error", "error while serializing")


def disk_full_errno(e: BaseException, folder: Path | None = None) -> int | None:
    """``ENOSPC``/``EDQUOT`` when ``e`` (or what caused it) is a write that failed for want of space. Libraries that
    do not raise OSError are recognised by their words; a short write with no reason counts only when ``folder``'s
    disk is nearly full."""
    seen: set[int] = set()
    chain: BaseException | None = e
    texts = []
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in DISK_FULL_ERRNOS:
            return chain.errno
        texts.append(str(chain).lower())
        chain = chain.__cause__ or chain.__context__
    text = " ".join(texts)
    if any(w in text for w in _DISK_FULL_WORDS):
        return errno.EDQUOT if "quota" in text else errno.ENOSPC
    if folder is not None and any(w in text for w in _WRITE_FAILED_WORDS):
        try:
            if shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES:
                return errno.ENOSPC
        except OSError:
            pass
    return None
