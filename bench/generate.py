"""Generation throughput on the default model: the pipeline vs raw batched ``model.generate`` vs one prompt at a time.

All three run in this one process, on exactly the same conversations with the same generated lengths: the pipeline
runs first (greedy, so every path decodes the same tokens) and records every batch it sends to the backend; the raw
baselines then replay those batches, batched as the pipeline batched them and one by one. Prints tokens/s for each and
the ratios. Absolute figures depend on the machine's load; the ratios, measured side by side, are what to compare.
Every other arm runs between two runs of the pipeline (one prompt at a time in one part per backend call, each
between two), and its "paired" ratio divides each part by the mean of the pipeline runs just before and after it, so
a machine that slows down or speeds up during the run (this VM drifts by half within minutes) does not move the ratios
the way it moves timings taken far apart. The "totals" ratios, against the mean of all pipeline runs, are printed too.

    .venv/bin/python bench/generate.py                  # 16 prompts, batch 16, 1 round, 128 new tokens per stage
    .venv/bin/python bench/generate.py --batch-size 8 --max-new-tokens 48
    .venv/bin/python bench/generate.py --dtype bfloat16    # the model in bf16 (every arm alike)

Pipeline arms: as shipped (the prefix cache, the revise stage continuing the critique's cache, and our decode loop,
where rows leave the batch as they end); with transformers' ``generate`` loop instead (every row to the end); without
the continuation (each call prefilled from the prefix cache alone); without the prefix cache (nor the continuation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.backends.base import Sampling  # noqa: E402
from cai.backends.local import LocalBackend  # noqa: E402
from cai.core.constitution import load_constitution  # noqa: E402
from cai.core.prompt_files import load_prompts  # noqa: E402
from cai.generate.runner import run_generate  # noqa: E402


class Recording(LocalBackend):
    """The local backend, remembering every batch it was asked to complete."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches: list[list] = []
        self.seconds: list[float] = []

    def generate(self, batch, sampling, seed):
        self.batches.append(batch)
        t0 = time.perf_counter()
        out = super().generate(batch, sampling, seed)
        self.seconds.append(time.perf_counter() - t0)
        return out


