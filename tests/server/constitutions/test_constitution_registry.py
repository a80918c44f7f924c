"""The live constitution registry of the server: start-up checks, edits picked up by refresh(), bad edits keep the last
good version, renames/new/deleted files, duplicate names refused, throttling, atomic swaps, concurrency, the watch."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

import server.constitutions.files as sc
from cai.core.errors import ConstitutionError
from server.constitutions import ConstitutionRegistry, Loaded, watch

from conftest import constitution_yaml

_MTIME = [int((time.time() - 10_000) * 1e9)]   # distinct mtimes, far enough in the past not to be "racy"


def write(path: Path, text: str, mtime_ns: int | None = None) -> Path:
    """Write ``text`` and give the file a distinct mtime (no sleeping needed to make edits visible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if mtime_ns is None:
        _MTIME[0] += 1_000_000_000
        mtime_ns = _MTIME[0]
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if needle in line)


def bad_yaml(name: str = "small") -> str:
    """A constitution with an unknown key on a known line."""
    return constitution_yaml(3, name=name).replace("    weight: 1.0", "    wieght: 1.0", 1)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "constitutions"
    write(d / "small.yaml", constitution_yaml(3))
    write(d / "other.yml", constitution_yaml(2, name="other"))
    return d


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------------------------------
# Start-up


def test_loads_a_folder_and_a_single_file(tmp_path, folder):
    write(folder / "README.md", "# not a constitution\n")
    write(folder / "notes.txt", "name: nope\n")
    write(folder / ".#small.yaml", "an editor's lock file: ignored\n")
    (folder / "sub.yaml").mkdir()   # a folder with a yaml-looking name: ignored
    single = write(tmp_path / "elsewhere" / "extra.yaml", constitution_yaml(1, name="extra"))
    reg = ConstitutionRegistry([folder, str(single)])
    assert reg.names() == ["extra", "other", "small"]
    assert reg.get("small").ids == ["p1", "p2", "p3"]
    assert reg.get("extra").ids == ["p1"]
    snap = reg.snapshot()
    assert snap["small"].path == str(folder / "small.yaml")
    assert snap["extra"].path == str(single)
    assert snap["small"].size == (folder / "small.yaml").stat().st_size
    assert snap["small"].mtime_ns == (folder / "small.yaml").stat().st_mtime_ns
    assert reg.errors() == {}
    with pytest.raises(KeyError):
        reg.get("nope")


def test_startup_lists_every_bad_file_with_its_line(tmp_path):
    d = tmp_path / "c"
    write(d / "good.yaml", constitution_yaml(2, name="good"))
    bad1 = write(d / "bad1.yaml", bad_yaml("bad1"))
    bad2 = write(d / "bad2.yaml", "name: bad2\nversion: 1\n")
    with pytest.raises(ConstitutionError) as info:
        ConstitutionRegistry([d])
    text = str(info.value)
    assert f"{bad1}:{line_of(bad_yaml('bad1'), 'wieght')}: unknown key 'wieght'" in text
    assert f"{bad2}:2: version: must be a string" in text
    assert f"{bad2}:1: principles: required field is missing" in text
    assert "good.yaml" not in text
    files = {i.file for i in info.value.issues}
    assert files == {str(bad1), str(bad2)}


def test_startup_refuses_two_files_with_one_name(tmp_path):
    d = tmp_path / "c"
    write(d / "a.yaml", constitution_yaml(2, name="same"))
    b = write(d / "b.yaml", constitution_yaml(3, name="same"))
    with pytest.raises(ConstitutionError) as info:
        ConstitutionRegistry([d])
    (issue,) = info.value.issues
    assert (issue.file, issue.line, issue.field) == (str(b), 1, "name")
    assert "'same'" in issue.message and str(d / "a.yaml") in issue.message


def test_startup_missing_path_is_named(tmp_path, folder):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ConstitutionError) as info:
        ConstitutionRegistry([folder, missing])
    assert str(missing) in str(info.value)
    assert "no such file or folder" in str(info.value)


