"""What will be generated, known before any model call: each prompt's principles (a seeded draw) and keys.

A record's key (:func:`record_key`) covers everything that shapes it: the prompt, the text of each principle drawn,
the prompt frame, the model and the sampling. A stage's key (:func:`stage_key`) covers the exact messages of one model
call. Both are stored in run folders, so they must not change from one version to the next (see
``cai.core.hashing``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cai.backends.base import Backend, Sampling, dtype_of
from cai.core.constitution import Constitution
from cai.core.hashing import content_digest, seed_from, sha256_hex
from cai.core.prompt_files import PromptItem
from cai.core.prompts import Message, frame_sha256


@dataclass(frozen=True)
class Plan:
    """What will be generated for one prompt, known before any model call: its principles and its key."""

    item: PromptItem
    principles: tuple[str, ...]   # principle id per round
    key: str


def draw_principles(constitution: Constitution, prompt_id: str, seed: int, rounds: int) -> tuple[str, ...]:
    """Seeded weighted draw of one principle per round, without replacement while unused principles remain.

    The draw depends only on (seed, prompt id, the principle ids and weights): editing a principle's text never
    changes which principle a prompt draws, so an edit touches only the records that drew that principle.
    """
    rng = random.Random(int.from_bytes(bytes.fromhex(sha256_hex(f"{seed}\x00{prompt_id}".encode())[:16]), "big"))
    ids = constitution.ids
    weights = {p.id: p.weight for p in constitution.principles}
    chosen: list[str] = []
    for r in range(rounds):
        in_cycle = r % len(ids)              # after every principle was used once, a new cycle starts
        used = set(chosen[r - in_cycle:])
        pool = [i for i in ids if i not in used]
        if in_cycle == 0 and chosen and len(ids) > 1:
            pool = [i for i in ids if i != chosen[-1]]   # no principle twice in a row
        chosen.append(rng.choices(pool, weights=[weights[i] for i in pool])[0])
    return tuple(chosen)


def record_key(item: PromptItem, constitution: Constitution, principles: tuple[str, ...], backend: Backend,
               sampling: Sampling, critic: Backend | None = None) -> str:
    material = {
        "prompt_id": item.id,
        "messages": item.messages,
        "principles": [constitution.principle(p).sha256 for p in principles],
        "frame": frame_sha256(constitution),
        "model": backend.model,
        "model_revision": backend.model_revision,
        "sampling": sampling.to_dict(),
    }
    if dtype_of(backend):                      # bf16 records are other records (fp32 keys stay as they were)
        material["dtype"] = dtype_of(backend)
    if adapter_of(backend):                    # a policy with an adapter merged in is another model
        material["adapter"] = adapter_of(backend)
    if critic is not None:                     # another model critiqued and revised
        material["critic"] = {"model": critic.model, "revision": critic.model_revision,
                              **({"dtype": dtype_of(critic)} if dtype_of(critic) else {}),
                              **({"adapter": adapter_of(critic)} if adapter_of(critic) else {})}
    return content_digest(material)


def adapter_of(backend: Backend) -> str | None:
    """The sha256 of the adapter merged into a local backend's model (its weights file), or None."""
    folder = getattr(backend, "adapter", None)
    if not folder:
        return None
    from pathlib import Path

    from cai.core.hashing import file_sha256

    weights = next((Path(folder) / w for w in ("adapter_model.safetensors", "adapter_model.bin")
                    if (Path(folder) / w).exists()), None)
    return file_sha256(weights) if weights else str(folder)


def stage_key(backend: Backend, sampling: Sampling, messages: list[Message]) -> str:
    """What produced a stage's output: the model, the sampling settings (seed included), the dtype when not fp32,
    and the exact messages."""
    material = {"model": backend.model, "model_revision": backend.model_revision, "sampling": sampling.to_dict(),
                "messages": messages}
    if dtype_of(backend):
        material["dtype"] = dtype_of(backend)
    if adapter_of(backend):
        material["adapter"] = adapter_of(backend)
    return content_digest(material)


def batch_seed(seed: int, plans: list[Plan]) -> int:
    """The sampling seed of one lockstep batch (the same plans always sample the same way)."""
    return seed_from(str(seed) + "".join(p.key for p in plans))


def stage_seed(seed: int, plan: Plan, stage: str, rnd: int) -> int:
    """The sampling seed of one record's stage when records run on their own (an HTTP fleet)."""
    return seed_from(f"{seed}:{plan.key}:{stage}:{rnd}")
