"""``cai label`` over a run folder: policy pairs and record pairs, the card, resume (in-process and after kill -9),
the endpoint feedback, ``--check``, and bad inputs, each a clear error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.fault_server import FaultServer

from cai.cli import main
from cai.core.constitution import load_constitution
from cai.core.preference import read_preferences
from cai.label.feedback import ENDPOINT_ASK
from cai.label.prompts import feedback_messages

from conftest import REPO, prompt_rows, subprocess_env, write_prompts

CHECK = REPO / "data" / "labeller_check.jsonl"


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run generated on the tiny model: 6 prompts, 1 round (the shipped constitution has preference principles)."""
    root = tmp_path_factory.mktemp("label")
    prompts = write_prompts(root / "p.jsonl", prompt_rows(6))
    run = root / "run"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(run),
                 "--rounds", "1", "--max-new-tokens", "8"]) == 0
    return run


def copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("label", "preferences.jsonl"))
    return dest


def cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, " ".join(out.err.split())


def test_policy_pairs_are_sampled_labelled_and_carded(tiny_run, tmp_path, capsys):
    run = copy(tiny_run, tmp_path / "run")
    rc, out, err = cli(["label", run, "--samples", "4", "--max-new-tokens", "8", "--principles-per-pair", "2"],
                       capsys)
    assert rc == 0, err
    prefs = read_preferences(run)
    card = json.loads((run / "label" / "card.json").read_text())
    # 6 prompts x 4 answers = 12 disjoint pairs, less any whose two answers came out the same or one came out empty
    # (a sampled tiny model can end at its first token; which pairs do depends on the CPU's kernels), each counted
    skipped = card["skipped"]
    assert card["pairs"] == len(prefs) > 0 and card["pairs"] + skipped["identical"] + skipped["empty_or_failed"] == 12
    # none failed (all 24 answers cached); the pairs are disjoint, so each skipped as empty holds one or two of them
    answers = [json.loads(line) for line in (run / "label" / "samples.jsonl").read_text().splitlines()]
    empty = sum(not a["value"]["text"].strip() for a in answers)
    assert len(answers) == 24 and skipped["empty_or_failed"] <= empty <= 2 * skipped["empty_or_failed"]
    for p in prefs:
        assert [r.source for r in p.responses] == ["policy:base", "policy:base"]
        assert [r.sample for r in p.responses] in ([0, 1], [2, 3])
        assert len(p.judgements) == 4 and {j.order for j in p.judgements} == {"ab", "ba"}
        assert len(set(p.provenance["principles"])) == 2 and 0.0 < p.label < 1.0 and p.status == "labelled"
        assert p.provenance["policy"] == "base" and p.provenance["constitution"]["name"] == "default"
    assert card["questions"]["asked"] == 4 * len(prefs) and card["questions"]["reused"] == 0
    assert card["position_bias"]["readings"] == 4 * len(prefs)
    assert "pairs" in out and "position bias" in out

    # the same command again: every answer and reading comes from the caches, the same labels
    rc, _, err = cli(["label", run, "--samples", "4", "--max-new-tokens", "8", "--principles-per-pair", "2"],
                     capsys)
    assert rc == 0, err
    again = json.loads((run / "label" / "card.json").read_text())
    assert again["questions"] == {"asked": 0, "reused": 4 * len(prefs), "unreadable": 0}
    same = [(p.id, p.label, p.judgements, p.responses) for p in read_preferences(run)]
    assert same == [(p.id, p.label, p.judgements, p.responses) for p in prefs]


def test_record_pairs_check_the_labeller_against_the_revisions(tiny_run, tmp_path, capsys):
    run = copy(tiny_run, tmp_path / "run")
    rc, _, err = cli(["label", run, "--policy", "records"], capsys)
    assert rc == 0, err
    prefs = read_preferences(run)
    assert prefs and all([r.source for r in p.responses] == ["record:initial", "record:final"] for p in prefs)
    card = json.loads((run / "label" / "card.json").read_text())
    agree = card["agrees_with_revision"]
    assert agree["n"] == card["labelled"] and agree["k"] == sum(p.label < 0.5 for p in prefs)


def test_identical_answers_are_skipped_and_counted(tiny_model_dir, tmp_path, capsys, prompt_file):
    run = tmp_path / "run"
    rows = [{"id": "s1", "prompt": "Say the same [[same]]"}, {"id": "s2", "prompt": "Other [[same]]"},
            {"id": "d1", "prompt": "A normal question?"}]
    assert main(["generate", "--backend", "fake", "--prompts", str(prompt_file(rows)), "--out", str(run),
                 "--max-new-tokens", "8"]) == 0
    rc, _, err = cli(["label", run, "--feedback-model", tiny_model_dir], capsys)
    assert rc == 0, err
    card = json.loads((run / "label" / "card.json").read_text())
    assert card["skipped"]["identical"] == 2 and card["pairs"] == 1
    assert [p.prompt_id for p in read_preferences(run)] == ["d1"]
    # only identical pairs: an error that says so, never a 50/50 label
    same_only = prompt_file(rows[:2], name="same.jsonl")
    rc, _, err = cli(["label", run, "--feedback-model", tiny_model_dir, "--prompts", same_only], capsys)
    assert rc == 2 and "2 had two identical answers" in err


