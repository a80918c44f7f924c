"""cai.evaluation.stats: expected values are worked out by hand in the comments, not by calling the code under test."""

from __future__ import annotations

import math

import pytest

from cai.evaluation.stats import (
    COLLAPSE_RATIO,
    REFUSAL_PHRASES,
    Rate,
    bleu,
    cluster_bootstrap_ci,
    collapse_flags,
    distinct_n,
    diversity,
    has_refusal_phrase,
    length_stats,
    ngrams,
    rate,
    self_bleu,
    wilson,
    words,
)

# --- wilson / rate -----------------------------------------------------------------------------------------------
# z = 1.96, z^2 = 3.8416; for n = 10: denom = 1 + 3.8416/10 = 1.38416, z^2/(2n) = 0.19208, z^2/(4n^2) = 0.009604.


def test_wilson_zero_of_ten():
    # p = 0: centre = 0.19208/1.38416 = 0.13877; half = 1.96*sqrt(0.009604)/1.38416 = 0.19208/1.38416 = 0.13877.
    lo, hi = wilson(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.2775, abs=1e-4)


def test_wilson_five_of_ten():
    # p = 0.5: centre = 0.5; half = 1.96*sqrt(0.025 + 0.009604)/1.38416 = 1.96*0.186021/1.38416 = 0.26341.
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4)
    assert hi == pytest.approx(0.7634, abs=1e-4)


def test_wilson_ten_of_ten():
    # Mirror image of 0/10: (1 - 0.2775, 1).
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4)
    assert hi == 1.0


def test_wilson_no_trials_is_everything():
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("k, n", [(-1, 5), (0, -1), (6, 5)])
def test_wilson_bad_args(k, n):
    with pytest.raises(ValueError):
        wilson(k, n)


def test_rate_counts_and_interval():
    r = rate([True, False, True, True])
    assert (r.k, r.n, r.rate) == (3, 4, 0.75)
    assert (r.lo, r.hi) == wilson(3, 4)
    assert r.lo < 0.75 < r.hi
    assert r.to_dict() == {"k": 3, "n": 4, "rate": 0.75, "lo": r.lo, "hi": r.hi}


def test_rate_empty_and_generator():
    assert rate([]) == Rate(k=0, n=0, rate=None, lo=0.0, hi=1.0)
    assert rate(x > 1 for x in range(4)).k == 2  # 2 and 3


# --- cluster bootstrap -------------------------------------------------------------------------------------------

GROUPS = [[1, 0, 1], [0], [1, 1], [0, 0, 1, 0]]  # pooled mean = (2 + 0 + 2 + 1) / 10 = 0.5


def test_bootstrap_deterministic_and_contains_pooled_mean():
    a = cluster_bootstrap_ci(GROUPS, seed=3)
    assert a == cluster_bootstrap_ci(GROUPS, seed=3)
    assert a is not None
    assert a[0] <= 0.5 <= a[1]
    assert a[0] < a[1]
    assert 0.0 <= a[0] and a[1] <= 1.0


def test_bootstrap_single_group_and_empty():
    assert cluster_bootstrap_ci([[1.0, 2.0]]) == (1.5, 1.5)
    assert cluster_bootstrap_ci([[], [1.0, 2.0], []]) == (1.5, 1.5)  # empty groups ignored
    assert cluster_bootstrap_ci([]) is None
    assert cluster_bootstrap_ci([[], []]) is None


def test_bootstrap_wider_when_groups_disagree():
    # Same eight values, same pooled mean 0.5. When every group has mean 0.5 (equal sizes), every resample has pooled
    # mean exactly 0.5: zero width. When groups are all-0 or all-1, resamples vary.
    agree = [[0, 1], [1, 0], [0, 1], [1, 0]]
    disagree = [[0, 0], [1, 1], [0, 0], [1, 1]]
    lo_a, hi_a = cluster_bootstrap_ci(agree)
    lo_d, hi_d = cluster_bootstrap_ci(disagree)
    assert lo_a == pytest.approx(0.5) and hi_a == pytest.approx(0.5)
    assert hi_d - lo_d > 0.3


def test_bootstrap_pools_by_group_size():
    # Groups A = [1, 1, 1], B = [0]. Resamples of 2 groups: AA (p 1/4) -> 1, AB (p 1/2) -> 3/4 pooled (the mean of
    # group means would be 1/2), BB (p 1/4) -> 0. The 30% and 70% quantiles both fall in the AB block: 0.75.
    lo, hi = cluster_bootstrap_ci([[1, 1, 1], [0]], level=0.4, seed=1)
    assert lo == pytest.approx(0.75) and hi == pytest.approx(0.75)


