"""The one error map: unknown paths and methods get the OpenAI error body, and generated requests against
/openapi.json never get a 5xx (schemathesis)."""

from __future__ import annotations

import json

from fixtures.server_fixtures import (
    AUTH,
    _settings,
    _started,
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
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode
    from starlette.testclient import TestClient

    # small caps keep every generated request short (a generated max_tokens is at most 4 tokens of work)
    app = create_app(_settings(files, limits=Limits(max_tokens=4, default_max_tokens=2, max_n=2)))
    failures: list[str] = []
    with TestClient(app, headers=AUTH, raise_server_exceptions=False) as client:
        _started(client)
        schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8

        def send(case) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            headers = {**(kwargs.get("headers") or {}), **AUTH}
            content = None
            if "json" in kwargs:
                content = json.dumps(kwargs["json"]).encode("utf-8", "surrogatepass")
                headers.setdefault("Content-Type", "application/json")
            elif isinstance(kwargs.get("data"), (bytes, str)):
                content = kwargs["data"]
            r = client.request(kwargs["method"], kwargs["url"], headers=headers, params=kwargs.get("params"),
                               content=content)
            if r.status_code >= 500:
                failures.append(f"{kwargs['method']} {kwargs['url']} {content!r:.300} -> {r.status_code} "
                                f"{r.text[:300]}")

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                check = settings(max_examples=10, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(HealthCheck))(
                    given(case=operation.as_strategy(generation_mode=mode))(send))
                try:
                    check()
                except Unsatisfiable:           # no invalid request exists for an operation without inputs
                    assert mode is GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures[:5])
