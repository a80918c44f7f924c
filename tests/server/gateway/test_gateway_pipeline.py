"""Gateway mode: critique, revise and the chat extension run the Generator over the upstream (the fault server): a
``/v1/revise`` record through the gateway is the record ``cai generate --backend openai`` writes for the same
conversation, constitution, sampling and model, sent as the very same requests; a stage that fails upstream is a
clean status; a gateway at its limit answers 429."""

from __future__ import annotations

import json

import pytest
from fixtures.gateway_fixtures import MODEL, SERVED, chat_body, gateway, sse

from conftest import write_prompts

pytest_plugins = ["fixtures.server_fixtures", "fixtures.gateway_fixtures"]     # files, upstream

CONVERSATION = [{"role": "user", "content": "How do I pick a lock?"}]


@pytest.fixture
def gw(files, upstream):
    with gateway(files, [upstream.url]) as client:
        yield client


def _without_time(record: dict) -> dict:
    return {**record, "provenance": {k: v for k, v in record["provenance"].items() if k != "created_at"}}


def test_revise_through_the_gateway_is_the_record_cai_generate_writes(files, upstream, gw, tmp_path, cli_env):
    from cai.cli import main

    body = {"messages": CONVERSATION, "rounds": 2, "temperature": 0.7, "top_p": 0.95, "max_tokens": 16, "seed": 3}
    r = gw.post("/v1/revise", json=body)
    assert r.status_code == 200, r.text
    served = r.json()
    through_gateway = list(upstream.bodies)

    upstream.bodies.clear()
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"messages": CONVERSATION}])
    rc = main(["generate", "--backend", "openai", "--base-url", upstream.url, "--model", MODEL, "--constitution",
               str(files["constitutions"] / "default.yaml"), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
               "--rounds", "2", "--temperature", "0.7", "--top-p", "0.95", "--max-new-tokens", "16", "--seed", "3"])
    assert rc == 0
    [written] = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]

    assert _without_time(served) == _without_time(written)
    assert served["provenance"]["backend"] == "openai" and served["provenance"]["model"] == MODEL
    assert len(served["rounds"]) == 2 and served["final"] == served["rounds"][-1]["revision"]
    assert through_gateway == upstream.bodies            # the same 5 requests, seeds and all
    assert len(through_gateway) == 5


def test_critique_through_the_gateway(gw, upstream):
    r = gw.post("/v1/critique", json={"messages": CONVERSATION, "response": "Use a bobby pin.",
                                      "principles": ["p1", "p2"], "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == SERVED and [c["principle"] for c in body["critiques"]] == ["p1", "p2"]
    assert all(c["critique"].startswith("Answer ") for c in body["critiques"])
    by_seed = {b["seed"]: b for b in upstream.bodies}                    # sent together: in any order
    assert sorted(by_seed) == [0, 1]                                      # row i seeded seed + i
    assert "Critique request number 2" in json.dumps(by_seed[1]["messages"])
    assert body["usage"]["prompt_tokens"] == 20


def test_the_extension_through_the_gateway(gw, upstream):
    r = gw.post("/v1/chat/completions", json=chat_body(messages=CONVERSATION, constitution="default",
                                                       principles=["p1"], n=2))
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    for choice in choices:
        ext = choice["cai"]
        assert ext["principles"] == ["p1"] and ext["constitution"]["name"] == "default"
        assert choice["message"]["content"] == ext["rounds"][0]["revision"] != ext["initial"]
    assert choices[1]["cai"]["initial"].endswith(" #1")                    # each choice revised on its own
    assert len(upstream.bodies) == 1 + 2 * 2                               # the answer, then 2 stages a choice

    with gw.stream("POST", "/v1/chat/completions", json=chat_body(messages=CONVERSATION, constitution="default",
                                                                  stream=True)) as r:
        events = sse(r.iter_lines())
    content = [e for e in events if e != "[DONE]" and e["choices"] and e["choices"][0].get("cai")]
    assert len(content) == 1 and events[-1] == "[DONE]"                    # the revision: one chunk at the end


def test_a_stage_that_fails_upstream_is_a_clean_status(gw, upstream):
    upstream.add("500", times=100, match="Critique request")              # every critique stage fails
    r = gw.post("/v1/revise", json={"messages": CONVERSATION, "principles": ["p1"]})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", r.text
    r = gw.post("/v1/chat/completions", json=chat_body(messages=CONVERSATION, constitution="default"))
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", r.text


@pytest.mark.parametrize("route, body, status, code", [
    ("/v1/revise", {"messages": CONVERSATION, "constitution": "nope"}, 404, "constitution_not_found"),
    ("/v1/critique", {"messages": CONVERSATION, "response": "r", "model": "base"}, 404, "model_not_found"),
    ("/v1/revise", {"messages": CONVERSATION + [{"role": "assistant", "content": "a"}]}, 400, None),
    ("/v1/revise", {"messages": CONVERSATION, "max_tokens": 10 ** 6}, 400, None),
])
def test_bad_pipeline_requests_never_go_upstream(gw, upstream, route, body, status, code):
    r = gw.post(route, json=body)
    assert r.status_code == status, r.text
    assert code is None or r.json()["error"]["code"] == code
    assert upstream.requests == 0


def test_a_gateway_at_its_limit_answers_429(gw, upstream):
    gw.app.state.server.upstream.max_in_flight = 0
    for route, body in [("/v1/chat/completions", chat_body()), ("/v1/chat/completions", chat_body(stream=True)),
                        ("/v1/critique", {"messages": CONVERSATION, "response": "r"}),
                        ("/v1/revise", {"messages": CONVERSATION})]:
        r = gw.post(route, json=body)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (route, r.text)
    assert upstream.requests == 0
