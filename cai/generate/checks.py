"""Output checks: the flags a stage's text gets (``cai.core.record.FLAGS``). Flagged records are kept, with their
flags; they never train silently (``cai data build`` leaves them out unless allowed)."""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from cai.backends.base import Completion


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def is_echo(answer: str, sources: list[str]) -> bool:
    """True when the answer repeats one of the sources (the prompt, the request) rather than answering it."""
    a = _norm(answer)
    if not a:
        return False
    for source in sources:
        s = _norm(source)
        if not s:
            continue
        if a == s or (len(s) >= 24 and a.startswith(s)):
            return True
        if len(a) <= 2 * len(s) and SequenceMatcher(None, a, s, autojunk=False).ratio() >= 0.85:
            return True
    return False


def check_output(completion: Completion, sources: list[str], previous: str | None = None) -> list[str]:
    flags = []
    if not completion.text.strip():
        flags.append("empty")
    elif is_echo(completion.text, sources):
        flags.append("echo")
    if completion.finish_reason == "length":
        flags.append("truncated")
    if previous is not None and completion.text.strip() and _norm(completion.text) == _norm(previous):
        flags.append("unchanged")
    return flags
