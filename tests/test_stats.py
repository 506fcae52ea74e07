"""sjax.stats against scipy, and the [0, 1]-bounded interval for rates."""

import itertools
import math

import numpy as np
import pytest

from sjax import stats
from sjax.errors import SjaxError

scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")


def test_t95_is_scipys_quantile():
    for df in [*range(1, 61), 75, 100, 250, 1000, 10_000]:
        assert stats.t95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9), df
    assert math.isnan(stats.t95(0))


def test_betainc_is_scipys():
    for a in (0.5, 1.0, 2.5, 10.0, 500.0, 5e4):
        for b in (0.5, 1.0, 3.0, 20.0):
            for x in (1e-6, 1e-3, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999, 1 - 1e-6):
                want = scipy_special.betainc(a, b, x)
                assert stats._betainc(a, b, x) == pytest.approx(want, rel=1e-7, abs=1e-300)
    assert stats._betainc(2, 3, 0.0) == 0.0 and stats._betainc(2, 3, 1.0) == 1.0


@pytest.mark.parametrize("n, shift", [(2, 0.5), (5, 0.3), (50, 0.05), (50, 0.0), (300, 0.01)])
def test_paired_difference_is_ttest_rel(n, shift):
    rng = np.random.default_rng(n)
    a = rng.normal(0, 1, n)
    b = a - shift + rng.normal(0, 0.2, n)
    got = stats.paired_difference(a, b)
    want = scipy_stats.ttest_rel(a, b)
    assert got["t"] == pytest.approx(want.statistic, rel=1e-10)
    assert got["p"] == pytest.approx(want.pvalue, rel=1e-8, abs=1e-300)
    ci = want.confidence_interval(0.95)
    assert (got["lo"], got["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-8)


def test_mean_ci_is_scipys_t_interval():
    x = np.random.default_rng(0).normal(3, 2, 20)
    lo, hi = scipy_stats.t.interval(0.95, 19, loc=x.mean(), scale=scipy_stats.sem(x))
    out = stats.mean_ci(x)
    assert (out["lo"], out["hi"]) == pytest.approx((lo, hi), rel=1e-9)


@pytest.mark.parametrize("values", [
    np.r_[np.zeros(49), 0.5],                          # one hit question in 50
    np.r_[np.zeros(4), 0.03],                           # few models, a rate near 0
    np.random.default_rng(1).beta(0.02, 5, 30),          # exact probabilities near 0
    1 - np.random.default_rng(2).beta(0.02, 5, 30),      # ... and near 1
])
def test_rate_ci_stays_in_unit_interval(values):
    r, t = stats.rate_ci(values), stats.mean_ci(values)
    assert 0.0 <= r["lo"] < r["mean"] < r["hi"] <= 1.0
    assert t["lo"] < 0 or t["hi"] > 1  # the t-interval leaves [0, 1] on these
    assert r["mean"] == t["mean"] and r["n"] == t["n"] and r["std"] == t["std"]


def test_rate_ci_is_the_t_interval_near_half():
    x = np.random.default_rng(3).uniform(0.3, 0.7, 50)
    r, t = stats.rate_ci(x), stats.mean_ci(x)
    width = t["hi"] - t["lo"]
    assert abs(r["lo"] - t["lo"]) < 0.01 * width and abs(r["hi"] - t["hi"]) < 0.01 * width


def test_rate_ci_of_bernoulli_values_is_wilson():
    x = np.r_[np.ones(3), np.zeros(27)]
    n, p = x.size - 1, x.mean()  # Wilson with n - 1 and the t quantile
    z = scipy_stats.t.ppf(0.975, n)
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    r = stats.rate_ci(x)
    assert (r["lo"], r["hi"]) == pytest.approx(((centre - half) / (1 + z * z / n),
                                                (centre + half) / (1 + z * z / n)), rel=1e-9)


def test_rate_ci_edges():
    # 0 hits in 50: not a zero-width [0, 0] but the binomial (Wilson) bound t^2 / (n + t^2),
    # with scipy's t quantile at 49 degrees of freedom; mirrored for all ones
    t2 = scipy_stats.t.ppf(0.975, 49) ** 2
    zero, one = stats.rate_ci(np.zeros(50)), stats.rate_ci(np.ones(50))
    assert (zero["mean"], zero["lo"]) == (0, 0) and zero["hi"] == pytest.approx(t2 / (50 + t2))
    assert (one["mean"], one["hi"]) == (1, 1) and one["lo"] == pytest.approx(50 / (50 + t2))
    assert (stats.rate_ci([0.2, 0.2])["lo"], stats.rate_ci([0.2, 0.2])["hi"]) == (0.2, 0.2)
    assert math.isnan(stats.rate_ci([0.4])["lo"])
    with pytest.raises(SjaxError, match=r"rate_ci: values must lie in \[0, 1\]"):
        stats.rate_ci([0.5, 1.2])


def test_sign_flip_test_counts_the_flips_by_hand():
    """One-sided exact p over the 2^n sign flips of paired differences, ties counting."""
    got = stats.sign_flip_test([0.3, 0.1, -0.2])
    means = [np.mean(np.multiply([0.3, 0.1, -0.2], s))
             for s in itertools.product((1, -1), repeat=3)]
    assert got["p_greater"] == np.mean([m >= np.mean([0.3, 0.1, -0.2]) - 1e-12 for m in means])
    assert got["p_greater"] == 3 / 8 and got["p_min"] == 1 / 8
    assert stats.sign_flip_test([1.0] * 6)["p_greater"] == 1 / 64  # the floor: all agree
    assert stats.sign_flip_test([-1.0, -2.0])["p_greater"] == 1.0
    assert stats.sign_flip_test([0.0, 0.0])["p_greater"] == 1.0  # ties are extreme
    with pytest.raises(SjaxError, match="sign_flip_test: needs at least one pair, got 0"):
        stats.sign_flip_test([])
    many = stats.sign_flip_test(np.full(30, 0.1), draws=999)  # seeded flips past 16 pairs
    assert not many["exact"] and many["p_greater"] == many["p_min"] == 1 / 1000
    noise = np.random.default_rng(0).normal(size=18)
    assert stats.sign_flip_test(noise, max_exact=20)["p_greater"] == pytest.approx(
        stats.sign_flip_test(noise, draws=40000)["p_greater"], abs=0.01)
