"""``cai iterate`` on the tiny model: iterations from the previous iteration's model, data accumulated (or
replaced), the paired comparison with the previous iteration, the report across iterations, a stop rule stopping the
loop, the review gate, settings that changed, and resume after an interruption or a kill -9 in a stage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cai.workflow.iterate as it
from cai.cli import main

from conftest import REPO, subprocess_env


def args(tiny_model_dir, out, *extra) -> list[str]:
    return ["iterate", str(out), "--model", str(tiny_model_dir), "--prompts-per-iteration", "4", "--heldout", "3",
            "--max-new-tokens", "6", "--train-steps", "2", "--eval-helpful", "2", "--eval-records", "2",
            "--eval-max-new-tokens", "4", "--batch-size", "8", *extra]


@pytest.fixture
def no_stops(monkeypatch):
    """The tiny model's judge says yes to everything, which stops the loop at once (test_a_blind_judge...): for the
    tests of the loop's own machinery, no rule fires."""
    monkeypatch.setattr(it, "check", lambda *a, **k: [])


def read(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def two_iterations(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(it, "check", lambda *a, **k: [])
        mp.chdir(REPO)
        assert main(args(tiny_model_dir, root / "acc", "--iterations", "2")) == 0
        assert main(args(tiny_model_dir, root / "rep", "--iterations", "2", "--replace")) == 0
    return root


def test_each_iteration_answers_fresh_prompts_from_the_previous_model(two_iterations):
    loop = two_iterations / "acc"
    p1 = [json.loads(x)["id"] for x in (loop / "iterations" / "1" / "prompts.jsonl").read_text().splitlines()]
    p2 = [json.loads(x)["id"] for x in (loop / "iterations" / "2" / "prompts.jsonl").read_text().splitlines()]
    held = [json.loads(x)["id"] for x in (loop / "heldout.jsonl").read_text().splitlines()]
    assert len(p1) == len(p2) == 4 and len(held) == 3 and not (set(p1) & set(p2) | set(held) & set(p1 + p2))
    r1 = [json.loads(x) for x in (loop / "iterations" / "1" / "gen" / "records.jsonl").read_text().splitlines()]
    r2 = [json.loads(x) for x in (loop / "iterations" / "2" / "gen" / "records.jsonl").read_text().splitlines()]
    assert {r["prompt_id"] for r in r1} == set(p1) and {r["prompt_id"] for r in r2} == set(p2)
    # iteration 2's policy is iteration 1's adapter merged into the base: its stage cache keys name that adapter
    stages = (loop / "iterations" / "2" / "gen" / "stages.jsonl").read_text()
    assert stages and json.dumps(read(loop / "iterations" / "1" / "train" / "adapters" / "sft" / "manifest.json"))


def test_data_accumulate_across_iterations_or_are_replaced(two_iterations):
    acc, rep = two_iterations / "acc", two_iterations / "rep"
    a1, a2 = (read(acc / "iterations" / str(k) / "train" / "lineage.json") for k in (1, 2))
    r2 = read(rep / "iterations" / "2" / "train" / "lineage.json")
    assert a1["records"] == 4 and a2["records"] == 8 and len(a2["sources"]) == 2
    assert r2["records"] == 4 and len(r2["sources"]) == 1
    assert [s["folder"] for s in a2["sources"]] == ["../../1/gen", "../../2/gen"] or all(
        s["folder"].endswith("gen") for s in a2["sources"])
    # the data built from them: more SFT rows when accumulating
    rows = lambda loop: sum(read(loop / "iterations" / "2" / "train" / "data" / "card.json")["counts"].values())  # noqa: E731
    assert rows(acc) > rows(rep)


def test_the_second_iteration_is_compared_with_the_first_paired(two_iterations):
    loop = two_iterations / "acc"
    report = read(loop / "iterations" / "2" / "train" / "eval" / "report.json")
    assert set(report["models"]) == {"base", "sft", "prev"}
    assert report["comparisons_to"]["prev"]["sft"]["harm"]["prompts"] == 3
    assert "prev" not in read(loop / "iterations" / "1" / "train" / "eval" / "report.json")["models"]
    across = read(loop / "iterations" / "report.json")
    assert [r["iteration"] for r in across["iterations"]] == [1, 2]
    assert across["iterations"][1]["vs_previous"]["prompts"] == 3 and across["iterations"][0]["vs_previous"] is None
    assert across["stopped_at"] is None and across["summary"][-1] == "no stop rule fired"
    assert all(set(r["seconds"]) >= {"generate", "data", "train", "eval"} for r in across["iterations"])
    assert (loop / "iterations" / "report.html").read_text().count("<tr>") == 3


def test_cai_eval_compare_iterations_prints_the_report(two_iterations, capsys):
    assert main(["eval", str(two_iterations / "acc"), "--compare", "iterations"]) == 0
    out = capsys.readouterr().out
    assert "iteration 1: violations" in out and "iteration 2: violations" in out and "report.html" in out


def test_a_finished_loop_extended_runs_only_the_new_iteration(two_iterations, tiny_model_dir, capsys, monkeypatch,
                                                              no_stops):
    loop = two_iterations / "rep"
    before = read(loop / "iterations" / "state.json")
    monkeypatch.chdir(REPO)
    assert main(args(tiny_model_dir, loop, "--iterations", "2", "--replace")) == 0      # nothing left to do
    assert read(loop / "iterations" / "state.json")["done"] == before["done"]


def test_other_settings_are_refused_with_the_differences(two_iterations, tiny_model_dir, capsys):
    rc = main(args(tiny_model_dir, two_iterations / "acc", "--iterations", "2", "--method", "dpo"))
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "started with other settings" in err and "method: 'sft'" in err and "'dpo'" in err


def test_a_blind_judge_stops_the_loop_and_says_why(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    loop = tmp_path / "loop"
    assert main(args(tiny_model_dir, loop, "--iterations", "3")) == 0
    out = " ".join(capsys.readouterr().out.split())
    state = read(loop / "iterations" / "state.json")
    assert state["stopped_at"] == 1 and state["stops"]["1"][0]["rule"] == "judge_blind"
    assert not (loop / "iterations" / "2" / "gen").exists()          # iteration 2 never started
    assert "stopped after iteration 1" in out and "no longer tells answers apart" in out
    # the person decides the judge's blindness is known (a weak judge): the same loop, told to ignore that rule, goes on
    assert main(args(tiny_model_dir, loop, "--iterations", "2", "--ignore-stop", "judge_blind")) == 0
    out = " ".join("".join(capsys.readouterr()).split())
    state = read(loop / "iterations" / "state.json")
    assert state["stops"]["1"][0]["ignored"] is True and state["done"]["2"][-1] == "rules"
    assert [s["rule"] for s in state["stops"]["2"] if s.get("ignored")] == ["judge_blind"]   # reported, not obeyed
    assert "(ignored: --ignore-stop)" in out
    assert state["stopped_at"] in (None, 2) and all(s["rule"] != "judge_blind" for s in
                                                     (read(loop / "iterations" / "report.json")["stopped_by"] or []))


def test_an_unknown_rule_to_ignore_is_refused_with_the_rules(tiny_model_dir, tmp_path, capsys):
    assert main(args(tiny_model_dir, tmp_path / "loop", "--ignore-stop", "judge-blind")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no stop rule 'judge-blind'" in err and "judge_blind" in err and not (tmp_path / "loop").exists()


def test_the_review_gate_waits_then_continues(tiny_model_dir, tmp_path, capsys, monkeypatch, no_stops):
    from cai.core.record import read_records
    from cai.review.store import Review, ReviewStore, record_digest

    monkeypatch.chdir(REPO)
    loop = tmp_path / "loop"
    assert main(args(tiny_model_dir, loop, "--iterations", "1", "--review-gate")) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "waits for review: 4 of 4 items" in out and "cai review" in out
    assert not (loop / "iterations" / "1" / "train").exists()
    gen = loop / "iterations" / "1" / "gen"
    store = ReviewStore(gen / "reviews.jsonl")
    recs = read_records(gen / "records.jsonl")
    for i, r in enumerate(recs):
        store.append(Review(target=r.id, kind="record", content_sha256=record_digest(r), reviewer="ann",
                            decision="reject" if i == 0 else "edit" if i == 1 else "accept",
                            text="A reviewed answer." if i == 1 else None, reason="bad" if i == 0 else None))
    assert main(args(tiny_model_dir, loop, "--iterations", "1", "--review-gate")) == 0
    card = read(loop / "iterations" / "1" / "train" / "data" / "card.json")
    sft = [json.loads(x) for f in ("sft_train.jsonl", "sft_test.jsonl")
           for x in (loop / "iterations" / "1" / "train" / "data" / f).read_text().splitlines()]
    completions = [row["completion"][0]["content"] for row in sft]
    assert "A reviewed answer." in completions and recs[0].final not in completions
    assert card["review"]["require_review"] is True and card["review"]["records"]["rejected"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Resume: an interruption in any stage, then the same command


@pytest.mark.parametrize("stage", ["_generate", "_data", "_train", "_eval"])
def test_an_interrupted_stage_resumes_where_it_stopped(tiny_model_dir, tmp_path, monkeypatch, no_stops, stage):
    monkeypatch.chdir(REPO)
    loop = tmp_path / "loop"
    calls: dict[str, int] = {}
    order = ["_generate", "_data", "_train", "_eval"]

    def counted(name):
        real = getattr(it._Iteration, name)

        def run(self):
            calls[name] = calls.get(name, 0) + 1
            if name == stage and calls[name] == 1:
                raise KeyboardInterrupt          # Ctrl-C in the middle of this stage
            return real(self)
        return run

    for name in order:
        monkeypatch.setattr(it._Iteration, name, counted(name))
    assert main(args(tiny_model_dir, loop, "--iterations", "1")) == 130
    state = read(loop / "iterations" / "state.json")
    assert stage.strip("_") not in state["done"].get("1", [])
    assert main(args(tiny_model_dir, loop, "--iterations", "1")) == 0
    state = read(loop / "iterations" / "state.json")
    assert state["done"]["1"][-1] == "rules"
    # the stages before the interrupted one ran once; it and the ones after ran again (it twice: cut, then whole)
    for name in order[: order.index(stage)]:
        assert calls[name] == 1, (name, calls)
    assert calls[stage] == 2


def test_kill_9_during_training_then_the_same_command_finishes(tiny_model_dir, tmp_path):
    loop = tmp_path / "loop"
    cmd = [sys.executable, "-m", "cai.cli", *args(tiny_model_dir, loop, "--iterations", "1", "--train-steps", "4")]
    env = subprocess_env()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = loop / "iterations" / "1" / "train" / "adapters" / "sft" / "train_config.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)                  # in the middle of the training stage
    proc.wait()
    state = read(loop / "iterations" / "state.json")
    assert "data" in state["done"]["1"] and "train" not in state["done"]["1"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    state = read(loop / "iterations" / "state.json")
    assert state["done"]["1"][-1] == "rules" and state["done"]["1"].count("generate") == 1
    assert read(loop / "iterations" / "1" / "train" / "adapters" / "sft" / "manifest.json")["steps"] == 4