def raw_generate(backend: LocalBackend, batch, max_new_tokens: int) -> int:
    """Plain transformers: tokenizer padding + one model.generate call. Returns generated tokens (up to EOS)."""
    tok = backend.tokenizer
    enc = tok([backend.render(m) for m in batch], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = backend.lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=backend.eos_ids, pad_token_id=tok.pad_token_id)
    eos = set(backend.eos_ids)
    total = 0
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        total += len(row) if stop is None else stop + 1
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32, as cai generate")
    args = ap.parse_args()

    torch.manual_seed(0)
    backend = Recording("default", dtype=args.dtype)
    constitution = load_constitution(ROOT / "constitution/default.yaml")
    items = load_prompts(ROOT / "data/prompts/red_team.jsonl").items
    items = items[:: max(1, len(items) // args.prompts)][: args.prompts]   # spread over the categories
    sampling = Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens, seed=0)

    def pipeline(prefix_cache: bool, continuation: bool = True, own_loop: bool = True) -> tuple[float, int]:
        backend.own_loop = own_loop
        backend.prefix_cache = prefix_cache
        backend.continuation = continuation and prefix_cache
        backend._prefixes.clear()
        backend._kept = None
        backend.batches.clear()
        backend.seconds.clear()
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            s = run_generate(constitution=constitution, items=items, backend=backend, out=out, rounds=args.rounds,
                             sampling=sampling, batch_size=args.batch_size)
            return time.perf_counter() - t0, s.completion_tokens

    pipeline(True)   # warm-up: first-call allocations and thread pools, so no path pays them in its timing
    t_pipe, n_pipe = pipeline(True)
    batches = list(backend.batches)
    call_seconds = list(backend.seconds)
    pipe_runs = [t_pipe]

    def raw(batch_list: list) -> tuple[float, int]:
        t0 = time.perf_counter()
        n = sum(raw_generate(backend, b, args.max_new_tokens) for b in batch_list)
        return time.perf_counter() - t0, n

    # every other arm runs between two runs of the pipeline, and is compared with the mean of those two: this VM's
    # speed drifts by half within a run, so a ratio of timings taken minutes apart measures the drift as much as the
    # code. One prompt at a time runs in one part per backend call of the pipeline, each between two pipeline runs.
    parts: dict[str, list[tuple[float, int, float]]] = {}   # arm -> [(seconds, tokens, pipeline seconds around)]
    plan = [("pipeline, generate loop", lambda: pipeline(True, own_loop=False)),
            ("pipeline, no continuation", lambda: pipeline(True, continuation=False)),
            ("pipeline, no prefix cache", lambda: pipeline(False)),
            ("raw batched generate", lambda: raw(batches))]
    plan += [("one prompt at a time", lambda b=b: raw([[m] for m in b])) for b in batches]
    for arm, run in plan:
        t, n = run()
        t_after, _ = pipeline(True)
        parts.setdefault(arm, []).append((t, n, (pipe_runs[-1] + t_after) / 2))
        pipe_runs.append(t_after)
        print(f"  {arm}: {t:.1f} s, pipeline around it {pipe_runs[-2]:.1f} / {t_after:.1f} s", flush=True)

    t_pipe = sum(pipe_runs) / len(pipe_runs)
    arms = {"pipeline": (t_pipe, n_pipe)}
    arms.update({k: (sum(t for t, _, _ in v), sum(n for _, n, _ in v)) for k, v in parts.items()})
    # drift-corrected: each part's seconds in units of the pipeline's time around it
    paired = {k: sum(t / around for t, _, around in v) for k, v in parts.items()}
    rate = {k: n / t for k, (t, n) in arms.items()}
    times = {k: t for k, (t, _) in arms.items()}
    tokens = {k: n for k, (_, n) in arms.items()}
    print(f"default model ({backend.dtype}), {len(items)} prompts, batch {args.batch_size}, {args.rounds} round(s), "
          f"{args.max_new_tokens} new tokens max per stage, greedy; {len(batches)} backend calls; "
          f"torch threads {torch.get_num_threads()}")
    print("pipeline backend calls (s):", " ".join(f"{t:.1f}" for t in call_seconds))
    print(f"pipeline runs (s): {' '.join(f'{t:.1f}' for t in pipe_runs)}: the pipeline row is their mean")
    print(f"{'path':28} {'tokens':>7} {'seconds':>8} {'tok/s':>7}")
    for k in rate:
        print(f"{k:28} {tokens[k]:7d} {times[k]:8.1f} {rate[k]:7.1f}")
    print("ratios: 'paired' divides each arm by the pipeline runs just before and after it; 'totals' by the mean of "
          "all pipeline runs")

    def ratio(label: str, arm: str, note: str) -> None:
        per_token = tokens[arm] / n_pipe   # every arm decodes the same tokens; kept exact all the same
        print(f"pipeline / {label:19} = {paired[arm] / per_token:.2f} paired, {rate['pipeline'] / rate[arm]:.2f} "
              f"totals  {note}")

    ratio("one at a time", "one prompt at a time", "(target >= 5)")
    ratio("raw batched", "raw batched generate", "(target >= 0.9)")
    ratio("no continuation", "pipeline, no continuation", "(the revise stage continuing the critique's cache)")
    ratio("generate loop", "pipeline, generate loop", "(rows leaving the batch as they end)")
    ratio("no prefix cache", "pipeline, no prefix cache", "(the prefix cache and shared-prefix attention)")
    print(f"raw batched / one at a time   = {rate['raw batched generate'] / rate['one prompt at a time']:.2f} totals")


if __name__ == "__main__":
    main()
