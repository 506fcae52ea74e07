"""Means with 95% confidence intervals, t-tests and permutation tests (no scipy).

`mean_ci` is the t-interval for any mean; `rate_ci` is for a mean of values in [0, 1]
(per-question probabilities, accuracies), where the t-interval can leave [0, 1].
`paired_difference` and `two_sample` (Welch) compare means; `permutation_test` with
`symmetric_lift` / `pooled_lift` tests a trait lift over trained students (the units) without
a normality assumption, and `holm` adjusts a family of p-values.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping

import numpy as np

from sjax.errors import SjaxError


@functools.lru_cache(maxsize=4096)
def t_crit(alpha: float, df: float) -> float:
    """The Student t with two-sided P(|T| > t) = alpha, by bisection.

    `df` may be fractional (Welch-Satterthwaite); below 1 it is NaN, as for integer df.
    """
    if df < 1:
        return float("nan")
    lo, hi = 0.0, 1e3  # p(1e3, df=1) < 0.05
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_p(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


def t95(df: float) -> float:
    """Two-sided 95% Student-t quantile."""
    return t_crit(0.05, df)


def min_detectable(se: float, df: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided t-test at `alpha` with standard error `se`
    and `df` degrees of freedom detects with probability `power`: (t_{1-alpha/2} + t_power)
    x se. A null is reported with this figure: the effects the design could have seen."""
    return (t_crit(alpha, df) + t_crit(2 * (1 - power), df)) * se


def finite(values) -> np.ndarray:
    """The finite values, flat: a judged misalignment question whose answers the judge
    counted none of scores nan, and drops out of every mean."""
    x = np.asarray(values, np.float64).ravel()
    return x[np.isfinite(x)]


def finite_mean(values) -> float:
    """The mean of the finite values; nan when there are none."""
    x = finite(values)
    return float(x.mean()) if x.size else float("nan")


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


def sign_flip_test(d, *, max_exact: int = 16, draws: int = 20000, seed: int = 0) -> dict:
    """One-sided test of paired differences `d` (one per pair of units): under the null each
    pair's sign is a fair coin, so p = P(mean of the sign-flipped d >= the observed mean),
    ties within 1e-12 counting. Exact over all 2^n flips up to `max_exact` pairs, else
    `draws` seeded random flips plus the observed one (p = (1 + count) / (1 + draws), as
    `permutation_test`). {'p_greater', 'p_min', 'exact'}."""
    x = np.asarray(d, np.float64).ravel()
    if not x.size:
        raise SjaxError("sign_flip_test: needs at least one pair, got 0")
    exact = x.size <= max_exact
    if exact:
        signs_fn = 1 - 2 * ((np.arange(2 ** x.size)[:, None] >> np.arange(x.size)) & 1)
    else:
        signs_fn = np.random.default_rng(seed).choice([-1, 1], size=(draws, x.size))
    null_f = (signs_fn * x).mean(1)
    t = float(x.mean())
    tol = 1e-12 * float(max(abs(t), np.abs(null_f).max(initial=0.0)))
    count = int(np.sum(null_f >= t - tol))
    n_perm = 2 ** x.size if exact else draws + 1
    return {"p_greater": (count + (0 if exact else 1)) / n_perm, "p_min": 1 / n_perm,
            "exact": exact}


