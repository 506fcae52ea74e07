"""Means with 95% confidence intervals and paired comparisons (Student t, no scipy)."""

from __future__ import annotations

import math

import numpy as np

# two-sided 95% Student-t quantiles, df = 1..30; beyond 30 the normal 1.96 is within 2%
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    if df < 1:
        return float("nan")
    return _T95[df - 1] if df <= 30 else 1.96 + 2.4 / df  # close fit to the t tail


def mean_ci(values) -> dict:
    """{'mean', 'lo', 'hi', 'n', 'std'}: 95% CI of the mean across `values`."""
    x = np.asarray(values, np.float64).ravel()
    n = x.size
    mean = float(x.mean()) if n else float("nan")
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    half = t95(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "std": std}


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
