"""sjax.stats permutation test, lift statistics, Holm and Welch, against brute force and scipy."""

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from sjax import stats
from sjax.errors import SjaxError


def _exact_lift(scores, labels, target) -> Fraction:
    """symmetric_lift in rational arithmetic on the decimal scores as written (0.3 is 3/10,
    not the nearest float): ties are exact, not float-rounded."""
    mine = [Fraction(str(s)) for s, lab in zip(scores, labels) if lab == target]
    rest = [Fraction(str(s)) for s, lab in zip(scores, labels) if lab != target]
    return sum(mine) / len(mine) - sum(rest) / len(rest)


def _exact_pooled(scores_by_target, labels) -> Fraction:
    lifts = [_exact_lift(s, labels, t) for t, s in scores_by_target.items()]
    return sum(lifts) / len(lifts)


def _brute_force(values, labels, exact_statistic):
    """(p_greater, p_two_sided, distinct labelings) over ALL n! orderings of the labels.

    Each distinct labeling appears prod(count!) times among the n! orderings, the same number
    for every one, so the fractions over all orderings are the fractions over distinct ones.
    """
    t_obs = exact_statistic(values, tuple(labels))
    null = [exact_statistic(values, p) for p in itertools.permutations(labels)]
    n_fact = math.factorial(len(labels))
    assert len(null) == n_fact
    greater = Fraction(sum(t >= t_obs for t in null), n_fact)
    two = Fraction(sum(abs(t) >= abs(t_obs) for t in null), n_fact)
    return greater, two, len(set(itertools.permutations(labels)))


# Score 0.4 twice and pairs summing to 0.8: many labelings tie with the observed lift, and
# in float some of those ties come out a few ulps apart (checked below).
TIES_2X4 = [0.1, 0.7, 0.2, 0.6, 0.3, 0.5, 0.4, 0.4]


@pytest.mark.parametrize("values, labels, target", [
    (TIES_2X4, list("aaaabbbb"), "a"),                         # 2 groups x 4, float ties
    ([3, 1, 2, 2, 1, 3, 0, 2], [1, 0, 1, 0, 1, 0, 1, 0], 1),  # integer scores, int labels
    ([0.5, 0.1, 0.9, 0.3, 0.3, 0.7], [2, 2, 2, 5, 5, 9], 5),   # uneven groups 3, 2, 1
    ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], list("xxyyzz"), "z"),     # all tied: every p is 1
])
def test_symmetric_lift_p_values_equal_brute_force(values, labels, target):
    got = stats.permutation_test(np.asarray(values), labels,
                                 functools.partial(stats.symmetric_lift, target=target))
    greater, two, distinct = _brute_force(values, labels,
                                          lambda v, lab: _exact_lift(v, lab, target))
    assert got["exact"] and got["n_perm"] == got["n_labelings"] == distinct
    assert got["p_greater"] == pytest.approx(float(greater), rel=1e-12)
    assert got["p_two_sided"] == pytest.approx(float(two), rel=1e-12)
    assert got["p_min"] == 1 / distinct
    assert got["stat"] == pytest.approx(float(_exact_lift(values, labels, target)))


def test_float_ties_need_the_tolerance():
    """On TIES_2X4 a plain `>=` in float misses a tie that exact arithmetic counts."""
    labels = list("aaaabbbb")
    t_obs = stats.symmetric_lift(TIES_2X4, np.array(labels), "a")
    orderings = set(itertools.permutations(labels))
    naive = sum(stats.symmetric_lift(TIES_2X4, np.array(p), "a") >= t_obs for p in orderings)
    exact = sum(_exact_lift(TIES_2X4, p, "a") >= _exact_lift(TIES_2X4, labels, "a")
                for p in orderings)
    assert naive != exact
    got = stats.permutation_test(TIES_2X4, labels, functools.partial(stats.symmetric_lift,
                                                                     target="a"))
    assert got["p_greater"] == pytest.approx(exact / len(orderings), rel=1e-12)


def test_pooled_lift_p_values_equal_brute_force_3x2():
    labels = ["a", "b", "c", "a", "c", "b"]
    scores = {"a": np.array([0.9, 0.2, 0.2, 0.4, 0.1, 0.2]),
              "b": np.array([0.1, 0.6, 0.3, 0.1, 0.3, 0.5]),
              "c": np.array([0.3, 0.3, 0.8, 0.3, 0.2, 0.1])}
    got = stats.permutation_test(scores, labels, stats.pooled_lift)
    greater, two, distinct = _brute_force(scores, labels, _exact_pooled)
    assert distinct == 90 and got["n_perm"] == 90 and got["exact"]
    assert got["p_greater"] == pytest.approx(float(greater), rel=1e-12)
    assert got["p_two_sided"] == pytest.approx(float(two), rel=1e-12)
    assert 0 < got["p_greater"] < 0.5  # the data are informative: not a degenerate check


