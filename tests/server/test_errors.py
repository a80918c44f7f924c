"""The one error map: unknown paths and methods get the OpenAI error body, and generated requests against
/openapi.json never get a 5xx (schemathesis)."""

from __future__ import annotations

from fixtures.server_fixtures import (
    AUTH,
    _settings,
    _started,
    schemathesis_failures,
)

from server.app import create_app
from server.settings import Limits

pytest_plugins = ["fixtures.server_fixtures"]     # files, app, client, served


def test_errors_on_unknown_paths_and_methods_use_the_error_body(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ---------------------------------------------------------------------------------------------------------------
# Schemathesis: generated requests against /openapi.json never get a 5xx


def test_schemathesis_finds_no_server_error(files):
    from starlette.testclient import TestClient

    # small caps keep every generated request short (a generated max_tokens is at most 4 tokens of work)
    app = create_app(_settings(files, limits=Limits(max_tokens=4, default_max_tokens=2, max_n=2)))
    with TestClient(app, headers=AUTH, raise_server_exceptions=False) as client:
        _started(client)
        failures = schemathesis_failures(client, lambda r: r.status_code < 500)
    assert not failures, "\n".join(failures[:5])
