"""Who may see and decide: every review route needs the key; the session cookie lets a browser view pages but never
post a decision; ids and file names are looked up, never used as paths."""

from __future__ import annotations

import pytest
from review_app import ALICE, auth, decide, digest, review_app, review_run

from server.security import SESSION_COOKIE


@pytest.fixture
def app_and_run(tmp_path):
    run, *_ = review_run(tmp_path / "run")
    return review_app(run), run


def test_no_key_no_page_and_a_browser_gets_the_sign_in_page(app_and_run):
    from starlette.testclient import TestClient

    app, _ = app_and_run
    with TestClient(app) as c:
        for path in ("/review", "/review/run", "/review/run/items/rec00000", "/review/api/run/queue",
                     "/review/static/review.js"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        r = c.get("/review/run", headers={"Accept": "text/html,application/xhtml+xml"})
        assert r.status_code == 401 and "API key" in r.text and "rec00000" not in r.text
        assert "script-src 'sha256-" in r.headers["content-security-policy"]
        r = c.get("/metrics", headers={"Accept": "text/html"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"   # no sign-in page there


def test_the_session_cookie_views_pages_but_never_decides(app_and_run):
    from starlette.testclient import TestClient

    app, run = app_and_run
    with TestClient(app) as c:
        r = c.post("/review/session", headers=auth())
        assert r.status_code == 200
        cookie = r.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/review" in cookie.lower()
        token = r.cookies[SESSION_COOKIE]
        assert ALICE not in token and ALICE not in cookie
        jar = {"Cookie": f"{SESSION_COOKIE}={token}"}
        assert c.get("/review/run", headers=jar).status_code == 200
        assert "reviewing as <b>alice</b>" in c.get("/review/run", headers=jar).text
        sha = digest(c, "rec00000")
        r = c.post("/review/api/run/items/rec00000/decision", headers=jar,
                   json={"decision": "accept", "content_sha256": sha})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.post("/review/session", headers=jar).status_code == 401                 # no renewing by cookie
        assert c.get("/metrics", headers=jar).status_code == 401                         # only under /review
        assert c.get("/review/run", headers={"Cookie": f"{SESSION_COOKIE}=forged"}).status_code == 401
        assert not (run / "reviews.jsonl").exists()
    with TestClient(review_app(run)) as fresh:                                          # a restarted server
        assert fresh.get("/review/run", headers=jar).status_code == 401


@pytest.mark.parametrize("path", [
    "/review/api/run/items/..%2F..%2Frun.json", "/review/api/run/items/%2e%2e", "/review/run/items/..%2Frecords.jsonl",
    "/review/api/run/items/..", "/review/static/..%2Fpages.py", "/review/static/%2e%2e%2fpages.py",
    "/review/static/review.css%00.py", "/review/api/..%2F..%2Fetc/queue", "/review/run/items/%2Fetc%2Fpasswd",
])
def test_ids_and_file_names_that_look_like_paths_are_refused(app_and_run, path):
    from starlette.testclient import TestClient

    app, _ = app_and_run
    with TestClient(app, headers=auth()) as c:
        r = c.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "records" not in r.text or "no record or pair" in r.text


def test_a_decision_on_a_path_looking_id_is_refused(app_and_run):
    from starlette.testclient import TestClient

    app, run = app_and_run
    with TestClient(app, headers=auth()) as c:
        r = c.post("/review/api/run/items/..%2Frun.json/decision",
                   json={"decision": "accept", "content_sha256": "a" * 64})
        assert r.status_code == 404
        assert decide(c, "rec00000", "accept").status_code == 200
    assert (run / "run.json").read_text().startswith("{")
