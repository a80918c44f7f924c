"""The shipped constitution and prompt sets are found from any folder, by default and by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.cli import main


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty working folder outside the repository."""
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.delenv("CAI_FAKE_DELAY", raising=False)
    return here


def test_validate_a_shipped_constitution_by_name(elsewhere, capsys):
    assert main(["validate", "default"]) == 0
    assert "ok default" in capsys.readouterr().out
    assert main(["validate", "default.yaml", "--hashes"]) == 0


def test_an_unknown_name_lists_the_shipped_ones(elsewhere, capsys):
    assert main(["validate", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "default" in err and "Traceback" not in err
    assert main(["generate", "--backend", "fake", "--constitution", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_generate_with_the_defaults_from_an_empty_folder(elsewhere, capsys):
    assert main(["generate", "--backend", "fake", "--limit", "2", "--out", "run", "--max-new-tokens", "16"]) == 0
    info = json.loads((elsewhere / "run" / "run.json").read_text())
    assert info["constitution"]["name"] == "default"
    assert len((elsewhere / "run" / "records.jsonl").read_text().splitlines()) == 2
    assert "2 prompts from" in capsys.readouterr().err


def test_generate_with_a_prompt_set_by_name(elsewhere, capsys):
    assert main(["generate", "--backend", "fake", "--limit", "3", "--out", "run", "--prompts", "helpful",
                 "--constitution", "default", "--max-new-tokens", "16"]) == 0
    recs = [json.loads(x) for x in (elsewhere / "run" / "records.jsonl").read_text().splitlines()]
    shipped = Path(__file__).resolve().parents[2] / "data" / "prompts" / "helpful.jsonl"
    first = [json.loads(x)["id"] for x in shipped.read_text(encoding="utf-8").splitlines()[:3]]
    assert sorted(r["prompt_id"] for r in recs) == sorted(first)


def test_demo_from_an_empty_folder_generate_only(elsewhere, capsys):
    rc = main(["demo", "--backend", "fake", "--out", "../elsewhere", "--limit", "2", "--train-steps", "0"])
    assert rc == 0, capsys.readouterr().err
    assert len((elsewhere.parent / "elsewhere" / "records.jsonl").read_text().splitlines()) == 2
    assert "records written" in capsys.readouterr().out
