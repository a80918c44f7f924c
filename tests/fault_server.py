"""A fault-injecting OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

A real HTTP server (threads) in the calling process. By default every request gets a deterministic answer (a hash
of the messages). ``add(kind, times, match)`` queues a fault for the next ``times`` requests whose last user message
contains ``match`` (any request when None). Kinds: ``429`` (with ``Retry-After``), ``500``, ``503``, ``garbage``
(a body that is not JSON), ``empty`` (an empty choice list), ``length`` (a truncated answer: finish_reason
"length"), ``hang`` (answer only after ``hang_s``), ``drop`` (close the connection without answering). ``api_key``
makes every request without ``Authorization: Bearer <api_key>`` a 401. ``delay`` delays every answer (benchmarks).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    def __init__(self, delay: float = 0.0, api_key: str | None = None, hang_s: float = 5.0,
                 retry_after: str = "0.2"):
        self.delay, self.api_key, self.hang_s, self.retry_after = delay, api_key, hang_s, retry_after
        self.faults: list[list] = []          # [kind, remaining, match]
        self.requests = 0
        self.answered = 0
        self.log: list[tuple[str, str]] = []  # (last user message, what was done)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def add(self, kind: str, times: int = 1, match: str | None = None) -> None:
        with self.lock:
            self.faults.append([kind, times, match])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _take(self, last_user: str) -> str | None:
        with self.lock:
            self.requests += 1
            for f in self.faults:
                if f[1] > 0 and (f[2] is None or f[2] in last_user):
                    f[1] -= 1
                    return f[0]
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.path.rstrip("/") != "/v1/chat/completions":
            with self.lock:
                self.requests += 1
            return self._send(h, 404, {"error": {"message": "not found"}})
        if self.api_key and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            with self.lock:
                self.requests += 1
            return self._send(h, 401, {"error": {"message": "bad key"}})
        req = json.loads(body)
        last_user = next((m["content"] for m in reversed(req["messages"]) if m["role"] == "user"), "")
        kind = self._take(last_user)
        with self.lock:
            self.log.append((last_user, kind or "ok"))
        if kind == "drop":
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if kind == "hang":
            time.sleep(self.hang_s)
        if kind == "429":
            return self._send(h, 429, {"error": {"message": "slow down"}}, {"Retry-After": self.retry_after})
        if kind in ("500", "503"):
            return self._send(h, int(kind), {"error": {"message": "server trouble"}})
        if kind == "garbage":
            return self._send_raw(h, 200, b"<html>not json", "text/html")
        if kind == "empty":
            return self._send(h, 200, {"id": "x", "object": "chat.completion", "choices": []})
        if self.delay:
            time.sleep(self.delay)
        digest = hashlib.sha256(json.dumps(req["messages"]).encode()).hexdigest()[:10]
        text = f"Answer {digest} to: {last_user[:40]}"
        finish = "length" if kind == "length" else "stop"
        with self.lock:
            self.answered += 1
        self._send(h, 200, {"id": "c" + digest, "object": "chat.completion", "model": req.get("model"),
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": finish}],
                            "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split())}})

    @staticmethod
    def _send(h, status: int, obj: dict, headers: dict | None = None) -> None:
        FaultServer._send_raw(h, status, json.dumps(obj).encode(), "application/json", headers)

    @staticmethod
    def _send_raw(h, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
