"""reviews.jsonl: append-only decisions, safe under concurrent writers and a torn last line; how the decisions of one
or several reviewers resolve into what trains; Label Studio export and import."""

from __future__ import annotations

import json
import threading

import pytest

from cai.core.errors import CaiError
from cai.review.decisions import resolve, summarize
from cai.review.labelstudio import export_tasks, import_annotations
from cai.review.store import Review, ReviewStore


def review(target="r1", who="ann", decision="accept", digest="d1", kind="record", **kw) -> Review:
    return Review(target=target, kind=kind, content_sha256=digest, reviewer=who, decision=decision, **kw)


def test_appends_are_kept_in_order_and_stamped(tmp_path):
    store = ReviewStore(tmp_path / "reviews.jsonl")
    store.append(review(decision="reject", reason="preachy"))
    store.append(review(decision="edit", text="Better text."))
    got = store.read()
    assert [r.decision for r in got] == ["reject", "edit"]
    assert got[0].reason == "preachy" and got[1].text == "Better text." and all(r.at for r in got)


@pytest.mark.parametrize("bad, needle", [
    (dict(decision="edit"), "needs the edited text"),
    (dict(decision="flip"), "a record can be"),
    (dict(kind="preference", decision="edit", text="x"), "a preference can be"),
])
def test_a_bad_review_is_refused_before_it_is_written(tmp_path, bad, needle):
    store = ReviewStore(tmp_path / "reviews.jsonl")
    with pytest.raises(ValueError, match=needle):
        store.append(review(**bad))
    assert not (tmp_path / "reviews.jsonl").exists()


