"""Building the messages of each stage (cai/prompts.py) and loading prompt sets (cai/prompt_sets.py)."""

from __future__ import annotations

import json

import pytest

from cai.core.errors import PromptFileError
from cai.core.prompt_files import load_prompts
from cai.core.prompts import critique_messages, frame_sha256, respond_messages, revise_messages

from conftest import REPO, make_constitution

MULTI = [
    {"role": "user", "content": "First question from the user."},
    {"role": "assistant", "content": "A first harmless reply."},
    {"role": "user", "content": "Follow-up that escalates."},
]


@pytest.fixture
def c():
    return make_constitution(4)


def test_critique_messages_layout(c):
    p3 = c.principle("p3")
    msgs = critique_messages(c, MULTI, "The answer under review.", p3)
    roles = [m["role"] for m in msgs]
    contents = [m["content"] for m in msgs]
    # system prompt first
    assert msgs[0] == {"role": "system", "content": "Be good."}
    # two exemplars of 6 turns, in file order; exemplar 1 names p1, exemplar 2 names none (uses the drawn one)
    ex = contents[1:13]
    assert ex[0] == "Exemplar prompt one" and ex[6] == "Exemplar prompt two"
    assert ex[1] == "Exemplar response one" and ex[3] == "Exemplar critique one" and ex[5] == "Exemplar revision one"
    assert ex[2] == c.principle("p1").critique and ex[4] == c.principle("p1").revision
    assert ex[8] == p3.critique and ex[10] == p3.revision
    assert roles[1:13] == ["user", "assistant"] * 6
    # the conversation, whole
    assert msgs[13:16] == MULTI
    # the answer as an assistant turn, then the critique request last
    assert msgs[16] == {"role": "assistant", "content": "The answer under review."}
    assert msgs[17] == {"role": "user", "content": p3.critique}
    assert len(msgs) == 18


def test_revise_messages_extend_critique(c):
    p2 = c.principle("p2")
    crit = critique_messages(c, MULTI, "answer", p2)
    rev = revise_messages(c, MULTI, "answer", p2, "The critique text.")
    assert rev[:len(crit)] == crit
    assert rev[len(crit):] == [{"role": "assistant", "content": "The critique text."},
                               {"role": "user", "content": p2.revision}]


def test_conversation_system_message_is_merged_not_duplicated(c):
    convo = [{"role": "system", "content": "Own system message."}] + MULTI
    msgs = critique_messages(c, convo, "answer", c.principle("p1"))
    systems = [m for m in msgs if m["role"] == "system"]
    assert len(systems) == 1 and msgs[0]["role"] == "system"
    assert "Be good." in systems[0]["content"] and "Own system message." in systems[0]["content"]


def test_no_system_prompt_no_exemplars():
    c = make_constitution(2, exemplars=False, system_prompt=None)
    msgs = critique_messages(c, MULTI, "answer", c.principle("p2"))
    assert msgs[:3] == MULTI
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]


def test_respond_stage_is_the_conversation_alone(c):
    convo = [{"role": "system", "content": "Own system message."}] + MULTI
    msgs = respond_messages(convo)
    assert msgs == convo
    assert all("Exemplar" not in m["content"] and m["content"] != "Be good." for m in msgs)
    msgs[0]["content"] = "changed"   # a copy: the prompt item is not mutated
    assert convo[0]["content"] == "Own system message."


def test_inputs_are_not_mutated(c):
    convo = [dict(m) for m in MULTI]
    critique_messages(c, convo, "a", c.principle("p1"))[13]["content"] = "x"
    assert convo == MULTI


def test_frame_hash_tracks_exemplars_and_system_prompt_only():
    base = make_constitution(3)
    assert frame_sha256(base) == frame_sha256(make_constitution(3))
    assert frame_sha256(base) == frame_sha256(make_constitution(3, critique={"p2": "Another critique."}))
    assert frame_sha256(base) != frame_sha256(make_constitution(3, system_prompt="Be better."))
    assert frame_sha256(base) != frame_sha256(make_constitution(3, exemplars=False))


# ---------------------------------------------------------------------------------------------------------------
# Prompt sets


def test_shipped_red_team_set():
    ps = load_prompts(REPO / "data" / "prompts" / "red_team.jsonl", strict=True)
    assert len(ps.items) >= 200
    assert not ps.issues
    multi = [i for i in ps.items if len(i.messages) > 1]
    assert len(multi) >= 10
    assert all(i.messages[-1]["role"] == "user" for i in ps.items)
    assert len({i.category for i in ps.items}) >= 5
    assert len({i.id for i in ps.items}) == len(ps.items)


def test_shipped_helpful_set():
    ps = load_prompts(REPO / "data" / "prompts" / "helpful.jsonl", strict=True)
    assert len(ps.items) >= 100
    assert len({i.category for i in ps.items}) >= 3


def test_shipped_sets_have_disjoint_ids():
    a = load_prompts(REPO / "data" / "prompts" / "red_team.jsonl")
    b = load_prompts(REPO / "data" / "prompts" / "helpful.jsonl")
    assert not {i.id for i in a.items} & {i.id for i in b.items}


