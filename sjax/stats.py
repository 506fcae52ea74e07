"""Means with 95% confidence intervals and paired comparisons (Student t, no scipy).

`mean_ci` is the t-interval for any mean; `rate_ci` is for a mean of values in [0, 1]
(per-question probabilities, accuracies), where the t-interval can leave [0, 1].
"""

from __future__ import annotations

import functools
import math

import numpy as np

from sjax.errors import SjaxError


@functools.lru_cache(maxsize=None)
def t95(df: int) -> float:
    """Two-sided 95% Student-t quantile: the t with P(|T| > t) = 0.05, by bisection."""
    if df < 1:
        return float("nan")
    lo, hi = 0.0, 1e3  # p(1e3, df=1) < 0.05
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_p(mid, df) > 0.05 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values) -> dict:
    """{'mean', 'lo', 'hi', 'n', 'std'}: 95% t-interval of the mean across `values`."""
    x = np.asarray(values, np.float64).ravel()
    n = x.size
    mean = float(x.mean()) if n else float("nan")
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    half = t95(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "std": std}


def rate_ci(values) -> dict:
    """`mean_ci`'s dict for a mean of values in [0, 1], with an interval inside [0, 1].

    The quasi-binomial score (Wilson) interval: the p with (mean - p)^2 <= t^2 * phi *
    p(1 - p) / n, where phi = std^2 / (mean (1 - mean)) is the dispersion seen in the data.
    Evaluating the variance at p rather than at the mean is what keeps the interval inside
    [0, 1] and widens it away from a bound (a rate near 0 gets a long upper arm, not a
    negative lower one). Near 0.5, p(1 - p) is flat and it is the t-interval; for 0/1
    values it is Wilson's interval with n - 1 and the t quantile. Deterministic, unlike a
    bootstrap, and keeps the t-quantile's small-n width (a few seeds or models), which a
    percentile bootstrap loses. All values at a bound (every rate 0, or every rate 1) show
    no dispersion to estimate: there phi = 1 (binomial), so 0 of n is [0, t^2 / (n + t^2)],
    not a zero-width claim of certainty; other all-equal values give [mean, mean].
    """
    out = mean_ci(values)
    m, n, std = out["mean"], out["n"], out["std"]
    if n and not 0.0 <= float(np.min(values)) <= float(np.max(values)) <= 1.0:
        raise SjaxError(f"rate_ci: values must lie in [0, 1], got [{np.min(values)}, "
                        f"{np.max(values)}]")
    at_bound = m in (0.0, 1.0)
    if n > 1 and (std > 0 or at_bound):
        phi = 1.0 if at_bound else std ** 2 / (m * (1 - m))
        k = t95(n - 1) ** 2 * phi / n
        root = math.sqrt(k * k + 4 * k * m * (1 - m))
        out["lo"] = max(0.0, (2 * m + k - root) / (2 * (1 + k)))
        out["hi"] = min(1.0, (2 * m + k + root) / (2 * (1 + k)))
    elif n > 1:
        out["lo"] = out["hi"] = m
    return out


def paired_difference(a, b) -> dict:
    """Mean of a - b with 95% CI and a two-sided paired t-test p-value."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    out = mean_ci(d)
    n = d.size
    se = out["std"] / math.sqrt(n) if n > 1 else float("nan")
    t = out["mean"] / se if se and se > 0 else (0.0 if out["mean"] == 0 else math.inf)
    out["t"] = t
    out["p"] = _t_two_sided_p(t, n - 1)
    return out


def _t_two_sided_p(t: float, df: int) -> float:
    """P(|T| > |t|) for Student t with `df` degrees of freedom (regularised incomplete beta)."""
    if df < 1 or math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    x = df / (df + t * t)
    return _betainc(df / 2, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(math.log(x) * a + math.log1p(-x) * b + lbeta)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-12:
            break
    return front * (f - 1.0) / a
