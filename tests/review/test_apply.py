"""People's decisions flow into `cai data build`: rejected items are left out, an edited text trains, flips swap a
pair, ties and rejects leave it out, --require-review keeps only what a person accepted, old reviews do not apply,
and the card and the adapter's manifest say how much was reviewed."""

from __future__ import annotations

import json

import pytest
from fixtures.review_fixtures import make_record, pair_of, review_pair, review_record, rows, write_run

from cai.cli import main
from cai.core.errors import DataError
from cai.data.build import BuildOptions, build_datasets
from cai.review.apply import edited

OPTS = dict(test_size=0.0)          # every row in train: the tests count rows, not the split


def _finals(run, kind="sft") -> dict[str, str]:
    """question → the trained answer (the SFT completion, or the DPO chosen)."""
    key = "completion" if kind == "sft" else "chosen"
    return {r["prompt"][-1]["content"]: r[key][0]["content"] for r in rows(run, kind)}


def _question(rec) -> str:
    return rec.messages[-1]["content"]


def test_rejected_records_are_left_out_and_an_edit_trains_in_sft_and_dpo(tmp_path):
    recs = [make_record(i) for i in range(5)]
    run = write_run(tmp_path / "run", recs)
    review_record(run, recs[0], "reject", reason="preachy")
    review_record(run, recs[1], "edit", text="A person's better answer.")
    review_record(run, recs[2], "accept")
    card = build_datasets(run, BuildOptions(**OPTS))
    for kind in ("sft", "dpo"):
        got = _finals(run, kind)
        assert _question(recs[0]) not in got                                   # rejected: neither SFT nor DPO
        assert got[_question(recs[1])] == "A person's better answer."
        assert got[_question(recs[2])] == recs[2].final and got[_question(recs[3])] == recs[3].final   # unreviewed
        assert len(got) == 4
    dpo = {r["prompt"][-1]["content"]: r for r in rows(run, "dpo")}
    assert dpo[_question(recs[1])]["rejected"][0]["content"] == recs[1].initial
    assert all("_review" not in r for kind in ("sft", "dpo") for r in rows(run, kind))     # the tag is not written
    r = card.review
    assert r["records"] == {**r["records"], "items": 5, "reviewed": 3, "accepted": 1, "edited": 1, "rejected": 1,
                            "unreviewed": 2, "conflicts": 0, "stale": 0}
    assert r["rows"]["sft"] == {"rows": 4, "reviewed": 2, "accepted": 1, "edited": 1}
    assert card.excluded["sft:review:rejected"] == 1 and card.excluded["dpo:review:rejected"] == 1
    readme = (run / "data" / "README.md").read_text()
    assert "## Human review" in readme and "3 of 5 reviewed (1 accepted, 1 edited, 1 rejected" in readme
    assert json.loads((run / "data" / "card.json").read_text())["review"]["rule"] == "any-reject"


def test_require_review_builds_only_from_accepted_and_edited_records(tmp_path):
    recs = [make_record(i) for i in range(6)]
    run = write_run(tmp_path / "run", recs)
    with pytest.raises(DataError, match="no reviews yet"):
        build_datasets(run, BuildOptions(require_review=True, **OPTS))
    review_record(run, recs[0], "accept")
    review_record(run, recs[1], "edit", text="Edited by a person.")
    review_record(run, recs[2], "reject", reason="no")
    review_record(run, recs[3], "accept", digest="0" * 64)             # a review of content that has since changed
    card = build_datasets(run, BuildOptions(require_review=True, **OPTS))
    assert _finals(run) == {_question(recs[0]): recs[0].final, _question(recs[1]): "Edited by a person."}
    assert card.excluded["sft:review:stale"] == 1 and card.excluded["sft:review:unreviewed"] == 2
    assert card.review["records"]["stale"] == 1 and card.review["require_review"] is True


def test_require_review_with_nothing_accepted_is_a_clear_error(tmp_path):
    recs = [make_record(i) for i in range(2)]
    run = write_run(tmp_path / "run", recs)
    review_record(run, recs[0], "reject", reason="no")
    with pytest.raises(DataError, match="no record of .* is both accepted"):
        build_datasets(run, BuildOptions(require_review=True, **OPTS))


def test_a_review_of_old_content_does_not_apply(tmp_path):
    recs = [make_record(i) for i in range(3)]
    run = write_run(tmp_path / "run", recs)
    review_record(run, recs[0], "reject", digest="f" * 64, reason="about the text before regeneration")
    card = build_datasets(run, BuildOptions(**OPTS))
    assert _question(recs[0]) in _finals(run) and card.review["records"]["stale"] == 1


@pytest.mark.parametrize("rule, trained, status", [("any-reject", False, "rejected"), ("latest", True, None),
                                                   ("unanimous", False, "conflict")])
def test_the_review_rule_resolves_reviewers_who_disagree(tmp_path, rule, trained, status):
    recs = [make_record(i) for i in range(3)]
    run = write_run(tmp_path / "run", recs)
    review_record(run, recs[0], "reject", who="ann", reason="evasive")
    review_record(run, recs[0], "accept", who="bob")                  # bob decided last
    card = build_datasets(run, BuildOptions(review_rule=rule, **OPTS))
    assert (_question(recs[0]) in _finals(run)) is trained
    if status:
        assert card.excluded[f"sft:review:{status}"] == 1
    assert card.review["records"]["disagreements"] == 1
    assert card.review["records"]["conflicts"] == (1 if rule == "unanimous" else 0)
    assert card.review["agreement"]["records"] == {"ann | bob": {"items": 1, "agree": 0.0}}
    with pytest.raises(DataError, match="--review-rule"):
        build_datasets(run, BuildOptions(review_rule="coin-flip", **OPTS))


