"""Critique, revise and the chat extension on the tiny model: the library's own pipeline (the record ``/v1/revise``
returns is the one ``cai generate`` writes), principles named or drawn, and bad critique/revise inputs."""

from __future__ import annotations

import json

import pytest
from fixtures.server_fixtures import (
    HI,
    chat,
)

pytest_plugins = ["fixtures.server_fixtures"]     # files, app, client, served


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


CRITIQUE_BAD = {
    "unknown principle": ({"messages": HI, "response": "r", "principles": ["p1", "nope"]}, 400, "principles"),
    "missing response": ({"messages": HI}, 400, "response"),
    "conversation not ending with a user turn": (
        {"messages": HI + [{"role": "assistant", "content": "a"}], "response": "r"}, 400, "messages"),
    "unknown model": ({"messages": HI, "response": "r", "model": "nope"}, 404, "model"),
    "max_tokens over the cap": ({"messages": HI, "response": "r", "max_tokens": 10 ** 7}, 400, "max_tokens"),
}


@pytest.mark.parametrize("route", ["/v1/critique", "/v1/revise"])
@pytest.mark.parametrize("case", list(CRITIQUE_BAD), ids=list(CRITIQUE_BAD))
def test_bad_critique_and_revise_inputs(client, route, case):
    body, status, param = CRITIQUE_BAD[case]
    if route == "/v1/revise" and case == "missing response":
        return                                                # response is optional for revise
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    if case == "unknown principle":
        assert "'nope'" in r.json()["error"]["message"]       # names the principle


# ---------------------------------------------------------------------------------------------------------------
# The extension, critique and revise: the library's own pipeline


def _local_record(files, messages, principle: str, response: str | None = None):
    """What cai's Generator writes for this conversation, on the same model through the LocalBackend."""
    from cai.backends.base import Completion, Sampling
    from cai.backends.local import LocalBackend
    from cai.core.constitution import parse_constitution
    from cai.core.prompt_files import item_from_row
    from cai.core.prompts import respond_messages
    from cai.generate.generator import Generator, MemoryStageCache, Plan, record_key, stage_key

    c = parse_constitution((files["constitutions"] / "default.yaml").read_text(), "default.yaml")
    backend = LocalBackend(str(files["model"]), device="cpu")
    sampling = Sampling(temperature=0.0, top_p=0.95, max_new_tokens=6, seed=0)
    item = item_from_row({"messages": messages}, "t")
    gen = Generator(c, backend, rounds=1, sampling=sampling)
    cache = MemoryStageCache()
    if response is not None:
        cache.put([(stage_key(backend, sampling, respond_messages(messages)), "respond",
                    Completion(response, 0, 0, "stop"))])
    plan = Plan(item, (principle,), record_key(item, c, (principle,), backend, sampling))
    return gen.run_batch([plan], cache=cache)[0].to_json()


def test_revise_returns_the_record_the_library_writes(client, files):
    messages = [{"role": "user", "content": "How do I pick a lock?"}]
    body = {"messages": messages, "principles": ["p2"], "temperature": 0, "max_tokens": 6}
    served = client.post("/v1/revise", json=body).json()
    local = _local_record(files, messages, "p2")
    for key in ("id", "prompt_id", "messages", "initial", "final", "flags"):
        assert served[key] == local[key], key
    assert served["rounds"][0]["critique"] == local["rounds"][0]["critique"]
    assert served["provenance"]["backend"] == "server"

    given = client.post("/v1/revise", json={**body, "response": "Use a bobby pin."}).json()
    assert given["initial"] == "Use a bobby pin."             # the given answer is the first stage's output
    assert given["final"] == _local_record(files, messages, "p2", "Use a bobby pin.")["final"]
    assert given["usage"]["prompt_tokens"] < served["usage"]["prompt_tokens"]   # no respond stage ran


def test_revise_draws_principles_per_round_like_cai_generate(client):
    r = client.post("/v1/revise", json={"messages": HI, "rounds": 3, "max_tokens": 3}).json()
    assert len(r["rounds"]) == 3 and len({x["principle"] for x in r["rounds"]}) == 3   # a fresh one each round
    assert r["provenance"]["constitution"]["name"] == "default"


def test_critique_each_named_principle_or_one_drawn(client):
    body = {"messages": HI, "response": "Hello there.", "max_tokens": 4, "temperature": 0}
    named = client.post("/v1/critique", json={**body, "principles": ["p3", "p1"]}).json()
    assert [c["principle"] for c in named["critiques"]] == ["p3", "p1"]
    assert all(c["critique"] and c["principle_sha256"] for c in named["critiques"])
    drawn = client.post("/v1/critique", json=body).json()
    assert len(drawn["critiques"]) == 1 and drawn["critiques"][0]["principle"] in ("p1", "p2", "p3")
    assert drawn["constitution"]["name"] == "default" and drawn["usage"]["completion_tokens"] > 0


def test_the_chat_extension_revises_the_answer_it_would_have_given(client):
    plain = chat(client, temperature=0, max_tokens=6).json()["choices"][0]["message"]["content"]
    r = chat(client, temperature=0, max_tokens=6, constitution="default", principles=["p1", "p2"])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ext = choice["cai"]
    assert ext["initial"] == plain.strip()
    assert ext["principles"] == ["p1", "p2"] and ext["constitution"]["name"] == "default"
    assert choice["message"]["content"] == ext["rounds"][-1]["revision"]
    with client.stream("POST", "/v1/chat/completions", json={"model": "base", "messages": HI, "max_tokens": 6,
                                                             "temperature": 0, "constitution": "default",
                                                             "principles": ["p1", "p2"], "stream": True}) as s:
        data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    content = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
    assert content == choice["message"]["content"]


def test_a_constitution_for_labelling_only_cannot_critique(tmp_path):
    """One with preference principles alone is served (listed, read), but critique and revise refuse it clearly."""
    from server.constitutions import ConstitutionRegistry
    from server.critique.pipeline import Pipeline
    from server.errors import InvalidRequest

    (tmp_path / "rl.yaml").write_text('name: rl\nversion: "1"\npreference_principles:\n'
                                      '  - id: kinder\n    text: Which response is kinder?\n')
    registry = ConstitutionRegistry([tmp_path])
    assert registry.names() == ["rl"]
    with pytest.raises(InvalidRequest) as info:
        Pipeline(None, registry=registry).constitution("rl")     # type: ignore[arg-type]
    assert info.value.param == "constitution" and "only preference principles" in str(info.value)
