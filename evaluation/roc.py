"""ROC and precision-recall analysis with DeLong variance (own implementation).

The empirical ROC AUC equals the Mann-Whitney statistic
``A = 1/(m n) * sum_i sum_j psi(x_i, y_j)`` with ``psi = 1`` if a positive's score ``x_i``
exceeds a negative's score ``y_j``, ``1/2`` on ties, ``0`` otherwise. DeLong, DeLong &
Clarke-Pearson (Biometrics 1988) estimate its variance from the *structural components*
``V10(x_i) = 1/n sum_j psi(x_i, y_j)`` and ``V01(y_j) = 1/m sum_i psi(x_i, y_j)``:
``var(A) = S10/m + S01/n`` with ``S10``, ``S01`` their sample variances (covariances
between scorers for the paired test). The components are computed from mid-ranks
(Sun & Xu, IEEE SPL 2014), which gives the same numbers as the double loop in O(N log N).

Scores are "higher = more likely positive"; a positive outcome is ``1``.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from qsm_core.errors import InputError, NotEstimableError

__all__ = ["check_binary_scores", "roc_curve", "pr_curve", "roc_auc", "average_precision",
           "partial_auc", "fast_metrics", "delong_components", "delong", "delong_paired"]


def check_binary_scores(y_true, scores, *, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validate a 0/1 outcome and a finite score vector of the same length.

    Returns
    -------
    y : ndarray of bool, shape (N,)
    s : ndarray of float, shape (N,)

    Raises
    ------
    InputError
        Shapes differ, the outcome is not 0/1, or the scores hold NaN/Inf.
    NotEstimableError
        Only one class is present.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise InputError(f"{name}: outcome and scores must be 1-D of equal length, got "
                         f"{y.shape} and {s.shape}")
    yf = y.astype(float)
    if not np.all(np.isin(yf, (0.0, 1.0))):
        raise InputError(f"{name}: the outcome must be 0/1 without missing values")
    if not np.all(np.isfinite(s)):
        bad = np.flatnonzero(~np.isfinite(s))
        raise InputError(f"{name}: {bad.size} non-finite score(s) at positions {bad[:10].tolist()}")
    yb = yf.astype(bool)
    if yb.all() or not yb.any():
        raise NotEstimableError(f"{name}: only one class in the outcome "
                                f"({int(yb.sum())} positive of {yb.size}); AUC needs both")
    return yb, s


def roc_curve(y_true, scores) -> dict:
    """Empirical ROC curve at every distinct score (ties grouped).

    Returns
    -------
    dict with ``fpr``, ``tpr``, ``thresholds`` (ndarrays, shape (K+1,)); the first point is
    (0, 0) with threshold +inf; a lesion is called positive when ``score >= threshold``.
    """
    y, s = check_binary_scores(y_true, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.flatnonzero(np.diff(s_sorted)) if s.size > 1 else np.array([], int)
    last = np.r_[distinct, s.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    thr = np.r_[np.inf, s_sorted[last]]
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr}


def pr_curve(y_true, scores) -> dict:
    """Precision-recall curve at every distinct score (ties grouped).

    Returns
    -------
    dict with ``recall``, ``precision``, ``thresholds`` (ndarrays, shape (K,)), in order of
    decreasing threshold.
    """
    y, s = check_binary_scores(y_true, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.flatnonzero(np.diff(s_sorted)) if s.size > 1 else np.array([], int)
    last = np.r_[distinct, s.size - 1]
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1)
    recall = tps / y.sum()
    return {"recall": recall, "precision": precision, "thresholds": s_sorted[last]}


def average_precision(y_true, scores) -> float:
    """Area under the step-wise PR curve: ``sum_k (R_k - R_{k-1}) P_k`` (no interpolation)."""
    c = pr_curve(y_true, scores)
    recall = np.r_[0.0, c["recall"]]
    return float(np.sum(np.diff(recall) * c["precision"]))


def roc_auc(y_true, scores) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count 1/2)."""
    return float(delong_components(y_true, np.asarray(scores, float)[None, :])[0][0])


def partial_auc(y_true, scores, *, max_fpr: float = 0.1, standardized: bool = True) -> float:
    """Partial ROC AUC over ``0 <= FPR <= max_fpr``.

    Parameters
    ----------
    max_fpr : float in (0, 1]
    standardized : bool
        McClish (Med Decis Making 1989) standardisation to [0.5, 1]:
        ``0.5 * (1 + (pAUC - max_fpr**2 / 2) / (max_fpr - max_fpr**2 / 2))``; 0.5 is chance
        and 1 is perfect, like a full AUC.

    Returns
    -------
    float
        The (standardised) partial area; the curve is linearly interpolated at ``max_fpr``.
    """
    if not 0 < max_fpr <= 1:
        raise InputError(f"max_fpr must lie in (0, 1], got {max_fpr}")
    c = roc_curve(y_true, scores)
    fpr, tpr = c["fpr"], c["tpr"]
    stop = np.searchsorted(fpr, max_fpr, side="right")
    x = np.r_[fpr[:stop], max_fpr]
    y = np.r_[tpr[:stop], np.interp(max_fpr, fpr, tpr)]
    area = float(np.trapezoid(y, x))
    if not standardized:
        return area
    min_area = 0.5 * max_fpr**2
    return 0.5 * (1.0 + (area - min_area) / (max_fpr - min_area))


