"""The stage cache and incremental regeneration: after a principle edit only the rounds that drew it (and the rounds
after them) call the model; --dry-run counts calls and tokens without calling or writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.backends.base import Completion, Sampling
from cai.backends.fake import FakeBackend
from cai.cli import main
from cai.core.constitution import parse_constitution
from cai.core.errors import RunFolderError
from cai.core.record import read_records
from cai.generate.runner import dry_run, run_generate
from cai.generate.store import STAGES_FILE

from conftest import constitution_yaml, items_from, make_constitution, prompt_rows

EDITED = "An edited critique request for principle seven: is anything unkind?"


class CountingBackend(FakeBackend):
    """The fake backend, remembering every conversation it was sent."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.sent: list[list[dict]] = []

    def generate(self, batch, sampling, seed):
        self.sent += batch
        return super().generate(batch, sampling, seed)


def _run(out: Path, constitution, backend, n: int = 64, rounds: int = 2, **kw):
    return run_generate(constitution=constitution, items=items_from(prompt_rows(n)), backend=backend, out=out,
                        rounds=rounds, sampling=Sampling(**kw.pop("sampling", {})), batch_size=kw.pop("batch", 8),
                        **kw)


def _dry(out: Path, constitution, backend, n: int = 64, rounds: int = 2, **kw):
    return dry_run(constitution=constitution, items=items_from(prompt_rows(n)), backend=backend, out=out,
                   rounds=rounds, sampling=Sampling(**kw.pop("sampling", {})), batch_size=8, **kw)


def _by_prompt(out: Path) -> dict[str, dict]:
    return {r.prompt_id: r.model_dump() for r in read_records(out)}


def test_an_edit_regenerates_only_the_rounds_that_drew_the_principle(tmp_path):
    base = make_constitution(16)
    edited = make_constitution(16, critique={"p7": EDITED})
    out = tmp_path / "run"
    first = _run(out, base, CountingBackend())
    assert (first.calls, first.cached_calls, first.new) == (64 * 5, 0, 64)
    before = _by_prompt(out)

    backend = CountingBackend()
    again = _run(out, edited, backend)
    after = _by_prompt(out)
    users = {pid for pid, r in before.items() if any(rd["principle"] == "p7" for rd in r["rounds"])}
    assert users and len(users) < 64                       # some records drew p7, most did not
    assert (again.regenerated, again.new, again.skipped) == (len(users), 0, 64 - len(users))
    # calls: the round that drew p7 and every round after it, two calls (critique, revise) a round
    expected = sum(2 * (2 - [rd["principle"] for rd in before[pid]["rounds"]].index("p7")) for pid in users)
    assert again.calls == expected == len(backend.sent)
    assert again.cached_calls == 5 * len(users) - again.calls     # the other stages of those records: the cache
    # nothing was sent for an unaffected record, and every critique sent drew p7 or came after it
    for pid, rec in after.items():
        if pid not in users:
            assert rec == before[pid]                      # untouched, byte for byte
            continue
        old, new = before[pid], rec
        assert new["initial"] == old["initial"]            # the respond stage came from the cache
        k = [rd["principle"] for rd in old["rounds"]].index("p7")
        assert new["rounds"][:k] == old["rounds"][:k]      # rounds before the edited one came from the cache
        assert new["rounds"][k]["principle_sha256"] == edited.principle("p7").sha256
        assert new["rounds"][k]["critique"] != old["rounds"][k]["critique"]
    assert all(EDITED in m[-1]["content"] or m[-1]["content"] != base.principle("p7").critique
               for m in backend.sent)
    assert sum(EDITED in m[-1]["content"] for m in backend.sent) == len(users)   # one p7 critique per user


def test_editing_a_principle_an_exemplar_shows_regenerates_every_round_but_not_the_answers(tmp_path):
    # the first exemplar names p1, so p1's requests are in every critique and revise prompt
    out = tmp_path / "run"
    first = _run(out, make_constitution(16), CountingBackend(), n=16)
    backend = CountingBackend()
    again = _run(out, make_constitution(16, critique={"p1": "An edited critique for p1."}), backend, n=16)
    assert (again.regenerated, again.skipped) == (16, 0)
    assert (again.calls, again.cached_calls) == (16 * 4, 16)     # every round; the initial answers are reused
    assert first.calls == 16 * 5
    assert all(len(m) > 1 for m in backend.sent)                   # no respond stage (one user turn) was sent


def test_an_exemplar_with_its_own_requests_does_not_tie_prompts_to_its_principle(tmp_path):
    def constitution(p1_critique: str):
        text = constitution_yaml(16, critique={"p1": p1_critique}).replace(
            "  - principle: p1\n", "  - principle: p1\n    critique_request: Look again.\n"
                                   "    revision_request: Do better.\n")
        return parse_constitution(text, "<test>")

    out = tmp_path / "run"
    _run(out, constitution("Critique request number 1: find problem 1."), CountingBackend())
    before = _by_prompt(out)
    again = _run(out, constitution(EDITED), CountingBackend())
    users = {pid for pid, r in before.items() if any(rd["principle"] == "p1" for rd in r["rounds"])}
    assert users and (again.regenerated, again.skipped) == (len(users), 64 - len(users))


def test_principle_draws_do_not_move_when_a_text_is_edited(tmp_path):
    out = tmp_path / "run"
    _run(out, make_constitution(16), CountingBackend())
    before = {pid: [rd["principle"] for rd in r["rounds"]] for pid, r in _by_prompt(out).items()}
    _run(out, make_constitution(16, critique={"p7": EDITED}), CountingBackend())
    after = {pid: [rd["principle"] for rd in r["rounds"]] for pid, r in _by_prompt(out).items()}
    assert before == after