def test_an_edit_lifts_the_flags_of_the_model_text_it_replaces_but_an_accept_does_not(tmp_path):
    recs = [make_record(0, flags=("truncated",)), make_record(1, flags=("truncated",)), make_record(2)]
    run = write_run(tmp_path / "run", recs)
    review_record(run, recs[0], "edit", text="Complete now.")
    review_record(run, recs[1], "accept")
    card = build_datasets(run, BuildOptions(**OPTS))
    got = _finals(run)
    assert got[_question(recs[0])] == "Complete now." and _question(recs[1]) not in got
    assert card.excluded["sft:truncated"] == 1
    fixed = edited(recs[0], "Complete now.")
    assert fixed.flags == [] and fixed.rounds[-1].revision == "Complete now." and fixed.final == "Complete now."


def test_all_rounds_trains_the_edit_in_place_of_the_last_revision(tmp_path):
    recs = [make_record(0, principles=("harmless", "honest"))]
    run = write_run(tmp_path / "run", recs)
    review_record(run, recs[0], "edit", text="Person's text.")
    build_datasets(run, BuildOptions(all_rounds=True, **OPTS))
    assert [r["completion"][0]["content"] for r in rows(run, "sft")] == ["Interim revision 0 of answer 0.",
                                                                          "Person's text."]


# ---------------------------------------------------------------------------------------------------------------
# Pairs


def _pairs_run(tmp_path, labels):
    recs = [make_record(i) for i in range(len(labels))]
    lines = [pair_of(r, p) for r, p in zip(recs, labels)]
    return write_run(tmp_path / "run", recs, lines), recs, lines


def _dpo_by_question(run):
    return {r["prompt"][-1]["content"]: r for r in rows(run, "dpo")}


def test_agree_and_flip_are_certain_and_tie_and_reject_leave_the_pair_out(tmp_path):
    run, recs, lines = _pairs_run(tmp_path, [0.7, 0.7, 0.8, 0.8, 0.9, 0.55])
    review_pair(run, lines[0], "accept")
    review_pair(run, lines[1], "flip")
    review_pair(run, lines[2], "tie")
    review_pair(run, lines[3], "reject", reason="both bad")
    review_pair(run, lines[5], "accept")                 # below the cut, but a person agreed: the cut is moot
    card = build_datasets(run, BuildOptions(preferences=True, min_confidence=0.6, **OPTS))
    dpo = _dpo_by_question(run)
    agreed, flipped = dpo[_question(recs[0])], dpo[_question(recs[1])]
    assert agreed["chosen"][0]["content"] == recs[0].final and agreed["label"] == 1.0
    assert flipped["chosen"][0]["content"] == recs[1].initial and flipped["rejected"][0]["content"] == recs[1].final
    assert flipped["label"] == 1.0
    assert dpo[_question(recs[4])]["label"] == 0.9                          # unreviewed: the AI's soft label stands
    assert dpo[_question(recs[5])]["label"] == 1.0
    assert set(dpo) == {_question(recs[i]) for i in (0, 1, 4, 5)}
    assert card.excluded["dpo:review:tie"] == 1 and card.excluded["dpo:review:rejected"] == 1
    p = card.review["preferences"]
    assert (p["agreed"], p["flipped"], p["tie"], p["rejected"], p["reviewed"]) == (2, 1, 1, 1, 5)
    assert card.review["rows"]["dpo"] == {"rows": 4, "reviewed": 3, "agreed": 2, "flipped": 1}
    reward = {r["prompt"][-1]["content"]: r for r in rows(run, "reward")}
    assert reward[_question(recs[1])]["chosen"][0]["content"] == recs[1].initial


def test_require_review_keeps_only_pairs_a_person_agreed_with_or_flipped(tmp_path):
    run, recs, lines = _pairs_run(tmp_path, [0.7, 0.8, 0.9])
    review_pair(run, lines[0], "flip")
    for r in recs:
        review_record(run, r, "accept")
    card = build_datasets(run, BuildOptions(preferences=True, require_review=True, **OPTS))
    assert list(_dpo_by_question(run)) == [_question(recs[0])]
    assert card.excluded["dpo:review:unreviewed"] == 2


def test_the_adapter_manifest_carries_the_review_counts(tmp_path):
    from cai.train.manifest import review

    recs = [make_record(i) for i in range(3)]
    run = write_run(tmp_path / "run", recs)
    review_record(run, recs[0], "edit", text="x y z")
    build_datasets(run, BuildOptions(**OPTS))
    card = json.loads((run / "data" / "card.json").read_text())
    m = review(card)
    assert m is not None and m["records"]["edited"] == 1 and m["rows"]["sft"]["edited"] == 1
    assert m["reviews"] == "reviews.jsonl" and len(m["reviews_sha256"]) == 64
    assert review({"review": {}}) is None


def test_the_cli_takes_require_review_and_the_rule(tmp_path, cli_env, capsys):
    recs = [make_record(i) for i in range(3)]
    run = write_run(tmp_path / "run", recs)
    review_record(run, recs[2], "accept")
    assert main(["data", "build", str(run), "--require-review", "--review-rule", "latest", "--test-size", "0"]) == 0
    assert list(_finals(run)) == [_question(recs[2])]
    assert "reviewed records" in capsys.readouterr().out
