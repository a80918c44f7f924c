"""The gateway's HTTP/1.1 client: keep-alive connections to one upstream, request bodies with a length, answers
with a length, chunked (streams) or up to the close.

Why not httpx (what the openai backend uses): the gateway's overhead per request is the CPU it spends on it, and on
this project's CPUs an httpx request costs about 2.7 ms of it, httpcore's 2.0 ms, this one 0.3 ms (``bench/gateway.py``
measures the whole gateway). What it leaves out: proxies, redirects, HTTP/2, cookies, compression. ``https://``
upstreams are verified against the system's certificates.

Connections: at most ``max_connections`` at once; an idle one is reused, and if the upstream closed it meanwhile (its
keep-alive timeout) so that the answer never starts, the request is sent once more on a new connection (no byte of an
answer came back, so the upstream did not process it). An answer holds its connection until its body has been read
(then the connection is reused, unless the upstream said ``Connection: close``) or :meth:`Response.aclose` (then it is
closed: an upstream that is still sending, a stream, learns that nobody reads it). Cancelling a task mid-request
closes its connection the same way. Timeouts are the caller's (:func:`bounded`).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

MAX_LINE = 64 * 1024                 # bytes of a status or header line (asyncio's own limit)
MAX_BODY = 64 * 1024 * 1024          # bytes of an answer read whole
READ = 64 * 1024
T = TypeVar("T")


async def bounded(work: Coroutine[Any, Any, T], seconds: float) -> T:
    """``await work``, raising asyncio.TimeoutError after ``seconds`` (``asyncio.timeout`` where Python has it: it
    runs ``work`` in this task, where ``wait_for`` makes one more task and one more loop turn a request)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await work
    return await asyncio.wait_for(work, seconds)


class BrokenConnection(ConnectionError):
    """The connection failed, broke before the answer was complete, or what came back is not HTTP."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()

    @property
    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()


class Response:
    """An answer's status and headers (names in lower case), its body read once: whole (:meth:`read`) or as text
    lines as they arrive (:meth:`lines`)."""

    def __init__(self, pool: Pool, conn: _Connection, status: int, headers: dict[str, str], keep_alive: bool):
        self.status, self.headers = status, headers
        self._pool, self._conn, self._keep = pool, conn, keep_alive
        self._done = False
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length: int | None = None
        if status in (204, 304) or 100 <= status < 200:
            self._length = 0
        elif not chunked and length is not None:
            if not length.strip().isdigit():
                raise BrokenConnection(f"an invalid Content-Length: {length!r}")
            self._length = int(length)
        self._chunked = chunked and self._length != 0
        if not self._chunked and self._length is None:
            self._keep = False                       # the body ends where the connection does

    async def read(self) -> bytes:
        parts, size = [], 0
        async for data in self._body():
            size += len(data)
            if size > MAX_BODY:
                await self.aclose()
                raise BrokenConnection(f"an answer over {MAX_BODY} bytes")
            parts.append(data)
        return b"".join(parts)

    async def lines(self) -> AsyncIterator[str]:
        """The body as text lines (without their line ends), each as soon as it is complete."""
        buf = b""
        async for data in self._body():
            buf += data
            while (i := buf.find(b"\n")) >= 0:
                line, buf = buf[:i], buf[i + 1:]
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Done with the answer: an unread rest closes the connection."""
        self._finish(reuse=False)

    def abort(self) -> None:
        """Cut the connection now (from a timer): a read in progress fails with BrokenConnection."""
        self._conn.close()

    async def _body(self) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        try:
            if self._chunked:
                while True:
                    line = await reader.readline()
                    size = line.split(b";")[0].strip()
                    if not line.endswith(b"\n") or not size or any(c not in b"0123456789abcdefABCDEF" for c in size):
                        raise BrokenConnection("a broken chunked body")
                    n = int(size, 16)
                    if n == 0:
                        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                            pass                     # trailers
                        break
                    data = await reader.readexactly(n)
                    await reader.readexactly(2)
                    yield data
            elif self._length is not None:
                left = self._length
                while left:
                    data = await reader.read(min(READ, left))
                    if not data:
                        raise BrokenConnection(f"the connection closed {left} bytes before the answer's end")
                    left -= len(data)
                    yield data
            else:
                while data := await reader.read(READ):
                    yield data
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as e:
            self._finish(reuse=False)
            if isinstance(e, BrokenConnection):
                raise
            raise BrokenConnection(f"the connection broke mid-answer ({type(e).__name__})") from None
        except BaseException:                        # cancelled, or the reader stopped early: not reusable
            self._finish(reuse=False)
            raise
        self._finish(reuse=True)

    def _finish(self, reuse: bool) -> None:
        if not self._done:
            self._done = True
            self._pool.release(self._conn, reuse and self._keep)


class Pool:
    """Keep-alive connections to one upstream (``url``: scheme, host, port and the path requests are under)."""

    def __init__(self, url: str, max_connections: int, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        netloc = self.host if default_port else f"{self.host}:{self.port}"
        self._head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": netloc, "User-Agent": "cai-gateway",
                                                            **(headers or {})}.items())
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def request(self, method: str, path: str, body: bytes = b"", accept: str = "application/json") -> Response:
        """Send a request (``path`` under the pool's) and read the answer's head; the body is the Response's."""
        head = (f"{method} {self.path}{path} HTTP/1.1\r\n{self._head}Accept: {accept}\r\n"
                + (f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if method == "POST" else "")
                + "\r\n").encode() + body
        await self._slots.acquire()
        conn: _Connection | None = None
        try:
            conn, reused = await self._connection()
            try:
                return await self._exchange(conn, head)
            except BrokenConnection:
                if not reused:
                    raise
            conn.close()
            conn = None
            conn = await self._open()                # an idle connection the upstream had closed: once more
            return await self._exchange(conn, head)
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise

    def release(self, conn: _Connection, reuse: bool) -> None:
        if reuse and conn.usable:
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn, True
            conn.close()
        return await self._open(), False

    async def _open(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=MAX_LINE,
                                                           server_hostname=self.host if self._ssl else None)
        except (OSError, ssl.SSLError) as e:
            raise BrokenConnection(f"cannot connect ({type(e).__name__}: {e})") from None
        return _Connection(reader, writer)

    async def _exchange(self, conn: _Connection, head: bytes) -> Response:
        try:
            conn.writer.write(head)
            await conn.writer.drain()
            while True:
                status_line = await conn.reader.readline()
                if not status_line:
                    raise BrokenConnection("the connection closed before the answer")
                version, _, rest = status_line.decode("latin-1").rstrip("\r\n").partition(" ")
                code = rest[:3]
                if not version.startswith("HTTP/") or not code.isdigit():
                    raise BrokenConnection(f"not an HTTP answer: {status_line[:80]!r}")
                headers: dict[str, str] = {}
                while (line := await conn.reader.readline()) not in (b"\r\n", b"\n"):
                    if not line:
                        raise BrokenConnection("the connection closed mid-headers")
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                if code != "100":                    # an interim answer; the real one follows
                    break
        except (ConnectionError, OSError, ValueError, asyncio.LimitOverrunError) as e:
            if isinstance(e, BrokenConnection):
                raise
            raise BrokenConnection(f"the connection broke ({type(e).__name__})") from None
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return Response(self, conn, int(code), headers, keep)
