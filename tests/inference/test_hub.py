"""A Hugging Face id on a machine that cannot reach the hub: one quick probe, then the local cache or a clear error
(never ~50 s of huggingface_hub's retries)."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

import cai.inference.hub as hub
from cai.core.errors import ModelError
from cai.inference.loading import resolve_model


def _closed_port_url() -> str:
    with socket.socket() as s:          # a port nobody listens on: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """The hub's endpoint refuses connections; the HF cache is an empty folder of ours."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(hub, "endpoint", _closed_port_url)
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "_answered", {})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def test_an_id_that_is_neither_reachable_nor_cached_is_a_clear_error(no_hub, monkeypatch):
    calls = []
    real = hub.unreachable
    monkeypatch.setattr(hub, "unreachable", lambda url=None: calls.append(url) or real(url))
    with pytest.raises(ModelError) as info:
        resolve_model("someorg/some-model")
    message = info.value.message
    assert "'someorg/some-model'" in message and "not reachable" in message and "not in the local cache" in message
    assert "default" in info.value.hint
    assert len(calls) == 1                                  # one probe, no retries


def test_an_unreachable_hub_falls_back_to_the_cached_snapshot(no_hub):
    snapshot = no_hub / "models--someorg--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (no_hub / "models--someorg--cached" / "refs").mkdir()
    (no_hub / "models--someorg--cached" / "refs" / "main").write_text("a" * 40)
    resolved = resolve_model("someorg/cached")
    assert resolved.path == str(snapshot)
    assert resolved.model_id == "someorg/cached"


def test_a_hub_that_answers_is_used_and_remembered(monkeypatch):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)             # any answer means the hub is there
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(hub, "endpoint", lambda: url)
        monkeypatch.setattr(hub, "offline", lambda: False)
        monkeypatch.setattr(hub, "_answered", {})
        assert hub.hub_source("someorg/model", None) == "someorg/model"
        server.shutdown()
        assert hub.unreachable(url) is None                 # remembered: not asked again within the minute
    finally:
        server.server_close()


def test_offline_mode_never_probes(monkeypatch):
    monkeypatch.setattr(hub, "offline", lambda: True)
    monkeypatch.setattr(hub, "unreachable", lambda url=None: pytest.fail("probed in offline mode"))
    assert hub.hub_source("someorg/model", None) == "someorg/model"