def test_bootstrap_bad_args():
    with pytest.raises(ValueError):
        cluster_bootstrap_ci(GROUPS, level=1.0)
    with pytest.raises(ValueError):
        cluster_bootstrap_ci(GROUPS, iterations=0)


# --- tokens, distinct-n ------------------------------------------------------------------------------------------


def test_words():
    assert words("Don’t STOP—it's fine!") == ["don't", "stop", "it's", "fine"]
    assert words("Café, naïve.") == ["café", "naïve"]
    assert words("  ...  ") == []


def test_ngrams():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []


def test_distinct_n_one_text():
    # "a b a b": unigrams a b a b -> {a, b} = 2/4; bigrams ab ba ab -> {ab, ba} = 2/3.
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)


def test_distinct_n_pooled_without_spanning():
    # "a b" + "a b": unigrams 2 distinct of 4; bigrams ab, ab -> 1/2 (a spanning "b a" would make it 2/3).
    assert distinct_n(["a b", "a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)


def test_distinct_n_none():
    assert distinct_n([], 1) is None
    assert distinct_n(["", "!!"], 1) is None
    assert distinct_n(["one", "two"], 2) is None  # no text has two words


# --- BLEU --------------------------------------------------------------------------------------------------------


def test_bleu_identical():
    toks = "the cat sat on the mat".split()
    assert bleu(toks, [toks]) == pytest.approx(1.0)


def test_bleu_partial_overlap_with_brevity_penalty():
    hyp = "the cat sat on mat".split()  # c = 5
    ref = "the cat sat on the mat".split()  # r = 6
    # p1 = 5/5 (every hyp word is in ref)
    # p2: hyp {the cat, cat sat, sat on, on mat}, 3 in ref -> (3+1)/(4+1) = 0.8
    # p3: hyp {the cat sat, cat sat on, sat on mat}, 2 in ref -> (2+1)/(3+1) = 0.75
    # p4: hyp {the cat sat on, cat sat on mat}, 1 in ref -> (1+1)/(2+1) = 2/3
    # geometric mean = (1 * 0.8 * 0.75 * 2/3)^(1/4) = 0.4^(1/4); BP = exp(1 - 6/5) = exp(-0.2)
    expected = 0.4**0.25 * math.exp(-0.2)  # = 0.6511
    assert bleu(hyp, [ref]) == pytest.approx(expected)
    assert expected == pytest.approx(0.6511, abs=1e-4)


def test_bleu_clipping_and_short_hypothesis():
    # hyp "the the the" vs "the cat": p1 clipped to 1/3; p2: {the the x2}, 0 match -> 1/3; p3: 0 of 1 -> 1/2;
    # n = 4 skipped (hyp has 3 tokens). c = 3 > r = 2 -> BP = 1. BLEU = (1/3 * 1/3 * 1/2)^(1/3) = (1/18)^(1/3).
    assert bleu(["the"] * 3, [["the", "cat"]]) == pytest.approx((1 / 18) ** (1 / 3))


def test_bleu_closest_reference_tie_takes_shorter():
    # hyp "a b c d" (c = 4); refs of length 3 and 5, both 1 away -> r = 3, c > r, BP = 1. Every hyp n-gram is in
    # the second reference, so all precisions are 1 and BLEU = 1 (it would be exp(1 - 5/4) with r = 5).
    assert bleu("a b c d".split(), ["a b c".split(), "a b c d e".split()]) == pytest.approx(1.0)


def test_bleu_zero_and_empty():
    assert bleu("x y z".split(), ["a b c".split()]) == 0.0
    assert bleu([], ["a b".split()]) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [])


# --- self-BLEU ---------------------------------------------------------------------------------------------------


def test_self_bleu_identical_and_disjoint():
    assert self_bleu(["The cat sat."] * 3) == pytest.approx(1.0)
    assert self_bleu(["alpha beta", "gamma delta", "epsilon zeta"]) == 0.0


def test_self_bleu_two_texts_by_hand():
    # "a b c d" vs ref "a b c": p1 3/4, p2 (2+1)/(3+1), p3 (1+1)/(2+1), p4 (0+1)/(1+1); c 4 > r 3 -> BP 1.
    first = (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    # "a b c" vs ref "a b c d": p1 1, p2 3/3, p3 2/2, n = 4 skipped; BP = exp(1 - 4/3).
    second = math.exp(-1 / 3)
    assert self_bleu(["a b c d", "a b c"]) == pytest.approx((first + second) / 2)


def test_self_bleu_none_and_dropping_empty():
    assert self_bleu([]) is None
    assert self_bleu(["only one"]) is None
    assert self_bleu(["only one", "", "?!"]) is None  # wordless texts dropped first


def test_self_bleu_sampled_hypotheses():
    texts = ["the cat sat"] * 5
    assert self_bleu(texts, max_hypotheses=2) == pytest.approx(1.0)
    varied = [f"w{i} w{i + 1} w{i + 2} common" for i in range(10)]
    assert self_bleu(varied, max_hypotheses=3, seed=7) == self_bleu(varied, max_hypotheses=3, seed=7)


# --- length stats, diversity, collapse ---------------------------------------------------------------------------


def test_length_stats():
    texts = ["a", "a b", "a b c", "a b c d", "a b c d e"]  # word counts 1..5
    # linear percentiles of [1..5]: p10 at position 0.4 -> 1.4, p90 at 3.6 -> 4.6
    assert length_stats(texts) == {"n": 5, "mean": 3.0, "median": 3.0, "p10": 1.4, "p90": 4.6, "min": 1, "max": 5}
    assert length_stats([]) == {
        "n": 0, "mean": None, "median": None, "p10": None, "p90": None, "min": None, "max": None
    }


def test_diversity_shape_and_rounding():
    d = diversity(["a b a b"])
    assert d["n"] == 1
    assert d["distinct_1"] == 0.5
    assert d["distinct_2"] == 0.6667  # 2/3 to 4 decimals
    assert d["self_bleu"] is None  # one text
    assert d["length"]["mean"] == 4.0


BASE = {"distinct_1": 0.5, "distinct_2": 0.8, "self_bleu": 0.2, "length": {"p10": 10.0, "p90": 50.0}}


def test_collapse_flags_collapsed_model():
    # distinct_1 0.3 < 0.8*0.5 = 0.4; distinct_2 0.5 < 0.64; self-BLEU 1-0.5 = 0.5 < 0.8*(1-0.2) = 0.64;
    # length spread 30-20 = 10 < 0.8*40 = 32.
    model = {"distinct_1": 0.3, "distinct_2": 0.5, "self_bleu": 0.5, "length": {"p10": 20.0, "p90": 30.0}}
    assert collapse_flags(BASE, model) == ["distinct_1", "distinct_2", "self_bleu", "length_spread"]
    assert COLLAPSE_RATIO == 0.8


def test_collapse_flags_same_diversity_and_none():
    assert collapse_flags(BASE, dict(BASE)) == []
    # Slightly less diverse but above the 0.8 ratio: 0.45 >= 0.4, 1-0.3 = 0.7 >= 0.64, spread 35 >= 32.
    mild = {"distinct_1": 0.45, "distinct_2": 0.7, "self_bleu": 0.3, "length": {"p10": 12.0, "p90": 47.0}}
    assert collapse_flags(BASE, mild) == []
    nones = {"distinct_1": None, "distinct_2": 0.1, "self_bleu": None, "length": {"p10": None, "p90": None}}
    assert collapse_flags(BASE, nones) == ["distinct_2"]
    assert collapse_flags({**BASE, "distinct_2": None}, nones) == []
    flat = {**BASE, "length": {"p10": 5.0, "p90": 5.0}}  # base spread 0: length skipped
    assert collapse_flags(flat, {**BASE, "length": {"p10": 5.0, "p90": 5.0}}) == []


def test_collapse_flags_on_real_diversity_dicts():
    varied = [
        "The quick brown fox jumps over the lazy dog.",
        "Paris is the capital of France and sits on the Seine.",
        "Water boils at one hundred degrees at sea level, less up a mountain.",
        "Prime numbers have exactly two divisors.",
    ]
    collapsed = ["I can help with that request."] * 4
    flags = collapse_flags(diversity(varied), diversity(collapsed))
    assert {"distinct_1", "distinct_2", "self_bleu", "length_spread"} <= set(flags)
    assert collapse_flags(diversity(varied), diversity(varied)) == []


# --- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I’M SORRY, but I can’t do this.",  # typographic apostrophe, uppercase
        "  I\n\n   cannot   do that.",  # whitespace runs collapsed
        "As an AI, I must decline.",
        "Sure? No. I won't.",
        "x" * 250 + " I am unable to continue.",  # inside the first 300 characters
        "I can't stress enough how useful this is.",  # known limitation: opens with a refusal phrase
    ],
)
def test_has_refusal_phrase_true(text):
    assert has_refusal_phrase(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is a simple recipe for bread: flour, water, salt and yeast.",
        "x" * 300 + " I can't help with that.",  # only after the first 300 characters
        "Hawaii cannot be reached by car.",  # "i cannot" is not whole words here
        "Use it as an aid to memory.",  # "as an ai" + "d"
        "",
    ],
)
def test_has_refusal_phrase_false(text):
    assert not has_refusal_phrase(text)


def test_refusal_phrases_lowercase():
    assert all(p == p.lower() for p in REFUSAL_PHRASES)
    assert len(REFUSAL_PHRASES) == 21
