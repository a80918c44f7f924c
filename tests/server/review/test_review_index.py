"""The run index behind the page: it follows the files on disk (records regenerated, reviews appended by another
process, a line still being written) and two reviewers deciding at once lose nothing."""

from __future__ import annotations

import json
import threading

from fixtures.review_fixtures import make_record, review_record
from review_app import BOB, auth, decide, digest, review_app, review_run

from cai.review.store import Review
from server.review.index import RunIndex


def test_an_item_whose_content_changed_needs_review_again(tmp_path):
    from starlette.testclient import TestClient

    run, _recs, _ = review_run(tmp_path / "run")
    with TestClient(review_app(run), headers=auth()) as c:
        assert decide(c, "rec00001", "reject", reason="unsafe").status_code == 200
        old = digest(c, "rec00001")
        lines = (run / "records.jsonl").read_text().splitlines()           # regenerated after a constitution edit
        changed = make_record(1, final="A new revision, after the constitution changed.", category="weapons")
        lines[1] = json.dumps(changed.to_json())
        (run / "records.jsonl").write_text("\n".join(lines) + "\n")
        assert digest(c, "rec00001") != old
        q = c.get("/review/api/run/queue", params={"status": "stale"}).json()
        assert [r["id"] for r in q["rows"]] == ["rec00001"] and q["progress"]["stale"] == 1
        page = c.get("/review/run/items/rec00001").text
        assert "needs review again" in page and "of earlier content: does not apply" in page
        assert "A new revision" in page
        todo = c.get("/review/api/run/queue", params={"status": "todo", "q": "number 1:", "kind": "record"}).json()
        assert todo["total"] == 1
        r = c.post("/review/api/run/items/rec00001/decision", json={"decision": "accept", "content_sha256": old})
        assert r.status_code == 409                                              # the old page's decision
        assert decide(c, "rec00001", "accept").json()["status"] == "accepted"


def test_reviews_appended_by_another_process_show_up_and_a_half_written_line_waits(tmp_path):
    run, recs, _ = review_run(tmp_path / "run")
    idx = RunIndex("run", run).refresh()
    version = idx.version
    assert idx.refresh().version == version                                      # nothing changed: nothing read
    review_record(run, recs[4], "accept", who="carol")                           # `cai review import`, say
    assert idx.refresh().get("rec00004").outcome.status == "accepted"
    line = Review(target="rec00005", kind="record", content_sha256=idx.get("rec00005").digest, reviewer="dan",
                  decision="accept", at="2026-01-01T00:00:00Z").model_dump_json(exclude_none=True)
    with open(run / "reviews.jsonl", "ab") as fh:
        fh.write(line[:20].encode())                                             # another writer, mid-write
    assert idx.refresh().get("rec00005").outcome.status == "unreviewed"
    with open(run / "reviews.jsonl", "ab") as fh:
        fh.write(line[20:].encode() + b"\n")
    assert idx.refresh().get("rec00005").outcome.decisions == {"dan": "accept"}
    assert idx.get("rec00004").outcome.decisions == {"carol": "accept"}           # read once, not twice
    assert len(idx.reviews["rec00004"]) == 1
    (run / "reviews.jsonl").unlink()                                             # removed: nothing applies
    assert idx.refresh().get("rec00004").outcome.status == "unreviewed"


def test_two_reviewers_at_once_lose_neither_decision_and_agreement_is_shown(tmp_path):
    from starlette.testclient import TestClient

    run, _recs, _ = review_run(tmp_path / "run")
    items = [f"rec{i:05d}" for i in range(10)]
    with TestClient(review_app(run), headers=auth()) as c:
        shas = {i: digest(c, i) for i in items}
        failures: list = []

        def burst(key: str, decision_of):
            for i in items:
                d = decision_of(i)
                r = c.post(f"/review/api/run/items/{i}/decision", headers=auth(key),
                           json={"decision": d, "content_sha256": shas[i], **({"reason": "no"} if d == "reject"
                                                                               else {})})
                if r.status_code != 200:
                    failures.append(r.text)

        threads = [threading.Thread(target=burst, args=(key, fn)) for key, fn in [
            ("alice-key-0001", lambda i: "accept"),
            (BOB, lambda i: "reject" if i in ("rec00003", "rec00007") else "accept")]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        lines = (run / "reviews.jsonl").read_text().splitlines()
        assert len(lines) == 20 and {json.loads(x)["reviewer"] for x in lines} == {"alice", "bob"}
        status = c.get("/review/api/run/status").json()
        assert status["agreement"] == {"alice | bob": {"items": 10, "agree": 0.8}}
        assert status["disagreements"] == ["rec00003", "rec00007"]
        assert status["by_status"]["rejected"] == 2                              # any-reject, the default rule
        html = c.get("/review/run").text
        assert "alice | bob: 80% of 10 both reviewed" in html, html[html.find("Agreement"):][:300]
        assert "reviewers disagree on 2" in html
        assert [r["id"] for r in c.get("/review/api/run/queue", params={"status": "disagreement"}).json()["rows"]] == [
            "rec00003", "rec00007"]
