"""A row's text, as its tokens are decoded: incremental, UTF-8 safe, cut at stop strings.

Each step decodes a short window of the row's tokens (the last complete characters and what followed) and shows the
new suffix once it ends in a complete character: a partial UTF-8 sequence decodes to U+FFFD and is held back until the
next token completes it (or the row ends). So a step costs the same at token 10 and at token 2000. With stop strings,
the last ``len(longest stop) - 1`` characters are held back until it is known they do not begin one; the text ends
before the first stop string found. The deltas of a request concatenate exactly to its ``Done.text``.
"""

from __future__ import annotations

from typing import Any

from server.engine.request import Request

REPLACEMENT_CHAR = "\ufffd"   # what a partial UTF-8 sequence decodes to


class Detokenizer:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def advance(self, request: Request, final: bool) -> tuple[str, bool]:
        """Take the row's newest token (already in ``request.ids``): (the text that can be shown now, never shown
        before; whether a stop string ended the text). ``final``: the row ends with this token."""
        self._extend(request, final)
        stops = request.params.stop
        stopped = False
        if stops:
            # Text only grows at its end, and len(longest stop) - 1 characters are held back: a stop string can
            # only begin in the part not yet sent.
            found = [i for s in stops if (i := request.text.find(s, request.sent)) >= 0]
            if found:
                request.text = request.text[:min(found)]
                stopped = True
        hold = 0 if final or stopped or not stops else max(map(len, stops)) - 1
        visible = len(request.text) - hold
        if visible <= request.sent:
            return "", stopped
        new = request.text[request.sent:visible]
        request.sent = visible
        return new, stopped

    def _extend(self, request: Request, final: bool) -> None:
        """Extend request.text with the new tokens' text. Decodes the tokens behind the last emitted text (for
        context) and the new ones; text ending in a partial UTF-8 character waits for the next token (unless this
        is the last)."""
        ids = request.ids
        decode = self.tokenizer.decode
        before = decode(ids[request.prefix_offset:request.read_offset], skip_special_tokens=True)
        now = decode(ids[request.prefix_offset:], skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith(REPLACEMENT_CHAR)):
            request.text += now[len(before):]
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)