def test_endpoint_feedback_reads_letters_and_an_endpoint_without_logprobs_is_refused_up_front(
        tiny_run, tmp_path, capsys):
    run = copy(tiny_run, tmp_path / "run")
    server = FaultServer()
    try:
        rc, _, err = cli(["label", run, "--policy", "records", "--feedback-backend", "openai", "--feedback-base-url",
                          server.url, "--feedback-model", "judge", "--limit", "3"], capsys)
        assert rc == 0, err
        prefs = read_preferences(run)
        assert len(prefs) == 3 and all(p.provenance["feedback"] == {"backend": "openai", "model": "judge"}
                                       for p in prefs)
        # the server encodes P(A) = yes_probability(the request): the reading is exactly that
        c = load_constitution(REPO / "constitution" / "default.yaml")
        for p in prefs:
            a, b = (r.text for r in p.responses)
            for j in p.judgements:
                shown = (a, b) if j.order == "ab" else (b, a)
                msgs = feedback_messages(c, p.messages, c.preference_principle(j.principle), *shown)
                msgs[-1] = {"role": "user", "content": f"{msgs[-1]['content']}\n\n{ENDPOINT_ASK}"}
                assert j.p_first == pytest.approx(FaultServer.yes_probability(msgs), abs=1e-5)
        requests = server.requests
        server.add("nologprobs", times=100)
        rc, _, err = cli(["label", copy(tiny_run, tmp_path / "run2"), "--policy", "records", "--feedback-backend",
                          "openai", "--feedback-base-url", server.url, "--feedback-model", "judge"], capsys)
        assert rc == 2 and server.url in err and "no log-probabilities" in err
        assert server.requests - requests == 1            # one probe, not a labelling of every pair
    finally:
        server.close()


def test_check_reports_accuracy_calibration_and_position_bias(tiny_run, tmp_path, capsys):
    run = copy(tiny_run, tmp_path / "run")
    small = tmp_path / "check.jsonl"
    small.write_text("\n".join(CHECK.read_text(encoding="utf-8").splitlines()[:6]) + "\n", encoding="utf-8")
    rc, out, err = cli(["label", run, "--check", "--check-set", small], capsys)
    assert rc == 0, err
    report = json.loads((run / "label" / "check.json").read_text())
    assert report["items"] == 6 and report["labelled"] == 6
    for key in ("accuracy", "accuracy_one_order", "accuracy_better_first", "accuracy_better_second"):
        r = report[key]
        assert r["n"] == 6 and 0 <= r["lo"] <= (r["rate"] or 0) <= r["hi"] + 1e-9 <= 1 + 1e-9
    ece = report["ece"]
    assert 0 <= ece["lo"] <= ece["value"] + 1e-9 and ece["value"] <= ece["hi"] + 1e-9 <= 1 + 1e-9
    assert report["position_bias"]["same_position"]["n"] == 6
    assert set(report["by_kind"]) <= {"harm", "over-refusal", "honesty", "quality"}
    assert "accuracy" in out and "calibration error" in out


def test_the_shipped_comparison_set_is_well_formed():
    from cai.label.check import load_check_set

    items = load_check_set(CHECK)
    kinds = [it.kind for it in items]
    assert len(items) >= 60 and kinds.count("over-refusal") >= 20 and kinds.count("harm") >= 20
    assert len({it.id for it in items}) == len(items) and len({it.category for it in items}) >= 8
    assert 0.3 < sum(len(it.better) > len(it.worse) for it in items) / len(items) < 0.7   # length does not tell


