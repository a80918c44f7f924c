"""`cai data build --preferences`: AI-feedback labels (a hand-written preferences.jsonl) → DPO rows with a soft or
hard label, reward rows with a margin, the same split by prompt as the SFT rows, the card's label figures; and the
bad inputs, each a clear error."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from cai.cli import main
from cai.core.errors import DataError
from cai.core.record import Record, read_records
from cai.data.build import BuildOptions, build_datasets
from cai.data.preferences import MAX_MARGIN, margin

from conftest import preference_line, prompt_rows, write_preferences
from data_fixtures import copy_run, make_run, read_rows


@pytest.fixture(autouse=True)
def _no_fake_delay(monkeypatch):
    monkeypatch.delenv("CAI_FAKE_DELAY", raising=False)


@pytest.fixture(scope="module")
def records_run(tmp_path_factory) -> Path:
    """40 ordinary prompts, two rounds (fake backend), nothing flagged."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CAI_FAKE_DELAY", raising=False)
        return make_run(tmp_path_factory.mktemp("prefs") / "run", prompt_rows(40))


def convo(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True)


# the labels of the first eight records in the small tests: P(responses[0] = final revision is better)
LABELS = [0.9, 0.2, 0.5, None, 0.55, 0.97, 0.35, None]


@pytest.fixture
def labelled_run(records_run, tmp_path) -> tuple[Path, list[Record]]:
    run = copy_run(records_run, tmp_path / "run")
    recs = read_records(run)
    write_preferences(run, [preference_line(r, label) for r, label in zip(recs, LABELS, strict=False)])
    return run, recs


def _by_convo(rows: list[dict]) -> dict[str, dict]:
    return {convo(r["prompt"]): r for r in rows}


# ---------------------------------------------------------------------------------------------------------------
# Soft and hard labels


def test_soft_labels_keep_the_probability_that_chosen_is_better(labelled_run):
    run, recs = labelled_run
    card = build_datasets(run, BuildOptions(test_size=0, preferences=True))
    rows = _by_convo(read_rows(run, "dpo_train"))
    assert len(rows) == 6 == card.counts["dpo_train"]               # two unlabelled pairs left out
    for rec, label in zip(recs, LABELS, strict=False):
        row = rows.get(convo([dict(m) for m in rec.messages]))
        if label is None:
            assert row is None
            continue
        assert set(row) == {"prompt", "chosen", "rejected", "label"}
        # the chosen answer is the one the label prefers; the label is the probability that it is the better one
        better, worse = (rec.final, rec.initial) if label >= 0.5 else (rec.initial, rec.final)
        assert row["chosen"] == [{"role": "assistant", "content": better}]
        assert row["rejected"] == [{"role": "assistant", "content": worse}]
        assert row["label"] == pytest.approx(max(label, 1 - label))
        assert 0.5 <= row["label"] <= 1
    # the records' own revision-vs-initial pairs are not used: the 0.2 pair prefers the initial answer
    assert rows[convo([dict(m) for m in recs[1].messages])]["chosen"][0]["content"] == recs[1].initial
    assert len(rows) < len(recs)
    # SFT rows still come from every record
    assert card.counts["sft_train"] == len(recs)
    assert card.excluded["dpo:unlabelled"] == 2
    assert card.preferences["unlabelled"] == 2 and card.preferences["labelled"] == 6


def test_hard_labels_drop_pairs_below_the_cut_and_write_one(labelled_run, capsys):
    run, recs = labelled_run
    assert main(["data", "build", str(run), "--preferences", "--preference-labels", "hard", "--min-confidence",
                 "0.6", "--test-size", "0"]) == 0, capsys.readouterr().err
    rows = _by_convo(read_rows(run, "dpo_train"))
    kept = {i for i, label in enumerate(LABELS) if label is not None and max(label, 1 - label) >= 0.6}
    assert kept == {0, 1, 5, 6}
    assert set(rows) == {convo([dict(m) for m in recs[i].messages]) for i in kept}
    assert {r["label"] for r in rows.values()} == {1.0}
    assert rows[convo([dict(m) for m in recs[6].messages])]["chosen"][0]["content"] == recs[6].initial   # 0.35
    card = json.loads((run / "data" / "card.json").read_text())
    p = card["preferences"]
    assert (p["mode"], p["min_confidence"], p["below_cut"], p["unlabelled"], p["used"]) == ("hard", 0.6, 2, 2, 4)
    assert card["excluded"]["dpo:below_cut"] == 2
    readme = (run / "data" / "README.md").read_text()
    assert "hard" in readme and "below confidence 0.6 left out (2)" in readme


