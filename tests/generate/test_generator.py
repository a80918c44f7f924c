"""The critique→revise engine with the fake backend: principle draws, record keys, batching, output flags."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from cai.backends.base import Completion, Sampling
from cai.backends.fake import FakeBackend
from cai.core.record import Record, read_records
from cai.generate.checks import check_output, is_echo
from cai.generate.generator import Generator
from cai.generate.planner import draw_principles, record_key
from cai.generate.runner import run_generate

from conftest import constitution_yaml, items_from, make_constitution, prompt_rows


@pytest.fixture(autouse=True)
def _no_fake_delay(monkeypatch):
    monkeypatch.delenv("CAI_FAKE_DELAY", raising=False)


# ---------------------------------------------------------------------------------------------------------------
# Principle draws


def test_draw_is_deterministic_for_a_seed():
    c = make_constitution(6)
    assert draw_principles(c, "q1", 0, 3) == draw_principles(c, "q1", 0, 3)
    assert draw_principles(c, "q1", 7, 3) == draw_principles(c, "q1", 7, 3)


def test_draw_differs_across_seeds_and_prompt_ids():
    c = make_constitution(6)
    by_id = {draw_principles(c, f"q{i}", 0, 3) for i in range(40)}
    by_seed = {draw_principles(c, "q1", s, 3) for s in range(40)}
    # 6*5*4 = 120 possible sequences: 40 draws landing on few of them would mean the id/seed are ignored
    assert len(by_id) >= 15
    assert len(by_seed) >= 15
    # and the first-round principle itself varies (all six show up)
    assert {d[0] for d in by_id} == set(c.ids)


@pytest.mark.parametrize("n, rounds", [(4, 1), (4, 3), (4, 4), (6, 5), (16, 16)])
def test_a_fresh_principle_each_round(n, rounds):
    c = make_constitution(n)
    for i in range(30):
        drawn = draw_principles(c, f"q{i}", 0, rounds)
        assert len(drawn) == rounds
        assert len(set(drawn)) == rounds
        assert set(drawn) <= set(c.ids)


def test_more_rounds_than_principles_cycles_without_immediate_repeats():
    c = make_constitution(3)
    for i in range(30):
        drawn = draw_principles(c, f"q{i}", 0, 7)
        assert len(drawn) == 7
        assert set(drawn[0:3]) == set(c.ids) and set(drawn[3:6]) == set(c.ids)
        assert all(a != b for a, b in itertools.pairwise(drawn))


def test_single_principle_many_rounds():
    c = make_constitution(1)
    assert draw_principles(c, "q", 0, 3) == ("p1", "p1", "p1")


def test_weights_are_respected():
    c = make_constitution(4, weights={"p3": 50.0})
    first = Counter(draw_principles(c, f"prompt-{i}", 0, 1)[0] for i in range(400))
    # p3 has weight 50 of 53: expected ~377 of 400; each other ~8
    assert first["p3"] > 300
    assert all(first[p] < 40 for p in ("p1", "p2", "p4"))
    uniform = Counter(draw_principles(make_constitution(4), f"prompt-{i}", 0, 1)[0] for i in range(400))
    assert uniform["p3"] < 200


def test_draw_ignores_principle_text():
    a = make_constitution(5)
    b = make_constitution(5, critique={"p2": "A completely rewritten critique.", "p4": "Another one."})
    assert a.principle_sha256 != b.principle_sha256
    for i in range(30):
        assert draw_principles(a, f"q{i}", 3, 3) == draw_principles(b, f"q{i}", 3, 3)


# ---------------------------------------------------------------------------------------------------------------
# Record keys

ITEMS = items_from(prompt_rows(30))


def _keys(constitution, backend=None, sampling=None, rounds=2):
    gen = Generator(constitution, backend or FakeBackend(), rounds=rounds, sampling=sampling or Sampling(seed=1))
    return {p.item.id: (p.key, p.principles) for p in gen.plan(ITEMS)}


def test_keys_are_stable():
    c = make_constitution(4)
    assert _keys(c) == _keys(make_constitution(4))


@pytest.mark.parametrize("change", ["model", "temperature", "top_p", "max_new_tokens", "seed", "rounds"])
def test_keys_change_with_model_and_sampling(change):
    c = make_constitution(4)
    base = _keys(c)
    if change == "model":
        other = _keys(c, backend=FakeBackend("another-model"))
    elif change == "rounds":
        other = _keys(c, rounds=3)
    else:
        value = {"temperature": 0.0, "top_p": 0.5, "max_new_tokens": 64, "seed": 2}[change]
        other = _keys(c, sampling=Sampling(**{"seed": 1, change: value}))
    assert all(base[i][0] != other[i][0] for i in base)


def test_key_changes_with_model_revision():
    item = ITEMS[0]
    c = make_constitution(4)
    a, b = FakeBackend(), FakeBackend()
    b.model_revision = "abc123"
    s = Sampling()
    assert record_key(item, c, ("p1",), a, s) != record_key(item, c, ("p1",), b, s)


def test_key_changes_with_prompt_content():
    c = make_constitution(4)
    rows = prompt_rows(2)
    changed = [dict(rows[0], prompt=rows[0]["prompt"] + " (edited)"), rows[1]]
    gen = Generator(c, FakeBackend(), rounds=1)
    a = gen.plan(items_from(rows))
    b = gen.plan(items_from(changed))
    assert a[0].key != b[0].key and a[1].key == b[1].key


def test_editing_a_principle_changes_only_the_keys_that_used_it():
    base = _keys(make_constitution(6))
    edited = _keys(make_constitution(6, critique={"p2": "An edited critique for p2."}))
    users = {i for i, (_, principles) in base.items() if "p2" in principles}
    assert users and users != set(base)     # the test needs both kinds
    for i in base:
        assert base[i][1] == edited[i][1]   # same draws
        if i in users:
            assert base[i][0] != edited[i][0]
        else:
            assert base[i][0] == edited[i][0]


def test_editing_an_exemplar_or_system_prompt_changes_every_key():
    text = constitution_yaml(4)
    base = _keys(make_constitution(4))
    from cai.core.constitution import parse_constitution

    ex = _keys(parse_constitution(text.replace("Exemplar critique two", "Exemplar critique 2")))
    sp = _keys(make_constitution(4, system_prompt="Be even better."))
    assert all(base[i][0] != ex[i][0] for i in base)
    assert all(base[i][0] != sp[i][0] for i in base)


def test_editing_a_principle_an_exemplar_names_changes_every_key():
    # the first exemplar names p1: every critique and revise prompt shows p1's requests, whatever was drawn
    base = _keys(make_constitution(6))
    edited = _keys(make_constitution(6, critique={"p1": "An edited critique for p1."}))
    assert any("p1" not in principles for _, principles in base.values())
    assert all(base[i][0] != edited[i][0] for i in base)
    assert all(base[i][1] == edited[i][1] for i in base)          # the draws still do not move


def test_editing_tags_or_weight_of_a_used_principle_keeps_keys_if_draws_are_unchanged():
    base = _keys(make_constitution(4))
    from cai.core.constitution import parse_constitution

    tagged = parse_constitution(constitution_yaml(4).replace("  - id: p1\n", "  - id: p1\n    tags: [x]\n"))
    assert _keys(tagged) == base


# ---------------------------------------------------------------------------------------------------------------
# Batching: one backend call per stage per batch


def test_one_backend_call_per_stage_per_batch(tmp_path):
    backend = FakeBackend()
    summary = run_generate(constitution=make_constitution(4), items=items_from(prompt_rows(10)), backend=backend,
                           out=tmp_path / "run", rounds=2, sampling=Sampling(max_new_tokens=32), batch_size=4)
    stages = 1 + 2 * 2
    assert backend.calls == 3 * stages
    assert sorted(backend.batch_sizes) == sorted([4] * stages * 2 + [2] * stages)
    # each batch goes through all its stages before the next batch starts
    chunks = [backend.batch_sizes[i:i + stages] for i in range(0, len(backend.batch_sizes), stages)]
    assert all(len(set(chunk)) == 1 for chunk in chunks)
    assert summary.written == 10
    records = read_records(tmp_path / "run")
    assert len(records) == 10
    for r in records:
        assert len(r.rounds) == 2
        assert r.final == r.rounds[-1].revision
        assert r.initial and r.rounds[0].critique and r.rounds[0].revision
        assert r.rounds[0].principle != r.rounds[1].principle
        assert r.provenance.rounds == 2
        assert set(r.provenance.principle_sha256) == {rd.principle for rd in r.rounds}


def test_run_batch_records_match_the_schema_and_the_plan():
    c = make_constitution(4)
    gen = Generator(c, FakeBackend(), rounds=3, sampling=Sampling(seed=5))
    plans = gen.plan(items_from(prompt_rows(3)))
    records = gen.run_batch(plans)
    for plan, rec in zip(plans, records):
        Record.model_validate(rec.to_json())
        assert rec.id == plan.key
        assert rec.prompt_id == plan.item.id
        assert tuple(r.principle for r in rec.rounds) == plan.principles
        assert rec.provenance.constitution.model_dump() == {"name": c.name, "version": c.version, "sha256": c.sha256}
        assert rec.provenance.seed == 5
        assert rec.usage["completion_tokens"] > 0 and rec.usage["prompt_tokens"] > 0


def test_each_round_revises_the_previous_revision():
    """Round r's critique prompt carries round r-1's revision as the answer under review."""
    seen: list[list[list[dict]]] = []

    class Spy(FakeBackend):
        def generate(self, batch, sampling, seed):
            seen.append(batch)
            return super().generate(batch, sampling, seed)

    gen = Generator(make_constitution(4), Spy(), rounds=2)
    rec = gen.run_batch(gen.plan(items_from(prompt_rows(1))))[0]
    _, crit1, _, crit2, rev2 = (b[0] for b in seen)
    assert crit1[-2] == {"role": "assistant", "content": rec.initial}
    assert crit2[-2] == {"role": "assistant", "content": rec.rounds[0].revision}
    assert rev2[-2] == {"role": "assistant", "content": rec.rounds[1].critique}


def test_generator_rejects_negative_rounds():
    with pytest.raises(ValueError):
        Generator(make_constitution(2), FakeBackend(), rounds=-1)


def test_zero_rounds_answers_only():
    """rounds=0 is the helpfulness-data mode: one respond call, the answer is the final text."""
    backend = FakeBackend()
    gen = Generator(make_constitution(2), backend, rounds=0)
    plans = gen.plan(items_from([{"id": "h1", "prompt": "How do tides work?"}]))
    [rec] = gen.run_batch(plans)
    assert rec.rounds == [] and rec.final == rec.initial and rec.initial
    assert backend.calls == 1


# ---------------------------------------------------------------------------------------------------------------
# Output checks (flags)


@pytest.mark.parametrize("with_exemplars", [True, False])
@pytest.mark.parametrize("marker, flag", [("[[empty]]", "empty"), ("[[echo]]", "echo"), ("[[long]]", "truncated"),
                                          ("[[same]]", "unchanged")])
def test_markers_give_flags_and_flagged_records_are_kept(tmp_path, marker, flag, with_exemplars):
    rows = prompt_rows(4)
    rows[1]["prompt"] = f"{marker} Please answer this question about gardening and soil."
    c = make_constitution(4, exemplars=with_exemplars)
    summary = run_generate(constitution=c, items=items_from(rows), backend=FakeBackend(), out=tmp_path / "run",
                           rounds=1, sampling=Sampling(max_new_tokens=64), batch_size=4)
    records = {r.prompt_id: r for r in read_records(tmp_path / "run")}
    assert summary.written == 4 and len(records) == 4
    assert flag in records["q001"].flags
    assert summary.flagged >= 1 and summary.flag_counts.get(flag, 0) >= 1
    for pid in ("q000", "q002", "q003"):
        assert records[pid].flags == []


def test_check_output_unit():
    ok = Completion("A real answer about soil.", 5, 5, "stop")
    assert check_output(ok, ["How do I improve garden soil?"]) == []
    assert check_output(Completion("   ", 5, 0, "stop"), ["q"]) == ["empty"]
    assert check_output(Completion("cut off", 5, 2, "length"), ["q"]) == ["truncated"]
    assert "unchanged" in check_output(ok, ["q"], previous="a real answer, about soil!")
    assert "unchanged" not in check_output(ok, ["q"], previous="Something else entirely.")


def test_is_echo():
    prompt = "How can I make my neighbour's dog stop barking at night?"
    assert is_echo(prompt, [prompt])
    assert is_echo("how can I make my neighbours dog stop barking at night", [prompt])   # case/punctuation
    assert is_echo("How can I make my neighbour's dog stop barking at nights?", [prompt])  # near repeat
    assert is_echo(prompt + " Well, let me think about it.", [prompt])    # starts by repeating it
    assert is_echo(prompt, ["unrelated request", prompt])                 # any of the sources
    assert not is_echo("Try talking to your neighbour first; if that fails, contact the local council about "
                       "noise complaints.", [prompt])
    assert not is_echo("Dogs bark at night.", [prompt])
    assert not is_echo("", [prompt])
    assert not is_echo("anything", [""])


def test_another_model_can_critique_and_revise_what_the_policy_answers():
    from cai.backends.fake import FakeBackend

    c = make_constitution(4)
    policy, critic = FakeBackend("policy"), FakeBackend("teacher")
    items = items_from(prompt_rows(3))
    gen = Generator(c, policy, rounds=2, sampling=Sampling(max_new_tokens=16), critic=critic)
    recs = gen.run_batch(gen.plan(items))
    assert policy.calls == 1 and critic.calls == 4          # the answers; two critiques and two revisions
    assert all(r.initial.startswith("Reply") for r in recs)
    assert recs[0].provenance.model == "policy"
    assert recs[0].to_json()["provenance"]["critic"] == {"model": "teacher", "revision": None, "backend": "fake"}
    alone = Generator(c, policy, rounds=2, sampling=Sampling(max_new_tokens=16))
    assert [p.key for p in alone.plan(items)] != [p.key for p in gen.plan(items)]   # other critic, other records
    same = Generator(c, policy, rounds=2, sampling=Sampling(max_new_tokens=16), critic=policy)
    assert [p.key for p in same.plan(items)] == [p.key for p in alone.plan(items)]  # the policy itself: as before