def test_a_bad_comparison_set_names_the_line(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(CHECK.read_text(encoding="utf-8").splitlines()[0] + "\n" + '{"id": "x", "kind": "harm"}\n')
    rc, _, err = cli(["label", tiny_run, "--check", "--check-set", bad], capsys)
    assert rc == 2 and "bad.jsonl:2" in err and "missing" in err


@pytest.mark.parametrize("argv, needle", [
    (["--samples", "1"], "--samples must be at least 2"),
    (["--policy", "nosuch"], "no finished adapter"),
    (["--clamp", "0.7", "0.9"], "--clamp"),
    (["--feedback-backend", "openai"], "needs --feedback-base-url"),
])
def test_bad_options_are_clear_errors(tiny_run, capsys, argv, needle):
    rc, _, err = cli(["label", tiny_run, *argv], capsys)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_a_run_without_records_and_a_policy_adapter_of_another_base(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text((tiny_run / "run.json").read_text())
    rc, _, err = cli(["label", empty, "--policy", "records"], capsys)
    assert rc == 2 and "no pairs to label" in err
    rc, _, err = cli(["label", empty], capsys)
    assert rc == 2 and "has no records" in err and "--prompts" in err
    other = tmp_path / "other-adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text("{}")
    (other / "manifest.json").write_text(json.dumps({"base_model": {"id": "someone/else"}}))
    rc, _, err = cli(["label", tiny_run, "--policy", other], capsys)
    assert rc == 2 and "trained on someone/else" in err


def test_the_samples_are_keyed_on_the_adapters_weights_not_on_its_manifests_timings(tiny_run, tmp_path):
    from cai.label.runner import _adapter_stamp, _with_manifest
    from cai.run import RunFolder

    run = copy(tiny_run, tmp_path / "run")
    folder = RunFolder.open(run)

    def adapter(name: str, weights: bytes, seconds: float) -> str:
        path = run / "adapters" / name
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(weights)
        (path / "manifest.json").write_text(json.dumps({"seconds_this_run": seconds}))
        return str(path)

    first, retrained, other = adapter("a", b"w1", 1.0), adapter("b", b"w1", 2.0), adapter("c", b"w2", 1.0)
    stamp = [_adapter_stamp(folder, p) for p in (first, retrained, other)]
    assert stamp[0]["path"] == "adapters/a"
    assert stamp[0]["weights_sha256"] == stamp[1]["weights_sha256"] != stamp[2]["weights_sha256"]
    assert "manifest_sha256" not in stamp[0]      # the key: a retrained adapter's new timings do not change it
    card = [_with_manifest({"model": "m", "adapter": s}, p) for s, p in zip(stamp, (first, retrained))]
    assert card[0]["adapter"]["manifest_sha256"] != card[1]["adapter"]["manifest_sha256"]   # the card has lineage
    assert card[0]["adapter"]["weights_sha256"] == stamp[0]["weights_sha256"]
    assert _adapter_stamp(folder, None) is None and _with_manifest({"adapter": None}, None) == {"adapter": None}


def test_label_run_keys_the_policy_samples_with_the_weights_stamp(tiny_run, tmp_path, monkeypatch):
    """The wiring: what ``label_run`` hands ``policy_pairs`` as the samples' key identity stays the same when only the
    adapter's manifest changes (a retraining to the same weights, at the same path), and changes with the weights."""
    import hashlib
    from types import SimpleNamespace

    from cai.label import runner

    run = copy(tiny_run, tmp_path / "run")
    sft = run / "adapters" / "sft"
    sft.mkdir(parents=True)
    seen: list[dict] = []

    class Stop(Exception):
        pass

    def pairs_seen(*args, **kwargs):
        seen.append(args[7])   # identity: the key's "policy" part
        raise Stop

    monkeypatch.setattr(runner, "policy_pairs", pairs_seen)
    backend = SimpleNamespace(model="tiny", model_revision=None, adapter=str(sft))
    for weights, seconds in ((b"w1", 1.0), (b"w1", 2.0), (b"w2", 2.0)):
        (sft / "adapter_model.safetensors").write_bytes(weights)
        (sft / "manifest.json").write_text(json.dumps({"seconds_this_run": seconds}))
        with pytest.raises(Stop):
            runner.label_run(run, runner.LabelOptions(policy="sft"), feedback=None, policy_backend=backend)
    assert seen[0] == seen[1] != seen[2]
    assert seen[0]["adapter"] == {"path": "adapters/sft", "weights_sha256": hashlib.sha256(b"w1").hexdigest()}


def test_no_preference_principles_is_named(tiny_run, tmp_path, capsys):
    from conftest import constitution_yaml

    plain = tmp_path / "plain.yaml"
    plain.write_text(constitution_yaml(2))
    rc, _, err = cli(["label", tiny_run, "--constitution", plain], capsys)
    assert rc == 2 and "has no preference_principles" in err and "anthropic-rl" in err


# ---------------------------------------------------------------------------------------------------------------
# kill -9 mid-labelling: the readings written before stay, the next run asks only the rest


def test_kill_9_then_the_same_command_finishes_without_asking_again(tiny_run, tiny_model_dir, tmp_path):
    run = copy(tiny_run, tmp_path / "run")
    argv = [sys.executable, "-m", "cai.cli", "label", str(run), "--policy", "records", "--feedback-batch-size", "1",
            "--principles-per-pair", "3"]
    proc = subprocess.Popen(argv, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    judgements = run / "label" / "judgements.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if judgements.exists() and len(judgements.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the labelling finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(judgements.read_bytes().split(b"\n")[:-1])
    assert kept >= 4 and not (run / "preferences.jsonl").exists()
    done = subprocess.run(argv, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    card = json.loads((run / "label" / "card.json").read_text())
    assert card["questions"]["reused"] >= kept - 1 and card["questions"]["asked"] + card["questions"]["reused"] == \
        card["pairs"] * 6
    fresh = copy(tiny_run, tmp_path / "fresh")
    assert main(["label", str(fresh), "--policy", "records", "--principles-per-pair", "3"]) == 0
    assert [p.label for p in read_preferences(run)] == pytest.approx([p.label for p in read_preferences(fresh)],
                                                                      abs=1e-5)
