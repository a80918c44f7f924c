"""Labelling throughput on the default model: ``cai label``'s local feedback vs a naive labeller.

Both arms label the same pairs (the first ``--pairs`` of the shipped comparison set, both orders, one principle a
pair, the shipped constitution's worked examples) and must give the same probabilities:

- **cai**: :class:`cai.label.feedback.LocalFeedback`: the questions batched (``--batch-size``), their common
  beginning (the worked examples; a pair's conversation) computed once per forward pass, the next-token
  log-probabilities read at the point where " (A)" and " (B)" part.
- **naive**: each order of each pair scored as a separate full forward pass of the whole prompt (what a labeller
  written with one ``model(...)`` call per question does).

Prints pairs/s for each and the ratio (target >= 2). Side by side in one process: the ratio is what to compare.

    .venv/bin/python bench/label.py                  # 16 pairs, batch 16
    .venv/bin/python bench/label.py --pairs 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.backends.local import LocalBackend  # noqa: E402
from cai.core.constitution import load_constitution  # noqa: E402
from cai.core.preference import Response  # noqa: E402
from cai.core.prompt_files import PromptItem  # noqa: E402
from cai.label.check import load_check_set  # noqa: E402
from cai.label.feedback import LocalFeedback, two_way  # noqa: E402
from cai.label.pairs import Pair, draw_preference_principles  # noqa: E402
from cai.label.prompts import ANSWER, feedback_messages  # noqa: E402
from cai.resources import constitution_path, labeller_check_path  # noqa: E402


def questions(c, pairs):
    out = []
    for p in pairs:
        (pid,) = draw_preference_principles(c, p.digest, 0, 1)
        a, b = (r.text for r in p.responses)
        for shown in ((a, b), (b, a)):
            out.append(feedback_messages(c, p.item.messages, c.preference_principle(pid), *shown))
    return out


def naive(backend: LocalBackend, requests) -> list[float]:
    """One full forward pass per question, nothing shared."""
    tok, out = backend.tokenizer, []
    for r in requests:
        text = backend.render(r) + ANSWER
        ids_a = tok(text + " (A)", add_special_tokens=False)["input_ids"]
        ids_b = tok(text + " (B)", add_special_tokens=False)["input_ids"]
        n = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
        with torch.inference_mode():
            logp = torch.log_softmax(backend.lm(input_ids=torch.tensor([ids_a[:n]])).logits[0, -1].float(), -1)
        out.append(two_way(logp[ids_a[n]].item(), logp[ids_b[n]].item()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    c = load_constitution(constitution_path("default"))
    items = load_check_set(labeller_check_path())[: args.pairs]
    pairs = [Pair(PromptItem(it.id, it.messages), (Response(text=it.better, source="x"),
                                                    Response(text=it.worse, source="x"))) for it in items]
    backend = LocalBackend(args.model, device="cpu")
    requests = questions(c, pairs)
    feedback = LocalFeedback(backend, batch_size=args.batch_size)
    feedback.read(requests[:2], cot=False, seed=0)              # warm-up (first-call allocations)
    t0 = time.perf_counter()
    ours = [r.p_first for r in feedback.read(requests, cot=False, seed=0)]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = naive(backend, requests)
    t_naive = time.perf_counter() - t0
    worst = max(abs(a - b) for a, b in zip(ours, base) if a is not None)
    tokens = sum(len(backend.tokenizer(backend.render(r), add_special_tokens=False)["input_ids"]) for r in requests)
    print(f"{len(pairs)} pairs, {len(requests)} questions (both orders), {tokens / len(requests):,.0f} prompt tokens "
          f"a question; batch {args.batch_size}; largest difference in P(A) between the arms: {worst:.2e}")
    print(f"cai   : {len(pairs) / t_ours:6.2f} pairs/s ({t_ours:.1f}s)")
    print(f"naive : {len(pairs) / t_naive:6.2f} pairs/s ({t_naive:.1f}s)")
    print(f"label cai / naive = {t_naive / t_ours:.2f}  (target >= 2)")
    if worst > 1e-3:
        sys.exit(f"the arms disagree (largest difference {worst:.2e}): the comparison is void")


if __name__ == "__main__":
    main()
