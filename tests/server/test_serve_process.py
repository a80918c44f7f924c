"""A real ``cai serve`` process: a client that goes away frees its slot (stream, plain request, revise), SIGTERM
finishes the stream in flight and exits 0, bad settings exit 2 before any model loads, and ``--compile --quantize
int4`` serves, as /health says."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from fixtures.engine_fixtures import needs_compiler
from fixtures.server_fixtures import (
    AUTH,
    ENDLESS,
    HI,
    Served,
    wait_until,
)

from conftest import REPO, subprocess_env

pytest_plugins = ["fixtures.server_fixtures"]     # files, app, client, served


# ---------------------------------------------------------------------------------------------------------------
# Disconnects


def _stream_then_hang_up(served, body: dict, chunks_before_close: int = 3) -> None:
    """Read a few events of a stream, see the request decoding, then close the connection."""
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", served.url + "/v1/chat/completions", headers=AUTH, json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= chunks_before_close:
                        assert served.metric("cai_in_flight") == 1
                        break


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    body = {"model": "base", "messages": HI, "max_tokens": ENDLESS, "temperature": 0, "stream": True}
    before = served.metric("cai_engine_tokens_generated_total")
    _stream_then_hang_up(served, body)
    t0 = time.monotonic()
    assert wait_until(lambda: served.metric("cai_in_flight") == 0, 5)
    assert time.monotonic() - t0 < 1.5                        # cancelled within about a second
    generated = served.metric("cai_engine_tokens_generated_total") - before
    assert generated < ENDLESS / 3                            # it stopped early: not run to max_tokens


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(served):
    body = {"model": "base", "messages": HI, "max_tokens": ENDLESS, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=1.0)
    t0 = time.monotonic()
    assert wait_until(lambda: served.metric("cai_in_flight") == 0, 5)
    assert time.monotonic() - t0 < 1.5


def test_a_client_that_gives_up_on_revise_stops_the_pipeline(served):
    # the respond stage runs ~9000 tokens unless cancelled; the pipeline waits for it in a worker thread
    body = {"messages": HI, "max_tokens": 9000, "temperature": 0, "principles": ["p1"]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/revise", headers=AUTH, json=body, timeout=1.0)
    t0 = time.monotonic()
    assert wait_until(lambda: served.metric("cai_in_flight") == 0 and served.metric("cai_queue_depth") == 0, 5)
    assert time.monotonic() - t0 < 1.5
    time.sleep(0.5)                                           # and no later stage was queued after the cancel
    assert served.metric("cai_in_flight") == 0 and served.metric("cai_queue_depth") == 0


# ---------------------------------------------------------------------------------------------------------------
# Signals


def test_sigterm_finishes_the_stream_in_flight_refuses_new_work_and_exits_0(files):
    server = Served(files, "--drain-grace", "1.5")
    try:
        body = {"model": "base", "messages": HI, "max_tokens": 3000, "temperature": 0, "stream": True}
        lines: list[str] = []
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/chat/completions", headers=AUTH,
                                                      json=body) as r:
            it = r.iter_lines()
            lines.append(next(it))
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            health = httpx.get(server.url + "/health", timeout=5)
            refused = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=5,
                                 json={"model": "base", "messages": HI, "max_tokens": 2})
            lines += list(it)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        finish = json.loads(data[-2][6:])["choices"][0]["finish_reason"]
        assert finish == "length"                             # ran to its end, not cancelled
        assert server.proc.wait(30) == 0, server.output()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "model not found"),
    (["--adapter", "/no/such/adapter"], "adapter 'adapter'"),
    (["--constitution", "/no/such.yaml"], "no such file"),
    (["--api-key-file", "/no/keys.txt"], "cannot read the API key file"),
    (["--max-n", "0"], "max-n must be at least 1"),
    (["--quantize", "int4", "--dtype", "float32"], "--quantize int4 serves on the CPU in bfloat16"),
    (["--quantize", "int4", "--device", "cuda"], "cannot go with --device cuda"),
])
def test_cai_serve_refuses_bad_settings_with_exit_2(files, args, message):
    base = ["--model", str(files["model"]), "--constitution", str(files["constitutions"])]
    r = subprocess.run([sys.executable, "-m", "cai.cli", "serve", *base, *args], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


@needs_compiler
def test_cai_serve_compile_and_int4_serve_what_health_says(files):
    server = Served(files, "--compile", "--quantize", "int4")
    try:
        health = httpx.get(server.url + "/health", timeout=5).json()
        assert health["status"] == "ok", server.output()
        assert (health["compile"], health["compiled"], health["quantize"], health["dtype"]) == \
            ("default", ["base"], "int4", "bfloat16")
        r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": "base", "messages": HI, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        server.stop()


def test_cai_serve_review_serves_the_page_beside_the_model(served):
    """`cai serve --review RUN`: the page at /review with the same keys as the rest, the model still served."""
    page = httpx.get(served.url + "/review/demo", headers=AUTH, timeout=10)
    assert page.status_code == 200 and "0 of 3 reviewed" in page.text
    assert httpx.get(served.url + "/review/demo", timeout=10).status_code == 401
    item = httpx.get(served.url + "/review/api/demo/items/rec00000", headers=AUTH, timeout=10).json()
    assert item["kind"] == "record" and len(item["content_sha256"]) == 64
    assert httpx.get(served.url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
