"""Constitution files: the shipped ones validate; every bad input names its line and field; content hashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cai.cli import main
from cai.core.constitution import Constitution, _sha256, load_constitution, parse_constitution
from cai.core.errors import ConstitutionError

from conftest import REPO, constitution_yaml

SHIPPED = sorted((REPO / "constitution").glob("**/*.yaml"))


def test_shipped_constitutions_exist():
    assert REPO / "constitution" / "default.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_constitution_validates(path):
    c = load_constitution(path)
    assert isinstance(c, Constitution)
    assert len(set(c.ids)) == len(c.ids)
    for ex in c.exemplars:
        if ex.principle is not None:
            c.principle(ex.principle)   # raises KeyError if the exemplar names a missing principle


def test_default_constitution_is_substantial():
    c = load_constitution(REPO / "constitution" / "default.yaml")
    assert len(c.principles) >= 12
    assert len(c.exemplars) >= 3
    assert c.name == "default"
    assert isinstance(c.version, str)
    for p in c.principles:
        assert p.critique.strip() and p.revision.strip()


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: each names the right line and field

BASE = constitution_yaml(3, exemplars=False)
BASE_LINES = BASE.splitlines()


def _line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line number of the n-th line containing needle."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) >= occurrence, f"{needle!r} not found {occurrence} times"
    return hits[occurrence - 1]


def _error(text: str, source: str = "c.yaml") -> ConstitutionError:
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, source)
    err = info.value
    assert err.issues, "a ConstitutionError must list at least one issue"
    for issue in err.issues:
        assert issue.file == source
    return err


def _only_issue(text: str):
    err = _error(text)
    assert len(err.issues) == 1, err.issues
    return err.issues[0]


def test_base_text_is_valid():
    c = parse_constitution(BASE, "c.yaml")
    assert c.ids == ["p1", "p2", "p3"]


def test_tab_indented_line():
    text = BASE.replace('    critique: "Critique request number 2', '\tcritique: "Critique request number 2')
    issue = _only_issue(text)
    assert issue.line == _line_of(text, "\tcritique")
    assert "tab" in issue.message.lower()


@pytest.mark.parametrize("bad", ["description: a: b", "description: 'unclosed\n  - x: [", "  name: indented"])
def test_malformed_yaml(bad):
    lines = list(BASE_LINES)
    at = _line_of(BASE, "description:")
    lines[at - 1] = bad
    text = "\n".join(lines) + "\n"
    issue = _only_issue(text)
    assert issue.line is not None
    # the line where the parser gave up, or where the broken construct started, is named
    assert issue.line == at or f"line {at}" in issue.message
    assert "malformed YAML" in issue.message


def test_unknown_top_level_key():
    text = BASE + "colour: blue\n"
    issue = _only_issue(text)
    assert issue.line == _line_of(text, "colour:")
    assert "colour" in str(issue) and "unknown key" in issue.message


def test_unknown_key_inside_a_principle():
    lines = list(BASE_LINES)
    at = _line_of(BASE, "id: p2")      # insert after p2's id line
    lines.insert(at, "    colour: red")
    text = "\n".join(lines) + "\n"
    issue = _only_issue(text)
    assert issue.line == at + 1
    assert "colour" in str(issue)
    assert "principles[1]" in str(issue)


def test_duplicate_principle_id_points_at_the_duplicate():
    text = BASE.replace("id: p3", "id: p1")
    issue = _only_issue(text)
    assert issue.line == _line_of(text, "id: p1", occurrence=2)
    assert issue.field == "principles[2].id"
    assert "p1" in issue.message
    assert str(_line_of(text, "id: p1")) in issue.message   # names the first definition too


@pytest.mark.parametrize("blank", ['""', '"   "', '"\\n\\t "'])
def test_empty_critique(blank):
    text = BASE.replace('"Critique request number 2: find problem 2."', blank)
    issue = _only_issue(text)
    assert issue.field == "principles[1].critique"
    assert issue.line == _line_of(text, f"critique: {blank}")
    assert "empty" in issue.message


def test_empty_principle_list():
    text = 'name: x\nversion: "1"\nprinciples: []\n'
    issue = _only_issue(text)
    assert issue.field == "principles"
    assert issue.line == 3
    assert "empty" in issue.message


def test_missing_principles():
    issue = _only_issue('name: x\nversion: "1"\n')
    assert issue.field == "principles"
    assert "missing" in issue.message


def test_weight_of_wrong_type():
    text = BASE.replace("weight: 1.0", 'weight: "high"', 1)
    issue = _only_issue(text)
    assert issue.field == "principles[0].weight"
    assert issue.line == _line_of(text, 'weight: "high"')


@pytest.mark.parametrize("weight", ["0", "-1.5"])
def test_weight_must_be_positive(weight):
    text = BASE.replace("weight: 1.0", f"weight: {weight}", 1)
    issue = _only_issue(text)
    assert issue.field == "principles[0].weight"


@pytest.mark.parametrize("bare", ["1.0", "2", "1.10"])
def test_version_as_bare_number(bare):
    text = BASE.replace('version: "1"', f"version: {bare}")
    issue = _only_issue(text)
    assert issue.field == "version"
    assert issue.line == 2
    assert "string" in issue.message


def test_exemplar_naming_a_missing_principle():
    text = BASE + ("exemplars:\n  - prompt: a\n    response: b\n    critique: c\n    revision: d\n"
                   "  - principle: nope\n    prompt: a\n    response: b\n    critique: c\n    revision: d\n")
    issue = _only_issue(text)
    assert issue.field == "exemplars[1].principle"
    assert issue.line == _line_of(text, "principle: nope")
    assert "nope" in issue.message


def test_duplicate_yaml_key_top_level():
    text = BASE.replace("description: a small test constitution",
                        "description: one\ndescription: two")
    issue = _only_issue(text)
    assert issue.line == _line_of(text, "description: two")
    assert "description" in issue.message and "duplicate" in issue.message


def test_duplicate_yaml_key_inside_a_principle():
    lines = list(BASE_LINES)
    at = _line_of(BASE, "id: p2")
    lines.insert(at, '    critique: "first"')   # p2 now has critique twice
    text = "\n".join(lines) + "\n"
    issue = _only_issue(text)
    assert issue.line == _line_of(text, "critique: ", occurrence=3)   # p1's, p2's first, p2's second
    assert issue.field == "principles[1]"
    assert "critique" in issue.message


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_empty_file(text):
    issue = _only_issue(text)
    assert "empty" in issue.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_not_a_mapping(text):
    issue = _only_issue(text)
    assert issue.line == 1


def test_several_problems_are_all_reported():
    text = BASE.replace("weight: 1.0", 'weight: "high"', 1).replace("id: p3", "id: 'bad id'")
    err = _error(text)
    fields = {i.field for i in err.issues}
    assert {"principles[0].weight", "principles[2].id"} <= fields


def test_load_constitution_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("weight: 1.0", 'weight: "high"', 1))
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    assert info.value.issues[0].file.endswith("bad.yaml")
    with pytest.raises(ConstitutionError, match="not found"):
        load_constitution(tmp_path / "missing.yaml")
    with pytest.raises(ConstitutionError, match="folder"):
        load_constitution(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Hashing


def test_same_content_same_hash():
    a, b = parse_constitution(BASE), parse_constitution(BASE)
    assert a.sha256 == b.sha256
    assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0
    assert a.principle_sha256 == b.principle_sha256


def test_key_order_whitespace_and_comments_do_not_change_the_hash():
    original = parse_constitution(BASE)
    data = yaml.safe_load(BASE)
    # same content, different layout: reversed key order everywhere, flow style, comments, blank lines
    reordered = {k: data[k] for k in reversed(list(data))}
    reordered["principles"] = [{k: p[k] for k in reversed(list(p))} for p in data["principles"]]
    text = "# a comment at the top\n\n" + yaml.safe_dump(reordered, sort_keys=False, default_flow_style=True,
                                                         width=1000) + "\n# trailing comment\n\n"
    assert text != BASE
    other = parse_constitution(text)
    assert other.sha256 == original.sha256
    assert other.principle_sha256 == original.principle_sha256
    # block scalars instead of quoted strings: the same text, the same hash
    folded = BASE.replace('    critique: "Critique request number 1: find problem 1."',
                          "    critique: >-\n      Critique request number 1:\n      find problem 1.")
    assert parse_constitution(folded).sha256 == original.sha256


def test_editing_one_critique_changes_only_that_principle():
    a = parse_constitution(BASE)
    b = parse_constitution(BASE.replace("find problem 2.", "find problem two."))
    assert b.principle("p2").critique != a.principle("p2").critique
    assert a.sha256 != b.sha256
    assert a.principle_sha256["p2"] != b.principle_sha256["p2"]
    assert a.principle_sha256["p1"] == b.principle_sha256["p1"]
    assert a.principle_sha256["p3"] == b.principle_sha256["p3"]


def test_editing_a_revision_changes_the_principle_hash():
    a = parse_constitution(BASE)
    b = parse_constitution(BASE.replace("fix problem 3.", "fix problem three."))
    assert a.principle_sha256["p3"] != b.principle_sha256["p3"]
    assert a.principle_sha256["p1"] == b.principle_sha256["p1"]


def test_editing_tags_or_weight_leaves_the_principle_hash_alone():
    a = parse_constitution(BASE)
    lines = list(BASE_LINES)
    at = _line_of(BASE, "id: p2")
    lines.insert(at, "    tags: [harm, extra]")
    tagged = parse_constitution("\n".join(lines) + "\n")
    reweighted = parse_constitution(BASE.replace("weight: 1.0", "weight: 2.5", 2))
    assert tagged.principle("p2").tags == ["harm", "extra"]
    assert reweighted.principle("p2").weight == 2.5
    assert tagged.principle_sha256 == a.principle_sha256
    assert reweighted.principle_sha256 == a.principle_sha256
    # the file hash still sees them: the file is a different version
    assert tagged.sha256 != a.sha256 and reweighted.sha256 != a.sha256


def test_to_yaml_round_trips():
    c = load_constitution(REPO / "constitution" / "default.yaml")
    again = parse_constitution(c.to_yaml())
    assert again.sha256 == c.sha256


# ---------------------------------------------------------------------------------------------------------------
# cai validate


def test_cli_validate_good(capsys):
    rc = main(["validate", str(REPO / "constitution" / "default.yaml"), "--hashes"])
    out = capsys.readouterr().out
    assert rc == 0
    c = load_constitution(REPO / "constitution" / "default.yaml")
    assert c.sha256[:16] in out
    assert c.principles[0].sha256[:16] in out


def test_cli_validate_bad_prints_file_and_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(BASE.replace("weight: 1.0", 'weight: "high"', 1))
    rc = main(["validate", "bad.yaml"])
    err = capsys.readouterr().err
    assert rc == 2
    line = _line_of(Path("bad.yaml").read_text(), 'weight: "high"')
    assert f"bad.yaml:{line}" in err
    assert "principles[0].weight" in err
    assert "Traceback" not in err


def test_cli_validate_mixed_files_fails_and_reports_each(tmp_path, capsys):
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "nested"
    deep.mkdir(parents=True)
    bad = deep / "bad.yaml"
    bad.write_text(BASE.replace("id: p3", "id: p1"))
    rc = main(["validate", str(REPO / "constitution" / "default.yaml"), str(bad)])
    captured = capsys.readouterr()
    assert rc == 2
    assert "default" in captured.out
    line = _line_of(bad.read_text(), "id: p1", occurrence=2)
    # one issue, one line of output, however long the path is (so editors and grep can jump to it)
    issue_lines = [ln for ln in captured.err.splitlines() if "duplicate principle id" in ln]
    assert len(issue_lines) == 1
    assert f"bad.yaml:{line}" in issue_lines[0]
    assert "principles[2].id" in issue_lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Preference principles and exemplars (the RL phase)

RL = '''preference_principles:
  - id: kinder
    text: "Which of these assistant responses is kinder? Options:"
  - id: helpful
    text: Which response is more helpful?
    weight: 2.0
preference_exemplars:
  - principle: kinder
    prompt: How do I stop my cat scratching the sofa?
    better: Give her a scratching post.
    worse: Get rid of the cat.
  - messages:
      - {role: user, content: My code hangs.}
      - {role: assistant, content: Which language?}
      - {role: user, content: Python.}
    better: Press Ctrl-C.
    worse: I can't help with that.
'''


def test_preference_principles_and_exemplars_load_and_hash():
    c = parse_constitution(BASE + RL, "c.yaml")
    assert c.preference_ids == ["kinder", "helpful"] and c.preference_principle("helpful").weight == 2.0
    assert c.preference_exemplars[1].conversation()[-1] == {"role": "user", "content": "Python."}
    edited = parse_constitution(BASE + RL.replace("kinder? Options:\"", "gentler? Options:\""), "c.yaml")
    assert edited.preference_principle("kinder").sha256 != c.preference_principle("kinder").sha256
    assert edited.preference_principle("helpful").sha256 == c.preference_principle("helpful").sha256
    assert edited.sha256 != c.sha256
    # a file without them hashes as it did before they existed (its records' stamps stay valid)
    plain = parse_constitution(BASE, "c.yaml")
    assert plain.sha256 == _sha256(plain.model_dump(mode="json", exclude={"preference_principles",
                                                                          "preference_exemplars"}))


@pytest.mark.parametrize("edit, field, needle", [
    (("principle: kinder", "principle: nosuch"), "preference_exemplars[0].principle", "nosuch"),
    (("  - messages:", "  - prompt: both given\n    messages:"), "preference_exemplars[1]", "not both"),
    (("{role: user, content: Python.}", "{role: assistant, content: Python.}"), "preference_exemplars[1]",
     "end with the user's turn"),
    (("    text: Which response is more helpful?", "    text: ''"), "preference_principles[1].text", "empty"),
    (("  - id: helpful", "  - id: kinder"), "preference_principles[1].id", "duplicate"),
])
def test_bad_preference_entries_name_file_line_and_field(edit, field, needle):
    text = BASE + RL.replace(*edit)
    issue = _only_issue(text)
    assert issue.field == field and needle in issue.message
    assert issue.line is not None and issue.line > len(BASE_LINES)
