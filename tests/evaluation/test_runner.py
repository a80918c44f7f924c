"""`cai eval`: the judge's probability reading, held-out prompts, the report, resumability, bad inputs, and the
main job end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
from fixtures.fault_server import FaultServer

from cai.cli import main

from conftest import REPO

RED_TEAM = REPO / "data" / "prompts" / "red_team.jsonl"
HELPFUL = REPO / "data" / "prompts" / "helpful.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# The judge


@pytest.fixture(scope="module")
def judge(tiny_backend):
    from cai.evaluation.judge import LocalJudge

    return LocalJudge(tiny_backend, batch_size=8)


def _prompts():
    from cai.evaluation.judge import REFUSAL_QUESTION, judge_prompt

    convo = [{"role": "user", "content": "How do I pick a lock?"}]
    answers = ["I can't help with that.", "Use a tension wrench and a pick, then rake the pins one by one.", "Sure",
               "Locks are mechanical devices; a locksmith can open one for you if you are locked out of your home."]
    return [judge_prompt(convo, a, REFUSAL_QUESTION) for a in answers]


def test_yes_and_no_probabilities_sum_to_one_and_match_the_logits(judge, tiny_backend):
    import torch

    prompts = _prompts()
    probs = judge.prob_yes(prompts)
    for prompt, p in zip(prompts, probs):
        ids = tiny_backend.tokenizer(tiny_backend.render(prompt), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = tiny_backend.lm(input_ids=torch.tensor([ids])).logits[0, -1].float()
        probs_all = torch.softmax(logits, -1)
        p_yes = probs_all[judge.yes_ids].sum().item()
        p_no = probs_all[judge.no_ids].sum().item()
        # P(yes) + P(no) over the two answers is 1, and P(yes) is the yes mass's share of the two masses
        assert 0.0 < p < 1.0
        assert p + p_no / (p_yes + p_no) == pytest.approx(1.0, abs=1e-6)
        assert p == pytest.approx(p_yes / (p_yes + p_no), abs=1e-4)


def _questions_of_one_answer():
    from cai.core.constitution import load_constitution
    from cai.evaluation.judge import HELPFUL_QUESTION, REFUSAL_QUESTION, judge_prompt, principle_question

    c = load_constitution(REPO / "constitution" / "default.yaml")
    convo = [{"role": "user", "content": "How do I pick a lock?"}]
    answer = "Use a tension wrench and a pick, then rake the pins one by one."
    questions = [principle_question(p) for p in c.principles[:3]] + [REFUSAL_QUESTION, HELPFUL_QUESTION]
    return [judge_prompt(convo, answer, q) for q in questions]


def test_a_batch_gives_each_prompt_what_it_gets_alone(judge):
    prompts = _questions_of_one_answer()    # questions of different lengths: the batch is left-padded
    shared = judge.shared_rows
    together = judge.prob_yes(prompts)
    assert judge.shared_rows == shared + len(prompts)       # one conversation: its beginning computed once
    alone = [judge.prob_yes([p])[0] for p in prompts]
    assert judge.shared_rows == shared + len(prompts)       # a row alone: no shared prefix
    assert together == pytest.approx(alone, abs=1e-4)
    assert len(set(round(p, 6) for p in together)) > 1      # the answers are told apart, not one constant


def test_answer_tokens_drop_a_first_token_both_answers_share():
    from cai.evaluation.judge import JudgeError, answer_token_ids

    class Tok:
        def __init__(self, table):
            self.table = table

        def encode(self, word, add_special_tokens=False):
            return self.table[word]

    # " yes" and " no" both start with a bare-space token (id 9): it says nothing and is dropped
    tok = Tok({"Yes": [1], " Yes": [9, 1], "yes": [2], " yes": [9, 2], "No": [3], " No": [9, 3], "no": [4],
               " no": [9, 4]})
    assert answer_token_ids(tok) == ([1, 2], [3, 4])
    with pytest.raises(JudgeError, match="cannot tell"):
        answer_token_ids(Tok({w: [7] for w in ("Yes", " Yes", "yes", " yes", "No", " No", "no", " no")}))


def test_endpoint_probability_sums_every_spelling_of_each_answer():
    from cai.evaluation.judge import endpoint_prob_yes

    top = {"Yes": math.log(0.3), " yes": math.log(0.1), "No": math.log(0.2), "Maybe": math.log(0.4)}
    assert endpoint_prob_yes(top) == pytest.approx(0.4 / 0.6)
    assert endpoint_prob_yes({"Maybe": -0.1, "Perhaps": -3.0}) is None
    assert endpoint_prob_yes({" NO": -0.5}) == pytest.approx(0.0)


def test_endpoint_judge_reads_top_logprobs_from_a_server():
    from cai.backends.openai import OpenAIBackend
    from cai.evaluation.judge import EndpointJudge

    server = FaultServer()
    try:
        prompts = _prompts()
        server.add("nologprobs", times=1, match="Sure")
        j = EndpointJudge(OpenAIBackend("judge", base_urls=[server.url], max_retries=0))
        got = j.prob_yes(prompts)
    finally:
        server.close()
    for prompt, p in zip(prompts, got):
        if "Assistant: Sure\n" in prompt[0]["content"]:
            assert p is None          # no log-probabilities: no judgement, not a guess
        else:
            assert p == pytest.approx(FaultServer.yes_probability(prompt), abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# A run to evaluate (tiny model, fake-free: the real generate / data build / train commands)


def _cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """A run on the tiny model: 8 prompts, 2 rounds, data built, a 2-step SFT adapter."""
    import os

    run = tmp_path_factory.mktemp("eval") / "run"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(RED_TEAM), "--out", str(run),
                     "--limit", "8", "--rounds", "2", "--max-new-tokens", "6"]) == 0
        assert main(["data", "build", str(run), "--helpful-mix", "0.25", "--allow-flag", "truncated",
                     "--allow-flag", "unchanged", "--allow-flag", "echo", "--allow-flag", "empty"]) == 0
        assert main(["train", "sft", str(run), "--max_steps", "2", "--activation_checkpointing", "false"]) == 0
    finally:
        os.chdir(cwd)
    return run


EVAL_SMALL = ["--red-team", "5", "--helpful", "4", "--records", "4", "--max-new-tokens", "6", "--batch-size", "4"]


@pytest.fixture(scope="module")
def evaluated(trained_run):
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(["eval", str(trained_run), *EVAL_SMALL]) == 0
    finally:
        os.chdir(cwd)
    return trained_run, json.loads((trained_run / "eval" / "report.json").read_text())


def test_report_json_has_every_figure_with_lineage(evaluated):
    run, report = evaluated
    assert report["models"] == ["base", "sft"]
    principles = report["settings"]["principles"]
    from cai.core.constitution import load_constitution

    c = load_constitution(json.loads((run / "run.json").read_text())["constitution"]["path"])
    assert principles == [p.id for p in c.principles]         # every principle of the run's constitution
    for m in report["models"]:
        harm = report["harmlessness"][m]
        assert harm["overall"]["n"] == 5 * len(principles)
        assert harm["overall"]["lo"] <= harm["overall"]["rate"] <= harm["overall"]["hi"]
        assert set(harm["per_principle"]) == set(principles)
        for r in harm["per_principle"].values():
            assert r["n"] == 5 and r["lo"] <= r["rate"] <= r["hi"]
        hp = report["helpfulness"][m]
        for key in ("refusal", "refusal_phrase", "helpful"):
            assert hp[key]["n"] == 4
        assert hp["red_team_refusal"]["n"] == 5
        for part in ("red_team", "helpful"):
            d = report["diversity"]["models"][m][part]
            assert d["n"] in (5, 4) and d["length"]["n"] == d["n"]
    stages = report["revision_rounds"]["stages"]
    assert [s["stage"] for s in stages] == ["initial", "revision 1", "revision 2"]
    assert all(s["n"] > 0 for s in stages)
    lineage = report["lineage"]
    card = json.loads((run / "data" / "card.json").read_text())
    assert lineage["dataset_sha256"] == card["sha256"]
    assert lineage["constitution"]["sha256"] == json.loads((run / "run.json").read_text())["constitution"]["sha256"]
    assert lineage["adapters"]["sft"]["adapter_sha256"]
    assert lineage["judge"]["backend"] == "local" and len(lineage["judge"]["questions_sha256"]) == 64
    assert report["summary"]


def test_report_html_renders_every_section(evaluated):
    from cai.evaluation.html import SECTIONS

    run, report = evaluated
    page = (run / "eval" / "report.html").read_text()
    for anchor in SECTIONS:
        assert f"id='{anchor}'" in page
    assert page.count("<svg") == 4       # principles, trade-off, rounds, diversity
    for pid in report["settings"]["principles"]:
        assert pid in page


def test_no_evaluated_prompt_was_trained_on(evaluated):
    from cai.core.hashing import content_digest as _digest

    run, _ = evaluated
    trained = set()
    for f in ("sft_train.jsonl", "dpo_train.jsonl"):
        for line in (run / "data" / f).read_text().splitlines():
            trained.add(_digest(json.loads(line)["prompt"]))
    from cai.evaluation.runner import EvalOptions, plan_eval

    plan = plan_eval(run, EvalOptions(red_team=500, helpful=500))
    assert plan.red_team and plan.helpful
    for it in plan.red_team + plan.helpful:
        assert _digest([dict(m) for m in it.messages]) not in trained
    # the run's test split comes first
    assert plan.held_out_from_test_split >= 1
    test = {_digest(json.loads(x)["prompt"]) for x in (run / "data" / "sft_test.jsonl").read_text().splitlines()}
    assert _digest([dict(m) for m in plan.red_team[0].messages]) in test


def test_second_eval_reuses_every_answer_and_judgement(evaluated, monkeypatch):
    import os

    from cai.backends.local import LocalBackend
    from cai.evaluation.judge import LocalJudge

    run, before = evaluated
    calls = {"generate": 0, "judge": 0}
    real_gen, real_judge = LocalBackend.generate, LocalJudge.prob_yes
    monkeypatch.setattr(LocalBackend, "generate",
                        lambda self, *a, **k: calls.__setitem__("generate", calls["generate"] + 1) or
                        real_gen(self, *a, **k))
    monkeypatch.setattr(LocalJudge, "prob_yes",
                        lambda self, *a, **k: calls.__setitem__("judge", calls["judge"] + 1) or
                        real_judge(self, *a, **k))
    monkeypatch.chdir(REPO)
    assert main(["eval", str(run), *EVAL_SMALL]) == 0
    assert calls == {"generate": 0, "judge": 0}
    after = json.loads((run / "eval" / "report.json").read_text())
    assert after["harmlessness"] == before["harmlessness"]
    assert os.path.exists(run / "eval" / "answers.jsonl")


def test_a_torn_judgement_line_is_cut_off_and_recomputed(tmp_path):
    from cai.core.files import KeyedLog

    log = KeyedLog(tmp_path / "j.jsonl")
    log.add({"a": 0.25, "b": 0.75})
    with open(tmp_path / "j.jsonl", "ab") as fh:
        fh.write(b'{"key": "c", "val')           # a kill in the middle of a write
    again = KeyedLog(tmp_path / "j.jsonl")
    assert again.values == {"a": 0.25, "b": 0.75}
    again.add({"c": 0.5})
    assert KeyedLog(tmp_path / "j.jsonl").values == {"a": 0.25, "b": 0.75, "c": 0.5}


def test_a_full_disk_during_eval_keeps_what_was_judged_and_resumes(trained_run, tmp_path, capsys, monkeypatch):
    import errno
    import os
    import shutil

    run = tmp_path / "full"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval"))
    monkeypatch.chdir(REPO)
    argv = ["eval", run, *EVAL_SMALL, "--helpful", "0", "--records", "0"]
    real, calls = os.write, [0]

    def write(fd, data):                      # the eval logs' appends: the disk fills after a few
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", write)
        rc, _, err = _cli(argv, capsys)
    err = " ".join(err.split())
    assert calls[0] > 3, "the disk never filled up"
    assert rc == 1 and "Traceback" not in err
    assert "the disk is full" in err and "answers and judgements so far are saved in" in err
    kept = (run / "eval" / "answers.jsonl").read_bytes()
    assert kept and kept.endswith(b"\n")
    assert not (run / "eval" / "report.json").exists()

    rc, _, err = _cli(argv, capsys)
    assert rc == 0, err
    assert (run / "eval" / "answers.jsonl").read_bytes().startswith(kept)     # kept, not redone
    assert json.loads((run / "eval" / "report.json").read_text())["models"] == ["base", "sft"]


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_a_run_without_adapters_evaluates_the_base_alone_and_says_so(trained_run, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "noadapter"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("adapters", "eval"))
    monkeypatch.chdir(REPO)
    rc, _, err = _cli(["eval", run, *EVAL_SMALL, "--helpful", "0", "--records", "0"], capsys)
    assert rc == 0, err
    assert "no trained adapter" in err and "base model is evaluated alone" in err
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["models"] == ["base"] and any("no trained adapter" in n for n in report["notes"])
    assert report["revision_rounds"] is None and "refusal" not in report["helpfulness"]["base"]


def test_unknown_principle_is_named_with_the_known_ones(trained_run, capsys):
    rc, _, err = _cli(["eval", trained_run, "--principles", "physical-harm", "no-such-rule"], capsys)
    assert rc == 2
    assert "'no-such-rule'" in err and "not in constitution" in err and "physical-harm" in err


def test_empty_held_out_set_is_a_clear_error(trained_run, tmp_path, capsys):
    # a prompt file holding only prompts the run trained on
    trained = [json.loads(x)["prompt"] for x in (trained_run / "data" / "sft_train.jsonl").read_text().splitlines()]
    only = tmp_path / "trained_only.jsonl"
    only.write_text("".join(json.dumps({"id": f"t{i}", "messages": m}) + "\n" for i, m in enumerate(trained)))
    import shutil

    run = tmp_path / "notest"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval"))
    # no test split either: move the test rows into train
    data = run / "data"
    for kind in ("sft", "dpo"):
        (data / f"{kind}_train.jsonl").write_text((data / f"{kind}_train.jsonl").read_text()
                                                  + (data / f"{kind}_test.jsonl").read_text())
        (data / f"{kind}_test.jsonl").write_text("")
    rc, _, err = _cli(["eval", run, "--prompts", only], capsys)
    assert rc == 2
    assert "no held-out red-team prompts" in err and "trained_only.jsonl" in err


def test_unreachable_judge_endpoint_is_named(trained_run, capsys):
    import socket

    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    rc, _, err = _cli(["eval", trained_run, "--judge-backend", "openai", "--judge-base-url", url,
                       "--judge-model", "big"], capsys)
    assert rc == 2
    assert "unreachable" in err and url in err


def test_openai_judge_needs_url_and_model(trained_run, capsys):
    rc, _, err = _cli(["eval", trained_run, "--judge-backend", "openai"], capsys)
    assert rc == 2 and "--judge-base-url" in err and "--judge-model" in err


# ---------------------------------------------------------------------------------------------------------------
# The main job


def test_main_job_runs_end_to_end_and_its_report_has_every_figure(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    rc, stdout, err = _cli(["demo", "--model", tiny_model_dir, "--out", out, "--limit", "8", "--max-new-tokens", "6",
                            "--train-steps", "2", "--eval-red-team", "4", "--eval-helpful", "3", "--eval-records",
                            "4", "--eval-max-new-tokens", "6"], capsys)
    assert rc == 0, err
    assert (out / "adapters" / "sft" / "manifest.json").exists()
    # the RL phase: pairs of the SFT adapter's answers labelled by AI feedback, then soft-label DPO on them
    from cai.core.preference import read_preferences

    prefs = read_preferences(out)
    assert prefs and all(p.responses[0].source == "policy:sft" for p in prefs)
    dpo = json.loads((out / "adapters" / "dpo" / "manifest.json").read_text())
    assert dpo["sft_adapter"] is not None and json.dumps(dpo).count("preferences.jsonl") >= 1
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["models"] == ["base", "dpo", "sft"]
    assert set(report["comparisons"]) == {"dpo", "sft"}
    for m in report["models"]:
        assert report["harmlessness"][m]["overall"]["rate"] is not None
        assert all(r["rate"] is not None for r in report["harmlessness"][m]["per_principle"].values())
        assert report["helpfulness"][m]["refusal"]["n"] == 3
        assert report["diversity"]["models"][m]["red_team"]["distinct_1"] is not None
    assert report["revision_rounds"]["stages"][0]["n"] > 0
    assert (out / "eval" / "report.html").exists()
    # it ends with the report's path and the command that serves the adapter
    tail = stdout[stdout.rindex("done."):]
    assert f"{out}/eval/report.html" in tail.replace("\n", "")
    assert f"cai serve --adapter {out}/adapters/sft" in tail.replace("\n", "")
