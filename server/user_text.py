"""User text is data: every message a caller sends (and the ``response`` of critique and revise) goes through
:class:`SpecialTokenFilter` before it reaches the chat template. A special-token string typed by a user
(``<|im_end|>``) gets a zero-width space after its first character, so it tokenizes as plain text and can never close
a turn or open a new role. The chat template renders message contents as Jinja data, never as template source.
"""

from __future__ import annotations

import re
from typing import Any

from cai.core.prompts import Message
from server.openai.protocol import ChatMessage

ZWSP = "\u200b"   # zero-width space: breaks a special-token string without a visible change

# Gateway mode has no tokenizer to ask: these are the turn markers of the common chat templates (ChatML: Qwen, SmolLM,
# Phi; Llama 2 and 3; Mistral; Gemma; Phi-3; Zephyr), neutralised in user text all the same
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
                "[INST]", "[/INST]", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>",
                "<|system|>", "<|end|>")


class SpecialTokenFilter:
    """Neutralises special-token strings in user text: a zero-width space goes after the first character of every
    occurrence of the tokenizer's special tokens and markup-like added tokens (those without whitespace), so the
    tokenizer reads them as ordinary characters. Inserting a character can never create a new occurrence (no
    special token contains U+200B), so one pass is enough."""

    def __init__(self, tokenizer: Any):
        strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            content = getattr(token, "content", "")
            if getattr(token, "special", False) or (content and not any(c.isspace() for c in content)):
                strings.add(content)
        self.tokens = sorted((s for s in strings if len(s) >= 2), key=len, reverse=True)   # longest first
        self._pattern = re.compile("|".join(map(re.escape, strings))) if strings else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: m[0][0] + ZWSP + m[0][1:], text)

    def messages(self, messages: list[ChatMessage]) -> list[Message]:
        """A request's messages as the chat template takes them, every content neutralised."""
        return [{"role": m.role, "content": self(m.text)} for m in messages]


class _Markers:
    all_special_tokens = list(CHAT_MARKERS)


def marker_filter() -> SpecialTokenFilter:
    """The filter of gateway mode: :data:`CHAT_MARKERS`, as no tokenizer is loaded."""
    return SpecialTokenFilter(_Markers())
