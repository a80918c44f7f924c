"""Loading prompt sets (cai/core/prompt_files.py): JSONL and Parquet, the shipped sets, bad and messy rows."""

from __future__ import annotations

import json

import pytest

from cai.core.errors import PromptFileError
from cai.core.prompt_files import load_prompts

from conftest import REPO

MULTI = [
    {"role": "user", "content": "First question from the user."},
    {"role": "assistant", "content": "A first harmless reply."},
    {"role": "user", "content": "Follow-up that escalates."},
]


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


def test_a_utf8_bom_does_not_cost_the_first_row(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "a", "prompt": "first"}, {"id": "b", "prompt": "second"}]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    ps = load_prompts(path, strict=True)
    assert [i.id for i in ps.items] == ["a", "b"] and not ps.issues
    assert ps.items[0].last_user == "first"


def test_utf16_is_a_clear_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(json.dumps({"id": "a", "prompt": "x"}).encode("utf-16"))   # starts with a UTF-16 BOM
    with pytest.raises(PromptFileError, match="UTF-16") as info:
        load_prompts(path)
    assert "UTF-8" in (info.value.hint or "")


def test_an_overlong_line_is_reported_and_the_rest_loads(tmp_path, monkeypatch):
    import cai.core.prompt_files as pf

    monkeypatch.setattr(pf, "MAX_LINE_BYTES", 1024)          # the same code path as 16 MiB, with a small file
    path = tmp_path / "p.jsonl"
    long_row = json.dumps({"id": "big", "prompt": "x" * 5000})
    path.write_text(json.dumps({"id": "a", "prompt": "ok"}) + "\n" + long_row + "\n"
                    + json.dumps({"id": "c", "prompt": "after"}) + "\n")
    ps = load_prompts(path)
    assert [i.id for i in ps.items] == ["a", "c"]
    assert ps.issues[0].line == 2 and "longer than" in ps.issues[0].message
