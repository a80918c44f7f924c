"""Gateway mode (``cai serve --upstream``): its overhead per request against calling the upstream directly (target:
at most 5% of the upstream's latency at 16 clients), and its throughput with 1 vs 2 upstreams (target: >= 1.8x).

Every upstream is a fault-free test server (``tests/fixtures/fault_server.py``) in its own process, answering after a
fixed ``--delay``; every gateway is a real ``cai serve --upstream ...`` process (no API key, on 127.0.0.1); the
clients are asyncio tasks of this process, each sending its requests one after the other over kept-alive
connections.

Overhead: ``--clients`` clients send chat completions (plain, then streamed: the fault server sends a chunk a word)
to one upstream that answers every request at once after ``--delay`` (no slot limit, so its latency does not depend
on the load), directly and through a gateway over it. The two arms alternate, ``--repeats`` times each; each arm's
latencies are pooled. Printed: mean, p50 and p95 latency of each, and the overhead (gateway minus direct) as a share
of the direct latency.

Throughput: ``--clients`` x 2 clients send plain completions for ``--seconds`` through a gateway over 1 and over 2
upstreams that work on at most ``--slots`` answers at once (``slots / delay`` requests/s each), and, for reference,
straight to the 2 upstreams (half the clients each): the arms alternate ``--repeats`` times and the best of each
counts. Printed: requests/s, the share of the upstreams' capacity, each upstream's share of the requests through
the gateway, and the ratio 2/1. The load average of the machine when the run began comes first: on a machine other
work keeps busy the gateway's event loop waits for the CPU at every turn, and the figures say so.

    .venv/bin/python bench/gateway.py                 # delay 0.1 s, 16 clients, 4 slots, ~1 min
    .venv/bin/python bench/gateway.py --delay 0.2 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-model"
HELLO = [{"role": "user", "content": "Write one short sentence about the sea."}]


def start_upstream(delay: float, slots: int | None) -> tuple[subprocess.Popen, str]:
    """A fault server in its own process; it prints its URL and serves until its stdin closes."""
    cmd = [sys.executable, str(ROOT / "tests" / "fixtures" / "fault_server.py"), "--delay", str(delay)]
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


async def one(client: httpx.AsyncClient, url: str, stream: bool) -> float:
    """Seconds for one chat completion, to its last byte."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 32, "stream": stream}
    t0 = time.perf_counter()
    if stream:
        async with client.stream("POST", url + "/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    break
    else:
        r = await client.post(url + "/chat/completions", json=body)
        r.raise_for_status()
    return time.perf_counter() - t0


async def latencies(url: str, clients: int, per_client: int, stream: bool) -> list[float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(one(client, url, stream) for _ in range(clients)))        # warm the connections
        out: list[float] = []

        async def worker() -> None:
            for _ in range(per_client):
                out.append(await one(client, url, stream))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return out


async def throughput(urls: list[str], clients: int, seconds: float) -> float:
    """Requests/s of ``clients`` clients for ``seconds``, client i sending to ``urls[i % len(urls)]``."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(one(client, urls[i % len(urls)], False) for i in range(clients)))
        done = 0
        t0 = time.perf_counter()
        end = t0 + seconds

        async def worker(url: str) -> None:
            nonlocal done
            while time.perf_counter() < end:
                await one(client, url, False)
                done += 1

        await asyncio.gather(*(worker(urls[i % len(urls)]) for i in range(clients)))
        return done / (time.perf_counter() - t0)


def summary(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    return statistics.fmean(xs), xs[len(xs) // 2], xs[int(len(xs) * 0.95)]


def served(gateway_url: str) -> list[int]:
    health = httpx.get(gateway_url.removesuffix("/v1") + "/health", timeout=5).json()
    return [u["served"] for u in health["upstreams"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.1, help="seconds an upstream takes per answer (default: 0.1)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    ap.add_argument("--requests", type=int, default=10, help="requests per client per repeat (default: 10)")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the arms (default: 3)")
    ap.add_argument("--slots", type=int, default=4, help="answers an upstream works on at once, throughput arms")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each throughput arm (default: 8)")
    args = ap.parse_args()
    load = os.getloadavg()

    procs: list[subprocess.Popen] = []
    try:
        free, free_url = start_upstream(args.delay, None)
        a, a_url = start_upstream(args.delay, args.slots)
        b, b_url = start_upstream(args.delay, args.slots)
        procs += [free, a, b]
        g0, over_free = start_gateway([free_url])
        g1, over_one = start_gateway([a_url])
        g2, over_two = start_gateway([a_url, b_url])
        procs += [g0, g1, g2]

        pooled: dict[tuple[str, bool], list[float]] = {}
        for stream in (False, True):
            for _ in range(args.repeats):
                for arm, url in (("direct", free_url), ("gateway", over_free)):
                    pooled.setdefault((arm, stream), []).extend(
                        asyncio.run(latencies(url, args.clients, args.requests, stream)))
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
          f"upstream: a fault_server process answering after {args.delay:g}s, no slot limit")
    print(f"{'request':>8} {'arm':>8} {'mean ms':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for stream in (False, True):
        for arm in ("direct", "gateway"):
            mean, p50, p95 = summary(pooled[(arm, stream)])
            print(f"{'stream' if stream else 'plain':>8} {arm:>8} {mean * 1e3:8.1f} {p50 * 1e3:8.1f} {p95 * 1e3:8.1f}")
    for stream in (False, True):
        direct, through = summary(pooled[("direct", stream)]), summary(pooled[("gateway", stream)])
        print(f"{'stream' if stream else 'plain'}: gateway / direct = {through[0] / direct[0]:.3f} (mean), "
              f"{through[1] / direct[1]:.3f} (p50); overhead {(through[0] - direct[0]) * 1e3:.1f} ms = "
              f"{(through[0] - direct[0]) / direct[0]:.1%} of the upstream's latency (target <= 5%)")
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
