"""Gateway mode (``cai serve --upstream``): its overhead per request against calling the upstream directly (target:
at most 5% of the upstream's latency at 16 clients), and its throughput with 1 vs 2 upstreams (target: >= 1.8x).

Every upstream is a fault-free test server (``tests/fixtures/fault_server.py``) in its own process, answering after a
fixed ``--delay``; every gateway is a real ``cai serve --upstream ...`` process (no API key, on 127.0.0.1); the
clients are asyncio tasks of this process, each sending its requests one after the other over kept-alive
connections, through the gateway's own HTTP client (``server/gateway/http.py``) whatever the arm: httpx's pool, at
16 to 32 requests at once, adds tails of seconds of its own on this machine (against a bare uvicorn app that answers
after 0.2 s, 32 clients: p95 3.4 s through httpx, 0.27 s through this client).

Overhead: ``--clients`` clients send chat completions (plain, then streamed: the fault server sends a chunk a word,
``--stream-delay`` apart, as an engine sends tokens as it decodes them) to one upstream that answers every request at
once after ``--delay`` (no slot limit, so its latency does not depend on the load), directly and through a gateway
over it, and through a bare TCP relay over it (an asyncio process that copies bytes both ways and nothing else: what
any single event loop in between costs on this machine). The three arms alternate, ``--repeats`` times each; each
arm's latencies are pooled. Printed: mean, p50 and p95 latency of each, the overhead (gateway minus direct) as a
share of the direct latency, and the gateway process's CPU time per request (read from /proc: what the overhead
comes to on an idle machine, whatever else the machine is doing).

Throughput: ``--clients`` x 2 clients send plain completions for ``--seconds`` through a gateway over 1 and over 2
upstreams that work on at most ``--slots`` answers at once (``slots / delay`` requests/s each), and, for reference,
straight to the 2 upstreams (half the clients each): the arms alternate ``--repeats`` times and the best of each
counts. Printed: requests/s, the share of the upstreams' capacity, each upstream's share of the requests through
the gateway, and the ratio 2/1. The load average of the machine when the run began comes first: on a machine other
work keeps busy the gateway's event loop waits for the CPU at every turn, and the figures say so.

    .venv/bin/python bench/gateway.py                 # delay 0.2 s, chunks 0.02 s apart, 16 clients, 4 slots (~3 min)
    .venv/bin/python bench/gateway.py --delay 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.gateway.http import Pool  # noqa: E402

MODEL = "bench-model"
HELLO = [{"role": "user", "content": "Write one short sentence about the sea."}]


def start_upstream(delay: float, slots: int | None, stream_delay: float = 0.0) -> tuple[subprocess.Popen, str]:
    """A fault server in its own process; it prints its URL and serves until its stdin closes."""
    cmd = [sys.executable, str(ROOT / "tests" / "fixtures" / "fault_server.py"), "--delay", str(delay),
           "--stream-delay", str(stream_delay)]
    if slots:
        cmd += ["--slots", str(slots)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()          # type: ignore[union-attr]


def start_gateway(urls: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cai.cli", "serve", "--port", str(port), "--upstream-model", MODEL,
           "--upstream-concurrency", "256", "--queue-size", "256", *[a for u in urls for a in ("--upstream", u)]]
    env = {**os.environ, "CAI_API_KEYS": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the gateway over {urls} did not start")


async def relay(port: int, upstream: str) -> None:
    """A bare TCP relay on 127.0.0.1:port to the upstream's host and port: bytes copied both ways."""
    from urllib.parse import urlsplit

    target = urlsplit(upstream)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def start_relay(upstream: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--relay", str(port), upstream])
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}/v1"
        time.sleep(0.1)
    proc.kill()
    sys.exit("the relay did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()                           # a fault server ends when its stdin closes
        else:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one(pool: Pool, stream: bool) -> float:
    """Seconds for one chat completion, to its last byte."""
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 32, "stream": stream}).encode()
    t0 = time.perf_counter()
    r = await pool.request("POST", "/chat/completions", body, accept="text/event-stream" if stream else "*/*")
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
    if stream:
        async for _line in r.lines():                   # to the body's end (after "data: [DONE]"): reused then
            pass
    else:
        await r.read()
    return time.perf_counter() - t0


async def latencies(url: str, clients: int, per_client: int, stream: bool) -> list[float]:
    pool = Pool(url, clients)
    try:
        await asyncio.gather(*(one(pool, stream) for _ in range(clients)))        # warm the connections
        out: list[float] = []

        async def worker() -> None:
            for _ in range(per_client):
                out.append(await one(pool, stream))

        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        pool.close()
    return out


async def throughput(urls: list[str], clients: int, seconds: float) -> float:
    """Requests/s of ``clients`` clients for ``seconds``, client i sending to ``urls[i % len(urls)]``."""
    pools = [Pool(url, clients) for url in urls]
    try:
        await asyncio.gather(*(one(pools[i % len(pools)], False) for i in range(clients)))
        done = 0
        t0 = time.perf_counter()
        end = t0 + seconds

        async def worker(pool: Pool) -> None:
            nonlocal done
            while time.perf_counter() < end:
                await one(pool, False)
                done += 1

        await asyncio.gather(*(worker(pools[i % len(pools)]) for i in range(clients)))
        return done / (time.perf_counter() - t0)
    finally:
        for pool in pools:
            pool.close()


