"""The review page over HTTP (TestClient): the queue's filters, paging and sorting, the record and pair views, every
decision kind and what it records, and the caller's mistakes, each a 4xx with the error body."""

from __future__ import annotations

import json

import pytest
from review_app import ALICE, auth, decide, digest, review_app, review_run

from cai.review.store import MAX_TEXT


@pytest.fixture
def served(tmp_path):
    from starlette.testclient import TestClient

    run, recs, prefs = review_run(tmp_path / "run")
    with TestClient(review_app(run), headers=auth()) as c:
        yield c, run, recs, prefs


def ids(client, **params) -> list[str]:
    r = client.get("/review/api/run/queue", params=params)
    assert r.status_code == 200, r.text
    return [row["id"] for row in r.json()["rows"]]


def test_the_queue_filters_by_flag_principle_category_kind_and_words(served):
    c, _, _recs, _ = served
    assert len(ids(c, per_page=100)) == 15
    assert ids(c, flag="truncated") == ["rec00003"]
    assert ids(c, flag="any") == ["rec00003", "rec00004"]
    assert len(ids(c, flag="none", per_page=100)) == 13
    assert ids(c, principle="honest") == ["rec00005", "rec00006"]
    assert ids(c, category="weapons", kind="record") == ["rec00001", "rec00003", "rec00005", "rec00007", "rec00009"]
    assert ids(c, kind="preference") == ["pair-rec00000-0", "pair-rec00001-0", "pair-rec00002-0"]
    assert ids(c, q="number 7:", kind="record") == ["rec00007"]
    assert ids(c, kind="", flag="", category="weapons", q="", status="", sort="position") == [   # the form's empties
        "rec00001", "rec00003", "rec00005", "rec00007", "rec00009"]


def test_the_queue_pages_and_sorts_on_the_server(served):
    c, *_ = served
    page = c.get("/review/api/run/queue", params={"per_page": 4, "page": 2}).json()
    assert (page["total"], page["pages"], page["page"]) == (15, 4, 2)
    assert [r["id"] for r in page["rows"]] == ["rec00004", "rec00005", "rec00006", "rec00007"]
    assert ids(c, sort="id", order="desc", per_page=2) == ["rec00011", "rec00010"]
    by_category = ids(c, sort="category", kind="record", per_page=100)
    assert by_category[:6] == ["rec00000", "rec00002", "rec00004", "rec00006", "rec00008", "rec00010"]
    assert c.get("/review/api/run/queue", params={"page": 99}).json()["rows"] == []
    html = c.get("/review/run", params={"per_page": 4, "page": 2, "sort": "id"}).text
    assert "page 2 of 4" in html and "rec00004" in html and "rec00000" not in html


def test_status_filters_follow_decisions_and_the_progress_counts_them(served):
    c, *_ = served
    assert decide(c, "rec00001", "accept").status_code == 200
    assert decide(c, "rec00002", "reject", reason="preachy").status_code == 200
    assert ids(c, status="reviewed") == ["rec00001", "rec00002"]
    assert ids(c, status="rejected") == ["rec00002"]
    assert "rec00001" not in ids(c, status="todo", per_page=100)
    assert ids(c, reviewer="alice") == ["rec00001", "rec00002"]
    assert ids(c, reviewer="bob") == []
    p = c.get("/review/api/run/queue").json()["progress"]
    assert (p["items"], p["reviewed"], p["stale"], p["conflicts"]) == (15, 2, 0, 0)
    assert "2 of 15 reviewed" in c.get("/review/run").text


def test_the_record_view_shows_rounds_principles_diff_flags_and_provenance(served):
    c, _, recs, _ = served
    html = c.get("/review/run/items/rec00003").text
    r = recs[3]
    for text in (r.messages[0]["content"], r.initial, r.rounds[0].critique, r.final, "harmless", "truncated",
                 "an accept does not lift a flag", r.provenance.model, record_digest_of(c, "rec00003")):
        assert text in html, text
    assert "<del>First </del><ins>Revised </ins>" in html                       # the word-level diff
    assert 'id="next" href="/review/run/items/rec00004"' in html and 'id="prev"' in html
    filtered = c.get("/review/run/items/rec00003", params={"category": "weapons"}).text
    assert 'href="/review/run/items/rec00005?category=weapons"' in filtered      # next within the filtered queue


def record_digest_of(c, item_id):
    return digest(c, item_id)


def test_the_pair_view_shows_both_answers_and_the_ai_label_as_a_suggestion(served):
    c, _, recs, _prefs = served
    html = c.get("/review/run/items/pair-rec00001-0").text
    assert recs[1].final in html and recs[1].initial in html
    assert "The AI label suggests <b>answer 2</b> (p = 0.70)" in html and "harmless, ethical" not in html
    assert "harmless" in html and "ethical" in html
    unlabelled = c.get("/review/run/items/pair-rec00002-0").text
    assert "No AI label" in unlabelled and 'id="flip" disabled' in unlabelled