def test_hard_labels_leave_out_exact_ties_soft_labels_keep_them(labelled_run):
    run, recs = labelled_run
    tie = convo([dict(m) for m in recs[2].messages])          # labelled 0.5
    card = build_datasets(run, BuildOptions(test_size=0, preferences=True, preference_labels="hard"))
    assert tie not in _by_convo(read_rows(run, "dpo_train"))
    assert card.excluded["dpo:tie"] == 1 and card.preferences["left_out"] == {"tie": 1}
    build_datasets(run, BuildOptions(test_size=0, preferences=True))
    assert _by_convo(read_rows(run, "dpo_train"))[tie]["label"] == 0.5


def test_soft_labels_with_a_cut_keep_the_probabilities_above_it(labelled_run):
    run, _ = labelled_run
    card = build_datasets(run, BuildOptions(test_size=0, preferences=True, min_confidence=0.8))
    labels = sorted(r["label"] for r in read_rows(run, "dpo_train"))
    assert labels == pytest.approx([0.8, 0.9, 0.97])
    assert card.preferences["below_cut"] == 3


def test_a_pair_of_equal_texts_or_a_flagged_answer_is_left_out_and_counted(records_run, tmp_path):
    run = copy_run(records_run, tmp_path / "run")
    recs = read_records(run)
    lines = [preference_line(recs[0], 0.9), preference_line(recs[1], 0.8, texts=("Same  answer.", "Same answer.")),
             preference_line(recs[2], 0.7, texts=("A real answer.", "   ")),
             preference_line(recs[3], 0.7, texts=("Flagged by the labeller.", "Other."))]
    lines[3]["responses"][0]["flags"] = ["truncated"]
    write_preferences(run, lines)
    card = build_datasets(run, BuildOptions(test_size=0, preferences=True))
    assert card.counts["dpo_train"] == 1
    assert card.preferences["left_out"] == {"no_pair": 1, "empty": 1, "truncated": 1}
    card = build_datasets(run, BuildOptions(test_size=0, preferences=True, allow_flags=("empty", "truncated")))
    assert card.counts["dpo_train"] == 3 and card.preferences["left_out"] == {"no_pair": 1}


# ---------------------------------------------------------------------------------------------------------------
# Reward rows


def test_margin_is_the_clipped_log_odds_of_the_label():
    assert margin(0.5, "soft") == 0.0
    assert margin(0.8, "soft") == pytest.approx(math.log(4))
    assert margin(0.99, "soft") == margin(1.0, "soft") == pytest.approx(MAX_MARGIN) == pytest.approx(math.log(19))
    assert margin(0.8, "hard") == margin(1.0, "hard") == 0.0


def test_reward_rows_hold_the_same_pairs_with_a_margin(labelled_run):
    run, _ = labelled_run
    card = build_datasets(run, BuildOptions(test_size=0, preferences=True))
    dpo, reward = read_rows(run, "dpo_train"), read_rows(run, "reward_train")
    assert card.counts["reward_train"] == len(reward) == len(dpo) == 6
    for d, r in zip(dpo, reward, strict=True):
        assert set(r) == {"prompt", "chosen", "rejected", "margin"}
        assert (r["prompt"], r["chosen"], r["rejected"]) == (d["prompt"], d["chosen"], d["rejected"])
        q = min(d["label"], 0.95)
        assert r["margin"] == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert max(r["margin"] for r in reward) == pytest.approx(MAX_MARGIN)       # the 0.97 pair, clipped
    assert min(r["margin"] for r in reward) == 0.0                              # the 0.5 pair
    assert set(card.files) >= {"reward_train.jsonl", "reward_test.jsonl"}
    # hard labels: no margin
    build_datasets(run, BuildOptions(test_size=0, preferences=True, preference_labels="hard"))
    assert {r["margin"] for r in read_rows(run, "reward_train")} == {0.0}


