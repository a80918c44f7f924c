"""Pairs of answers to label: sampled from a policy, or taken from the run's records.

- **Policy pairs**: ``samples`` answers (K ≥ 2) to each prompt from the model named by ``--policy`` (the base, or an
  adapter of the run merged into it), at the given temperature; answers ``2i`` and ``2i+1`` make a pair, so K = 2
  is one pair a prompt (as in the paper) and the pairs of one prompt share no answer. Each answer is keyed by the
  model, the sampling, its seed and the conversation, and cached in ``RUN/label/samples.jsonl`` as it is made, so a
  kill loses only the batch in flight.
- **Record pairs** (``--policy records``): each record's initial answer against its final revision. The revision is
  what the supervised phase says is better, so labels of these pairs check the labeller against that signal.

A pair whose two answers are the same text (up to whitespace) is no comparison: it is skipped and counted, never
labelled 50/50.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from cai.backends.base import Backend, Sampling
from cai.core.constitution import Constitution
from cai.core.files import KeyedLog
from cai.core.hashing import content_digest, pair_digest, seed_from, sha256_hex
from cai.core.preference import Response
from cai.core.prompt_files import PromptItem
from cai.core.record import Record


@dataclass
class Pair:
    """Two answers to one conversation, before labelling."""

    item: PromptItem
    responses: tuple[Response, Response]
    digest: str = ""                 # the pair's identity (conversation and both texts): seeds its principles

    def __post_init__(self) -> None:
        self.digest = pair_digest(self.item.messages, self.responses[0].text, self.responses[1].text)

    @property
    def identical(self) -> bool:
        a, b = (" ".join(r.text.split()) for r in self.responses)
        return a == b


@dataclass
class PairSet:
    pairs: list[Pair] = field(default_factory=list)
    identical: int = 0               # pairs skipped: both answers the same text
    empty: int = 0                   # pairs skipped: an answer was empty or failed
    unpaired: int = 0                # an odd sample left without a partner
    sampled: int = 0                 # policy answers generated now (the rest came from the cache)


def record_pairs(records: list[Record], limit: int | None = None) -> PairSet:
    out = PairSet()
    for rec in records:
        if not rec.rounds:
            continue
        item = PromptItem(id=rec.prompt_id, messages=list(rec.messages), category=rec.category)
        pair = Pair(item, (Response(text=rec.initial, source="record:initial", record=rec.id),
                           Response(text=rec.final, source="record:final", record=rec.id)))
        _add(out, pair)
        if limit and len(out.pairs) >= limit:
            break
    return out


def policy_pairs(items: list[PromptItem], backend: Backend, policy: str, sampling: Sampling, samples: int,
                 cache: KeyedLog, batch_size: int, identity: dict[str, Any], progress=None) -> PairSet:
    """``samples`` answers per prompt from ``backend`` (named ``policy``), paired 0-1, 2-3, ...; answers cached in
    ``cache`` under keys of ``identity`` (the model, its adapter), the sampling, the seed and the messages."""
    out = PairSet(unpaired=len(items) * (samples % 2))
    answers: dict[tuple[str, int], tuple[str, int]] = {}   # (prompt id, sample) -> (text, seed)
    for k in range(samples):
        todo = []
        for item in items:
            seed = seed_from(f"{sampling.seed}:{k}:{item.id}")
            key = content_digest({"policy": identity, "sampling": sampling.to_dict(), "seed": seed,
                                  "messages": item.messages})
            if key in cache:
                answers[(item.id, k)] = (cache[key]["text"], seed)
            else:
                todo.append((item, seed, key))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            # one seed a batch (the backends take one); the batch is the same whenever these answers are missing
            batch_seed = seed_from("".join(key for _, _, key in chunk))
            done = backend.generate([item.messages for item, _, _ in chunk], sampling, batch_seed)
            fresh = {}
            for (item, seed, key), c in zip(chunk, done):
                if c.error is None:
                    fresh[key] = {"text": c.text, "finish_reason": c.finish_reason}
                    answers[(item.id, k)] = (c.text, seed)
            cache.add(fresh)
            out.sampled += len(fresh)
            if progress is not None:
                progress(len(chunk))
    for item in items:
        for k in range(0, samples - 1, 2):
            got = [answers.get((item.id, j)) for j in (k, k + 1)]
            if any(g is None or not g[0].strip() for g in got):
                out.empty += 1
                continue
            (a, seed_a), (b, seed_b) = got   # type: ignore[misc]
            _add(out, Pair(item, (Response(text=a, source=f"policy:{policy}", sample=k, seed=seed_a),
                                  Response(text=b, source=f"policy:{policy}", sample=k + 1, seed=seed_b))))
    return out


def _add(out: PairSet, pair: Pair) -> None:
    if not all(r.text.strip() for r in pair.responses):
        out.empty += 1
    elif pair.identical:
        out.identical += 1
    else:
        out.pairs.append(pair)


def draw_preference_principles(c: Constitution, pair_digest: str, seed: int, m: int) -> tuple[str, ...]:
    """``m`` preference principles for a pair, drawn weighted and without replacement. The draw depends only on the
    seed, the pair and the principles' ids and weights: editing a principle's text never changes which pairs drew it,
    so an edit relabels only those."""
    rng = random.Random(int(sha256_hex(f"{seed}\x00{pair_digest}".encode())[:16], 16))
    pool = list(c.preference_ids)
    chosen: list[str] = []
    for _ in range(min(m, len(pool))):
        pick = rng.choices(pool, weights=[c.preference_principle(i).weight for i in pool])[0]
        chosen.append(pick)
        pool.remove(pick)
    return tuple(chosen)
