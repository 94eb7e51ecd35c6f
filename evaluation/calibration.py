"""Calibration of probability scores: reliability diagram, ECE and Brier score."""

from __future__ import annotations

import numpy as np

from qsm_core.errors import InputError, NotEstimableError

__all__ = ["reliability", "expected_calibration_error", "calibration"]


def _check(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, float)
    p = np.asarray(prob, float)
    if y.shape != p.shape or y.ndim != 1:
        raise InputError("outcome and probabilities must be 1-D of equal length")
    if y.size == 0:
        raise NotEstimableError("no cases")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise InputError("the outcome must be 0/1")
    if not np.all(np.isfinite(p)):
        raise InputError("probabilities hold NaN/Inf")
    if p.min() < 0 or p.max() > 1:
        raise NotEstimableError(f"scores outside [0, 1] (range {p.min():.3g}..{p.max():.3g}) "
                                f"are not probabilities; calibration does not apply")
    return y, p


def reliability(y_true, prob, *, n_bins: int = 10) -> dict:
    """Reliability-diagram data over equal-width probability bins.

    Returns
    -------
    dict
        ``bin_edges`` (n_bins+1,), and per bin ``count``, ``mean_predicted``,
        ``observed_fraction`` (``None`` for empty bins).
    """
    y, p = _check(y_true, prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    count, mean_p, obs = [], [], []
    for i in range(n_bins):
        sel = b == i
        count.append(int(sel.sum()))
        mean_p.append(float(p[sel].mean()) if sel.any() else None)
        obs.append(float(y[sel].mean()) if sel.any() else None)
    return {"bin_edges": edges.tolist(), "count": count, "mean_predicted": mean_p,
            "observed_fraction": obs}


def expected_calibration_error(y_true, prob, *, n_bins: int = 10) -> float:
    """ECE = sum over bins of (n_b / N) * |observed fraction - mean predicted|."""
    r = reliability(y_true, prob, n_bins=n_bins)
    n = sum(r["count"])
    return float(sum(c / n * abs(o - m) for c, o, m in
                     zip(r["count"], r["observed_fraction"], r["mean_predicted"]) if c))


def calibration(y_true, prob, *, n_bins: int = 10) -> dict:
    """ECE, Brier score and reliability data in one dict."""
    y, p = _check(y_true, prob)
    return {"ece": expected_calibration_error(y, p, n_bins=n_bins),
            "brier": float(np.mean((p - y) ** 2)), "n_bins": int(n_bins),
            "reliability": reliability(y, p, n_bins=n_bins),
            "method": f"{n_bins} equal-width bins"}