def test_without_preferences_there_are_no_reward_files(records_run, tmp_path):
    run = copy_run(records_run, tmp_path / "run")
    card = build_datasets(run, BuildOptions(test_size=0))
    assert not any(name.startswith("reward") for name in card.files)
    assert card.preferences == {} and "label" not in read_rows(run, "dpo_train")[0]


def test_reward_rows_pass_trl_reward_preparation_with_the_margin(labelled_run, tiny_model_dir, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    run, _ = labelled_run
    build_datasets(run, BuildOptions(test_size=0, preferences=True))
    ds = load_dataset("json", data_files={"train": str(run / "data" / "reward_train.jsonl")})["train"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    args = RewardConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                        max_length=512, per_device_train_batch_size=2, max_steps=1)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    assert trainer.train_dataset["margin"] == ds["margin"]            # kept through tokenization
    batch = next(iter(trainer.get_train_dataloader()))                   # and through the column removal
    assert batch["margin"].shape == (2,)
    assert all(any(abs(m - x) < 1e-6 for x in ds["margin"]) for m in batch["margin"].tolist())


# ---------------------------------------------------------------------------------------------------------------
# One split for every file


def test_a_prompt_held_out_of_sft_is_held_out_of_dpo_and_reward(records_run, tmp_path):
    run = copy_run(records_run, tmp_path / "run")
    recs = read_records(run)
    write_preferences(run, [preference_line(r, 0.8 if i % 2 else 0.3) for i, r in enumerate(recs)])
    card = build_datasets(run, BuildOptions(test_size=0.25, preferences=True))
    split = {name: {convo(r["prompt"]) for r in read_rows(run, name)}
             for name in ("sft_train", "sft_test", "dpo_train", "dpo_test", "reward_train", "reward_test")}
    assert split["dpo_test"] and split["dpo_train"]
    assert split["dpo_test"] == split["reward_test"] and split["dpo_train"] == split["reward_train"]
    assert split["sft_test"] == split["dpo_test"]          # every record has a pair here: the same prompts
    assert not split["sft_test"] & (split["dpo_train"] | split["reward_train"])
    assert not split["sft_train"] & (split["dpo_test"] | split["reward_test"])
    assert card.prompts["test"] == len(split["sft_test"])
    # and the split of a prompt is the one a build without preferences gives it
    other = copy_run(records_run, tmp_path / "plain")
    build_datasets(other, BuildOptions(test_size=0.25))
    assert {convo(r["prompt"]) for r in read_rows(other, "sft_test")} == split["sft_test"]


# ---------------------------------------------------------------------------------------------------------------
# The card


def test_the_card_states_the_label_figures(labelled_run):
    run, _ = labelled_run
    build_datasets(run, BuildOptions(test_size=0, preferences=True))
    card = json.loads((run / "data" / "card.json").read_text())
    p = card["preferences"]
    assert p["sha256"] == hashlib.sha256((run / "preferences.jsonl").read_bytes()).hexdigest()
    assert (p["pairs"], p["labelled"], p["unlabelled"], p["used"]) == (8, 6, 2, 6)
    confidences = [0.9, 0.8, 0.5, 0.55, 0.97, 0.65]
    assert p["confidence"]["mean"] == pytest.approx(sum(confidences) / 6, abs=1e-4)
    assert (p["confidence"]["min"], p["confidence"]["max"]) == (0.5, 0.97)
    assert [b["pairs"] for b in p["confidence"]["histogram"]] == [2, 1, 0, 1, 2]
    assert [(b["from"], b["to"]) for b in p["confidence"]["histogram"]][::4] == [(0.5, 0.6), (0.9, 1.0)]
    assert p["feedback_models"] == [{"model": "judge-7b", "pairs": 6}]
    assert p["feedback_identities"] == [{"backend": "local", "model": "judge-7b"}]
    assert [(x["id"], x["judgements"]) for x in p["principles"]] == [("ethical", 12), ("harmless", 12)]
    assert (p["mode"], p["min_confidence"], p["check"]) == ("soft", 0.5, None)
    readme = (run / "data" / "README.md").read_text()
    assert p["sha256"] in readme and "judge-7b (6 pairs)" in readme
    assert "8 (6 labelled, 2 unlabelled" in readme
    assert "| [0.9, 1.0] | 2 |" in readme and "| [0.7, 0.8) | 0 |" in readme


def _check_json(model: str = "judge-7b") -> dict:
    """A check card as `cai label RUN --check` writes it (cai.label.check)."""
    def rate(k: int, n: int, lo: float, hi: float) -> dict:
        return {"k": k, "n": n, "rate": k / n, "lo": lo, "hi": hi}

    return {"items": 97, "labelled": 96, "accuracy": rate(79, 96, 0.73, 0.88),
            "accuracy_better_first": rate(85, 96, 0.8, 0.93), "accuracy_one_order": {"k": 0, "n": 0, "rate": None,
                                                                                    "lo": 0.0, "hi": 1.0},
            "ece": {"value": 0.041, "lo": 0.02, "hi": 0.09, "n": 96, "interval": "bootstrap over items, 95%"},
            "position_bias": {"mean_p_first": 0.56, "mean_p_first_ci": [0.52, 0.6], "readings": 384,
                              "same_position": rate(20, 192, 0.07, 0.16)},
            "by_kind": {"harm": rate(40, 44, 0.79, 0.96), "over_refusal": rate(14, 24, 0.39, 0.76)},
            "feedback": {"backend": "local", "model": model, "revision": None, "adapter": None},
            "settings": {"principles_per_pair": 2, "orders": "both", "cot": False, "clamp": None, "seed": 0},
            "constitution": {"name": "small", "version": "1", "sha256": "0" * 64},
            "check_set": {"path": "data/labeller_check.jsonl", "items": 97}}


def test_the_labellers_check_card_is_copied_beside_the_labels(labelled_run):
    run, _ = labelled_run
    check = _check_json()
    (run / "label").mkdir()
    (run / "label" / "check.json").write_text(json.dumps(check))
    build_datasets(run, BuildOptions(test_size=0, preferences=True))
    card = json.loads((run / "data" / "card.json").read_text())["preferences"]["check"]
    assert card["figures"] == check and card["file"] == "label/check.json"
    assert (card["feedback"], card["other_feedback"]) == ("judge-7b", False)
    assert card["sha256"] == hashlib.sha256((run / "label" / "check.json").read_bytes()).hexdigest()
    readme = " ".join((run / "data" / "README.md").read_text().split())
    assert "The labeller's check of judge-7b" in readme
    assert "accuracy 0.823 [0.73, 0.88] (79/96)" in readme and "ece 0.041 [0.02, 0.09]" in readme
    assert "position_bias (mean_p_first 0.56 [0.52, 0.6], readings 384, same_position 0.104 [0.07, 0.16] (20/192))" \
        in readme
    assert "by_kind (harm 0.909 [0.79, 0.96] (40/44), over_refusal 0.583 [0.39, 0.76] (14/24))" in readme
    assert "accuracy_one_order" not in readme                   # nothing measured: no figure
    assert "principles_per_pair" not in readme and "check_set" not in readme     # how, not how good
    assert "another feedback model" not in readme
    # a check of another feedback model is said not to qualify these labels
    (run / "label" / "check.json").write_text(json.dumps(_check_json("other-judge")))
    build_datasets(run, BuildOptions(test_size=0, preferences=True))
    card = json.loads((run / "data" / "card.json").read_text())["preferences"]["check"]
    assert (card["feedback"], card["other_feedback"]) == ("other-judge", True)
    assert "its figures do not qualify these labels" in (run / "data" / "README.md").read_text()
    # an unreadable one stops the build, naming it and the command that writes it
    (run / "label" / "check.json").write_text("{not json")
    with pytest.raises(DataError, match=r"label/check.json is unreadable") as e:
        build_datasets(run, BuildOptions(test_size=0, preferences=True))
    assert "cai label" in e.value.hint and "--check" in e.value.hint


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_no_preferences_file_is_a_data_error_naming_it_and_cai_label(records_run, tmp_path, capsys):
    run = copy_run(records_run, tmp_path / "run")
    with pytest.raises(DataError) as e:
        build_datasets(run, BuildOptions(preferences=True))
    assert "preferences.jsonl not found" in e.value.message and str(run.name) in e.value.message
    assert "cai label" in e.value.hint
    assert not (run / "data").exists()
    assert main(["data", "build", str(run), "--preferences"]) == 2
    err = capsys.readouterr().err
    assert "preferences.jsonl not found" in err and "cai label" in err and "Traceback" not in err


def test_a_preferences_file_with_every_pair_unlabelled_is_a_data_error(records_run, tmp_path):
    run = copy_run(records_run, tmp_path / "run")
    recs = read_records(run)
    write_preferences(run, [preference_line(r, None) for r in recs[:5]])
    with pytest.raises(DataError) as e:
        build_datasets(run, BuildOptions(preferences=True))
    assert "preferences.jsonl" in e.value.message and "none of its 5 pairs is labelled" in e.value.message
    assert "cai label" in e.value.hint
    assert not (run / "data").exists()
    write_preferences(run, [])
    with pytest.raises(DataError, match="holds no pairs"):
        build_datasets(run, BuildOptions(preferences=True))


def test_every_pair_below_the_cut_is_a_data_error_saying_the_best_label(labelled_run):
    run, _ = labelled_run
    with pytest.raises(DataError) as e:
        build_datasets(run, BuildOptions(preferences=True, min_confidence=0.99))
    assert "none of the 6 labelled pairs can be used (below_cut 6" in e.value.message
    assert "0.970" in e.value.hint and "--min-confidence" in e.value.hint


@pytest.mark.parametrize("opts, words", [
    ({"preference_labels": "medium"}, "--preference-labels must be one of soft, hard, got 'medium'"),
    ({"min_confidence": 0.4}, "--min-confidence must be in [0.5, 1], got 0.4"),
    ({"min_confidence": 1.1}, "--min-confidence must be in [0.5, 1], got 1.1"),
])
def test_an_unknown_mode_or_a_cut_outside_half_to_one_is_a_data_error(labelled_run, capsys, opts, words):
    run, _ = labelled_run
    with pytest.raises(DataError) as e:
        build_datasets(run, BuildOptions(preferences=True, **opts))
    assert words in e.value.message
    assert not (run / "data").exists()
    flag = "--preference-labels" if "preference_labels" in opts else "--min-confidence"
    assert main(["data", "build", str(run), "--preferences", flag, str(next(iter(opts.values())))]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_label_options_without_preferences_are_a_data_error(labelled_run):
    run, _ = labelled_run
    with pytest.raises(DataError, match="apply only to --preferences"):
        build_datasets(run, BuildOptions(preference_labels="hard"))


@pytest.mark.parametrize("change, words", [
    (lambda line: line.update(label=1.5), "has label 1.5: not a probability in [0, 1]"),
    (lambda line: line["responses"].pop(), "has 1 responses (a pair has exactly two)"),
])
def test_a_malformed_pair_is_a_data_error_naming_the_file_and_pair(records_run, tmp_path, change, words):
    run = copy_run(records_run, tmp_path / "run")
    recs = read_records(run)
    lines = [preference_line(r, 0.8) for r in recs[:3]]
    change(lines[1])
    write_preferences(run, lines)
    with pytest.raises(DataError) as e:
        build_datasets(run, BuildOptions(preferences=True))
    assert words in e.value.message and "preferences.jsonl" in e.value.message and lines[1]["id"] in e.value.message
