"""A word-level diff of two texts, for the page to show what the revisions changed in the first answer.

Texts are cut into words, each with the whitespace after it (so the diff keeps the text's own line breaks, and the
matcher is not left comparing thousands of identical spaces: that made two unrelated 120-word texts take 100 ms),
compared with :class:`difflib.SequenceMatcher`, and returned as segments ``(op, text)`` with ``op`` one of ``same``,
``del`` (only in the first text) and ``ins`` (only in the second). The page escapes every segment: a diff is model text.
"""

from __future__ import annotations

import difflib
import re

_TOKENS = re.compile(r"^\s+|\S+\s*")      # a word with the whitespace after it (and any leading whitespace)
MAX_TOKENS = 5_000           # words; past this a diff is slow and unreadable: the page shows the texts alone
EXACT = 500                  # words: up to this the matcher considers every word (its cost grows with the cube of
#                              the length on repetitive text, the kind a rambling model writes: 5,000 such words took
#                              32 s); past it, words that fill over 1% of a text are matched only inside longer runs
#                              (difflib's "autojunk"): fast, at the price of coarser segments


def tokens(text: str) -> list[str]:
    return _TOKENS.findall(text)


def word_diff(old: str, new: str) -> list[tuple[str, str]] | None:
    """The segments from ``old`` to ``new``; None when either text is too long to diff usefully."""
    a, b = tokens(old), tokens(new)
    if len(a) > MAX_TOKENS or len(b) > MAX_TOKENS:
        return None
    out: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=max(len(a), len(b)) > EXACT).get_opcodes():
        if op == "equal":
            _add(out, "same", "".join(a[i1:i2]))
            continue
        if op in ("delete", "replace"):
            _add(out, "del", "".join(a[i1:i2]))
        if op in ("insert", "replace"):
            _add(out, "ins", "".join(b[j1:j2]))
    return out


def _add(out: list[tuple[str, str]], op: str, text: str) -> None:
    if not text:
        return
    if out and out[-1][0] == op:
        out[-1] = (op, out[-1][1] + text)
    else:
        out.append((op, text))
