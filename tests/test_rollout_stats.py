"""The rollout figures PPO logs (diversity, reward-length correlation) and the collapse rule, against hand-computed
numbers."""
import pytest

from rlhf_ds.tracking.rollout_stats import collapse_starts, distinct_fraction, distinct_n, pearson, rollout_stats


def test_distinct_fraction():
    assert distinct_fraction(["a b", "a b", "c"]) == pytest.approx(2 / 3)
    assert distinct_fraction(["x"] * 8) == pytest.approx(1 / 8)
    assert distinct_fraction([]) == 0.0


def test_distinct_2_counts_word_bigrams_over_the_whole_rollout():
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 5, of which 3 distinct
    assert distinct_n(["a b a b", "a  b c"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["a", "", "b"], 2) == 0.0
    assert distinct_n(["a b c"], 1) == 1.0


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # dx = dy-permuted [-1.5, -0.5, 0.5, 1.5]: sxy = 4, sxx = syy = 5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0 and pearson([5], [7]) == 0.0
    with pytest.raises(ValueError):
        pearson([1, 2], [1])


def test_rollout_stats_of_a_collapsed_rollout():
    responses = ["the fox is nice ."] * 3 + ["it runs ."]
    stats = rollout_stats(responses, scores=[2.0, 2.0, 2.0, 0.0], lengths=[5, 5, 5, 3])
    assert stats["distinct_fraction"] == pytest.approx(0.5)
    assert stats["distinct_2"] == pytest.approx(6 / 14)  # 3 x 4 bigrams of one sentence + 2 others
    assert stats["reward_length_corr"] == pytest.approx(1.0)


def test_collapse_warning_fires_once_per_run_of_low_values():
    low, high = 0.1, 0.9
    assert not collapse_starts([high, low, low], 0.3, 3)
    assert collapse_starts([high, low, low, low], 0.3, 3)
    assert not collapse_starts([high, low, low, low, low], 0.3, 3)  # already warned for this run
    assert collapse_starts([low, low, low], 0.3, 3)
    assert collapse_starts([low, low, low, high, low, low, low], 0.3, 3)  # a new run of low values
    assert not collapse_starts([low] * 5, 0.3, 0)  # patience 0 disables the warning
    assert not collapse_starts([0.3] * 5, 0.3, 2)  # at the threshold is not below it