def test_startup_empty_folder_is_an_error(tmp_path):
    d = tmp_path / "empty"
    write(d / "README.md", "# nothing here\n")
    with pytest.raises(ConstitutionError, match="no constitution found in .*empty"):
        ConstitutionRegistry([d])
    with pytest.raises(ConstitutionError, match="no constitution sources"):
        ConstitutionRegistry([])


# ---------------------------------------------------------------------------------------------------------------
# Edits


def test_good_edit_is_picked_up_without_restart(folder):
    reg = ConstitutionRegistry([folder])
    before = reg.get("small")
    write(folder / "small.yaml", constitution_yaml(3, critique={"p2": "A brand new critique request."}))
    assert reg.refresh(force=True) == ["small"]
    after = reg.get("small")
    assert after.principle("p2").critique == "A brand new critique request."
    assert after.sha256 != before.sha256
    assert after.principle_sha256["p1"] == before.principle_sha256["p1"]
    assert after.principle_sha256["p2"] != before.principle_sha256["p2"]
    desc = reg.describe("small")
    assert desc["sha256"] == after.sha256
    assert [p["sha256"] for p in desc["principles"]] == [p.sha256 for p in after.principles]
    assert reg.refresh(force=True) == []   # nothing changed since


def test_touch_or_comment_edit_reports_no_change(folder):
    reg = ConstitutionRegistry([folder])
    sha = reg.get("small").sha256
    write(folder / "small.yaml", constitution_yaml(3))                    # same bytes, new mtime
    assert reg.refresh(force=True) == []
    write(folder / "small.yaml", "# a comment\n" + constitution_yaml(3))  # same content, different bytes
    assert reg.refresh(force=True) == []
    assert reg.get("small").sha256 == sha


def test_bad_edit_keeps_last_good_version_and_warns_once(folder, caplog):
    caplog.set_level(logging.INFO, logger="server.constitutions")
    reg = ConstitutionRegistry([folder])
    good = reg.get("small")
    path = folder / "small.yaml"
    write(path, bad_yaml())
    assert reg.refresh(force=True) == []
    assert reg.get("small") is good                       # still serving the last good version
    (error,) = reg.errors().values()
    line = line_of(bad_yaml(), "wieght")
    assert error.path == str(path)
    assert error.issues[0].startswith(f"{path}:{line}: unknown key 'wieght'")
    assert reg.describe("small")["error"]["issues"] == error.issues
    (warning,) = warnings(caplog)
    assert str(path) in warning and "unknown key 'wieght'" in warning and "still serving" in warning

    for _ in range(3):                                    # neither a refresh nor a touch logs it again
        reg.refresh(force=True)
    write(path, bad_yaml())
    reg.refresh(force=True)
    assert len(warnings(caplog)) == 1
    assert reg.errors()[str(path)] is error               # the same failure keeps its first time

    write(path, "name: small\n")                          # a different failure is logged
    reg.refresh(force=True)
    assert len(warnings(caplog)) == 2 and "required field is missing" in warnings(caplog)[-1]

    write(path, constitution_yaml(3, critique={"p1": "Fixed."}))
    assert reg.refresh(force=True) == ["small"]
    assert reg.errors() == {}
    assert reg.get("small").principle("p1").critique == "Fixed."
    assert reg.describe("small")["error"] is None