def test_values_reach_the_statistic_unchanged():
    """A [n_units, k] array is passed as is: only the labels are permuted."""
    seen = []

    def stat(values, labels):
        seen.append(values)
        return stats.symmetric_lift(values[:, 1], labels, 1)

    v_uk = np.arange(12.0).reshape(6, 2)
    got = stats.permutation_test(v_uk, [0, 0, 0, 1, 1, 1], stat)
    assert all(v is v_uk for v in seen) and len(seen) == 1 + 20
    assert got["stat"] == 6.0 and got["p_greater"] == 1 / 20


def _pooled_design(n_targets, per_target, shift, seed=0):
    rng = np.random.default_rng(seed)
    targets = [f"t{i}" for i in range(n_targets)]
    labels = np.repeat(targets, per_target)
    scores = {t: rng.uniform(0, 0.1, labels.size) + shift * (labels == t) for t in targets}
    return scores, labels


def test_p_min_of_the_designs_and_a_shifted_group_reaches_it():
    scores, labels = _pooled_design(3, 3, shift=1.0)  # 3 targets x 3 seeds
    got = stats.permutation_test(scores, labels, stats.pooled_lift)
    assert got["n_perm"] == 1680 and got["p_min"] == 1 / 1680 and got["exact"]
    assert got["p_greater"] == got["p_two_sided"] == 1 / 1680

    lift_b = functools.partial(stats.symmetric_lift, target="b")
    shifted = stats.permutation_test([0.1, 0.3, 0.2, 5.1, 5.3, 5.2], list("aaabbb"), lift_b)
    assert shifted["n_perm"] == 20 and shifted["p_min"] == 1 / 20
    assert shifted["p_greater"] == 1 / 20
    assert shifted["p_two_sided"] == 2 / 20  # the swapped labeling gives -stat: floor is 2/20
    flipped = stats.permutation_test([5.1, 5.3, 5.2, 0.1, 0.3, 0.2], list("aaabbb"), lift_b)
    assert flipped["p_greater"] == 1.0 and flipped["p_two_sided"] == 2 / 20


def test_identical_groups_give_p_one():
    lift_b = functools.partial(stats.symmetric_lift, target="b")
    got = stats.permutation_test([0.1, 0.5, 0.3, 0.3, 0.1, 0.5], list("aaabbb"), lift_b)
    assert got["stat"] == pytest.approx(0.0, abs=1e-15) and got["p_two_sided"] == 1.0
    scores, labels = _pooled_design(3, 2, shift=0.0)
    same = {t: np.full(labels.size, 0.25) for t in scores}
    assert stats.permutation_test(same, labels, stats.pooled_lift)["p_two_sided"] == 1.0


def test_monte_carlo_is_close_to_exact_and_seeded():
    scores, labels = _pooled_design(3, 3, shift=0.02, seed=3)
    exact = stats.permutation_test(scores, labels, stats.pooled_lift)
    assert exact["exact"] and 0.01 < exact["p_greater"] < 0.5  # a p with room to miss
    draws = 5000
    mc = stats.permutation_test(scores, labels, stats.pooled_lift, max_exact=1000,
                                draws=draws, seed=1)
    assert not mc["exact"] and mc["n_perm"] == draws + 1 and mc["n_labelings"] == 1680
    assert mc["p_min"] == 1 / (draws + 1) and mc["stat"] == exact["stat"]
    for key in ("p_greater", "p_two_sided"):
        p = exact[key]
        assert abs(mc[key] - p) < 4 * math.sqrt(p * (1 - p) / draws) + 2 / draws, key
    again = stats.permutation_test(scores, labels, stats.pooled_lift, max_exact=1000,
                                   draws=draws, seed=1)
    other = stats.permutation_test(scores, labels, stats.pooled_lift, max_exact=1000,
                                   draws=draws, seed=2)
    assert again == mc and other["p_greater"] != mc["p_greater"]


