"""Hostile constitution files (alias bombs, huge or deeply nested documents) get a clear ``file:line`` error in a few
MB of memory; ordinary files still load. Both parsers are covered: libyaml's event scan and the pure-Python fallback.
How long the refusal takes is measured in ``bench/hostile_yaml.py`` (timing does not belong in tests)."""

from __future__ import annotations

import json
import tracemalloc

import pytest

import cai.core.safe_yaml as cc
from cai.cli import main
from cai.core.constitution import load_constitution, parse_constitution
from cai.core.errors import ConfigError, ConstitutionError
from cai.core.importers import import_anthropic, import_hf
from cai.core.safe_yaml import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, yaml_with_lines
from cai.resources import constitution_path

from conftest import constitution_yaml


def bomb(levels: int = 9) -> str:
    """A "billion laughs": 9 lists of 9 aliases of the previous one, 9**levels strings once expanded."""
    lines = ["name: bomb", "version: '1'", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    lines.append(f"principles: *a{levels - 1}")
    return "\n".join(lines) + "\n"


@pytest.fixture(params=["libyaml", "python"])
def parser(request, monkeypatch):
    """Run the test with libyaml's fast scan (when installed) and with the pure-Python composer."""
    if request.param == "python":
        monkeypatch.setattr(cc, "_FAST_LOADER", None)
    elif cc._FAST_LOADER is None:
        pytest.skip("PyYAML without libyaml")
    return request.param


def refused(text: str, source: str = "c.yaml", budget_mb: float = 8.0):
    """The one issue of parsing ``text``, checking the peak of traced memory on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(ConstitutionError) as info:
            parse_constitution(text, source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < budget_mb * 2**20, f"{peak / 2**20:.1f} MiB"
    (issue,) = info.value.issues
    assert issue.file == source
    return issue


def test_alias_bomb_is_refused_at_the_first_alias(parser):
    issue = refused(bomb())
    assert issue.line == 4                                # a1: &a1 [*a0, ...]
    assert "aliases are not allowed" in issue.message and "*a0" in issue.message
    assert "line 3" in issue.message                      # where the anchor is
    assert str(issue).startswith("c.yaml:4: ")


def test_alias_bomb_file_via_validate(parser, tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    assert info.value.issues[0].line == 4
    assert main(["validate", str(path)]) != 0
    err = capsys.readouterr().err
    assert "bomb.yaml:4" in err and "aliases are not allowed" in err and "Traceback" not in err


def test_any_alias_is_refused_even_a_harmless_one(parser):
    text = constitution_yaml(2).replace("    weight: 1.0", "    weight: &w 1.0", 1)
    text = text.replace("    weight: 1.0", "    weight: *w", 1)
    issue = refused(text)
    assert issue.line == next(n for n, line in enumerate(text.splitlines(), 1) if "*w" in line)


def test_merge_key_is_an_alias_too(parser):
    text = "base: &base {critique: a, revision: b}\nprinciples:\n  - <<: *base\n    id: p1\n"
    assert refused(text).line == 3


def test_huge_file_is_refused_before_it_is_read(parser, tmp_path):
    path = tmp_path / "huge.yaml"
    text = constitution_yaml(3) + "# " + "x" * MAX_YAML_BYTES + "\n"
    path.write_text(text)
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    assert "at most 1 MiB" in info.value.issues[0].message
    assert "1 MiB" in refused(text, budget_mb=16).message  # the text itself (as the server passes it) is refused too


def test_deep_flow_nesting_is_refused(parser):
    depth = 100_000
    issue = refused("principles: " + "[" * depth + "]" * depth + "\n")
    assert "nested too deeply" in issue.message and str(MAX_YAML_DEPTH) in issue.message
    assert issue.line == 1


def test_deep_block_nesting_is_refused(parser):
    text = "".join(f"{'  ' * i}k{i}:\n" for i in range(MAX_YAML_DEPTH + 5)) + "  " * (MAX_YAML_DEPTH + 5) + "x\n"
    issue = refused(text)
    assert "nested too deeply" in issue.message
    # the root mapping (line 1) is level 1 and k{i}'s value, from line i + 2, level i + 2: one too many on line 51
    assert issue.line == MAX_YAML_DEPTH + 1


def test_too_many_values_are_refused(parser):
    text = "principles:\n" + "- a\n" * (MAX_YAML_NODES + 10)
    issue = refused(text, budget_mb=16)
    assert "too many values" in issue.message
    # values: the root mapping, "principles", the list, then item j on line j + 1: value MAX + 1 is item MAX - 2
    assert issue.line == MAX_YAML_NODES - 1


def test_nesting_just_under_the_limit_loads(parser):
    text = "k: " + "[" * (MAX_YAML_DEPTH - 2) + "]" * (MAX_YAML_DEPTH - 2) + "\n"
    data, _ = yaml_with_lines(text, "c.yaml")
    assert isinstance(data["k"], list)


def test_malformed_yaml_keeps_its_message(parser):
    text = constitution_yaml(2).replace('    critique: "Critique request number 2', '\tcritique: "Critique request 2')
    issue = refused(text)
    assert "malformed YAML" in issue.message and "tab" in issue.message


def test_shipped_and_ordinary_constitutions_still_load(parser):
    tracemalloc.start()
    try:
        c = load_constitution(constitution_path("default"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert c.ids and peak < 8 * 2**20
    assert parse_constitution(constitution_yaml(4), "c.yaml").ids == ["p1", "p2", "p3", "p4"]


def test_training_config_is_guarded_too(parser):
    with pytest.raises(ConfigError) as info:
        yaml_with_lines("lr: &x 1\nsteps: *x\n", "cfg.yaml", ConfigError, "training config")
    issue = info.value.issues[0]
    assert issue.line == 2 and "not allowed in a training config" in issue.message


# ---------------------------------------------------------------------------------------------------------------
# The importers read JSON: no aliases there, but a huge or deeply nested file must not crash them


@pytest.mark.parametrize("fn", [import_hf, import_anthropic])
def test_importers_refuse_deep_json(fn, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ConstitutionError, match="nested too deeply"):
        fn(path)


@pytest.mark.parametrize("fn", [import_hf, import_anthropic])
def test_importers_refuse_huge_json(fn, tmp_path):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"constitutions": [], "pad": "x" * MAX_YAML_BYTES}))
    with pytest.raises(ConstitutionError) as info:
        fn(path)
    assert "at most 1 MiB" in info.value.issues[0].message
