"""Token log-probabilities in OpenAI's shape: each token's text, its log-probability and its bytes, with the top
alternatives.

A token that holds part of a UTF-8 character decodes to U+FFFD; its ``bytes`` are the real ones (:func:`token_bytes`),
so a client can join them into the character. -9999 stands for -inf (and NaN), as OpenAI's API does: JSON has neither.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from server.engine import TokenLogprob
from server.openai.protocol import ChoiceLogprobs, TokenLogprobs, TopLogprob


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-ins byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen) writes its tokens' bytes in -> byte."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for chr(256 + n) in byte order
    printable = [b for b in range(256) if chr(b) in alphabet]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def token_bytes(tokenizer: Any, token: int) -> bytes | None:
    """The bytes one token stands for: exact for byte-level BPE tokenizers and SentencePiece byte tokens
    (``<0xE9>``); None where the tokenizer's tokens are not bytes (the caller falls back to the decoded text)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(piece, str):
        return None
    if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
        return bytes([int(m.group(1), 16)])
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        alphabet = _byte_level_alphabet()
        if all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
    return None


class LogprobFormatter:
    """The ``logprobs`` object of a choice (or of a streamed chunk) from the engine's :class:`TokenLogprob` entries.
    Token texts and bytes are cached: a vocabulary is bounded."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._tokens: dict[int, tuple[str, list[int]]] = {}   # token id -> (text, bytes)

    def __call__(self, tokens: tuple[TokenLogprob, ...] | None) -> ChoiceLogprobs | None:
        if tokens is None:
            return None
        return ChoiceLogprobs(content=[
            TokenLogprobs(**self._entry(t.token, t.logprob),
                          top_logprobs=[TopLogprob(**self._entry(i, lp)) for i, lp in t.top])
            for t in tokens])

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text, raw = self._token_text(token)
        return {"token": text, "logprob": logprob if math.isfinite(logprob) else -9999.0, "bytes": raw}

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        known = self._tokens.get(token)
        if known is None:
            text = self.tokenizer.decode([token])
            raw = token_bytes(self.tokenizer, token)
            known = self._tokens[token] = (text, list(raw if raw is not None else text.encode("utf-8")))
        return known
