"""The one-row decode step of the serving engine: eager vs compiled (``--compile``) vs 4-bit weights
(``--quantize int4``), side by side in one process, on the default model.

Every arm is a :class:`server.engine.Engine` of its own over the same model, loaded once each; the arms take turns
(round after round, every arm once a round), so that the machine's drift falls on all of them alike. In each turn an
arm answers the same prompt twice, greedy and alone: once for 1 token, once for ``--tokens``; the difference of the
two, over ``--tokens - 1``, is its decode step (a one-row step, what a single client waits on per token: the prefill
and the request's overhead cancel out). The median over the rounds is printed, with each arm's ratio to the first
arm, and whether its tokens equal the first arm's of the same dtype.

    .venv/bin/python bench/decode.py                           # bf16 eager / compiled / int4 / int4 compiled
    .venv/bin/python bench/decode.py --arms bf16 bf16+compile fp32 fp32+compile --rounds 5

Compiling takes ~45 s per compiled arm the first time on the 2-core CPU (Inductor's cache makes later runs quicker).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.engine import Engine, GenParams  # noqa: E402

ARMS = {   # name -> Engine arguments
    "bf16": {"dtype": "bfloat16"},
    "bf16+compile": {"dtype": "bfloat16", "compile": True},
    "int4": {"dtype": "bfloat16", "quantize": "int4"},
    "int4+compile": {"dtype": "bfloat16", "quantize": "int4", "compile": True},
    "fp32": {"dtype": "float32"},
    "fp32+compile": {"dtype": "float32", "compile": True},
}
PROMPT = [{"role": "user", "content": "Tell me about the history of Rome in a few paragraphs."}]


def answer(engine: Engine, tokens: int) -> tuple[float, str]:
    """(seconds, text) of a greedy answer of exactly ``tokens`` tokens."""
    t0 = time.perf_counter()
    done = engine.submit("base", PROMPT, GenParams(max_tokens=tokens, temperature=0.0)).result(600)
    seconds = time.perf_counter() - t0
    if done.completion_tokens != tokens:
        raise RuntimeError(f"asked for {tokens} tokens, got {done.completion_tokens} ({done.finish_reason})")
    return seconds, done.text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=["bf16", "bf16+compile", "int4", "int4+compile"], choices=list(ARMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="tokens of the long answer (default: %(default)s)")
    args = ap.parse_args()
    import torch

    print(f"default model, CPU, torch {torch.__version__}, threads {torch.get_num_threads()}, one row, greedy, "
          f"{args.tokens} tokens, {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}", flush=True)
    engines: dict[str, Engine] = {}
    for arm in args.arms:
        t0 = time.perf_counter()
        engines[arm] = Engine("default", device="cpu", max_batch=16, **ARMS[arm])
        engines[arm].start()
        answer(engines[arm], 2)                       # warm: the first request of an engine pays for allocations
        print(f"[{arm}] ready in {time.perf_counter() - t0:.1f}s (compiled: {engines[arm].compiled or 'no'})",
              flush=True)
    steps: dict[str, list[float]] = {arm: [] for arm in args.arms}
    texts: dict[str, str] = {}
    try:
        for r in range(args.rounds):
            for arm, engine in engines.items():
                short, _ = answer(engine, 1)
                long, texts[arm] = answer(engine, args.tokens)
                steps[arm].append((long - short) / (args.tokens - 1))
            print(f"round {r + 1}: " + "  ".join(f"{a} {s[-1] * 1000:.1f} ms" for a, s in steps.items()), flush=True)
    finally:
        for engine in engines.values():
            engine.drain(timeout=10)
    first = args.arms[0]
    print()
    print(f"{'arm':<16}{'step ms':>9}{'tok/s':>8}{'vs ' + first:>12}  tokens")
    for arm in args.arms:
        ms = statistics.median(steps[arm]) * 1000
        same = next((a for a in args.arms if ARMS[a]["dtype"] == ARMS[arm]["dtype"] and "quantize" not in ARMS[a]),
                    None)
        note = ("(reference)" if same == arm else f"= {same}'s" if same and texts[same] == texts[arm]
                else f"differ from {same}'s" if same else "")
        ratio = statistics.median(steps[first]) / statistics.median(steps[arm])
        print(f"{arm:<16}{ms:>9.1f}{1000 / ms:>8.1f}{ratio:>11.2f}x  {note}")
    for arm in args.arms:
        if arm != first:
            ratio = statistics.median(steps[first]) / statistics.median(steps[arm])
            print(f"one-row decode step, {first} / {arm} = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
