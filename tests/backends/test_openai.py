"""The OpenAI-compatible backend against a real fault-injecting HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from fixtures.fault_server import FaultServer

from cai.backends.base import Sampling
from cai.backends.openai import AuthError, EndpointError, OpenAIBackend
from cai.cli import main
from cai.core.files import read_jsonl
from cai.core.record import read_records
from cai.generate.runner import run_generate

from conftest import REPO, constitution_yaml, items_from, make_constitution, prompt_rows, subprocess_env, write_prompts

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


# ---------------------------------------------------------------------------------------------------------------
# `cai generate --backend openai` as a real process: kill -9 mid-run, an endpoint crashing mid-run


def _cli_args(tmp_path, urls: list[str], n_prompts: int = 40) -> tuple[list[str], list[dict]]:
    rows = prompt_rows(n_prompts)
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    constitution = tmp_path / "small.yaml"
    constitution.write_text(constitution_yaml(4))
    args = ["generate", "--backend", "openai", *(x for u in urls for x in ("--base-url", u)), "--model", "m",
            "--constitution", str(constitution), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
            "--rounds", "1", "--concurrency", "4", "--batch-size", "4", "--max-new-tokens", "16",
            "--request-timeout", "5"]
    return args, rows


def _start_cli(args: list[str], cwd) -> subprocess.Popen:
    # output goes to a file, not a pipe: a pipe nobody reads could fill up and stall the run
    with open(cwd / "generate.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "cai.cli", *args], cwd=REPO, env=subprocess_env(),
                                stdout=log, stderr=subprocess.STDOUT)


def _wait_for_records(proc: subprocess.Popen, records, at_least: int, timeout: float = 120.0) -> int:
    """Poll until records.jsonl has at least ``at_least`` complete lines (the process still running); returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = records.read_bytes().count(b"\n") if records.exists() else 0
        if n >= at_least:
            return n
        if proc.poll() is not None:
            log = (records.parent.parent / "generate.log").read_text(errors="replace")
            pytest.fail(f"cai generate exited (rc {proc.returncode}) with {n} records, before {at_least}:\n"
                        f"{log[-3000:]}")
        time.sleep(0.01)
    pytest.fail(f"no {at_least} records within {timeout}s")


def _check_complete(run_dir, rows: list[dict]) -> list:
    recs = read_records(run_dir)                      # every line parses as a record
    assert (run_dir / "records.jsonl").read_bytes().endswith(b"\n")
    assert len({r.id for r in recs}) == len(recs), "a record was written twice"
    assert sorted(r.prompt_id for r in recs) == sorted(r["id"] for r in rows), "a prompt is missing or doubled"
    return recs


def test_cli_kill_9_mid_run_then_resume(tmp_path, capsys):
    server = FaultServer(delay=0.05)
    proc = None
    try:
        args, rows = _cli_args(tmp_path, [server.url])
        records = tmp_path / "run" / "records.jsonl"
        proc = _start_cli(args, tmp_path)
        _wait_for_records(proc, records, 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        before = {r.prompt_id for r in read_records(tmp_path / "run")}   # a torn last line would be skipped
        assert 8 <= len(before) < len(rows), "the kill must land mid-run"

        with server.lock:
            server.log.clear()
        rc = main(args)                               # the same command again, to completion
        assert rc == 0, capsys.readouterr().err
        recs = _check_complete(tmp_path / "run", rows)
        assert len(recs) == len(rows)
        assert all(r.final for r in recs)
        # the records finished before the kill were kept, not asked for again (a prompt whose answer was done but
        # whose record was not may come from the stage cache: not necessarily asked again either)
        texts = {r["prompt"]: r["id"] for r in rows}
        asked = {texts[u] for u, _ in server.log if u in texts}
        assert asked and not asked & before
        assert "already done" in capsys.readouterr().out
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()


@pytest.mark.parametrize("retries", [None, 0])
def test_cli_one_of_two_endpoints_crashing_mid_run_loses_nothing(tmp_path, capsys, retries):
    """With retries (the default) the run rides over the crash; with none, the requests that went to the crashed
    endpoint before it was taken out of rotation fail for good: listed in errors.jsonl, done by the next run."""
    a, b = FaultServer(delay=0.05), FaultServer(delay=0.05)
    proc = None
    try:
        args, rows = _cli_args(tmp_path, [a.url, b.url])
        run_dir = tmp_path / "run"
        proc = _start_cli(args + ([] if retries is None else ["--max-retries", str(retries)]), tmp_path)
        at_crash = _wait_for_records(proc, run_dir / "records.jsonl", 8)
        answered_a = a.answered
        a.kill()                                      # a crash: requests in flight on a are cut off too
        assert proc.wait(timeout=120) == 0, (tmp_path / "generate.log").read_text(errors="replace")[-3000:]
        assert answered_a > 0 and at_crash < len(rows), "the crash must land mid-run, after a had served"

        # every prompt has exactly one record, or (a request that failed for good) is listed in errors.jsonl
        recs = read_records(run_dir)
        assert len({r.id for r in recs}) == len(recs), "a record was written twice"
        written = [r.prompt_id for r in recs]
        assert len(written) == len(set(written))
        failed = {e["prompt_id"] for _, e in read_jsonl(run_dir / "errors.jsonl")}
        assert not failed & set(written)
        assert set(written) | failed == {r["id"] for r in rows}
        assert b.answered > 0
        if retries == 0:
            assert failed, "with no retries, the requests sent to the crashed endpoint must fail"

        # a second run (a still down) completes whatever is left and rewrites nothing
        before = (run_dir / "records.jsonl").read_bytes()
        assert main(args) == 0, capsys.readouterr().err
        assert (run_dir / "records.jsonl").read_bytes().startswith(before)
        recs = _check_complete(run_dir, rows)
        assert len(recs) == len(rows)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        a.close()
        b.close()


@pytest.mark.parametrize("slots", [2, None])
def test_slots_cap_the_answers_in_progress(slots):
    s = FaultServer(delay=0.1, slots=slots)
    try:
        t0 = time.perf_counter()
        out = ask(backend(s.url, concurrency=8), [f"q{i}" for i in range(9)])
        elapsed = time.perf_counter() - t0
        assert all(o.error is None for o in out) and s.answered == 9
        if slots:
            assert s.peak_busy == 2
            assert elapsed >= 0.1 + 4 * 0.1 - 0.03     # the first request alone, then 8 more two at a time
        else:
            assert s.peak_busy >= 3                    # no cap: the 8 after the first are answered together
    finally:
        s.close()
