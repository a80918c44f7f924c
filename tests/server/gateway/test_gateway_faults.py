"""Gateway mode: every fault of the upstream (the fault server) is a clean status with the OpenAI error body, never
a hang: 502 for a failing or unreachable upstream or a bad answer, 503 with Retry-After for a busy one or when every
upstream is out of rotation, 504 when it does not answer within the timeout, 400 with the upstream's message for a
request it refuses; a stream that fails after its first chunk ends with an error event and [DONE]."""

from __future__ import annotations

import json
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
from fixtures.fault_server import FaultServer
from fixtures.gateway_fixtures import chat_body, gateway, sse

pytest_plugins = ["fixtures.server_fixtures"]     # files

FAULTS = {   # kind -> (status, code)
    "500": (502, "upstream_error"),
    "garbage": (502, "upstream_bad_response"),
    "empty": (502, "upstream_bad_response"),
    "drop": (502, "upstream_unreachable"),
    "503": (503, "upstream_unavailable"),
    "429": (503, "upstream_busy"),
    "hang": (504, "upstream_timeout"),
}


@pytest.fixture
def upstream():
    s = FaultServer(hang_s=3.0, retry_after="0.1")
    yield s
    s.close()


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if status == 503:
        assert int(r.headers["retry-after"]) >= 1
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("kind", list(FAULTS))
def test_each_fault_is_a_clean_status_after_the_retries(files, upstream, kind, stream):
    upstream.add(kind, times=2)                              # the first attempt and its one retry
    with gateway(files, [upstream.url], timeout_s=0.5, retries=1) as gw:
        t0 = time.monotonic()
        r = gw.post("/v1/chat/completions", json=chat_body(stream=stream))
        elapsed = time.monotonic() - t0
        error = _error(r, *FAULTS[kind])
        assert upstream.requests == 2, error                 # retried once, then given up
        assert elapsed < 2 * 0.5 + 1.5                       # bounded: two attempts of at most the timeout
        r = gw.post("/v1/chat/completions", json=chat_body(stream=stream))     # the fault is spent: served again
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_one_fault_is_retried_and_answered(files, upstream, stream):
    with gateway(files, [upstream.url], timeout_s=0.5, retries=1) as gw:
        for kind in FAULTS:
            upstream.add(kind, times=1)
            r = gw.post("/v1/chat/completions", json=chat_body(stream=stream))
            assert r.status_code == 200, (kind, r.text)
    assert upstream.requests == 2 * len(FAULTS)


def test_a_truncated_answer_passes_through_as_length(files, upstream):
    upstream.add("length")
    with gateway(files, [upstream.url]) as gw:
        r = gw.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_hanging_upstream_is_bounded_by_the_timeout(files, upstream):
    upstream.hang_s = 30
    upstream.add("hang", times=10)
    with gateway(files, [upstream.url], timeout_s=0.5, retries=0) as gw:
        t0 = time.monotonic()
        _error(gw.post("/v1/chat/completions", json=chat_body()), 504, "upstream_timeout")
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("kind", ["stall", "cut"])
def test_a_stream_that_fails_after_its_first_chunk_ends_with_an_error_event(files, upstream, kind):
    upstream.add(kind)
    with gateway(files, [upstream.url], timeout_s=0.5) as gw:
        t0 = time.monotonic()
        with gw.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
            assert r.status_code == 200
            events = sse(r.iter_lines())
        assert time.monotonic() - t0 < 2.5
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"          # relayed before the failure
    code = {"stall": "upstream_timeout", "cut": "upstream_unreachable"}[kind]
    assert events[-2]["error"]["code"] == code, events[-2]


def test_an_upstream_that_refuses_the_key_or_the_model(files, monkeypatch):
    locked = FaultServer(api_key="upstream-secret")
    try:
        with gateway(files, [locked.url]) as gw:
            error = _error(gw.post("/v1/chat/completions", json=chat_body()), 502, "upstream_auth_failed")
            assert "CAI_TEST_UPSTREAM_KEY" in error["message"] and locked.requests == 1      # not retried
            health = gw.get("/health")
            assert health.status_code == 503 and "refused" in health.json()["upstreams"][0]["error"]
        monkeypatch.setenv("CAI_TEST_UPSTREAM_KEY", "upstream-secret")
        with gateway(files, [locked.url]) as gw:
            assert gw.post("/v1/chat/completions", json=chat_body()).status_code == 200
            assert gw.get("/health").status_code == 200
        with gateway(files, [locked.url.removesuffix("/v1") + "/nope"]) as gw:
            _error(gw.post("/v1/chat/completions", json=chat_body()), 502, "upstream_not_found")
    finally:
        locked.close()


class _Refusing(BaseHTTPRequestHandler):
    """An upstream that refuses every request as vLLM refuses a prompt over the context."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"object": "error", "type": "BadRequestError", "param": None, "code": 400,
                           "message": "This model's maximum context length is 2048 tokens."}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_request_the_upstream_refuses_is_the_callers_400(files):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with gateway(files, [f"http://127.0.0.1:{httpd.server_address[1]}/v1"]) as gw:
            for stream in (False, True):
                error = _error(gw.post("/v1/chat/completions", json=chat_body(stream=stream)), 400,
                               "context_length_exceeded")
                assert "maximum context length is 2048" in error["message"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_every_upstream_out_of_rotation_is_503_at_once(files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"     # nothing listens: connections are refused
    with gateway(files, [dead], retries=2) as gw:
        _error(gw.post("/v1/chat/completions", json=chat_body()), 502, "upstream_unreachable")
        t0 = time.monotonic()
        error = _error(gw.post("/v1/chat/completions", json=chat_body()), 503, "upstream_unavailable")
        assert "out of rotation" in error["message"] and time.monotonic() - t0 < 1.5
        health = gw.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert health.json()["upstreams"][0]["in_rotation"] is False
