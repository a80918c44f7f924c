"""`cai review status | export | import` and the mistakes in calling it; `cai review RUN` serving is tested as a real
process in tests/e2e/test_review_kill.py, and `cai serve --review` in tests/server/test_serve_process.py."""

from __future__ import annotations

import json

import pytest
from fixtures.review_fixtures import make_record, pair_of, review_pair, review_record, write_run

from cai.cli import main


@pytest.fixture
def run(tmp_path):
    recs = [make_record(i) for i in range(6)]
    lines = [pair_of(recs[0], 0.8), pair_of(recs[1], 0.4)]
    folder = write_run(tmp_path / "run", recs, lines)
    return folder, recs, lines


def test_status_counts_reviewed_conflicts_stale_and_agreement(run, capsys, cli_env):
    folder, recs, lines = run
    review_record(folder, recs[0], "accept", who="ann")
    review_record(folder, recs[0], "reject", who="bob", reason="no")
    review_record(folder, recs[1], "accept", who="ann")
    review_record(folder, recs[1], "accept", who="bob")
    review_record(folder, recs[2], "edit", who="ann", text="Mine.")
    review_record(folder, recs[3], "accept", who="ann", digest="0" * 64)          # of content since changed
    review_pair(folder, lines[0], "flip", who="ann")
    assert main(["review", "status", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "4 of 8 reviewed (records 3 of 6, pairs 1 of 2)" in out
    assert "needs review again 1" in out and "reviewers disagree on 1 (rec00000)" in out
    assert "agreement ann | bob: 50% of 2 both reviewed" in out
    assert main(["review", "status", str(folder), "--json", "--review-rule", "unanimous"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["reviewed"] == 4 and figures["records"]["by_status"]["conflict"] == 1
    assert figures["pairs"]["by_status"] == {"flipped": 1, "unreviewed": 1}


def test_export_then_import_label_studio(run, tmp_path, capsys, cli_env):
    folder, *_ = run
    out = tmp_path / "tasks.json"
    assert main(["review", "export", str(folder), "--format", "label-studio", "-o", str(out)]) == 0
    assert "wrote 6 record tasks and 2 pair tasks" in capsys.readouterr().out
    tasks = json.loads(out.read_text())
    assert (tmp_path / "tasks.records.label_config.xml").exists()
    tasks[0]["annotations"] = [{"completed_by": {"email": "ann@x"}, "result": [
        {"from_name": "decision", "value": {"choices": ["reject"]}},
        {"from_name": "reason", "value": {"text": ["off topic"]}}]}]
    (tmp_path / "done.json").write_text(json.dumps(tasks))
    assert main(["review", "import", str(folder), str(tmp_path / "done.json")]) == 0
    assert "imported 1 reviews" in capsys.readouterr().out
    assert main(["review", "status", str(folder)]) == 0
    assert "1 of 8 reviewed" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["review", "status"], "takes one RUN"),
    (["review", "import", "{run}"], "takes RUN FILE"),
    (["review", "export", "{run}"], "needs -o FILE"),
    (["review", "status", "{missing}"], "is not a folder"),
    (["review", "{run}=x", "--port", "0"], "--port must be in"),
    (["review", "api={run}"], "the page's own addresses use"),
])
def test_mistakes_are_one_clear_message(run, tmp_path, capsys, cli_env, args, needle):
    folder, *_ = run
    args = [a.format(run=folder, missing=tmp_path / "nope") for a in args]
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_review_is_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["review", "--help"])
    out = capsys.readouterr().out
    assert "cai review status RUN" in out and "--api-key-file" in out