def fast_metrics(y: np.ndarray, s: np.ndarray, *, max_fpr: float = 0.1) -> tuple[float, ...]:
    """ROC AUC, average precision and standardised partial AUC from one sort, unchecked.

    For inner loops (the bootstrap): ``y`` must be a bool array with both classes and ``s``
    finite floats of the same length. The trapezoidal area of the tie-grouped ROC curve
    equals the Mann-Whitney statistic, so the AUC is identical to :func:`roc_auc`.

    Returns
    -------
    (auc, average_precision, partial_auc)
    """
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    last = np.r_[np.flatnonzero(ss[1:] != ss[:-1]), ss.size - 1]
    tps = np.cumsum(ys)[last]
    fps = (last + 1) - tps
    m, n = tps[-1], fps[-1]
    tpr = np.r_[0.0, tps / m]
    fpr = np.r_[0.0, fps / n]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)
    ap = float(np.sum(np.diff(tpr) * (tps / (last + 1))))
    stop = np.searchsorted(fpr, max_fpr, side="right")
    x = np.r_[fpr[:stop], max_fpr]
    yv = np.r_[tpr[:stop], np.interp(max_fpr, fpr, tpr)]
    area = float(np.sum(np.diff(x) * (yv[1:] + yv[:-1])) / 2)
    min_area = 0.5 * max_fpr**2
    return auc, ap, 0.5 * (1.0 + (area - min_area) / (max_fpr - min_area))


def delong_components(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components of one or more scorers on the same cases.

    Parameters
    ----------
    y_true : array_like, shape (N,)
        0/1 outcome.
    scores : array_like, shape (K, N)
        One row per scorer.

    Returns
    -------
    auc : ndarray, shape (K,)
    v10 : ndarray, shape (K, m)
        ``V10`` of each of the ``m`` positives.
    v01 : ndarray, shape (K, n)
        ``V01`` of each of the ``n`` negatives.
    """
    s2 = np.atleast_2d(np.asarray(scores, dtype=float))
    y, _ = check_binary_scores(y_true, s2[0])
    for row in s2[1:]:
        check_binary_scores(y, row)
    pos, neg = s2[:, y], s2[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    r_all = stats.rankdata(s2, axis=1)          # mid-ranks among all cases
    r_pos = stats.rankdata(pos, axis=1)         # among positives
    r_neg = stats.rankdata(neg, axis=1)         # among negatives
    # negatives below (ties 1/2) each positive = rank among all - rank among positives
    v10 = (r_all[:, y] - r_pos) / n
    # positives above (ties 1/2) each negative = m - (rank among all - rank among negatives)
    v01 = 1.0 - (r_all[:, ~y] - r_neg) / m
    auc = v10.mean(axis=1)
    return auc, v10, v01


def _covariance(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((v10.shape[0],) * 2)
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((v01.shape[0],) * 2)
    return s10 / m + s01 / n


def delong(y_true, scores, *, alpha: float = 0.05) -> dict:
    """ROC AUC with DeLong standard error and a Wald confidence interval.

    Returns
    -------
    dict
        ``estimate``, ``variance``, ``se``, ``ci_low``, ``ci_high`` (Wald, clipped to
        [0, 1]), ``n_positive``, ``n_negative``, ``method``.
    """
    auc, v10, v01 = delong_components(y_true, np.asarray(scores, float)[None, :])
    var = float(_covariance(v10, v01)[0, 0])
    se = float(np.sqrt(max(var, 0.0)))
    z = stats.norm.ppf(1 - alpha / 2)
    a = float(auc[0])
    return {"estimate": a, "variance": var, "se": se,
            "ci_low": max(0.0, a - z * se), "ci_high": min(1.0, a + z * se),
            "n_positive": int(v10.shape[1]), "n_negative": int(v01.shape[1]),
            "method": f"DeLong {100 * (1 - alpha):g}% Wald interval, clipped to [0, 1]"}


def delong_paired(y_true, scores_a, scores_b, *, alpha: float = 0.05) -> dict:
    """Paired DeLong test of two correlated ROC AUCs measured on the same cases.

    Returns
    -------
    dict
        ``auc_a``, ``auc_b``, ``estimate`` (``auc_a - auc_b``), ``se``, ``ci_low``,
        ``ci_high``, ``z``, ``p_value`` (two-sided), ``correlation``, ``method``.
    """
    s = np.vstack([np.asarray(scores_a, float), np.asarray(scores_b, float)])
    auc, v10, v01 = delong_components(y_true, s)
    cov = _covariance(v10, v01)
    contrast = np.array([1.0, -1.0])
    var = float(contrast @ cov @ contrast)
    diff = float(auc[0] - auc[1])
    zq = stats.norm.ppf(1 - alpha / 2)
    out = {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "estimate": diff,
           "variance": var, "method": "paired DeLong (1988) z-test, two-sided"}
    denom = np.sqrt(cov[0, 0] * cov[1, 1])
    out["correlation"] = float(cov[0, 1] / denom) if denom > 0 else None
    if var <= 1e-15:
        if abs(diff) < 1e-12:
            out.update(se=0.0, ci_low=diff, ci_high=diff, z=None, p_value=1.0,
                       note="identical rankings: no difference")
            return out
        raise NotEstimableError("the AUC difference has zero DeLong variance")
    se = float(np.sqrt(var))
    z = diff / se
    out.update(se=se, ci_low=diff - zq * se, ci_high=diff + zq * se, z=float(z),
               p_value=float(2 * stats.norm.sf(abs(z))))
    return out
