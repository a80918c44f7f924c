"""Generation throughput of the openai backend with 1 vs 2 vs 4 endpoints (target: >= 1.8x and >= 3.5x of one).

Each endpoint is a fault-free test server (``tests/fixtures/fault_server.py``) in its own process, so the servers do
not compete with the client for the GIL. A server answers every request after a fixed ``--delay`` and works on at most
``--slots`` requests at once; the others queue, as on a real server of fixed capacity. One endpoint can therefore
serve at most ``slots / delay`` requests per second, whatever the client sends.

The same prompts (the first ``--prompts`` of ``data/prompts/red_team.jsonl``, the default constitution) go through
``run_generate`` (respond, then critique and revise per round: ``1 + 2 * rounds`` requests a prompt) into a fresh
temporary run folder for each arm, with the client's concurrency (and records in flight, ``--batch-size``: the CLI's
default for this backend) far above the endpoints' total slots, so the endpoints, not the client, are the limit. The
arms run side by side in one process, interleaved over ``--repeats``; the best of each is reported. Prints per arm:
requests/s and records/s, the endpoints' capacity (``endpoints * slots / delay`` requests/s) and the share of it
reached, the floor (the shortest time the endpoints allow: :func:`floor_seconds`) and the share of it reached; then
the ratios 2/1 and 4/1.

    .venv/bin/python bench/scale.py          # 96 prompts, 1 round, delay 0.2 s, 4 slots an endpoint, concurrency 64
    .venv/bin/python bench/scale.py --prompts 192 --delay 0.1 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.backends import make_backend  # noqa: E402
from cai.backends.base import Sampling  # noqa: E402
from cai.core.constitution import load_constitution  # noqa: E402
from cai.core.prompt_files import load_prompts  # noqa: E402
from cai.generate.runner import run_generate  # noqa: E402

ARMS = (1, 2, 4)


def start_servers(n: int, delay: float, slots: int) -> list[tuple[subprocess.Popen, str]]:
    """``n`` fault servers, each in its own process; each prints its URL and serves until its stdin closes."""
    servers = []
    for _ in range(n):
        server = str(ROOT / "tests" / "fixtures" / "fault_server.py")
        proc = subprocess.Popen([sys.executable, server, "--delay", str(delay), "--slots", str(slots)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        servers.append((proc, proc.stdout.readline().strip()))
    return servers


def stop_servers(servers) -> None:
    for proc, _ in servers:
        proc.stdin.close()
    for proc, _ in servers:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def floor_seconds(n_prompts: int, stages: int, capacity: int, delay: float) -> float:
    """The shortest time a run can take: the backend's very first request goes alone (one delay), then every slot
    of every endpoint busy all the time (each record moves to its next stage as soon as its answer is back)."""
    return (1 + math.ceil((n_prompts * stages - 1) / capacity)) * delay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--delay", type=float, default=0.2, help="seconds a server takes per answer (default: 0.2)")
    ap.add_argument("--slots", type=int, default=4, help="answers a server works on at once (default: 4)")
    ap.add_argument("--concurrency", type=int, default=64, help="client requests in flight (default: 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="records in flight (default: --concurrency)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each arm, interleaved; the best counts")
    args = ap.parse_args()
    batch_size = args.batch_size or args.concurrency
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    constitution = load_constitution(ROOT / "constitution/default.yaml")
    items = load_prompts(ROOT / "data/prompts/red_team.jsonl").items[: args.prompts]
    if len(items) < args.prompts:
        sys.exit(f"only {len(items)} prompts in data/prompts/red_team.jsonl")
    sampling = Sampling(max_new_tokens=64, seed=0)
    stages = 1 + 2 * args.rounds

    servers = start_servers(max(ARMS), args.delay, args.slots)
    urls = [u for _, u in servers]
    try:
        def arm(n: int, prompts=items) -> tuple[float, int, int, list[int]]:
            backend = make_backend("openai", "bench-model", base_urls=urls[:n], concurrency=args.concurrency,
                                   max_retries=2)
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                s = run_generate(constitution=constitution, items=prompts, backend=backend, out=out,
                                 rounds=args.rounds, sampling=sampling, batch_size=batch_size)
                seconds = time.perf_counter() - t0
            if s.failed:
                sys.exit(f"{s.failed} requests failed with {n} endpoint(s): the figures would be meaningless")
            return seconds, sum(e.served for e in backend.endpoints), s.written, [e.served for e in backend.endpoints]

        arm(max(ARMS), items[:8])     # warm-up: imports, first connections; not timed
        results: dict[int, tuple[float, int, int, list[int]]] = {}
        for _ in range(args.repeats):
            for n in ARMS:
                r = arm(n)
                if n not in results or r[0] < results[n][0]:
                    results[n] = r
    finally:
        stop_servers(servers)

    print(f"openai backend, {len(items)} prompts, {args.rounds} round(s) ({stages} requests a prompt), client "
          f"concurrency {args.concurrency}, {batch_size} records in flight; each endpoint a fault_server process "
          f"answering after "
          f"{args.delay:g}s, {args.slots} at a time ({args.slots / args.delay:g} req/s capacity); best of "
          f"{args.repeats}")
    print(f"{'endpoints':>9} {'requests':>8} {'seconds':>8} {'req/s':>7} {'rec/s':>7} {'capacity':>8} "
          f"{'of cap.':>7} {'floor s':>7} {'of floor':>8}  served per endpoint")
    rate = {}
    for n in ARMS:
        seconds, requests, written, served = results[n]
        rate[n] = requests / seconds
        capacity = n * args.slots / args.delay
        floor = floor_seconds(len(items), stages, n * args.slots, args.delay)
        print(f"{n:9d} {requests:8d} {seconds:8.2f} {rate[n]:7.1f} {written / seconds:7.1f} {capacity:8.1f} "
              f"{rate[n] / capacity:7.0%} {floor:7.2f} {floor / seconds:8.0%}  {' '.join(map(str, served))}")
    print(f"2 endpoints / 1 = {rate[2] / rate[1]:.2f}  (target >= 1.8)")
    print(f"4 endpoints / 1 = {rate[4] / rate[1]:.2f}  (target >= 3.5)")


if __name__ == "__main__":
    main()
