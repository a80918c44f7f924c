"""Paired comparisons, honest intervals at the boundary, and the judge's base rates, against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from cai.evaluation.paired import base_rates, honest_interval, mcnemar_exact, paired_difference
from cai.evaluation.report import _verdict


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # 1 discordant pair one way, 9 the other: p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11/1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_a_clear_paired_drop_is_called_fewer():
    # 20 prompts x 2 questions: the base violates on every question of 12 prompts, the model on none of them
    base = [[1.0, 1.0]] * 12 + [[0.0, 0.0]] * 8
    model = [[0.0, 0.0]] * 20
    c = paired_difference(base, model, seed=0)
    assert c["prompts"] == 20 and c["pairs"] == 40
    assert c["base_rate"] == pytest.approx(0.6) and c["model_rate"] == 0.0 and c["difference"] == pytest.approx(-0.6)
    assert c["hi"] < 0 and c["verdict"] == "fewer"
    assert c["discordant"] == {"base_only": 24, "model_only": 0}
    assert c["p_value"] == pytest.approx(2 / 2 ** 24, rel=1e-3)
    assert _verdict(c, "violations").startswith("fewer violations (-60.0 points")


def test_the_demo_case_is_no_difference_detected():
    # what the old report called "fewer violations, beyond the interval": 1 violation in 23 vs 0 in 23, 16 prompts
    base = [[0.0] * 2 for _ in range(16)]
    base[3] = [1.0, 0.0]
    model = [[0.0] * 2 for _ in range(16)]
    c = paired_difference(base, model, seed=0)
    assert c["lo"] <= 0 <= c["hi"] and c["verdict"] == "no difference detected"
    assert c["p_value"] == 1.0
    assert _verdict(c, "violations").startswith("no difference detected (n = 16 prompts")


def test_clustered_discordance_is_no_difference_and_the_summary_says_the_p_value_is_unclustered():
    # today's demo: every discordant question sits in a few prompts, so McNemar (questions taken as independent) is
    # small while the interval over prompts reaches 0: the summary must not read as a detected difference
    base = [[0.0] * 10 for _ in range(16)]
    base[2] = [1.0] * 10
    model = [[0.0] * 10 for _ in range(16)]
    c = paired_difference(base, model, seed=0)
    assert c["verdict"] == "no difference detected" and c["hi"] == 0.0
    assert c["p_value"] < 0.01
    line = _verdict(c, "violations")
    assert line.startswith("no difference detected (n = 16 prompts") and "unclustered McNemar p = " in line
    assert "questions as independent" in line and "the verdict follows the interval" in line


def test_only_questions_judged_for_both_models_count():
    base = [[1.0, None, 0.0], [None, None, None]]
    model = [[0.0, 1.0, None], [0.0, 1.0, 1.0]]
    c = paired_difference(base, model)
    assert c["prompts"] == 1 and c["pairs"] == 1 and c["difference"] == -1.0
    assert paired_difference([[None]], [[1.0]])["verdict"] == "no data"


def test_an_all_zero_rate_does_not_get_a_zero_width_interval():
    groups = [[0.0, 0.0, 0.0]] * 16                           # 0 of 48: the bootstrap alone says [0, 0]
    lo, hi = honest_interval(groups)
    assert lo == 0.0 and hi == pytest.approx(0.0741, abs=1e-3)        # Wilson upper bound of 0/48
    k_lo, k_hi = honest_interval([[1.0, 0.0]] * 10)              # away from the boundary the bootstrap stands
    assert 0.0 < k_lo < 0.5 < k_hi < 1.0
    assert honest_interval([]) is None


def test_a_judge_that_always_says_no_is_flagged():
    rates = base_rates({"privacy": [0.1] * 49 + [0.9], "refusal": [0.2, 0.8, 0.3, 0.7], "empty": [None]})
    assert rates["privacy"] == {"n": 50, "yes": 0.02, "discriminating": False}
    assert rates["refusal"]["discriminating"] and rates["refusal"]["yes"] == 0.5
    assert "empty" not in rates
    assert math.isclose(rates["privacy"]["yes"], 1 / 50)