def test_dry_run_predicts_the_calls_and_writes_nothing(tmp_path):
    base, edited = make_constitution(16), make_constitution(16, critique={"p7": EDITED})
    out = tmp_path / "run"
    fresh = _dry(out, base, FakeBackend())
    assert not out.exists()                                 # a dry run makes no folder
    assert (fresh.calls, fresh.new, fresh.reused, fresh.cached_calls) == (64 * 5, 64, 0, 0)
    assert fresh.completion_tokens == fresh.max_completion_tokens == 64 * 5 * 256   # nothing known: the bound
    assert fresh.prompt_tokens > 0

    _run(out, base, FakeBackend())
    listing = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    plan = _dry(out, edited, FakeBackend())
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == listing   # nothing touched
    real = _run(out, edited, FakeBackend())
    assert (plan.calls, plan.cached_calls) == (real.calls, real.cached_calls)
    assert (plan.reused, plan.regenerate, plan.new) == (real.skipped, real.regenerated, real.new)
    assert plan.prompt_tokens == real.prompt_tokens         # the fake counts words; its outputs are all one length
    assert _dry(out, edited, FakeBackend()).calls == 0      # all done now


def test_a_run_killed_mid_batch_keeps_its_finished_stages(tmp_path):
    class DiesAtRevise(FakeBackend):
        def generate(self, batch, sampling, seed):
            if self.calls == 2:                             # respond, critique done; the revise call dies
                raise KeyboardInterrupt
            return super().generate(batch, sampling, seed)

    out = tmp_path / "run"
    c = make_constitution(4)
    with pytest.raises(KeyboardInterrupt):
        _run(out, c, DiesAtRevise(), n=8, rounds=1)
    assert not (out / "records.jsonl").exists() or not read_records(out)
    assert len((out / STAGES_FILE).read_text().splitlines()) == 16   # 8 answers + 8 critiques were kept
    backend = CountingBackend()
    again = _run(out, c, backend, n=8, rounds=1)
    assert (again.written, again.calls, again.cached_calls) == (8, 8, 16)   # only the revisions were called
    assert all(m[-1]["content"].startswith("Revision request") for m in backend.sent)


def test_failed_requests_are_never_cached(tmp_path):
    class FailsOne(FakeBackend):
        def generate(self, batch, sampling, seed):
            out = super().generate(batch, sampling, seed)
            return [Completion("upstream said no", 0, 0, "error", error="HTTP 500") if "number 3 " in m[-1]["content"]
                    else c for m, c in zip(batch, out)]

    out = tmp_path / "run"
    c = make_constitution(4)
    first = _run(out, c, FailsOne(), n=6, rounds=1)
    assert (first.written, first.failed) == (5, 1)
    assert "upstream said no" not in (out / STAGES_FILE).read_text()
    backend = CountingBackend()
    second = _run(out, c, backend, n=6, rounds=1)
    assert (second.written, second.new, second.calls) == (1, 1, 3)   # the failed prompt is called again, whole
    assert "upstream said no" not in (out / "records.jsonl").read_text()


def test_other_sampling_settings_reuse_nothing(tmp_path):
    out = tmp_path / "run"
    c = make_constitution(4)
    _run(out, c, FakeBackend(), n=6, rounds=1)
    again = _run(out, c, FakeBackend(), n=6, rounds=1, sampling={"temperature": 0.3})
    assert (again.regenerated, again.calls, again.cached_calls) == (6, 18, 0)


def test_a_torn_cache_line_is_cut_and_a_bad_one_is_named(tmp_path):
    out = tmp_path / "run"
    c = make_constitution(4)
    _run(out, c, FakeBackend(), n=4, rounds=1)
    stages = out / STAGES_FILE
    with open(stages, "a") as fh:
        fh.write('{"key": "abc", "text": "half a li')       # a kill mid-write
    _run(out, c, FakeBackend(), n=5, rounds=1)              # opens, repairs, goes on
    assert all(json.loads(line) for line in stages.read_text().splitlines())
    lines = stages.read_text().splitlines()
    stages.write_text("\n".join(lines[:2] + ['{"not": "an entry"}'] + lines[2:]) + "\n")
    with pytest.raises(RunFolderError, match=r"stages\.jsonl:3: not a stage cache entry"):
        _run(out, c, FakeBackend(), n=6, rounds=1)


def test_cli_dry_run_and_summary(cli_env, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(12)))
    cfile = tmp_path / "c.yaml"
    cfile.write_text(constitution_yaml(16))
    out = tmp_path / "run"
    args = ["generate", "--backend", "fake", "--prompts", str(prompts), "--constitution", str(cfile), "--out",
            str(out), "--rounds", "2", "--max-new-tokens", "32"]
    assert main(args + ["--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "model calls" in text and "60" in text and "12 new" in text
    assert not out.exists()
    assert main(args) == 0
    capsys.readouterr()
    cfile.write_text(constitution_yaml(16, critique={"p7": EDITED}))
    assert main(args + ["--dry-run"]) == 0
    planned = capsys.readouterr().out
    assert main(args) == 0
    done = capsys.readouterr().out
    regenerated = sum(any(rd.principle == "p7" for rd in r.rounds) for r in read_records(out))
    assert f"{regenerated} regenerated" in done
    assert f"{regenerated} to regenerate" in planned