def test_every_decision_kind_is_recorded_and_resolved(served):
    c, run, _recs, _ = served
    expected = [("rec00000", "accept", {}, "accepted"), ("rec00001", "reject", {"reason": "rude"}, "rejected"),
                ("rec00002", "edit", {"text": "Better."}, "edited"), ("pair-rec00000-0", "accept", {}, "accepted"),
                ("pair-rec00001-0", "flip", {}, "flipped"), ("pair-rec00002-0", "tie", {}, "tie"),
                ("pair-rec00000-0", "reject", {"reason": "both bad"}, "rejected")]
    for item_id, decision, body, status in expected:
        r = decide(c, item_id, decision, **body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["decision"], got["status"], got["reviewer"]) == (decision, status, "alice")
    lines = [json.loads(x) for x in (run / "reviews.jsonl").read_text().splitlines()]
    assert [(x["target"], x["decision"]) for x in lines] == [(i, d) for i, d, _, _ in expected]
    assert lines[2]["text"] == "Better." and lines[1]["reason"] == "rude" and all(x["source"] == "page" for x in lines)
    assert "text" not in lines[0]
    page = c.get("/review/run/items/rec00002").text
    assert "alice</b>: edit" in page and "Outcome: <b class=\"status\" id=\"outcome\">edited" in page


@pytest.mark.parametrize("item_id, decision, body, status, code", [
    ("rec99999", "accept", {}, 404, "item_not_found"),
    ("rec00000", "promote", {}, 400, None),
    ("rec00000", "flip", {}, 400, "invalid_decision"),
    ("pair-rec00000-0", "edit", {"text": "x"}, 400, "invalid_decision"),
    ("rec00000", "edit", {}, 400, "missing_text"),
    ("rec00000", "edit", {"text": "   "}, 400, "missing_text"),
    ("rec00000", "reject", {}, 400, "missing_reason"),
    ("rec00000", "edit", {"text": "x" * (MAX_TEXT + 1)}, 400, None),
    ("rec00000", "accept", {"content_sha256": "0" * 64}, 409, "content_changed"),
    ("rec00000", "accept", {"content_sha256": "../../run.json"}, 400, None),
    ("rec00000", "accept", {"extra": 1}, 400, None),
    ("rec00000", "accept", {"reviewer": "mallory"}, 400, "reviewer_mismatch"),
    ("pair-rec00002-0", "flip", {}, 400, "no_label"),
])
def test_caller_mistakes_are_4xx_with_the_error_body_and_write_nothing(served, item_id, decision, body, status,
                                                                       code):
    c, run, *_ = served
    body.setdefault("content_sha256", digest(c, item_id) if item_id != "rec99999" else "a" * 64)
    r = c.post(f"/review/api/run/items/{item_id}/decision", json={"decision": decision, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code
    assert not (run / "reviews.jsonl").exists()


def test_unknown_runs_oversized_bodies_and_non_json_bodies_are_refused(tmp_path):
    from starlette.testclient import TestClient

    run, *_ = review_run(tmp_path / "run")
    with TestClient(review_app(run, max_body_bytes=4096), headers=auth()) as c:
        r = c.get("/review/api/nope/queue")
        assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"
        assert c.get("/review/nope").status_code == 404
        r = c.post("/review/api/run/items/rec00000/decision",
                   json={"decision": "edit", "text": "x" * 5000, "content_sha256": "a" * 64})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = c.post("/review/api/run/items/rec00000/decision", content=b"decision=accept",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415                  # what a cross-site form could send
        assert c.get("/review/api/run/queue", params={"per_page": 0}).status_code == 400
        assert c.get("/review/api/run/queue", params={"sort": "evil"}).status_code == 400
    assert not (run / "reviews.jsonl").exists()


def test_pages_escape_model_text_and_forbid_inline_script(served):
    c, *_ = served
    r = c.get("/review/run/items/rec00010")
    html = r.text
    assert "<script>window.__pwned" not in html and "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;i&gt;more&lt;/i&gt;" in html
    queue = c.get("/review/run", params={"per_page": 100}).text
    assert "<img src=x" not in queue and "&lt;img src=x onerror=" in queue           # record 11's prompt
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert c.get("/review/static/review.js").headers["content-type"].startswith("text/javascript")


def test_a_server_with_no_keys_takes_the_reviewers_name(tmp_path):
    from starlette.testclient import TestClient

    run, *_ = review_run(tmp_path / "run")
    with TestClient(review_app(run, keys=False)) as c:
        r = decide(c, "rec00000", "accept", key=None)
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_reviewer"
        r = decide(c, "rec00000", "accept", key=None, reviewer="Dana K.")
        assert r.status_code == 200 and r.json()["reviewer"] == "Dana K."
        assert decide(c, "rec00001", "accept", key=None, reviewer="<script>").status_code == 400
        assert c.post("/review/session").json() == {"reviewer": None, "keys": False}


def test_the_api_key_names_the_reviewer(served):
    from review_app import BOB, UNNAMED

    c, *_ = served
    assert decide(c, "rec00000", "accept", key=BOB).json()["reviewer"] == "bob"
    unnamed = decide(c, "rec00001", "accept", key=UNNAMED).json()["reviewer"]
    assert unnamed.startswith("key-") and UNNAMED not in unnamed
    assert c.post("/review/session", headers=auth(ALICE)).json() == {"reviewer": "alice", "keys": True}