def test_half_written_and_empty_saves_keep_serving(folder):
    reg = ConstitutionRegistry([folder])
    path = folder / "small.yaml"
    old = reg.get("small")
    new_text = constitution_yaml(3, critique={"p3": "Saved in two steps."})
    write(path, "")
    reg.refresh(force=True)
    assert reg.get("small") is old and "the file is empty" in reg.errors()[str(path)].issues[0]
    write(path, new_text[: len(new_text) // 2])
    reg.refresh(force=True)
    assert reg.get("small") is old
    write(path, new_text)
    assert reg.refresh(force=True) == ["small"]
    assert reg.get("small").principle("p3").critique == "Saved in two steps." and reg.errors() == {}


def test_same_size_same_mtime_edit_is_noticed(folder):
    reg = ConstitutionRegistry([folder])
    path = folder / "small.yaml"
    mtime = path.stat().st_mtime_ns
    text = constitution_yaml(3, critique={"p1": "AAAA"})
    write(path, text, mtime)
    assert reg.refresh(force=True) == ["small"]
    write(path, text.replace("AAAA", "BBBB"), mtime)      # same size, same mtime
    assert path.stat().st_size == len(text) and path.stat().st_mtime_ns == mtime
    assert reg.refresh(force=True) == ["small"]
    assert reg.get("small").principle("p1").critique == "BBBB"


def test_racy_read_is_read_again(folder, monkeypatch):
    # Pretend the stat shows only (mtime, size), as on a file system with coarse, unreliable stat fields: a second
    # write within the same mtime tick is then seen only because the first read was "racy" (within 2 s of mtime).
    monkeypatch.setattr(sc, "_signature", lambda st: (st.st_mtime_ns, st.st_size))
    reg = ConstitutionRegistry([folder])
    reads: list[str] = []
    real_read = reg._read
    monkeypatch.setattr(reg, "_read", lambda key, shown, prev: reads.append(shown) or real_read(key, shown, prev))
    path = folder / "small.yaml"
    now = time.time_ns()
    text = constitution_yaml(3, critique={"p1": "AAAA"})
    write(path, text, now)
    assert reg.refresh(force=True) == ["small"]
    write(path, text.replace("AAAA", "BBBB"), now)
    reads.clear()
    assert reg.refresh(force=True) == ["small"]
    assert reg.get("small").principle("p1").critique == "BBBB"
    assert reads == [str(path)]                           # other.yml (old mtime, unchanged) was not read


def test_rename_of_a_constitution_moves_it(folder):
    reg = ConstitutionRegistry([folder])
    write(folder / "small.yaml", constitution_yaml(3, name="big"))
    assert reg.refresh(force=True) == ["big", "small"]
    assert reg.names() == ["big", "other"]
    assert reg.snapshot()["big"].path == str(folder / "small.yaml")
    with pytest.raises(KeyError):
        reg.get("small")


def test_new_file_appears_and_deleted_file_disappears(folder, caplog):
    caplog.set_level(logging.INFO, logger="server.constitutions")
    reg = ConstitutionRegistry([folder], min_interval=0)
    write(folder / "fresh.yaml", constitution_yaml(2, name="fresh"))
    assert reg.get("fresh").ids == ["p1", "p2"]           # an unknown name triggers a refresh
    assert reg.names() == ["fresh", "other", "small"]
    (folder / "other.yml").unlink()
    assert reg.refresh(force=True) == ["other"]
    assert reg.names() == ["fresh", "small"]
    with pytest.raises(KeyError):
        reg.get("other")
    assert any("other.yml was deleted" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_replace_by_rename_is_picked_up_and_dotfiles_ignored(folder):
    reg = ConstitutionRegistry([folder])
    tmp = write(folder / ".small.yaml", constitution_yaml(3, name="small", critique={"p1": "Via rename."}))
    assert reg.refresh(force=True) == [] and reg.errors() == {}   # the editor's temp file is not a source
    os.replace(tmp, folder / "small.yaml")
    assert reg.refresh(force=True) == ["small"]
    assert reg.get("small").principle("p1").critique == "Via rename."


def test_duplicate_name_from_an_edit_is_refused_and_old_mapping_stays(folder, caplog):
    reg = ConstitutionRegistry([folder])
    before = reg.snapshot()
    other = folder / "other.yml"
    write(other, constitution_yaml(2, name="small"))
    assert reg.refresh(force=True) == []
    assert reg.snapshot() == before
    assert reg.get("other") is before["other"].constitution
    error = reg.errors()[str(other)]
    assert "already declared in" in error.message and str(folder / "small.yaml") in error.message
    assert error.issues[0].startswith(f"{other}:1: name: ")
    assert len(warnings(caplog)) == 1
    reg.refresh(force=True)
    assert len(warnings(caplog)) == 1                     # not logged again while nothing changes
    # the holder moves to another name: the refused edit now goes through without touching other.yml
    write(folder / "small.yaml", constitution_yaml(3, name="renamed"))
    assert reg.refresh(force=True) == ["other", "renamed", "small"]
    assert reg.snapshot()["small"].path == str(other) and reg.errors() == {}


def test_two_new_files_with_one_name_are_both_refused(folder):
    reg = ConstitutionRegistry([folder])
    write(folder / "x1.yaml", constitution_yaml(1, name="twin"))
    write(folder / "x2.yaml", constitution_yaml(2, name="twin"))
    assert reg.refresh(force=True) == []
    assert "twin" not in reg.names()
    assert set(reg.errors()) == {str(folder / "x1.yaml"), str(folder / "x2.yaml")}


def test_vanished_folder_is_reported(tmp_path, folder):
    single = write(tmp_path / "keep.yaml", constitution_yaml(1, name="keep"))
    reg = ConstitutionRegistry([folder, single])
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    assert reg.refresh(force=True) == ["other", "small"]
    assert reg.names() == ["keep"]
    assert "cannot list the constitution folder" in reg.errors()[str(folder)].message


# ---------------------------------------------------------------------------------------------------------------
# Throttling, atomicity, threads


def test_min_interval_throttles_stats_unless_forced(folder, monkeypatch):
    stats: list[str] = []
    real_stat = sc._stat
    monkeypatch.setattr(sc, "_stat", lambda p: stats.append(p) or real_stat(p))
    reg = ConstitutionRegistry([folder], min_interval=60)
    stats.clear()
    write(folder / "small.yaml", constitution_yaml(3, critique={"p1": "Throttled."}))
    assert reg.refresh() == []
    assert stats == []                                    # within the interval: not even a stat
    assert reg.get("small").principle("p1").critique != "Throttled."
    assert reg.refresh(force=True) == ["small"]
    assert len(stats) == 2
    reg._last_refresh -= 61                               # the interval has passed
    reg.refresh()
    assert len(stats) == 4


def test_snapshot_taken_before_a_refresh_is_unchanged_after_it(folder):
    reg = ConstitutionRegistry([folder])
    snap, errs = reg.snapshot(), reg.errors()
    old_sha = snap["small"].constitution.sha256
    write(folder / "small.yaml", constitution_yaml(3, name="small", critique={"p1": "Changed."}))
    write(folder / "other.yml", bad_yaml("other"))
    write(folder / "new.yaml", constitution_yaml(1, name="new"))
    assert reg.refresh(force=True) == ["new", "small"]
    assert sorted(snap) == ["other", "small"] and errs == {}
    assert snap["small"].constitution.sha256 == old_sha
    assert isinstance(snap["small"], Loaded)
    assert reg.snapshot()["small"].constitution.sha256 != old_sha and len(reg.errors()) == 1


def test_concurrent_refresh_and_readers_never_miss_a_name(folder):
    reg = ConstitutionRegistry([folder])
    path = folder / "small.yaml"
    texts = [constitution_yaml(3, critique={"p1": f"Edit number {i}."}) for i in range(50)]
    stop = threading.Event()
    failures: list[BaseException] = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:
                failures.append(e)
        return run

    def writer():
        i = 0
        while not stop.is_set():
            if i % 2:
                path.write_text(texts[i % 50], encoding="utf-8")          # in place: may be read half-written
            else:
                tmp = folder / ".small.yaml.tmp"
                tmp.write_text(texts[i % 50], encoding="utf-8")
                os.replace(tmp, path)                                      # atomic save by rename
            i += 1

    def refresher():
        while not stop.is_set():
            reg.refresh(force=True)

    def reader():
        while not stop.is_set():
            assert reg.get("small").principle("p1").critique.startswith(("Critique request", "Edit number"))
            assert reg.get("other").ids == ["p1", "p2"]
            assert reg.names() == ["other", "small"]           # names() and snapshot() never refresh: a
            assert sorted(reg.snapshot()) == ["other", "small"]  # half-applied swap would show here

    threads = [threading.Thread(target=guard(f)) for f in (writer, refresher, refresher, refresher, reader, reader)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)   # switch threads often, so that a window between two steps of a swap would be hit
    try:
        for t in threads:
            t.start()
        time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        sys.setswitchinterval(switch)
    assert not failures, failures
    write(path, texts[7])
    reg.refresh(force=True)
    assert reg.get("small").principle("p1").critique == "Edit number 7." and reg.errors() == {}


# ---------------------------------------------------------------------------------------------------------------
# describe() and watch()


def test_describe_shapes(folder):
    reg = ConstitutionRegistry([folder])
    write(folder / "broken.yaml", "name: broken\n")
    reg.refresh(force=True)
    one = reg.describe("small")
    c = reg.get("small")
    assert set(one) == {"name", "version", "description", "sha256", "path", "loaded_at", "principles",
                        "exemplars", "error"}
    assert (one["name"], one["version"], one["sha256"], one["exemplars"]) == ("small", "1", c.sha256, 2)
    assert one["principles"][0] == {"id": "p1", "sha256": c.principles[0].sha256, "tags": [], "weight": 1.0}
    everything = reg.describe()
    assert [d["name"] for d in everything["data"]] == ["other", "small"]
    (error,) = everything["errors"]
    assert set(error) == {"path", "message", "issues", "at"} and error["path"] == str(folder / "broken.yaml")
    json.dumps(everything)                                # JSON-ready as it is
    with pytest.raises(KeyError):
        reg.describe("missing")


def test_watch_survives_exceptions_and_keeps_refreshing(folder, caplog):
    reg = ConstitutionRegistry([folder])
    calls: list[int] = []

    def flaky_refresh(force: bool = False):
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("disk on fire")
        return []

    reg.refresh = flaky_refresh

    async def main():
        task = asyncio.create_task(watch(reg, interval=0.001))
        for _ in range(2000):
            if len(calls) >= 5:
                break
            await asyncio.sleep(0.001)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(calls) >= 5
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1 and "disk on fire" in logged[0].exc_text   # the same failure twice: one traceback


def test_watch_picks_up_an_edit(folder):
    reg = ConstitutionRegistry([folder], min_interval=0)
    write(folder / "small.yaml", constitution_yaml(3, critique={"p1": "Seen by the watch."}))

    async def main():
        task = asyncio.create_task(watch(reg, interval=0.001))
        for _ in range(2000):
            if reg.snapshot()["small"].constitution.principle("p1").critique == "Seen by the watch.":
                break
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(main())
    assert reg.get("small").principle("p1").critique == "Seen by the watch."


def test_a_hostile_edit_is_listed_as_failed_and_the_last_good_version_serves(folder):
    """An alias bomb or a huge file saved over a served constitution: refused with its line (or size) in bounded
    memory, listed among the failures, and the last good version keeps serving."""
    import tracemalloc

    from cai.core.safe_yaml import MAX_YAML_BYTES

    reg = ConstitutionRegistry([folder])
    good = reg.get("small")
    path = folder / "small.yaml"
    bomb = ["name: small", "version: '1'", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)] + ["principles: *a8"]
    write(path, "\n".join(bomb) + "\n")
    tracemalloc.start()
    try:
        reg.refresh(force=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    assert reg.get("small") is good
    (error,) = reg.errors().values()
    assert "aliases are not allowed" in error.issues[0] and f"{path}:4:" in error.issues[0]
    write(path, constitution_yaml(3) + "# " + "x" * (4 * MAX_YAML_BYTES) + "\n")
    reg.refresh(force=True)
    assert reg.get("small") is good
    (error,) = reg.errors().values()
    assert "at most 1 MiB" in error.issues[0]
