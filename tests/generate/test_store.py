"""The run folder: resume, torn-line repair, superseding on edits, folder identity checks, preflight, the lock."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from cai.backends.base import Sampling
from cai.backends.fake import FakeBackend
from cai.core.errors import ContextLengthError, RunFolderError
from cai.core.files import read_jsonl
from cai.core.record import Record, read_records
from cai.generate.runner import run_generate
from cai.generate.store import open_store

from conftest import items_from, make_constitution, prompt_rows

SAMPLING = Sampling(max_new_tokens=16, seed=0)


@pytest.fixture(autouse=True)
def _no_fake_delay(monkeypatch):
    monkeypatch.delenv("CAI_FAKE_DELAY", raising=False)


def gen(out, n=8, constitution=None, backend=None, rounds=2, **kwargs):
    items = kwargs.pop("items", None) or items_from(prompt_rows(n))
    return run_generate(constitution=constitution or make_constitution(4), items=items,
                        backend=backend or FakeBackend(), out=out, rounds=rounds,
                        sampling=kwargs.pop("sampling", SAMPLING), batch_size=kwargs.pop("batch_size", 3), **kwargs)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def assert_one_record_per_prompt(out, expected_ids):
    recs = lines(out / "records.jsonl")
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "duplicate record ids"
    assert Counter(r["prompt_id"] for r in recs) == Counter(expected_ids)


def test_resume_skips_done_work(tmp_path):
    out = tmp_path / "run"
    first = gen(out)
    assert (first.written, first.skipped) == (8, 0)
    before = (out / "records.jsonl").read_bytes()
    backend = FakeBackend()
    second = gen(out, backend=backend)
    assert (second.written, second.skipped, second.superseded) == (0, 8, 0)
    assert backend.calls == 0
    assert (out / "records.jsonl").read_bytes() == before


def test_larger_limit_writes_only_the_new_ones(tmp_path):
    out = tmp_path / "run"
    gen(out, n=5)
    before = (out / "records.jsonl").read_bytes()
    backend = FakeBackend()
    s = gen(out, n=9, backend=backend)
    assert (s.written, s.skipped) == (4, 5)
    assert sum(backend.batch_sizes) == 4 * 5      # 4 prompts x 5 stages
    assert (out / "records.jsonl").read_bytes().startswith(before)
    assert_one_record_per_prompt(out, [f"q{i:03d}" for i in range(9)])


def test_run_json_written(tmp_path):
    out = tmp_path / "run"
    c = make_constitution(4)
    gen(out, constitution=c)
    info = json.loads((out / "run.json").read_text())
    assert info["constitution"]["sha256"] == c.sha256
    assert info["model"] == "fake" and info["backend"] == "fake"


def test_torn_last_line_is_cut_and_regenerated_once(tmp_path):
    out = tmp_path / "run"
    gen(out, n=6)
    path = out / "records.jsonl"
    raw = path.read_bytes().splitlines(keepends=True)
    torn_record = json.loads(raw[-1])
    # the kill happened while the last line was being written: half of it, no newline
    path.write_bytes(b"".join(raw[:-1]) + raw[-1][: len(raw[-1]) // 2])
    # reading never fails: the torn line is skipped
    assert len(read_records(out)) == 5
    assert [n for n, _ in read_jsonl(path)] == [1, 2, 3, 4, 5]
    backend = FakeBackend()
    s = gen(out, n=6, backend=backend)
    assert s.torn_bytes == len(raw[-1]) // 2
    assert (s.written, s.skipped) == (1, 5)
    assert path.read_bytes().endswith(b"\n")
    assert_one_record_per_prompt(out, [f"q{i:03d}" for i in range(6)])
    regenerated = [r for r in lines(path) if r["prompt_id"] == torn_record["prompt_id"]]
    assert regenerated[0]["id"] == torn_record["id"]       # same key: the same work, done again
    assert gen(out, n=6).written == 0


def test_torn_line_only_file(tmp_path):
    out = tmp_path / "run"
    gen(out, n=3)
    path = out / "records.jsonl"
    path.write_bytes(b'{"id": "abc", "prom')
    with open_store(out) as store:
        assert store.torn_bytes == len(b'{"id": "abc", "prom')
        assert store.records == {}
    assert path.read_bytes() == b""


def test_corrupted_middle_line_is_an_error_naming_the_line(tmp_path):
    out = tmp_path / "run"
    gen(out, n=5)
    path = out / "records.jsonl"
    raw = path.read_bytes().splitlines(keepends=True)
    raw[2] = b'{"this is": not json}\n'
    path.write_bytes(b"".join(raw))
    before = path.read_bytes()
    with pytest.raises(RunFolderError) as info:
        gen(out, n=5)
    assert "records.jsonl:3" in str(info.value)
    with pytest.raises(RunFolderError, match="records.jsonl:3"):
        read_records(out)
    assert path.read_bytes() == before


def test_line_that_is_not_a_record(tmp_path):
    out = tmp_path / "run"
    gen(out, n=3)
    with open(out / "records.jsonl", "a") as fh:
        fh.write('{"something": "else"}\n')
    with pytest.raises(RunFolderError, match="records.jsonl:4"):
        gen(out, n=3)


def test_editing_a_principle_supersedes_only_the_records_that_used_it(tmp_path):
    out = tmp_path / "run"
    n = 12
    gen(out, n=n, constitution=make_constitution(5))
    old = {r["prompt_id"]: r for r in lines(out / "records.jsonl")}
    users = {pid for pid, r in old.items() if any(rd["principle"] == "p3" for rd in r["rounds"])}
    assert users and len(users) < n      # the test needs both kinds

    edited = make_constitution(5, critique={"p3": "An edited critique request for principle three."})
    backend = FakeBackend()
    s = gen(out, n=n, constitution=edited, backend=backend)
    assert s.superseded == len(users)
    assert s.written == len(users)
    assert s.skipped == n - len(users)
    # only the p3 round and the rounds after it call the model (the stage cache gives the rest)
    assert sum(backend.batch_sizes) == s.calls < len(users) * 5
    assert s.calls + s.cached_calls == len(users) * 5

    superseded = lines(out / "superseded.jsonl")
    assert {r["prompt_id"] for r in superseded} == users
    assert all(r == old[r["prompt_id"]] for r in superseded)          # moved as they were
    new = {r["prompt_id"]: r for r in lines(out / "records.jsonl")}
    assert_one_record_per_prompt(out, [f"q{i:03d}" for i in range(n)])
    for pid in old:
        if pid in users:
            assert new[pid]["id"] != old[pid]["id"]
            p3 = next(rd for rd in new[pid]["rounds"] if rd["principle"] == "p3")
            assert p3["principle_sha256"] == edited.principle("p3").sha256
        else:
            assert new[pid] == old[pid]                               # untouched, byte for byte in content
    # nothing more to do
    again = gen(out, n=n, constitution=edited)
    assert (again.written, again.superseded) == (0, 0)


def test_other_constitution_name_is_refused_and_nothing_changes(tmp_path):
    out = tmp_path / "run"
    gen(out, n=4)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    other = make_constitution(4, name="another")
    with pytest.raises(RunFolderError) as info:
        gen(out, n=4, constitution=other)
    assert "another" in str(info.value) and "small" in str(info.value)
    assert "--supersede" in (info.value.hint or "")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before


def test_other_model_is_refused(tmp_path):
    out = tmp_path / "run"
    gen(out, n=4)
    before = (out / "records.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match="model"):
        gen(out, n=4, backend=FakeBackend("other-model"))
    assert (out / "records.jsonl").read_bytes() == before


def test_supersede_all_moves_the_old_records(tmp_path):
    out = tmp_path / "run"
    gen(out, n=4)
    old = lines(out / "records.jsonl")
    other = make_constitution(4, name="another")
    s = gen(out, n=4, constitution=other, supersede_all=True)
    assert s.superseded == 4 and s.written == 4
    assert sorted(lines(out / "superseded.jsonl"), key=lambda r: r["id"]) == sorted(old, key=lambda r: r["id"])
    new = lines(out / "records.jsonl")
    assert {r["provenance"]["constitution"]["name"] for r in new} == {"another"}
    assert_one_record_per_prompt(out, [f"q{i:03d}" for i in range(4)])
    assert json.loads((out / "run.json").read_text())["constitution"]["name"] == "another"
    # the folder now belongs to the new constitution: a plain rerun is fine
    assert gen(out, n=4, constitution=other).written == 0


def test_records_without_run_json_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "records.jsonl").write_text('{"id": "x", "prompt_id": "y"}\n')
    with pytest.raises(RunFolderError, match="run.json"):
        gen(out, n=2)


def test_out_is_a_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("x")
    with pytest.raises(RunFolderError, match="not a folder"):
        gen(out, n=2)


def _with_long_prompt(n=5):
    rows = prompt_rows(n)
    rows[2]["prompt"] = " ".join(["word"] * 1000)
    return items_from(rows)


def test_prompt_too_long_fails_before_the_folder_exists(tmp_path):
    out = tmp_path / "run"
    backend = FakeBackend(context_length=400)
    with pytest.raises(ContextLengthError) as info:
        gen(out, items=_with_long_prompt(), backend=backend)
    assert len(info.value.issues) == 1
    assert "q002" in info.value.issues[0].message
    assert info.value.issues[0].line == 3       # the row's line in its file
    assert not out.exists()
    assert backend.calls == 0


def test_skip_long_generates_the_rest_and_lists_the_long_one(tmp_path):
    out = tmp_path / "run"
    s = gen(out, items=_with_long_prompt(), backend=FakeBackend(context_length=400), skip_long=True)
    assert (s.written, s.too_long) == (4, 1)
    assert_one_record_per_prompt(out, ["q000", "q001", "q003", "q004"])
    errors = lines(out / "errors.jsonl")
    assert [e["prompt_id"] for e in errors] == ["q002"]
    assert errors[0]["reason"] == "context_length"


def test_the_context_bound_counts_every_stage(tmp_path):
    """A prompt that fits alone but not with exemplars, requests and three generations is caught up front."""
    items = items_from(prompt_rows(1))
    c = make_constitution(4)
    backend = FakeBackend(context_length=10_000)
    own = backend.count_tokens(items[0].messages)
    m = 16
    backend.context_length = own + m + 5      # the respond stage alone would fit
    with pytest.raises(ContextLengthError):
        gen(tmp_path / "run", items=items, constitution=c, backend=backend, rounds=1,
            sampling=Sampling(max_new_tokens=m))


def test_second_open_store_is_refused(tmp_path):
    out = tmp_path / "run"
    with open_store(out):
        with pytest.raises(RunFolderError, match="in use"):
            with open_store(out):
                pass
        with pytest.raises(RunFolderError, match="in use"):
            gen(out, n=2)
    # released on exit
    with open_store(out) as store:
        assert store.records == {}


def _record(key: str, prompt_id: str) -> Record:
    return Record(id=key, prompt_id=prompt_id, messages=[{"role": "user", "content": "hi"}], initial="a", rounds=[],
                  final="a", flags=[], usage={"prompt_tokens": 1, "completion_tokens": 1},
                  provenance={"constitution": {"name": "c", "sha256": "0"}, "model": "m", "backend": "fake"})


def test_append_never_writes_a_known_id_twice(tmp_path):
    out = tmp_path / "run"
    with open_store(out) as store:
        rec = _record("k1", "p")
        assert store.append([rec]) == 1
        assert store.append([rec, _record("k2", "q")]) == 1
    assert [r["id"] for r in lines(out / "records.jsonl")] == ["k1", "k2"]
    with open_store(out) as store:
        assert set(store.records) == {"k1", "k2"}
        assert store.append([_record("k1", "p")]) == 0


def test_batch_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        gen(tmp_path / "run", n=2, batch_size=0)
