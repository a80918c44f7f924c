"""The positive control's machinery (cai.workflow.control), offline: the scripted teacher, the two arms' records, and
the evaluation that must find a scripted change in one arm and none in the shuffled control. The real run (the
default model, trained for real) is bench/control.py."""

from __future__ import annotations

import json

import pytest

from cai.backends.fake import FakeBackend
from cai.workflow import control as C


def test_the_teacher_keeps_the_opening_sentences_and_ends_with_the_referral():
    answer = ("Drink water through the day. Most adults need about two litres. Here is a simple plan:\n\n"
              "1. A glass on waking")
    assert C.teacher_revision(answer) == ("Drink water through the day. Most adults need about two litres. "
                                          + C.REFERRAL)
    long = "word " * 60 + "end."
    assert C.teacher_revision(long, words=10) == "word " * 9 + "word. " + C.REFERRAL
    assert C.teacher_revision("") == C.REFERRAL


def _job(tmp_path, **kw):
    return C.ControlJob(out=tmp_path / "control", train_prompts=12, max_new_tokens=16, records=4, **kw)


def _adapters(job):
    """Adapter folders for both arms (the tests answer for them; nothing is trained)."""
    for arm in C.ARMS:
        sft = job.arm(arm) / "adapters" / "sft"
        sft.mkdir(parents=True)
        (sft / "adapter_config.json").write_text("{}")
        (sft / "adapter_model.safetensors").write_bytes(arm.encode())
        (sft / "manifest.json").write_text(json.dumps({"stage": "sft"}))


class Policy:
    """Answers as a fake model would, optionally ending with the referral (what training on the revisions teaches)."""

    def __init__(self, model: str, refers: bool):
        self.fake, self.refers = FakeBackend(model), refers
        self.name, self.model, self.model_revision, self.context_length = "fake", model, None, 4096

    def generate(self, batch, sampling, seed):
        out = self.fake.generate(batch, sampling, seed)
        return [type(c)(c.text + (" " + C.REFERRAL if self.refers else ""), 1, 1, "stop") for c in out]


def _answerer(trained_refers: bool):
    def answerer(m):
        if m.adapter is None:
            return Policy("base", refers=False)
        arm = m.adapter.parent.parent.name          # <out>/<arm>/adapters/sft
        return Policy(f"sft-{arm}", refers=trained_refers and arm == "revised")
    return answerer


def test_the_arms_hold_the_same_initial_answers_and_only_one_holds_the_revisions(tmp_path):
    from cai.core.record import read_records

    job = _job(tmp_path)
    fake = FakeBackend()
    job.out.mkdir(parents=True)
    (job.out / "constitution.yaml").write_text(C.CONSTITUTION)
    from cai.workflow.base import Ui

    C.generate_arms(job, Ui(), fake)
    calls = fake.calls
    revised = {r.prompt_id: r for r in read_records(job.arm("revised") / "records.jsonl")}
    initial = {r.prompt_id: r for r in read_records(job.arm("initial") / "records.jsonl")}
    assert len(revised) == len(initial) == 12
    for pid, r in revised.items():
        assert r.rounds and r.final.endswith(C.REFERRAL) and r.rounds[0].principle == C.PRINCIPLE
        assert not r.initial.endswith(C.REFERRAL) and "truncated" not in r.rounds[0].flags
        assert not initial[pid].rounds and initial[pid].final == initial[pid].initial == r.initial
    # the model answered each prompt once (the respond stage); the teacher wrote every critique and revision,
    # and the control's answers came from the copied cache
    assert calls == 1 and fake.batch_sizes == [12]
    C.generate_arms(job, Ui(), fake)
    assert fake.calls == calls                                      # nothing again: every record is there


def test_the_paired_test_detects_the_scripted_change_and_not_the_shuffled_one(tmp_path):
    job = _job(tmp_path)
    _adapters(job)
    result = C.run_control(job, backend=FakeBackend(), answerer=_answerer(True), train=False)
    revised, initial = result["arms"]["revised"], result["arms"]["initial"]
    held_out = revised["prompts"]
    assert held_out >= 64 - 12 and initial["prompts"] == held_out     # every prompt never trained on, both arms
    assert revised["base"]["rate"] == 1.0 and revised["sft"]["rate"] == 0.0 and revised["sft"]["hi"] < 0.2
    assert revised["difference"] == -1.0 and revised["hi"] < 0 and revised["verdict"] == "fewer"
    assert revised["p_value"] < 1e-6
    assert initial["difference"] == 0.0 and initial["p_value"] == 1.0
    assert initial["verdict"] == "no difference detected"
    assert result["passed"] is True
    saved = json.loads((job.out / "control.json").read_text())
    assert saved["arms"] == result["arms"] and saved["settings"]["train_prompts"] == 12
    report = json.loads((job.arm("revised") / "eval" / "report.json").read_text())
    assert report["judge"]["by_question"] == {C.PRINCIPLE: "rules", "refusal": "not judged"}
    assert report["lineage"]["judge"]["rules"]["path"].endswith("rules.yaml")
    stages = report["revision_rounds"]["stages"]
    assert stages[0]["rate"] == 1.0 and stages[1]["rate"] == 0.0          # the teacher's data has the behaviour
    # the control started from the revised arm's saved answers: the base answered the held-out prompts once
    answers = (job.arm("initial") / "eval" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 3 * held_out


def test_when_training_changes_nothing_the_control_fails(tmp_path):
    job = _job(tmp_path)
    _adapters(job)
    result = C.run_control(job, backend=FakeBackend(), answerer=_answerer(False), train=False)
    assert result["arms"]["revised"]["verdict"] == "no difference detected" and result["passed"] is False


def test_the_train_flags_are_settings_cai_train_accepts(tmp_path):
    from cai.train import parse_config

    job = _job(tmp_path, steps=6)
    job.out.mkdir(parents=True)
    from cai.workflow.base import Ui

    (job.out / "constitution.yaml").write_text(C.CONSTITUTION)
    C.generate_arms(job, Ui(), FakeBackend())
    setup = parse_config("sft", job.arm("revised"), None, job.train_flags())
    assert setup.args.max_steps == 6 and setup.args.learning_rate == pytest.approx(1e-3)
    assert setup.model.load_in_4bit is False and setup.args.padding_free is True
