"""A fault-injecting OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

A real HTTP server (threads) in the calling process. By default every request gets a deterministic answer (a hash
of the messages). ``add(kind, times, match)`` queues a fault for the next ``times`` requests whose last user message
contains ``match`` (any request when None). Kinds: ``429`` (with ``Retry-After``), ``500``, ``503``, ``garbage``
(a body that is not JSON), ``empty`` (an empty choice list), ``length`` (a truncated answer: finish_reason
"length"), ``nologprobs`` (no log-probabilities even when asked), ``hang`` (answer only after ``hang_s``), ``drop`` (close the connection without answering). ``api_key``
makes every request without ``Authorization: Bearer <api_key>`` a 401. ``delay`` delays every answer (benchmarks).
``slots`` models a server's limited capacity: at most ``slots`` answers are being worked on at once (``delay`` is
spent holding a slot), later requests wait their turn; None (the default) answers every request at once.
``kill()`` is a crash: it stops listening and cuts every open connection, requests in flight included.

Run as a script it serves until its stdin closes (so it dies with the process that started it), printing its URL:

    python tests/fault_server.py --delay 0.2 --slots 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    # the standard library listens with a backlog of 5: a client opening dozens of connections at once overflows it
    # and some connections are reset; real servers listen with hundreds or thousands
    request_queue_size = 1024


class FaultServer:
    def __init__(self, delay: float = 0.0, api_key: str | None = None, hang_s: float = 5.0,
                 retry_after: str = "0.2", slots: int | None = None, port: int = 0):
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.delay, self.api_key, self.hang_s, self.retry_after = delay, api_key, hang_s, retry_after
        self.slots = slots
        self._slots = threading.BoundedSemaphore(slots) if slots else None
        self.faults: list[list] = []          # [kind, remaining, match]
        self.requests = 0
        self.answered = 0
        self.busy = 0                         # answers being worked on now (holding a slot, when slots is set)
        self.peak_busy = 0
        self.log: list[tuple[str, str]] = []  # (last user message, what was done)
        self.lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with server.lock:
                    server._conns.add(self.connection)

            def finish(self):
                with server.lock:
                    server._conns.discard(self.connection)
                super().finish()

            def do_POST(self):
                server._handle(self)

        self.httpd = _Server(("127.0.0.1", port), Handler)
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
        """Stop listening; connections already open (keep-alive) are still answered until the client drops them."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def kill(self) -> None:
        """A crash: stop listening and cut every open connection, so requests in flight get no answer."""
        self.close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
        if self._slots:
            self._slots.acquire()            # wait for a free slot, as a server at capacity queues requests
        try:
            with self.lock:
                self.busy += 1
                self.peak_busy = max(self.peak_busy, self.busy)
            if self.delay:
                time.sleep(self.delay)
            digest = hashlib.sha256(json.dumps(req["messages"]).encode()).hexdigest()[:10]
            text = f"Answer {digest} to: {last_user[:40]}"
            finish = "length" if kind == "length" else "stop"
            with self.lock:
                self.answered += 1
                self.busy -= 1
        finally:
            if self._slots:
                self._slots.release()
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if req.get("logprobs") and kind != "nologprobs":
            choice["logprobs"] = self.logprobs(req["messages"], int(req.get("top_logprobs") or 0))
        self._send(h, 200, {"id": "c" + digest, "object": "chat.completion", "model": req.get("model"),
                            "choices": [choice],
                            "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split())}})

    @staticmethod
    def yes_probability(messages: list[dict]) -> float:
        """The P(yes) this server's log-probabilities encode for a conversation (deterministic, in [0.05, 0.95])."""
        digest = hashlib.sha256(json.dumps(messages).encode()).hexdigest()
        return 0.05 + 0.9 * int(digest[:8], 16) / 0xFFFFFFFF

    @classmethod
    def logprobs(cls, messages: list[dict], top: int) -> dict:
        """An OpenAI ``logprobs`` object for a one-token answer: "Yes" and " No" share 90% of the mass in the ratio
        of :meth:`yes_probability`; "Maybe" holds the other 10%."""
        import math

        p = cls.yes_probability(messages)
        alts = [("Yes", math.log(0.9 * p)), (" No", math.log(0.9 * (1 - p))), ("Maybe", math.log(0.1))]
        alts.sort(key=lambda a: -a[1])
        first = alts[0]
        return {"content": [{"token": first[0], "logprob": first[1],
                             "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alts[:top]]}]}

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


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve a FaultServer until stdin closes; print its URL on stdout.")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds each answer takes (holding a slot)")
    ap.add_argument("--slots", type=int, default=None, help="answers worked on at once (default: unlimited)")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    args = ap.parse_args()
    server = FaultServer(delay=args.delay, slots=args.slots, port=args.port)
    print(server.url, flush=True)
    try:
        sys.stdin.read()                     # EOF when the parent closes the pipe or dies
    except KeyboardInterrupt:
        pass
    server.close()


if __name__ == "__main__":
    main()
