"""Gateway mode as real processes: ``cai serve --upstream`` in front of a real ``cai serve`` on the tiny model (the
official openai client through it, log-probabilities, the record ``cai generate --backend openai`` writes, a client
that goes away cancelling the upstream's generation), in front of two fault servers one of which dies mid-run; the
auth census and schemathesis on a gateway app; bad gateway settings exit 2."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
from fixtures.fault_server import FaultServer
from fixtures.gateway_fixtures import GatewayProcess, chat_body, gateway
from fixtures.server_fixtures import AUTH, ENDLESS, HI, KEY, route_census, schemathesis_failures, wait_until

from server.settings import Limits

from conftest import REPO, subprocess_env, write_prompts

pytest_plugins = ["fixtures.server_fixtures"]     # files, served


@pytest.fixture(scope="module")
def front(files, served):
    """A gateway process in front of the `served` cai serve (its model: base; the gateway's key is the upstream's)."""
    g = GatewayProcess(files, [served.url + "/v1"], "base", upstream_key=KEY)
    yield g
    g.stop()
    assert g.proc.returncode == 0, g.output()                 # SIGTERM: a clean drain


def test_the_openai_client_through_the_gateway_gets_what_the_upstream_gives(front, served):
    from openai import OpenAI

    direct = OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    through = OpenAI(base_url=front.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in through.models.list().data] == ["base"]
    ask = dict(model="base", messages=HI, max_tokens=8, temperature=0)
    a, b = direct.chat.completions.create(**ask), through.chat.completions.create(**ask)
    assert b.choices[0].message.content == a.choices[0].message.content and b.usage == a.usage
    chunks = list(through.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    lp = dict(ask, max_tokens=3, logprobs=True, top_logprobs=4)
    a, b = direct.chat.completions.create(**lp), through.chat.completions.create(**lp)
    assert b.choices[0].logprobs.model_dump() == a.choices[0].logprobs.model_dump()    # bytes and all
    streamed = [c.choices[0].logprobs for c in through.chat.completions.create(**lp, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [t.token for s in streamed for t in s.content] == [t.token for t in a.choices[0].logprobs.content]
    health = httpx.get(front.url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["upstreams"][0]["up"] is True


def test_revise_through_the_gateway_over_cai_serve_is_what_cai_generate_writes(front, served, files, tmp_path,
                                                                                monkeypatch, cli_env):
    from cai.cli import main

    messages = [{"role": "user", "content": "How do I pick a lock?"}]
    r = httpx.post(front.url + "/v1/revise", headers=AUTH, timeout=120,
                   json={"messages": messages, "temperature": 0, "max_tokens": 6, "seed": 1})
    assert r.status_code == 200, r.text
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"messages": messages}])
    assert main(["generate", "--backend", "openai", "--base-url", served.url + "/v1", "--model", "base",
                 "--constitution", str(files["constitutions"] / "default.yaml"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "run"), "--temperature", "0", "--max-new-tokens", "6", "--seed", "1"]) == 0
    [written] = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    served_record = r.json()
    for record in (served_record, written):
        record["provenance"].pop("created_at")
    assert served_record == written


def _upstream_idle(served) -> bool:
    return served.metric("cai_in_flight") == 0 and served.metric("cai_queue_depth") == 0


def test_a_client_that_goes_away_cancels_the_upstream_request(front, served):
    body = {"model": "base", "messages": HI, "max_tokens": ENDLESS, "temperature": 0}
    with httpx.Client(timeout=30) as c, c.stream("POST", front.url + "/v1/chat/completions", headers=AUTH,
                                                 json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for n, _ in enumerate(line for line in r.iter_lines() if line.startswith("data: ")):
            if n == 3:
                assert served.metric("cai_in_flight") == 1
                break
    assert wait_until(lambda: _upstream_idle(served), 3), "the upstream kept generating for a stream nobody reads"

    for route, request in [("/v1/chat/completions", body),
                           ("/v1/revise", {"messages": HI, "max_tokens": 9000, "temperature": 0})]:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(front.url + route, headers=AUTH, json=request, timeout=1.0)
        assert wait_until(lambda: _upstream_idle(served), 3), route
        time.sleep(0.5)                                       # and no later stage went upstream after it
        assert _upstream_idle(served), route


def test_two_upstreams_are_balanced_and_one_dying_mid_run_fails_no_request(files):
    a, b = FaultServer(delay=0.05), FaultServer(delay=0.05)
    g = GatewayProcess(files, [a.url, b.url])
    try:
        async def run() -> list[int]:
            statuses: list[int] = []
            async with httpx.AsyncClient(base_url=g.url, headers=AUTH, timeout=30) as client:
                async def worker(w: int) -> None:
                    for i in range(10):
                        if w == 0 and i == 4:
                            a.kill()                          # a crash: requests in flight on it are cut
                        r = await client.post("/v1/chat/completions",
                                              json=chat_body(model="fault-model",
                                                             messages=[{"role": "user", "content": f"q{w}.{i}"}]))
                        statuses.append(r.status_code)
                await asyncio.gather(*(worker(w) for w in range(16)))
            return statuses

        statuses = asyncio.run(run())
        assert statuses == [200] * 160, [s for s in statuses if s != 200]
        assert a.answered >= 16 and b.answered >= 16, (a.answered, b.answered)   # both took their share first
        assert b.answered > a.answered                        # and the survivor the rest
        health = httpx.get(g.url + "/health", timeout=5).json()
        assert health["status"] == "ok" and [u["up"] for u in health["upstreams"]] == [False, True]
    finally:
        g.stop()
        b.close()


def test_every_gateway_route_but_health_needs_a_key(files):
    from starlette.testclient import TestClient

    upstream = FaultServer()
    try:
        with gateway(files, [upstream.url]) as gw:
            census = route_census(gw.app)
            assert {p for _, p in census} >= {"/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                              "/v1/critique", "/v1/revise", "/v1/constitutions"}
            anonymous = TestClient(gw.app)
            for method, path in census:
                r = anonymous.request(method, path, json={} if method == "POST" else None)
                assert r.status_code == (200 if path == "/health" else 401), (method, path, r.status_code)
                if method == "GET":
                    assert gw.request(method, path).status_code < 400, (method, path)
        assert upstream.requests == 0                         # nothing anonymous went upstream
    finally:
        upstream.close()


def test_schemathesis_finds_no_server_error_but_the_upstreams(files):
    upstream = FaultServer()

    def ok(r) -> bool:
        return r.status_code < 500 or (r.status_code in (502, 503, 504)
                                       and r.json()["error"]["code"].startswith("upstream_"))
    try:
        with gateway(files, [upstream.url], raise_server_exceptions=False,
                     limits=Limits(max_tokens=4, default_max_tokens=2, max_n=2)) as gw:
            failures = schemathesis_failures(gw, ok)
        assert not failures, "\n".join(failures[:5])
    finally:
        upstream.close()


@pytest.mark.parametrize("args, message", [
    (["--upstream", "http://127.0.0.1:9/v1"], "needs --upstream-model"),
    (["--upstream-model", "m"], "goes with --upstream"),
    (["--upstream", "ftp://127.0.0.1/v1", "--upstream-model", "m"], "http:// or https://"),
    (["--upstream", "http://127.0.0.1:9/v1", "--upstream-model", "m", "--adapter", "a"], "cannot go with"),
    (["--upstream", "http://127.0.0.1:9/v1", "--upstream-model", "m", "--compile"], "--compile cannot go with"),
    (["--upstream", "http://127.0.0.1:9/v1", "--upstream-model", "m", "--upstream-timeout", "0"], "positive"),
])
def test_bad_gateway_settings_exit_2(files, args, message):
    r = subprocess.run([sys.executable, "-m", "cai.cli", "serve", "--constitution", str(files["constitutions"]),
                        *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
