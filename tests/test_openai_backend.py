"""The OpenAI-compatible backend against a real fault-injecting HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time

import pytest

from cai.backends.base import Sampling
from cai.backends.openai import AuthError, EndpointError, OpenAIBackend
from cai.generate import run_generate
from cai.records import read_jsonl, read_records
from conftest import items_from, make_constitution, prompt_rows
from fault_server import FaultServer

FAST = dict(backoff_base=0.01, backoff_max=0.5, timeout=2.0, first_cooldown=0.3)
SAMPLING = Sampling(temperature=0.0, max_new_tokens=32)


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def backend(*urls, **kw) -> OpenAIBackend:
    return OpenAIBackend("test-model", list(urls), **{**FAST, **kw})


def ask(b: OpenAIBackend, texts: list[str]):
    return b.generate([[{"role": "user", "content": t}] for t in texts], SAMPLING, seed=0)


def free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"        # nothing listens there: connections are refused


def test_answers_come_back_in_order_with_usage(server):
    out = ask(backend(server.url), [f"question {i}" for i in range(8)])
    assert [o.text.split("to: ")[1] for o in out] == [f"question {i}" for i in range(8)]
    assert all(o.error is None and o.finish_reason == "stop" and o.completion_tokens > 0 for o in out)


@pytest.mark.parametrize("kind", ["500", "503", "garbage", "empty", "drop"])
def test_transient_faults_are_retried_until_an_answer(server, kind):
    server.add(kind, times=2)
    [out] = ask(backend(server.url), ["hello"])
    assert out.error is None and "hello" in out.text
    assert server.requests == 3


def test_429_waits_for_retry_after(server):
    server.retry_after = "0.5"
    server.add("429", times=1)
    t0 = time.perf_counter()
    [out] = ask(backend(server.url), ["hello"])
    assert out.error is None
    assert time.perf_counter() - t0 >= 0.45          # honoured Retry-After, not the 0.01 s backoff


def test_a_hang_past_the_timeout_is_retried(server):
    server.hang_s = 1.5
    server.add("hang", times=1)
    [out] = ask(backend(server.url, timeout=0.5), ["hello"])
    assert out.error is None and server.requests == 2


def test_truncated_answer_is_reported_as_length(server):
    server.add("length", times=1)
    [out] = ask(backend(server.url), ["hello"])
    assert out.finish_reason == "length" and out.text


def test_a_request_that_keeps_failing_becomes_an_error_not_an_answer(server):
    server.add("500", times=100, match="doomed")
    out = ask(backend(server.url, max_retries=3), ["fine", "doomed"])
    assert out[0].error is None
    assert out[1].error and "HTTP 500" in out[1].error and out[1].text == ""
    assert server.log.count(("doomed", "500")) == 4


def test_wrong_api_key_stops_at_once_without_hammering(monkeypatch):
    s = FaultServer(api_key="right")
    try:
        monkeypatch.setenv("TEST_KEY", "wrong")
        b = backend(s.url, api_key_env="TEST_KEY", concurrency=1)
        with pytest.raises(AuthError) as e:
            ask(b, [f"q{i}" for i in range(20)])
        assert "API key" in e.value.message and "TEST_KEY" in e.value.hint
        assert "wrong" not in str(e.value)             # the key itself is never shown
        assert s.requests == 1
    finally:
        s.close()


def test_a_wrong_url_stops_at_once(server):
    be = backend(server.url.removesuffix("/v1") + "/nope", concurrency=8)
    with pytest.raises(EndpointError) as e:
        ask(be, [f"q{i}" for i in range(10)])
    assert "404" in e.value.message and "--base-url" in e.value.hint
    assert server.requests == 1      # the first request went alone; nothing followed the 404


def test_the_api_key_is_sent_as_bearer(monkeypatch):
    s = FaultServer(api_key="sekrit")
    try:
        monkeypatch.setenv("TEST_KEY", "sekrit")
        out = ask(backend(s.url, api_key_env="TEST_KEY"), ["hi"])
        assert out[0].error is None
    finally:
        s.close()


def test_least_outstanding_balances_two_endpoints():
    a, b = FaultServer(delay=0.05), FaultServer(delay=0.05)
    try:
        ask(backend(a.url, b.url, concurrency=8), [f"q{i}" for i in range(40)])
        assert a.answered + b.answered == 40
        assert 12 <= a.answered <= 28, (a.answered, b.answered)
    finally:
        a.close()
        b.close()


def test_a_dead_endpoint_is_taken_out_of_rotation(server):
    dead = free_port_url()
    be = backend(dead, server.url, concurrency=4)
    out = ask(be, [f"q{i}" for i in range(30)])
    assert all(o.error is None for o in out)
    dead_ep = be.endpoints[0]
    assert dead_ep.served == 0
    assert dead_ep.errors <= 8           # tripped after a few failures, not tried for every request


def test_an_endpoint_dying_mid_run_loses_nothing():
    a, b = FaultServer(delay=0.02), FaultServer(delay=0.02)
    try:
        be = backend(a.url, b.url, concurrency=4)
        first = ask(be, [f"first {i}" for i in range(12)])
        a.close()                                     # one of two endpoints dies
        second = ask(be, [f"second {i}" for i in range(12)])
        assert all(o.error is None for o in first + second)
        assert b.answered >= 12
    finally:
        b.close()


# ---------------------------------------------------------------------------------------------------------------
# A whole generation run against the fault server


def run(server_url: str, out, items, **kw):
    be = backend(server_url, **kw)
    return run_generate(constitution=make_constitution(4), items=items, backend=be, out=out, rounds=2,
                        sampling=SAMPLING, batch_size=8)


def test_generation_with_faults_writes_every_record_once_or_lists_it_in_errors(tmp_path, server):
    rows = prompt_rows(20)
    rows[3]["prompt"] += " doomed-a"
    rows[11]["prompt"] += " doomed-b"
    items = items_from(rows)
    for kind in ("429", "500", "503", "garbage", "empty", "drop"):
        server.add(kind, times=2)
    server.add("500", times=10 ** 6, match="doomed")
    # 13 attempts a request: more than the 12 transient faults, so only the doomed prompts can run out
    s = run(server.url, tmp_path / "run", items, max_retries=12)
    recs = read_records(tmp_path / "run")
    assert s.written == 18 and s.failed == 2
    assert len({r.prompt_id for r in recs}) == len(recs) == 18
    errors = [e for _, e in read_jsonl(tmp_path / "run" / "errors.jsonl")]
    assert sorted(e["prompt_id"] for e in errors) == ["q003", "q011"]
    assert all(e["reason"] == "request_failed" and "HTTP 500" in e["message"] for e in errors)
    assert not any("server trouble" in r.final or r.final == "" for r in recs)

    # the endpoint recovers: the next run completes the rest, rewriting nothing
    server.faults.clear()
    s2 = run(server.url, tmp_path / "run", items)
    assert s2.written == 2 and s2.skipped == 18 and s2.failed == 0
    recs = read_records(tmp_path / "run")
    assert len(recs) == 20 and len({r.prompt_id for r in recs}) == 20


def test_truncated_answers_are_flagged_in_records(tmp_path, server):
    server.add("length", times=1, match="number 0 ")
    run(server.url, tmp_path / "run", items_from(prompt_rows(3)))
    recs = {r.prompt_id: r for r in read_records(tmp_path / "run")}
    assert "truncated" in recs["q000"].initial_flags


def test_cli_wrong_key_exits_2_with_a_clear_message(tmp_path, monkeypatch, capsys, cli_env):
    from cai.cli import main

    s = FaultServer(api_key="right")
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        p = tmp_path / "p.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in prompt_rows(5)) + "\n")
        rc = main(["generate", "--backend", "openai", "--base-url", s.url, "--model", "m", "--prompts", str(p),
                   "--out", str(tmp_path / "run"), "--max-retries", "1"])
        err = capsys.readouterr().err
        assert rc == 2 and "refused the API key" in err and "Traceback" not in err
        assert s.requests == 1
    finally:
        s.close()
