"""The gateway's HTTP/1.1 client against raw sockets: bodies with a length, chunked and up to the close; keep-alive
reuse, and an idle connection the server closed retried once on a new one; what is not HTTP; a request cancelled
mid-answer closes its connection."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from server.gateway.http import BrokenConnection, Pool


class RawServer:
    """Answers each request on a connection with the next of ``replies`` (bytes sent as they are); counts
    connections. ``close_after``: the server closes each connection after that many answers, without saying so."""

    def __init__(self, replies: list[bytes], close_after: int | None = None):
        self.replies, self.close_after = list(replies), close_after
        self.connections = 0
        self.closed = threading.Event()         # a connection was closed by the client
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        answered = 0
        with conn:
            while self.replies:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(65536)
                    if not data:
                        self.closed.set()
                        return
                    request += data
                head, _, body = request.partition(b"\r\n\r\n")
                length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                               if h.lower().startswith(b"content-length")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(self.replies.pop(0))
                answered += 1
                if self.close_after is not None and answered >= self.close_after:
                    return
            if not conn.recv(1):
                self.closed.set()

    def close(self) -> None:
        self.sock.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + \
        b"\r\n" + extra + b"\r\n" + body


@pytest.fixture
def run():
    return asyncio.run


def test_bodies_with_a_length_are_read_and_the_connection_reused(run):
    server = RawServer([ok(b'{"a": 1}'), ok(b'{"b": 2}')])

    async def go():
        pool = Pool(server.url, 4)
        first = await (await pool.request("POST", "/chat/completions", b"{}")).read()
        second = await (await pool.request("POST", "/chat/completions", b"{}")).read()
        pool.close()
        return first, second

    try:
        assert run(go()) == (b'{"a": 1}', b'{"b": 2}')
        assert server.connections == 1
    finally:
        server.close()


def test_chunked_bodies_come_line_by_line(run):
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"6\r\ndata: \r\n9\r\n{\"x\": 1}\n\r\n1\r\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    server = RawServer([chunked, ok(b"again")])

    async def go():
        pool = Pool(server.url, 4)
        r = await pool.request("POST", "/chat/completions", b"{}", accept="text/event-stream")
        lines = [line async for line in r.lines()]
        again = await (await pool.request("POST", "/chat/completions", b"{}")).read()
        return lines, again

    try:
        lines, again = run(go())
        assert lines == ['data: {"x": 1}', "", "data: [DONE]", ""]
        assert again == b"again" and server.connections == 1       # the chunked answer left it reusable
    finally:
        server.close()


def test_an_idle_connection_the_server_closed_is_retried_once_on_a_new_one(run):
    server = RawServer([ok(b"one"), ok(b"two")], close_after=1)

    async def go():
        pool = Pool(server.url, 4)
        first = await (await pool.request("POST", "/chat/completions", b"{}")).read()
        await asyncio.sleep(0.1)                                     # the server has closed it by now
        second = await (await pool.request("POST", "/chat/completions", b"{}")).read()
        return first, second

    try:
        assert run(go()) == (b"one", b"two") and server.connections == 2
    finally:
        server.close()


def test_a_body_up_to_the_close_and_http_1_0(run):
    server = RawServer([b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"until\": \"close\"}"],
                       close_after=1)

    async def go():
        r = await Pool(server.url, 4).request("GET", "/models")
        return r.status, await r.read()

    try:
        assert run(go()) == (200, b'{"until": "close"}')
    finally:
        server.close()


@pytest.mark.parametrize("reply", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                                   b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
                         ids=["not-http", "cut-short", "bad-chunk"])
def test_what_is_not_a_whole_http_answer_is_a_broken_connection(run, reply):
    server = RawServer([reply], close_after=1)

    async def go():
        r = await Pool(server.url, 4).request("POST", "/chat/completions", b"{}")
        await r.read()

    try:
        with pytest.raises(BrokenConnection):
            run(go())
    finally:
        server.close()


def test_nothing_listening_is_a_broken_connection(run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(BrokenConnection, match="cannot connect"):
        run(Pool(url, 1).request("GET", "/models"))


def test_a_request_cancelled_mid_answer_closes_its_connection_and_frees_its_slot(run):
    hanging = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = RawServer([hanging, ok(b"next")])

    async def go():
        pool = Pool(server.url, 1)                                   # one slot: the next request needs it back
        r = await pool.request("POST", "/chat/completions", b"{}", accept="text/event-stream")
        reading = asyncio.ensure_future(r.read())
        await asyncio.sleep(0.1)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        return await asyncio.wait_for((await pool.request("POST", "/chat/completions", b"{}")).read(), 5)

    try:
        assert run(go()) == b"next"
        assert server.closed.wait(5) and server.connections == 2
    finally:
        server.close()
