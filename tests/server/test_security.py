"""API keys on every route (and the ways around them), the key file, and the body cap."""

from __future__ import annotations

import socket

import pytest
from fixtures.server_fixtures import (
    KEY,
    route_census,
)

pytest_plugins = ["fixtures.server_fixtures"]     # files, app, client, served


def test_every_route_but_health_needs_a_key(app, client):
    from starlette.testclient import TestClient

    census = route_census(app)
    paths = {p for _, p in census}
    assert {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/critique", "/v1/revise",
            "/v1/constitutions", "/v1/constitutions/default", "/openapi.json", "/docs", "/review", "/review/demo",
            "/review/demo/items/rec00000", "/review/static/review.js", "/review/session", "/review/api/runs",
            "/review/api/demo/queue", "/review/api/demo/items/rec00000/decision"} <= paths
    anonymous = TestClient(app)                              # the app is already started by `client`
    for method, path in census:
        r = anonymous.request(method, path, json={} if method == "POST" else None)
        if path == "/health":
            assert r.status_code == 200, (method, path)
        else:
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            if method != "HEAD":
                assert r.json()["error"]["code"] == "invalid_api_key"
        if method == "GET":                                   # and with the key, each answers
            assert client.request(method, path).status_code < 400, (method, path)


@pytest.mark.parametrize("path", ["//v1/models", "/v1//models", "/health/", "//health", "/health/../v1/models",
                                  "/HEALTH", "/v1/models?x=/health"])
def test_paths_that_look_like_open_ones_still_need_a_key(app, client, path):
    from starlette.testclient import TestClient

    r = TestClient(app).get(path)
    assert r.status_code == 401, (path, r.status_code)


@pytest.mark.parametrize("headers", [
    {"Host": "localhost/health"},
    {"Host": "127.0.0.1:8000", "X-Forwarded-For": "127.0.0.1", "X-Original-URL": "/health"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
    {"Authorization": "Bearer wrong-key-0123456789"},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": "Bearer "},
], ids=["host", "forwarded", "basic", "no-scheme", "wrong-key", "longer-key", "prefix-key", "empty-key"])
def test_crafted_headers_and_wrong_keys_are_refused(app, client, headers):
    from starlette.testclient import TestClient

    r = TestClient(app).get("/v1/models", headers=headers)
    assert r.status_code == 401


def test_the_key_scheme_is_case_insensitive_and_any_listed_key_works(app, client):
    from starlette.testclient import TestClient

    assert TestClient(app).get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_a_crafted_host_header_over_a_real_socket(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1/health\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401")


def test_a_key_line_may_name_its_holder_and_todays_lines_read_as_before(tmp_path, monkeypatch):
    from cai.core.errors import CaiError
    from server.security import holder_of, read_api_keys

    f = tmp_path / "k.txt"
    f.write_text("alice: alice-key-0001\nbob.smith@example.org:\tbob-key-00002\nplain-key-0003\nabc:defghijk\n")
    monkeypatch.setenv("KEYS", "carol: carol-key-004, env-key-0005")
    keys = read_api_keys(f, "KEYS")
    assert keys == {"alice-key-0001": "alice", "bob-key-00002": "bob.smith@example.org", "plain-key-0003": None,
                    "abc:defghijk": None, "carol-key-004": "carol", "env-key-0005": None}
    holders = {k: v for k, v in keys.items() if v}
    assert holder_of("alice-key-0001", holders) == "alice"
    unnamed = holder_of("plain-key-0003", holders)
    assert unnamed.startswith("key-") and len(unnamed) == 12 and "plain" not in unnamed
    for text, match in [("alice: short\n", "at least 8"), ("<b>: some-long-key-1\n", "holder is a name")]:
        f.write_text(text)
        with pytest.raises(CaiError, match=match):
            read_api_keys(f)


def test_load_api_keys_and_bad_key_files(tmp_path, monkeypatch):
    from cai.core.errors import CaiError
    from server.security import key_matches, load_api_keys

    f = tmp_path / "k.txt"
    f.write_text("# comment\n\nfirst-key-123\n  second-key-456  \n")
    monkeypatch.setenv("KEYS", "env-key-789, other-key-000")
    assert load_api_keys(f, "KEYS") == ["first-key-123", "second-key-456", "env-key-789", "other-key-000"]
    assert key_matches(b"second-key-456", ["first-key-123", "second-key-456"])
    assert not key_matches(b"second-key-45", ["second-key-456"])
    for text, match in [("short\n", "at least 8"), ("# only comments\n", "holds no key"),
                        ("has space inside\n", "no spaces")]:
        f.write_text(text)
        with pytest.raises(CaiError, match=match):
            load_api_keys(f)
    with pytest.raises(CaiError, match="cannot read"):
        load_api_keys(tmp_path / "missing.txt")


def test_chunked_bodies_over_the_cap_get_413(client):
    def chunks():
        for _ in range(12):
            yield b"x" * (64 * 1024)

    r = client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
