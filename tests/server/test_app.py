"""The application's life: 503 while the model loads, a model that fails to load, a full queue (429 with Retry-After),
and the boundary (the library never imports the server)."""

from __future__ import annotations

import subprocess
import sys
import time

from fixtures.server_fixtures import (
    AUTH,
    ENDLESS,
    HI,
    _settings,
    _started,
    chat,
    wait_until,
)

from server.app import create_app

from conftest import REPO, subprocess_env

pytest_plugins = ["fixtures.server_fixtures"]     # files, app, client, served


def test_a_full_queue_answers_429_with_retry_after_at_once(files):
    from starlette.testclient import TestClient

    from server.engine import GenParams

    app = create_app(_settings(files, max_batch=1, queue_size=1))
    with TestClient(app, headers=AUTH) as c:
        _started(c)
        engine = app.state.server.engine
        running = engine.submit("base", HI, GenParams(max_tokens=ENDLESS, temperature=0))
        assert wait_until(lambda: engine.in_flight == 1)
        waiting = engine.submit("base", HI, GenParams(max_tokens=2, temperature=0))
        try:
            t0 = time.monotonic()
            r = chat(c)
            assert r.status_code == 429 and time.monotonic() - t0 < 2
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"] == {**r.json()["error"], "type": "rate_limit_error", "code": "queue_full"}
            for route, body in [("/v1/critique", {"messages": HI, "response": "r"}),
                                ("/v1/revise", {"messages": HI})]:
                assert c.post(route, json=body).status_code == 429
        finally:
            running.cancel()
            waiting.cancel()
        assert wait_until(lambda: engine.in_flight == 0 and engine.queue_depth == 0)
        assert chat(c).status_code == 200


def test_health_is_503_while_loading(files):
    from starlette.testclient import TestClient

    import server.app as app_module

    gate = __import__("threading").Event()
    real = app_module.load_engine

    def slow(settings):
        gate.wait(10)
        return real(settings)

    app_module.load_engine = slow
    try:
        app = create_app(_settings(files))
        with TestClient(app, headers=AUTH) as c:
            assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "loading"
            r = chat(c)
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert c.get("/v1/constitutions").status_code == 200     # no model needed
            gate.set()
            _started(c)
    finally:
        app_module.load_engine = real


def test_a_model_that_fails_to_load_is_reported(files, tmp_path):
    from starlette.testclient import TestClient

    told: list[BaseException] = []
    app = create_app(_settings(files, adapters={"x": str(tmp_path / "missing")}), on_fatal=told.append)
    with TestClient(app, headers=AUTH) as c:
        assert wait_until(lambda: c.get("/health").json()["status"] == "failed")
        assert "adapter 'x'" in c.get("/health").json()["error"]
        assert chat(c).status_code == 503
    assert told and "does not exist" in str(told[0])


def test_the_library_never_imports_the_server():
    r = subprocess.run([sys.executable, "-c", "import sys, cai.cli, cai.generate.generator, cai.generate.runner; "
                        "print(any(m == 'server' or m.startswith('server.') for m in sys.modules))"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
