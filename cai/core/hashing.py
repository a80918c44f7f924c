"""Every digest cai writes, in one place, each named for what it keys.

Keys are stored in run folders (record ids, the stage cache, eval answers and judgements, training-row groups), so a
change to any function here silently invalidates every run folder made before it: ``tests/core/test_hashing.py``
pins their values. Two canonical JSON forms exist for historical reasons and both are kept:

- :func:`content_digest`: sorted keys, non-ASCII text as is. Record keys, stage keys, the prompt frame, training
  rows and their groups.
- :func:`ascii_digest`: sorted keys, non-ASCII text escaped. ``cai eval``'s answer and judgement keys, the judge's
  question set, ids of prompt rows that have none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20   # bytes read at a time when hashing a file


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON with non-ASCII text kept (record, stage and training-row keys)."""
    return sha256_hex(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode())


def ascii_digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON with non-ASCII text escaped (eval answer/judgement keys, prompt ids)."""
    return sha256_hex(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode())


def seeded_order(seed: int, name: str) -> str:
    """A sort key that shuffles names reproducibly for a seed (train/test splits, which prompts an eval takes)."""
    return sha256_hex(f"{seed}:{name}".encode())


def seed_from(text: str) -> int:
    """A 32-bit seed derived from a string (per-record and per-batch sampling seeds)."""
    return int(sha256_hex(text.encode())[:8], 16)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (datasets and adapters can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_sha256(folder: str | Path) -> str | None:
    """An adapter's weights file's sha256 (None when it has none): what its answers are keyed on, in ``cai eval`` and
    ``cai label``. Not its manifest, which holds the training's timings and date: an adapter retrained to the same
    weights keeps its answers."""
    folder = Path(folder)
    weights = next((folder / w for w in ("adapter_model.safetensors", "adapter_model.bin") if (folder / w).exists()),
                   None)
    return file_sha256(weights) if weights else None


# ---------------------------------------------------------------------------------------------------------------
# The RL phase (cai label)


def pair_digest(messages: list, text_a: str, text_b: str) -> str:
    """A pair of answers to one conversation, whatever labels it: seeds the principles drawn for it."""
    return content_digest({"messages": messages, "responses": [text_a, text_b]})


def preference_key(material: dict) -> str:
    """A preference's id: the pair, the principles drawn (their hashes), the feedback model and how it was asked."""
    return content_digest(material)


def feedback_key(feedback: dict, messages: list, cot: bool, seed: int) -> str:
    """One question to the feedback model: who answers it and the exact messages (the judgement cache's key)."""
    return content_digest({"feedback": feedback, "messages": messages, "cot": cot, "seed": seed})