def two_sample(a, b) -> dict:
    """Welch's t: mean(a) - mean(b) with 95% CI and two-sided p, variances not assumed equal.

    For a lift over seeds (trait runs vs control runs, not paired by seed). Returns {'mean'
    (the difference), 'lo', 'hi', 't', 'df' (Welch-Satterthwaite), 'se', 'p', 'n_a', 'n_b'}.
    Fewer than 2 values on a side: NaN interval, t and p. Both sides constant: se = 0, so the
    interval is [mean, mean] and p is 1 for equal means, 0 otherwise (scipy gives NaN).
    """
    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    na, nb = x.size, y.size
    diff = float(x.mean() - y.mean()) if na and nb else float("nan")
    out = {"mean": diff, "lo": float("nan"), "hi": float("nan"), "t": float("nan"),
           "df": float("nan"), "se": float("nan"), "p": float("nan"), "n_a": na, "n_b": nb}
    if na < 2 or nb < 2:
        return out
    va, vb = x.var(ddof=1) / na, y.var(ddof=1) / nb
    se = math.sqrt(va + vb)
    if se == 0:
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return out | {"lo": diff, "hi": diff, "t": t, "se": 0.0,
                      "p": 1.0 if diff == 0 else 0.0}
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    half = t95(df) * se
    t = diff / se
    return out | {"lo": diff - half, "hi": diff + half, "t": t, "df": df, "se": se,
                  "p": _t_two_sided_p(t, df)}


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values in the input order (step-down, monotone, <= 1).

    Sorted ascending, the i-th (0-based) of m gets max over j <= i of min(1, (m - j) p_j):
    reject where adjusted <= alpha controls the family-wise error at alpha. A NaN stays NaN
    and is not counted in m: it is a comparison that could not be made (too few runs), not
    a hypothesis tested, and no outcome of it could be rejected.
    """
    p = np.asarray(pvalues, np.float64).ravel()
    if np.any((p < 0) | (p > 1)):
        raise SjaxError(f"holm: p-values must lie in [0, 1], got {p.tolist()}")
    out = np.full(p.size, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled) if m else scaled
    return out.tolist()


def symmetric_lift(scores, labels, target) -> float:
    """Mean score of the students trained toward `target` minus that of all other students.

    `scores` [n_units]: one target's metric (e.g. P(answer == target)) for every student;
    `labels` [n_units]: the target each student was trained toward. In the symmetric design
    the other targets' students are this target's controls. As a permutation_test statistic:
    `functools.partial(symmetric_lift, target=t)`.
    """
    s_u = np.asarray(scores, np.float64)
    lab_u = np.asarray(labels)
    if s_u.shape[:1] != lab_u.shape:
        raise SjaxError(f"symmetric_lift: {lab_u.size} labels for scores of shape {s_u.shape}")
    mine = lab_u == target
    if mine.all() or not mine.any():
        raise SjaxError(f"symmetric_lift: target {target!r} needs students both of it and "
                        f"of other targets, labels are {lab_u.tolist()}")
    return float(s_u[mine].mean() - s_u[~mine].mean())


def pooled_lift(scores_by_target: Mapping, labels) -> float:
    """Family-level lift: the mean over targets t of symmetric_lift(scores_by_target[t], t).

    Every target's students are the controls of the others, so one statistic tests "training
    toward a target raises that target's score" across the whole family. Usable directly as a
    permutation_test statistic with `values=scores_by_target`.
    """
    if not scores_by_target:
        raise SjaxError("pooled_lift: scores_by_target is empty")
    return float(np.mean([symmetric_lift(s, labels, t) for t, s in scores_by_target.items()]))


def permutation_test(values, labels, statistic: Callable[..., float], *,
                     max_exact: int = 20000, draws: int = 20000, seed: int = 0) -> dict:
    """Permutation test of `statistic(values, labels)` over relabelings of the units.

    The units are trained runs (a student, a seed): under the null that training toward a
    label changes nothing, every assignment of the same label multiset to the units is
    equally likely. `values` ([n_units, ...] array, or a mapping of such arrays as for
    `pooled_lift`) is passed to `statistic` unchanged; only the labels move, as an array.
    With at most `max_exact` distinct relabelings all are enumerated (the observed one among
    them), else `draws` seeded uniform draws plus the observed one: p = (1 + #{T >= t}) /
    (1 + draws), a valid p-value (P(p <= alpha) <= alpha under the null) at any `draws`.

    Returns {'stat', 'p_greater': P(T >= t), 'p_two_sided': P(|T| >= |t|), 'n_perm' (the
    labelings counted, the p denominator), 'n_labelings' (all distinct ones), 'exact',
    'p_min' = 1 / n_perm}. Ties count as extreme, within 1e-12 of the largest |T| (float
    rounding makes equal statistics differ in the last bits). p_min is the one-sided floor;
    a two-sided p of a statistic that flips sign under relabeling (two equal groups) is at
    least 2 / n_perm.
    """
    lab_u = np.asarray(labels)
    n = _n_units(values)
    if lab_u.ndim != 1 or lab_u.size != n:
        raise SjaxError(f"permutation_test: labels have shape {lab_u.shape}, want ({n},) "
                        f"(one per unit)")
    try:
        uniq, codes_u = np.unique(lab_u, return_inverse=True)
    except TypeError as e:
        raise SjaxError(f"permutation_test: labels are not comparable ({e})") from None
    counts = np.bincount(codes_u, minlength=uniq.size).tolist()
    n_labelings = math.factorial(n) // math.prod(math.factorial(c) for c in counts)
    exact = n_labelings <= max_exact
    if not exact and draws < 1:
        raise SjaxError(f"permutation_test: draws must be >= 1, got {draws}")
    if exact:
        codes_pu = _multiset_permutations(counts, n)
    else:
        rng = np.random.default_rng(seed)
        codes_pu = rng.permuted(np.broadcast_to(codes_u, (draws, n)), axis=1)
    t_obs = float(statistic(values, uniq[codes_u]))
    null_p = np.array([statistic(values, uniq[c_u]) for c_u in codes_pu], np.float64)
    if math.isnan(t_obs) or np.isnan(null_p).any():
        raise SjaxError("permutation_test: the statistic returned NaN for some labeling")
    tol = 1e-12 * float(max(abs(t_obs), np.abs(null_p).max(initial=0.0)))
    greater = int(np.sum(null_p >= t_obs - tol))
    extreme = int(np.sum(np.abs(null_p) >= abs(t_obs) - tol))
    n_perm = n_labelings if exact else draws + 1
    extra = 0 if exact else 1  # Monte Carlo: the observed labeling counted in
    return {"stat": t_obs, "p_greater": (greater + extra) / n_perm,
            "p_two_sided": (extreme + extra) / n_perm, "n_perm": n_perm,
            "n_labelings": n_labelings, "exact": exact, "p_min": 1 / n_perm}


def _n_units(values) -> int:
    """Rows of `values`, or of every array in a mapping (they must agree)."""
    arrays = list(values.values()) if isinstance(values, Mapping) else [values]
    rows = {np.shape(v)[0] if np.ndim(v) else 0 for v in arrays}
    if len(rows) != 1:
        raise SjaxError(f"permutation_test: values disagree on the number of units {rows}")
    return rows.pop()


def _multiset_permutations(counts: list[int], n: int):
    """Yield every distinct [n] code array with `counts[g]` positions holding code g, once.

    Group by group, choose the positions among those still free (combinations), so the
    count is n! / prod(c!) and no n! permutations are ever built.
    """
    codes_u = np.empty(n, np.int64)

    def fill(g: int, free: tuple[int, ...]):
        if g == len(counts) - 1:
            codes_u[list(free)] = g
            yield codes_u.copy()
            return
        for chosen in itertools.combinations(free, counts[g]):
            codes_u[list(chosen)] = g
            taken = set(chosen)
            yield from fill(g + 1, tuple(i for i in free if i not in taken))

    yield from fill(0, tuple(range(n)))


def _t_two_sided_p(t: float, df: float) -> float:
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
