"""The word-level diff the record page shows: words kept, deleted and inserted, the text's own whitespace kept, and
long or repetitive texts (a rambling model's) handled without a quadratic blow-up."""

from __future__ import annotations

from server.review.diff import MAX_TOKENS, word_diff


def joined(segments, ops=("same", "ins")) -> str:
    return "".join(t for op, t in segments if op in ops)


def test_words_changed_are_deleted_and_inserted_and_both_texts_rebuild():
    old, new = "First answer, blunt\nand unsafe.", "Revised answer, kinder\nand safer."
    d = word_diff(old, new)
    assert d[:2] == [("del", "First "), ("ins", "Revised ")]
    assert ("same", "answer, ") in d and ("del", "blunt\n") in d and ("ins", "kinder\n") in d
    assert joined(d) == new and joined(d, ("same", "del")) == old
    assert word_diff("same text", "same text") == [("same", "same text")]
    assert word_diff("", "new") == [("ins", "new")]


def test_long_and_repetitive_texts_still_diff_and_too_long_ones_do_not():
    old = " ".join(f"w{i % 50}" for i in range(3000))
    new = " ".join(f"w{(i * 3) % 50}" for i in range(3000))
    d = word_diff(old, new)
    assert d is not None and joined(d) == new and joined(d, ("same", "del")) == old
    assert word_diff("x " * (MAX_TOKENS + 1), "y") is None
