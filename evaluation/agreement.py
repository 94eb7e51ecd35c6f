"""Agreement between raters: Cohen's and Fleiss' kappa, McNemar, ICC, Spearman."""

from __future__ import annotations

import numpy as np
from scipy import stats

from qsm_core.errors import InputError, NotEstimableError

__all__ = ["contingency", "cohen_kappa", "fleiss_kappa", "fleiss_kappa_from_counts",
           "mcnemar", "icc", "spearman"]


def _clean_pair(a, b, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a), np.asarray(b)
    if x.ndim != 1 or x.shape != y.shape:
        raise InputError(f"{name_a} and {name_b} must be 1-D of equal length")
    for v, nm in ((x, name_a), (y, name_b)):
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise InputError(f"{nm} holds missing values")
    if x.size == 0:
        raise NotEstimableError("no paired ratings")
    return x, y


def contingency(a, b) -> tuple[np.ndarray, list]:
    """Counts table of two raters' categories (rows ``a``, columns ``b``)."""
    x, y = _clean_pair(a, b, "rater a", "rater b")
    cats = sorted(set(x.tolist()) | set(y.tolist()))
    ix = {c: i for i, c in enumerate(cats)}
    t = np.zeros((len(cats), len(cats)), dtype=int)
    for u, v in zip(x.tolist(), y.tolist()):
        t[ix[u], ix[v]] += 1
    return t, cats


def cohen_kappa(a, b, *, alpha: float = 0.05) -> dict:
    """Cohen's kappa of two raters with a large-sample (Fleiss-Cohen-Everitt 1969) CI.

    ``SE = sqrt(A + B - C) / ((1 - pe) sqrt(n))`` with
    ``A = sum_i p_ii [1 - (p_i. + p_.i)(1 - k)]^2``,
    ``B = (1 - k)^2 sum_{i != j} p_ij (p_.i + p_j.)^2``, ``C = [k - pe (1 - k)]^2``
    (Fleiss, Levin & Paik 2003, eq. 18.13).

    Returns
    -------
    dict
        ``estimate``, ``se``, ``ci_low``, ``ci_high``, ``observed_agreement``,
        ``expected_agreement``, ``n``, ``table``, ``method``.
    """
    t, cats = contingency(a, b)
    n = t.sum()
    p = t / n
    rows, cols = p.sum(1), p.sum(0)
    po = float(np.trace(p))
    pe = float(rows @ cols)
    if pe >= 1 - 1e-12:
        raise NotEstimableError("both raters gave one and the same category to every case; "
                                "kappa is undefined")
    k = (po - pe) / (1 - pe)
    A = sum(p[i, i] * (1 - (rows[i] + cols[i]) * (1 - k)) ** 2 for i in range(len(cats)))
    B = (1 - k) ** 2 * sum(p[i, j] * (cols[i] + rows[j]) ** 2
                           for i in range(len(cats)) for j in range(len(cats)) if i != j)
    C = (k - pe * (1 - k)) ** 2
    se = float(np.sqrt(max(A + B - C, 0.0)) / ((1 - pe) * np.sqrt(n)))
    z = stats.norm.ppf(1 - alpha / 2)
    return {"estimate": float(k), "se": se, "ci_low": float(max(-1.0, k - z * se)),
            "ci_high": float(min(1.0, k + z * se)), "observed_agreement": po,
            "expected_agreement": pe, "n": int(n), "categories": [str(c) for c in cats],
            "table": t.tolist(),
            "method": f"Cohen's kappa, large-sample {100 * (1 - alpha):g}% CI "
                      f"(Fleiss, Cohen & Everitt 1969)"}


def fleiss_kappa_from_counts(counts) -> dict:
    """Fleiss' kappa from a subjects x categories table of rating counts.

    Every row must sum to the same number of raters ``r >= 2``.
    """
    c = np.asarray(counts, dtype=float)
    if c.ndim != 2 or c.shape[0] == 0:
        raise NotEstimableError("no subjects")
    r = c.sum(1)
    if not np.allclose(r, r[0]) or r[0] < 2:
        raise InputError("every subject needs the same number (>= 2) of ratings")
    r = float(r[0])
    n = c.shape[0]
    p_j = c.sum(0) / (n * r)
    p_i = (np.sum(c**2, axis=1) - r) / (r * (r - 1))
    p_bar, pe = float(p_i.mean()), float(np.sum(p_j**2))
    if pe >= 1 - 1e-12:
        raise NotEstimableError("every rating is the same category; Fleiss' kappa is undefined")
    return {"estimate": (p_bar - pe) / (1 - pe), "observed_agreement": p_bar,
            "expected_agreement": pe, "n_subjects": int(n), "n_raters": int(r),
            "method": "Fleiss' kappa (1971)"}


def fleiss_kappa(ratings) -> dict:
    """Fleiss' kappa from a subjects x raters matrix of category labels."""
    m = np.asarray(ratings)
    if m.ndim != 2 or m.shape[1] < 2:
        raise InputError("ratings must be a subjects x raters matrix with >= 2 raters")
    if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
        raise InputError("ratings hold missing values")
    cats = np.unique(m)
    counts = np.stack([(m == c).sum(1) for c in cats], axis=1)
    return fleiss_kappa_from_counts(counts)


