"""The admin routes on the tiny model: metrics, and constitution edits served live (a bad edit keeps the last good
version)."""

from __future__ import annotations

from fixtures.server_fixtures import (
    HI,
    chat,
    wait_until,
)

from conftest import constitution_yaml

pytest_plugins = ["fixtures.server_fixtures"]     # files, app, client, served


def test_metrics_count_requests_tokens_and_batches(client):
    chat(client, max_tokens=3)
    client.post("/v1/chat/completions", json={"model": "nope", "messages": HI})
    text = client.get("/metrics").text
    assert 'cai_requests_total{route="/v1/chat/completions",method="POST",status="200"}' in text
    assert 'cai_requests_total{route="/v1/chat/completions",method="POST",status="404"}' in text
    assert 'cai_request_duration_seconds_bucket{route="/v1/chat/completions",le="+Inf"}' in text
    assert "cai_queue_depth 0" in text and "cai_in_flight 0" in text
    completion = next(line for line in text.splitlines()
                      if line.startswith('cai_completion_tokens_total{model="base"}'))
    assert float(completion.split()[1]) >= 3
    assert 'cai_batch_size_bucket{le="1"}' in text


def test_constitution_edits_are_served_without_a_restart_and_bad_edits_keep_the_last_good(files, client):
    path = files["constitutions"] / "extra.yaml"
    path.write_text(constitution_yaml(2, name="extra"))
    assert wait_until(lambda: client.get("/v1/constitutions/extra").status_code == 200)
    first = client.get("/v1/constitutions/extra").json()
    assert [p["id"] for p in first["principles"]] == ["p1", "p2"]

    path.write_text(constitution_yaml(3, name="extra"))                       # a good edit
    assert wait_until(lambda: len(client.get("/v1/constitutions/extra").json()["principles"]) == 3)
    good = client.get("/v1/constitutions/extra").json()
    assert good["sha256"] != first["sha256"] and good["error"] is None
    r = client.post("/v1/critique", json={"messages": HI, "response": "r", "constitution": "extra",
                                          "principles": ["p3"], "max_tokens": 2})
    assert r.status_code == 200                                               # the new principle is usable

    path.write_text(constitution_yaml(3, name="extra").replace("principles:", "principles: [oops"))  # a bad edit
    assert wait_until(lambda: client.get("/v1/constitutions").json()["errors"])
    listing = client.get("/v1/constitutions").json()
    assert listing["errors"][0]["path"].endswith("extra.yaml") and listing["errors"][0]["issues"]
    still = client.get("/v1/constitutions/extra").json()
    assert still["sha256"] == good["sha256"] and still["error"] is not None   # the last good version serves
    path.unlink()
    assert wait_until(lambda: client.get("/v1/constitutions/extra").status_code == 404)
    assert client.get("/v1/constitutions/extra").json()["error"]["code"] == "constitution_not_found"
