"""The decode step of the serving engine, at one row and at many: eager vs compiled (``--compile``) vs 4-bit weights
(``--quantize int4``), side by side in one process, on the default model.

Every arm is a :class:`server.engine.Engine` of its own over the same model, loaded once each; the arms take turns
(round after round, every arm once a round), so that the machine's drift falls on all of them alike. In each turn an
arm answers ``--rows`` prompts at once, greedy, twice: once for 1 token each, once for ``--tokens``; the difference of
the two, over ``--tokens - 1``, is its decode step at that many rows (one row: what a single client waits on per
token; the prefill and the requests' overhead cancel out). The median over the rounds is printed, with each arm's
ratio to the first arm, and whether its first answer equals that of the arm of the same dtype without 4-bit weights.

    .venv/bin/python bench/decode.py          # bf16 eager / compiled / int4 / int4 compiled, at 1 and 16 rows
    .venv/bin/python bench/decode.py --arms bf16 bf16+compile fp32 fp32+compile --rounds 5
    .venv/bin/python bench/decode.py --device cuda --arms bf16 bf16+compile    # on a GPU

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
    "bf16-unpacked": {"dtype": "bfloat16", "prepack": False},   # F.linear on the plain weights (before prepacking)
    "bf16": {"dtype": "bfloat16"},
    "bf16+compile": {"dtype": "bfloat16", "compile": True},
    "int4": {"dtype": "bfloat16", "quantize": "int4"},
    "int4+compile": {"dtype": "bfloat16", "quantize": "int4", "compile": True},
    "bf16+max": {"dtype": "bfloat16", "compile": "max-autotune"},
    "int4+max": {"dtype": "bfloat16", "quantize": "int4", "compile": "max-autotune"},
    "fp32": {"dtype": "float32"},
    "fp32+compile": {"dtype": "float32", "compile": True},
}
PROMPTS = ["Tell me about the history of Rome in a few paragraphs.", "Explain how a bicycle stays upright.",
           "Write a short story about a lighthouse keeper.", "Describe the water cycle for a ten-year-old."]


def answer(engine: Engine, tokens: int, rows: int = 1) -> tuple[float, str]:
    """(seconds, first text) of ``rows`` greedy answers of exactly ``tokens`` tokens each, submitted at once (they
    prefill together and decode together)."""
    t0 = time.perf_counter()
    handles = [engine.submit("base", [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                             GenParams(max_tokens=tokens, temperature=0.0)) for i in range(rows)]
    done = [h.result(600) for h in handles]
    seconds = time.perf_counter() - t0
    if any(d.completion_tokens != tokens for d in done):
        raise RuntimeError(f"asked for {tokens} tokens, got {[d.completion_tokens for d in done]}")
    return seconds, done[0].text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=["bf16", "bf16+compile", "int4", "int4+compile"], choices=list(ARMS))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 16], help="rows decoding together (default: 1 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="tokens of the long answers (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="torch device (cuda: the int4 arms are CPU-only)")
    args = ap.parse_args()
    import torch

    print(f"default model, {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, greedy, "
          f"{args.tokens} tokens, rows {args.rows}, {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    engines: dict[str, Engine] = {}
    try:
        for arm in args.arms:
            t0 = time.perf_counter()
            engines[arm] = Engine("default", device=args.device, max_batch=max(16, *args.rows), **ARMS[arm])
            engines[arm].start()
            answer(engines[arm], 2)                   # warm: the first request of an engine pays for allocations
            print(f"[{arm}] ready in {time.perf_counter() - t0:.1f}s (compiled: {engines[arm].compiled or 'no'})",
                  flush=True)
        steps: dict[tuple[str, int], list[float]] = {(a, n): [] for a in args.arms for n in args.rows}
        texts: dict[tuple[str, int], str] = {}
        for r in range(args.rounds):
            for n in args.rows:
                for arm, engine in engines.items():
                    short, _ = answer(engine, 1, n)
                    long, texts[arm, n] = answer(engine, args.tokens, n)
                    steps[arm, n].append((long - short) / (args.tokens - 1))
                print(f"round {r + 1}, {n} rows: " + "  ".join(f"{a} {steps[a, n][-1] * 1000:.1f} ms"
                                                             for a in args.arms), flush=True)
    finally:
        for engine in engines.values():
            engine.drain(timeout=10)
    first = args.arms[0]
    print()
    print(f"{'arm':<16}{'rows':>5}{'step ms':>9}{'tok/s':>8}{'vs ' + first:>12}  tokens")
    for n in args.rows:
        for arm in args.arms:
            ms = statistics.median(steps[arm, n]) * 1000
            same = next((a for a in args.arms if ARMS[a]["dtype"] == ARMS[arm]["dtype"]
                         and "quantize" not in ARMS[a]), None)
            note = ("(reference)" if same == arm else f"= {same}'s" if same and texts[same, n] == texts[arm, n]
                    else f"differ from {same}'s" if same else "")
            ratio = statistics.median(steps[first, n]) / statistics.median(steps[arm, n])
            print(f"{arm:<16}{n:>5}{ms:>9.1f}{n * 1000 / ms:>8.1f}{ratio:>11.2f}x  {note}")
    for n in args.rows:
        for arm in args.arms[1:]:
            ratio = statistics.median(steps[first, n]) / statistics.median(steps[arm, n])
            print(f"decode step of {n} row(s), {first} / {arm} = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