def test_monte_carlo_counts_the_observed_labeling():
    """A shifted group beats every draw: p = 1 / (1 + draws), never 0."""
    scores, labels = _pooled_design(3, 3, shift=1.0)
    got = stats.permutation_test(scores, labels, stats.pooled_lift, max_exact=0, draws=200)
    assert got["p_greater"] == got["p_two_sided"] == 1 / 201


def test_bad_input_raises():
    lift = functools.partial(stats.symmetric_lift, target="a")
    with pytest.raises(SjaxError, match="labels have shape"):
        stats.permutation_test([1.0, 2.0, 3.0], ["a", "b"], lift)
    with pytest.raises(SjaxError, match="disagree on the number of units"):
        stats.permutation_test({"a": [1.0, 2.0], "b": [1.0]}, ["a", "b"], stats.pooled_lift)
    with pytest.raises(SjaxError, match="target 'c'"):
        stats.symmetric_lift([1.0, 2.0], ["a", "b"], "c")
    with pytest.raises(SjaxError, match="NaN"):
        stats.permutation_test([1.0, 2.0], ["a", "b"], lambda v, lab: float("nan"))


def test_holm_hand_table():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]                       # capped at 1
    assert stats.holm([0.02, 0.02, 0.02]) == pytest.approx([0.06, 0.06, 0.06])  # ties
    got = stats.holm([0.01, float("nan"), 0.04])                       # NaN not in m = 2
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.04)
    assert stats.holm([]) == [] and stats.holm([0.3]) == [0.3]
    with pytest.raises(SjaxError, match="holm"):
        stats.holm([0.1, 1.5])


def test_holm_is_monotone_and_between_raw_and_bonferroni():
    p = np.random.default_rng(0).uniform(0, 0.2, 30) ** 2
    adj = np.array(stats.holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p) and np.all(adj <= np.minimum(1, p * p.size) + 1e-15)
    assert np.any(adj < np.minimum(1, p * p.size))  # step-down: less than Bonferroni


def test_t95_takes_fractional_df():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1.0, 1.37, 2.5, 7.9, 33.3, 1e4 + 0.5):
        assert stats.t95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9), df
    assert stats.t95(5) == stats.t95(5.0)


def test_min_detectable_is_the_t_power_formula():
    """(t_{1 - alpha/2, df} + t_{power, df}) * se, fractional df included; the normal
    approximation (1.96 + 0.84) is far off at the few df of a seeds design."""
    t = pytest.importorskip("scipy.stats").t
    for df in (1.0, 2.0, 3.7, 4.0, 9.25, 120.5):
        for se in (0.3, 2.0):
            want = (t.ppf(0.975, df) + t.ppf(0.8, df)) * se
            assert stats.min_detectable(se, df) == pytest.approx(want, rel=1e-8), (df, se)
        # one-sided at 0.05 (alpha=0.1 two-sided), as the report states its power
        assert stats.min_detectable(1.0, df, alpha=0.1) == pytest.approx(
            t.ppf(0.95, df) + t.ppf(0.8, df), rel=1e-8)
        assert stats.min_detectable(1.0, df, power=0.9) == pytest.approx(
            t.ppf(0.975, df) + t.ppf(0.9, df), rel=1e-8)
    assert stats.min_detectable(1.0, 4.0) > 1.2 * (1.959964 + 0.841621)


@pytest.mark.parametrize("na, nb, scale_b, shift", [
    (2, 2, 1.0, 0.5), (3, 7, 3.0, 1.0), (10, 4, 0.1, 0.0), (50, 60, 2.0, 0.3)])
def test_two_sample_is_welch_ttest_ind(na, nb, scale_b, shift):
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(na * 100 + nb)
    a, b = rng.normal(shift, 1.0, na), rng.normal(0.0, scale_b, nb)
    got = stats.two_sample(a, b)
    want = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert got["mean"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert got["t"] == pytest.approx(want.statistic, rel=1e-10)
    assert got["df"] == pytest.approx(want.df, rel=1e-10)
    assert got["p"] == pytest.approx(want.pvalue, rel=1e-8)
    ci = want.confidence_interval(0.95)
    assert (got["lo"], got["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-8)
    assert (got["n_a"], got["n_b"]) == (na, nb)


def test_two_sample_degenerate():
    assert math.isnan(stats.two_sample([1.0], [1.0, 2.0])["p"])
    const = stats.two_sample([2.0, 2.0], [1.0, 1.0, 1.0])
    assert (const["lo"], const["hi"], const["p"]) == (1.0, 1.0, 0.0)
    assert stats.two_sample([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