def test_two_writers_at_once_lose_nothing(tmp_path):
    path = tmp_path / "reviews.jsonl"
    stores = [ReviewStore(path), ReviewStore(path)]           # two stores: as two processes would be

    def burst(store, who):
        for i in range(100):
            store.append(review(target=f"r{i}", who=who))

    threads = [threading.Thread(target=burst, args=(s, w)) for s, w in zip(stores, ("ann", "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = ReviewStore(path).read()
    assert len(got) == 200 and {(r.reviewer, r.target) for r in got} == {
        (w, f"r{i}") for w in ("ann", "bob") for i in range(100)}


def test_a_torn_last_line_is_cut_off_and_the_rest_read(tmp_path):
    path = tmp_path / "reviews.jsonl"
    store = ReviewStore(path)
    store.append(review())
    with open(path, "ab") as fh:
        fh.write(b'{"target": "r2", "kind": "rec')            # a crash in the middle of a write
    assert [r.target for r in store.read()] == ["r1"]
    store.append(review(target="r3"))
    assert [r.target for r in ReviewStore(path).read()] == ["r1", "r3"]


# ---------------------------------------------------------------------------------------------------------------
# Outcomes


def test_the_latest_decision_per_reviewer_wins_and_old_content_does_not_apply():
    reviews = [review(decision="reject"), review(decision="accept"),            # ann changed her mind
               review(target="r2", digest="old"), review(target="r3", decision="edit", text="Fixed.")]
    out = resolve(reviews, {"r1": "d1", "r2": "new", "r3": "d1", "r4": "d1"})
    assert out["r1"].status == "accepted"
    assert out["r2"].status == "stale" and not out["r2"].reviewed        # regenerated since: needs review again
    assert out["r3"].status == "edited" and out["r3"].text == "Fixed."
    assert out["r4"].status == "unreviewed"


@pytest.mark.parametrize("rule, status", [("any-reject", "rejected"), ("latest", "accepted"),
                                          ("unanimous", "conflict")])
def test_conflicting_reviewers_follow_the_rule(rule, status):
    reviews = [review(who="ann", decision="reject", reason="evasive"), review(who="bob", decision="accept")]
    (outcome,) = resolve(reviews, {"r1": "d1"}, rule).values()
    assert outcome.status == status and outcome.decisions == {"ann": "reject", "bob": "accept"}
    assert outcome.disagreement


def test_an_edit_wins_over_an_accept_unless_someone_rejects():
    reviews = [review(who="ann", decision="edit", text="Mine."), review(who="bob", decision="accept")]
    assert resolve(reviews, {"r1": "d1"})["r1"].text == "Mine."
    with pytest.raises(ValueError, match="unknown review rule"):
        resolve(reviews, {"r1": "d1"}, "coin-flip")


def test_the_summary_reports_progress_disagreements_and_agreement():
    reviews = [review(target=t, who="ann") for t in ("r1", "r2", "r3")]
    reviews += [review(target="r1", who="bob"), review(target="r2", who="bob", decision="reject")]
    s = summarize(resolve(reviews, {t: "d1" for t in ("r1", "r2", "r3", "r4")}))
    assert (s.items, s.reviewed) == (4, 3) and s.by_status == {"accepted": 2, "rejected": 1, "unreviewed": 1}
    assert s.disagreements == ["r2"] and s.agreement == {"ann | bob": {"items": 2, "agree": 0.5}}


# ---------------------------------------------------------------------------------------------------------------
# Label Studio


def _record(i=0):
    from cai.core.record import Provenance, Record, Round

    return Record(id=f"rec{i}", prompt_id=f"q{i}", messages=[{"role": "user", "content": f"Q{i}?"}], initial="first",
                  rounds=[Round(principle="p1", principle_sha256="s", critique="too short", revision="second")],
                  final="second", flags=[], usage={},
                  provenance=Provenance(constitution={"name": "c", "sha256": "x"}, model="m", backend="fake"))


def _preference(label=0.8):
    from cai.core.preference import Preference, Response

    return Preference(id="pref0", prompt_id="q0", messages=[{"role": "user", "content": "Q?"}],
                      responses=[Response(text="one", source="policy:base"), Response(text="two",
                                                                                      source="policy:base")],
                      judgements=[], label=label, status="labelled" if label is not None else "unlabelled",
                      provenance={"principles": ["kinder"]})


def _annotation(email, *result):
    return {"completed_by": {"email": email}, "result": list(result), "updated_at": "2026-12-01T10:00:00Z"}


def test_export_then_import_round_trips_each_decision(tmp_path):
    from cai.review.store import preference_digest, record_digest

    recs, pref = [_record(0), _record(1)], _preference(0.8)
    out = tmp_path / "tasks.json"
    info = export_tasks(recs, [pref], out)
    tasks = json.loads(out.read_text())
    assert info["records"] == 2 and info["preferences"] == 1 and len(tasks) == 3
    assert tasks[0]["data"]["content_sha256"] == record_digest(recs[0]) and "Round 1 (p1)" in tasks[0]["data"][
        "rounds"]
    assert "<Pairwise" in info["configs"]["preferences"].read_text() and "answer 1 is better" in tasks[2]["data"][
        "ai_label"]
    # what Label Studio exports after annotation: the tasks with their annotations
    tasks[0]["annotations"] = [_annotation("ann@x", {"from_name": "decision", "type": "choices",
                                                     "value": {"choices": ["edit"]}},
                                           {"from_name": "edited", "type": "textarea", "value": {"text": ["Mine."]}})]
    tasks[1]["annotations"] = [{"was_cancelled": True, "result": []},
                               _annotation("bob@x", {"from_name": "decision", "value": {"choices": ["reject"]}},
                                           {"from_name": "reason", "value": {"text": ["rude"]}})]
    tasks[2]["annotations"] = [_annotation("ann@x", {"from_name": "preferred", "type": "pairwise",
                                                     "value": {"selected": "right"}})]
    tasks.append({"data": {**tasks[0]["data"], "cai_id": "gone"}, "annotations": tasks[0]["annotations"]})
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    store = ReviewStore(tmp_path / "reviews.jsonl")
    got = import_annotations(tmp_path / "export.json", store, {"rec0", "rec1", "pref0"})
    assert got.skipped == {"cancelled": 1, "not in this run": 1}
    out_ = resolve(store.read(), {"rec0": record_digest(recs[0]), "rec1": record_digest(recs[1]),
                                  "pref0": preference_digest(pref)})
    assert out_["rec0"].status == "edited" and out_["rec0"].text == "Mine."
    assert out_["rec1"].status == "rejected" and out_["rec1"].reason == "rude"
    assert out_["pref0"].status == "flipped"            # the AI preferred answer 1, the reviewer answer 2
    assert all(r.source == "label-studio" for r in store.read())


def test_a_file_that_is_not_an_export_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('[{"data": {"text": "hello"}}]')
    with pytest.raises(CaiError, match="not exported by `cai review export`"):
        import_annotations(bad, ReviewStore(tmp_path / "r.jsonl"), set())
    bad.write_text('{"a": 1,,}')
    with pytest.raises(CaiError) as info:
        import_annotations(bad, ReviewStore(tmp_path / "r.jsonl"), set())
    assert info.value.issues[0].line == 1


def test_an_append_after_a_crash_cuts_the_torn_line_first_so_the_new_one_is_readable(tmp_path):
    path = tmp_path / "reviews.jsonl"
    store = ReviewStore(path)
    store.append(review())
    with open(path, "ab") as fh:
        fh.write(b'{"target": "r2", "kind": "rec')            # a kill -9 in the middle of a write
    store.append(review(target="r3"))                          # no read() in between: the server's next decision
    assert path.read_bytes().count(b"\n") == 2
    assert [r.target for r in ReviewStore(path).read()] == ["r1", "r3"]