def mcnemar(a, b, *, method: str = "exact") -> dict:
    """McNemar's test of two paired 0/1 raters.

    Parameters
    ----------
    method : {'exact', 'midp'}
        Exact binomial test on the discordant pairs, or its mid-p version.

    Returns
    -------
    dict
        ``b`` (a=1, b=0), ``c`` (a=0, b=1), ``p_value``, ``method``.
    """
    x, y = _clean_pair(a, b, "rater a", "rater b")
    x, y = x.astype(float), y.astype(float)
    if not (np.all(np.isin(x, (0, 1))) and np.all(np.isin(y, (0, 1)))):
        raise InputError("McNemar needs 0/1 calls")
    n10 = int(np.sum((x == 1) & (y == 0)))
    n01 = int(np.sum((x == 0) & (y == 1)))
    nd = n10 + n01
    if method not in ("exact", "midp"):
        raise InputError(f"McNemar method must be 'exact' or 'midp', got {method!r}")
    if nd == 0:
        p = 1.0
    else:
        k = min(n10, n01)
        p = min(1.0, 2 * float(stats.binom.cdf(k, nd, 0.5)))
        if method == "midp":
            p = p - float(stats.binom.pmf(k, nd, 0.5))
    return {"b": n10, "c": n01, "n_discordant": nd, "p_value": float(p),
            "method": "McNemar exact binomial" if method == "exact" else "McNemar mid-p"}


def icc(ratings, *, kind: str = "2,1", alpha: float = 0.05) -> dict:
    """Intraclass correlation of a targets x raters matrix (Shrout & Fleiss 1979).

    Parameters
    ----------
    ratings : array_like, shape (n, k)
    kind : {'2,1', '3,1'}
        ICC(2,1): two-way random, absolute agreement (McGraw & Wong ICC(A,1));
        ICC(3,1): two-way mixed, consistency (ICC(C,1)).

    Returns
    -------
    dict
        ``estimate``, ``ci_low``, ``ci_high`` (F-based, McGraw & Wong 1996), the mean squares.
    """
    x = np.asarray(ratings, dtype=float)
    if x.ndim != 2 or x.shape[1] < 2:
        raise InputError("ICC needs a targets x raters matrix with >= 2 raters")
    if not np.all(np.isfinite(x)):
        raise InputError("ICC ratings hold missing values")
    n, k = x.shape
    if n < 2:
        raise NotEstimableError("ICC needs at least 2 targets")
    gm = x.mean()
    ssr = k * np.sum((x.mean(1) - gm) ** 2)
    ssc = n * np.sum((x.mean(0) - gm) ** 2)
    sse = np.sum((x - gm) ** 2) - ssr - ssc
    msr, msc, mse = ssr / (n - 1), ssc / (k - 1), sse / ((n - 1) * (k - 1))
    q = 1 - alpha / 2
    df1, df2 = n - 1, (n - 1) * (k - 1)
    if kind == "3,1":
        den = msr + (k - 1) * mse
        if den <= 0 or mse <= 0 and msr <= 0:
            raise NotEstimableError("no variance between targets; ICC is undefined")
        est = (msr - mse) / den
        if mse <= 0:
            lo = hi = 1.0
        else:
            f0 = msr / mse
            fl = f0 / stats.f.ppf(q, df1, df2)
            fu = f0 * stats.f.ppf(q, df2, df1)
            lo, hi = (fl - 1) / (fl + k - 1), (fu - 1) / (fu + k - 1)
        name = "ICC(3,1) two-way mixed, consistency"
    elif kind == "2,1":
        den = msr + (k - 1) * mse + k * (msc - mse) / n
        if den <= 0:
            raise NotEstimableError("no variance between targets; ICC is undefined")
        est = (msr - mse) / den
        if est >= 1 - 1e-12 or mse <= 0:
            lo = hi = float(est)
        else:
            a = k * est / (n * (1 - est))
            b = 1 + k * est * (n - 1) / (n * (1 - est))
            v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / df2)
            fs = stats.f.ppf(q, df1, v)
            fs2 = stats.f.ppf(q, v, df1)
            lo = n * (msr - fs * mse) / (fs * (k * msc + (k * n - k - n) * mse) + n * msr)
            hi = n * (fs2 * msr - mse) / (k * msc + (k * n - k - n) * mse + n * fs2 * msr)
        name = "ICC(2,1) two-way random, absolute agreement"
    else:
        raise InputError(f"ICC kind must be '2,1' or '3,1', got {kind!r}")
    return {"estimate": float(est), "ci_low": float(lo), "ci_high": float(hi),
            "ms_rows": float(msr), "ms_cols": float(msc), "ms_error": float(mse),
            "n_targets": int(n), "n_raters": int(k),
            "method": f"{name}; {100 * (1 - alpha):g}% F-based CI (McGraw & Wong 1996)"}


def spearman(a, b) -> dict:
    """Spearman rank correlation with its two-sided p-value (scipy)."""
    x, y = _clean_pair(a, b, "a", "b")
    x, y = x.astype(float), y.astype(float)
    if x.size < 3:
        raise NotEstimableError("Spearman's rho needs at least 3 pairs")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise NotEstimableError("one variable is constant; Spearman's rho is undefined")
    r = stats.spearmanr(x, y)
    return {"estimate": float(r.statistic), "p_value": float(r.pvalue), "n": int(x.size),
            "method": "Spearman rank correlation (scipy.stats.spearmanr)"}