def summary(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    return statistics.fmean(xs), xs[len(xs) // 2], xs[int(len(xs) * 0.95)]


def served(gateway_url: str) -> list[int]:
    health = httpx.get(gateway_url.removesuffix("/v1") + "/health", timeout=5).json()
    return [u["served"] for u in health["upstreams"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.2, help="seconds an upstream takes per answer (default: 0.2)")
    ap.add_argument("--stream-delay", type=float, default=0.02, help="seconds between a stream's chunks (default: "
                                                                    "0.02, 50 tokens/s)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    ap.add_argument("--requests", type=int, default=10, help="requests per client per repeat (default: 10)")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the arms (default: 3)")
    ap.add_argument("--slots", type=int, default=4, help="answers an upstream works on at once, throughput arms")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each throughput arm (default: 8)")
    ap.add_argument("--relay", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay:
        asyncio.run(relay(int(args.relay[0]), args.relay[1]))
        return
    load = os.getloadavg()

    procs: list[subprocess.Popen] = []
    try:
        free, free_url = start_upstream(args.delay, None, args.stream_delay)
        a, a_url = start_upstream(args.delay, args.slots)
        b, b_url = start_upstream(args.delay, args.slots)
        procs += [free, a, b]
        r0, over_relay = start_relay(free_url)
        procs.append(r0)
        g0, over_free = start_gateway([free_url])
        g1, over_one = start_gateway([a_url])
        g2, over_two = start_gateway([a_url, b_url])
        procs += [g0, g1, g2]

        pooled: dict[tuple[str, bool], list[float]] = {}
        cpu: dict[bool, float] = {False: 0.0, True: 0.0}     # the gateway's CPU seconds over its arms
        for stream in (False, True):
            for _ in range(args.repeats):
                for arm, url in (("direct", free_url), ("relay", over_relay), ("gateway", over_free)):
                    before = cpu_seconds(g0.pid)
                    pooled.setdefault((arm, stream), []).extend(
                        asyncio.run(latencies(url, args.clients, args.requests, stream)))
                    if arm == "gateway":
                        cpu[stream] += cpu_seconds(g0.pid) - before
        rates: dict[str, float] = {}
        for _ in range(args.repeats):
            for arm, urls in (("1", [over_one]), ("2", [over_two]), ("direct", [a_url, b_url])):
                rate = asyncio.run(throughput(urls, 2 * args.clients, args.seconds))
                rates[arm] = max(rates.get(arm, 0.0), rate)
        shares = served(over_two)
        rate1, rate2 = rates["1"], rates["2"]
    finally:
        stop(procs)

    n = args.clients * args.requests * args.repeats
    print(f"load average when the run began: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) on {os.cpu_count()} CPUs")
    print(f"gateway overhead: {args.clients} clients, {n} requests an arm (alternating, {args.repeats} repeats); "
          f"upstream: a fault_server process answering after {args.delay:g}s (a stream's chunks "
          f"{args.stream_delay:g}s apart), no slot limit")
    print(f"{'request':>8} {'arm':>8} {'mean ms':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for stream in (False, True):
        for arm in ("direct", "relay", "gateway"):
            mean, p50, p95 = summary(pooled[(arm, stream)])
            print(f"{'stream' if stream else 'plain':>8} {arm:>8} {mean * 1e3:8.1f} {p50 * 1e3:8.1f} {p95 * 1e3:8.1f}")
    for stream in (False, True):
        direct, through = summary(pooled[("direct", stream)]), summary(pooled[("gateway", stream)])
        bare = summary(pooled[("relay", stream)])
        print(f"{'stream' if stream else 'plain'}: gateway overhead / upstream latency = "
              f"{(through[0] - direct[0]) / direct[0]:.3f}  (target <= 0.05); {(through[0] - direct[0]) * 1e3:.1f} ms "
              f"(gateway / direct: {through[0] / direct[0]:.3f} mean, {through[1] / direct[1]:.3f} p50); gateway CPU "
              f"{cpu[stream] / (n + args.clients * args.repeats) * 1e3:.2f} ms a request = "
              f"{cpu[stream] / (n + args.clients * args.repeats) / direct[0]:.1%} of the latency; a bare relay adds "
              f"{(bare[0] - direct[0]) * 1e3:.1f} ms = {(bare[0] - direct[0]) / direct[0]:.1%}")
    capacity = args.slots / args.delay
    print(f"throughput: {2 * args.clients} clients for {args.seconds:g}s an arm, best of {args.repeats}; each upstream "
          f"answers after {args.delay:g}s, {args.slots} at a time ({capacity:g} req/s capacity)")
    print(f"1 upstream : {rate1:7.1f} req/s ({rate1 / capacity:.0%} of capacity)")
    print(f"2 upstreams: {rate2:7.1f} req/s ({rate2 / (2 * capacity):.0%} of capacity; requests per upstream "
          f"{' / '.join(map(str, shares))})")
    print(f"2 upstreams, straight to them (no gateway): {rates['direct']:7.1f} req/s "
          f"({rates['direct'] / (2 * capacity):.0%} of capacity)")
    print(f"2 upstreams / 1 = {rate2 / rate1:.2f}  (target >= 1.8); through the gateway / straight, 2 upstreams = "
          f"{rate2 / rates['direct']:.2f}")


if __name__ == "__main__":
    main()