def test_multi_turn_row_is_kept_whole(prompt_file):
    path = prompt_file([{"id": "m", "messages": MULTI, "category": "x"}])
    item = load_prompts(path).items[0]
    assert item.messages == MULTI
    assert item.category == "x"
    assert item.last_user == "Follow-up that escalates."


def test_malformed_line_among_good_ones(prompt_file):
    path = prompt_file([{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"},
                        '{"id": "c", "prompt": "three"', {"id": "d", "prompt": "four"}])
    ps = load_prompts(path)
    assert [i.id for i in ps.items] == ["a", "b", "d"]
    assert len(ps.issues) == 1
    assert ps.issues[0].line == 3
    assert "JSON" in ps.issues[0].message
    assert ps.items[2].source.endswith(":4")
    with pytest.raises(PromptFileError) as info:
        load_prompts(path, strict=True)
    assert info.value.issues[0].line == 3


def test_blank_lines_are_skipped_and_line_numbers_stay_true(prompt_file):
    path = prompt_file([{"id": "a", "prompt": "one"}, "", {"id": "b", "prompt": ["not", "a", "string"]}])
    ps = load_prompts(path)
    assert [i.id for i in ps.items] == ["a"]
    assert [i.line for i in ps.issues] == [3]


@pytest.mark.parametrize("row, needle", [
    ({"id": "x", "messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "end with a user"),
    ({"id": "x", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"id": "x", "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                              {"role": "user", "content": "c"}]}, "system"),
    ({"id": "x", "messages": [{"role": "user", "content": "  "}]}, "content"),
    ({"id": "x", "messages": []}, "messages"),
    ({"id": "x"}, "prompt"),
    ({"id": "x", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
    ({"id": "x", "prompt": ""}, "prompt"),
    ({"id": "", "prompt": "a"}, "id"),
    ({"id": "x", "prompt": "a", "category": 3}, "category"),
    ([1, 2], "object"),
])
def test_bad_rows_are_reported(prompt_file, row, needle):
    path = prompt_file([{"id": "good", "prompt": "fine"}, row])
    ps = load_prompts(path)
    assert [i.id for i in ps.items] == ["good"]
    assert len(ps.issues) == 1
    assert ps.issues[0].line == 2
    assert needle in ps.issues[0].message
    with pytest.raises(PromptFileError):
        load_prompts(path, strict=True)


def test_duplicate_ids_are_reported(prompt_file):
    path = prompt_file([{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}, {"id": "a", "prompt": "three"}])
    ps = load_prompts(path)
    assert [i.messages[0]["content"] for i in ps.items] == ["one", "two"]
    assert len(ps.issues) == 1
    assert ps.issues[0].line == 3 and "duplicate" in ps.issues[0].message
    assert ":1" in ps.issues[0].message     # names the first one


def test_only_bad_rows_is_an_error(prompt_file):
    path = prompt_file(["not json", {"prompt": ""}])
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    assert len(info.value.issues) == 2


def test_parquet_prompt_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["What is two plus two?", "Name a colour."], "extra": [1, 2],
                      "category": ["math", None]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    ps = load_prompts(path, strict=True)
    assert [i.messages for i in ps.items] == [[{"role": "user", "content": "What is two plus two?"}],
                                              [{"role": "user", "content": "Name a colour."}]]
    assert ps.items[0].category == "math" and ps.items[1].category is None
    assert ps.items[0].id != ps.items[1].id


def test_parquet_messages_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["m1"], "messages": [MULTI]}), path)
    assert load_prompts(path, strict=True).items[0].messages == MULTI


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(PromptFileError, match="Parquet"):
        load_prompts(path)


def test_row_without_id_gets_a_stable_id(tmp_path, prompt_file):
    a = load_prompts(prompt_file([{"prompt": "no id here"}, {"prompt": "another"}], "a.jsonl")).items
    b = load_prompts(prompt_file([{"prompt": "something first"}, {"prompt": "no id here"}], "b.jsonl")).items
    assert a[0].id and a[0].id != a[1].id
    assert a[0].id == b[1].id      # depends on the content, not on the position or the file


def test_integer_id_becomes_text(prompt_file):
    assert load_prompts(prompt_file([{"id": 7, "prompt": "x"}])).items[0].id == "7"


@pytest.mark.parametrize("spec", ["missing.jsonl", "./missing", "sub/missing.parquet", "data/prompts/red_team"])
def test_missing_file_is_a_clear_error(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PromptFileError) as info:
        load_prompts(spec)
    assert "not found" in str(info.value)
    assert spec.lstrip("./") in str(info.value)


def test_folder_and_unknown_suffix(tmp_path):
    with pytest.raises(PromptFileError, match="folder"):
        load_prompts(tmp_path)
    other = tmp_path / "p.csv"
    other.write_text("prompt\nhello\n")
    with pytest.raises(PromptFileError, match="unsupported"):
        load_prompts(other)


def test_non_utf8_line_is_reported(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(json.dumps({"id": "a", "prompt": "ok"}).encode() + b"\n" + b'{"id": "b", "prompt": "\xff"}\n')
    ps = load_prompts(path)
    assert [i.id for i in ps.items] == ["a"]
    assert ps.issues[0].line == 2 and "UTF-8" in ps.issues[0].message
