"""Binary decisions: exact proportions, sensitivity/specificity, threshold choice.

A lesion (or patient) is called positive when ``score >= threshold``. Thresholds are either
fixed, or chosen on out-of-fold data (patients split into folds; each fold's threshold is
chosen on the other folds and applied to it) so that the reported sensitivity and
specificity are not optimistically biased by choosing and testing on the same cases.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from evaluation._common import not_estimable
from qsm_core.errors import InputError, NotEstimableError

__all__ = ["clopper_pearson", "proportion", "confusion", "sens_spec", "youden_threshold",
           "threshold_for_sensitivity", "choose_threshold", "out_of_fold_calls",
           "parse_threshold_rule"]


def clopper_pearson(k: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided confidence interval of a binomial proportion.

    Parameters
    ----------
    k, n : int
        Successes and trials, ``0 <= k <= n``, ``n >= 1``.
    alpha : float
        1 - confidence level.

    Examples
    --------
    >>> lo, hi = clopper_pearson(26, 32)
    >>> round(100 * lo, 1), round(100 * hi, 1)
    (63.6, 92.8)
    """
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise NotEstimableError(f"a proportion needs 0 <= k <= n and n >= 1 (k={k}, n={n})")
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def proportion(k: int, n: int, *, alpha: float = 0.05) -> dict:
    """A proportion ``k/n`` with its exact CI, or a not-estimable entry when ``n == 0``."""
    if int(n) == 0:
        return not_estimable("no cases in the denominator", k=0, n=0)
    lo, hi = clopper_pearson(k, n, alpha=alpha)
    return {"estimate": int(k) / int(n), "ci_low": lo, "ci_high": hi, "k": int(k), "n": int(n),
            "method": f"exact Clopper-Pearson {100 * (1 - alpha):g}% CI"}


def _as01(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise InputError(f"{name} must be 1-D")
    if not np.all(np.isin(a, (0.0, 1.0))):
        raise InputError(f"{name} must hold only 0/1 (no missing values)")
    return a.astype(bool)


def confusion(y_true, y_pred) -> dict:
    """Counts ``tp``, ``fp``, ``tn``, ``fn`` of 0/1 calls against a 0/1 reference."""
    y, p = _as01(y_true, "reference"), _as01(y_pred, "calls")
    if y.shape != p.shape:
        raise InputError(f"reference and calls differ in length ({y.size} vs {p.size})")
    return {"tp": int(np.sum(y & p)), "fp": int(np.sum(~y & p)),
            "tn": int(np.sum(~y & ~p)), "fn": int(np.sum(y & ~p))}


def sens_spec(y_true, y_pred, *, alpha: float = 0.05) -> dict:
    """Sensitivity, specificity, PPV, NPV and accuracy with exact CIs.

    Returns
    -------
    dict
        ``counts`` (tp, fp, tn, fn) and one :func:`proportion` entry per measure (a
        not-estimable entry when its denominator is 0).
    """
    c = confusion(y_true, y_pred)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    return {"counts": c,
            "sensitivity": proportion(tp, tp + fn, alpha=alpha),
            "specificity": proportion(tn, tn + fp, alpha=alpha),
            "ppv": proportion(tp, tp + fp, alpha=alpha),
            "npv": proportion(tn, tn + fn, alpha=alpha),
            "accuracy": proportion(tp + tn, tp + tn + fp + fn, alpha=alpha)}


def _candidates(s: np.ndarray) -> np.ndarray:
    u = np.unique(s)
    return np.r_[u, np.inf]  # score >= inf calls nothing positive


def youden_threshold(y_true, scores) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (highest on ties)."""
    y = _as01(y_true, "reference")
    s = np.asarray(scores, float)
    if y.all() or not y.any():
        raise NotEstimableError("Youden's threshold needs both classes")
    cand = _candidates(s)
    calls = s[None, :] >= cand[:, None]
    sens = (calls & y).sum(1) / y.sum()
    spec = (~calls & ~y).sum(1) / (~y).sum()
    j = sens + spec - 1
    return float(cand[int(np.flatnonzero(j == j.max())[-1])])


def threshold_for_sensitivity(y_true, scores, *, target: float) -> float:
    """Highest threshold whose sensitivity is at least ``target``."""
    if not 0 < target <= 1:
        raise InputError(f"target sensitivity must lie in (0, 1], got {target}")
    y = _as01(y_true, "reference")
    s = np.asarray(scores, float)
    if not y.any():
        raise NotEstimableError("a target sensitivity needs positive cases")
    pos = np.sort(s[y])[::-1]
    k = int(np.ceil(target * pos.size - 1e-12))
    return float(pos[max(k, 1) - 1])


def parse_threshold_rule(rule) -> tuple[str, float | None]:
    """Parse a threshold rule: a number, ``"call"``, ``"youden"`` or ``"sensitivity=0.9"``.

    Returns
    -------
    (kind, value)
        kind in {'fixed', 'call', 'youden', 'sensitivity'}.
    """
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if not np.isfinite(rule):
            raise InputError(f"threshold must be finite, got {rule}")
        return "fixed", float(rule)
    text = str(rule).strip().lower()
    if text == "call":
        return "call", None
    if text == "youden":
        return "youden", None
    if text.startswith("sensitivity=") or text.startswith("sens="):
        try:
            v = float(text.split("=", 1)[1])
        except ValueError:
            v = -1.0
        if not 0 < v <= 1:
            raise InputError(f"threshold rule {rule!r}: give a target sensitivity in (0, 1], "
                             f"e.g. 'sensitivity=0.9'")
        return "sensitivity", v
    try:
        return parse_threshold_rule(float(text))
    except ValueError:
        raise InputError(f"unknown threshold rule {rule!r}; use a number (e.g. 0.5), 'call' "
                         f"(the scorer's own *_call column), 'youden' or 'sensitivity=0.9'"
                         ) from None


def choose_threshold(y_true, scores, *, rule) -> float:
    """Threshold from ``rule`` ('youden' or 'sensitivity=T') chosen on ``(y_true, scores)``."""
    kind, value = parse_threshold_rule(rule)
    if kind == "fixed":
        return float(value)
    if kind == "youden":
        return youden_threshold(y_true, scores)
    if kind == "sensitivity":
        return threshold_for_sensitivity(y_true, scores, target=value)
    raise InputError("choose_threshold needs a number, 'youden' or 'sensitivity=T'")


def out_of_fold_calls(y_true, scores, groups, *, rule, n_folds: int = 5,
                      seed: int = 0) -> dict:
    """Calls whose thresholds were chosen on other patients (grouped K-fold).

    Patients (``groups``) are shuffled with ``seed`` and dealt into ``n_folds`` folds; the
    threshold for each fold is chosen by ``rule`` on the remaining folds.

    Returns
    -------
    dict
        ``calls`` (ndarray of int, shape (N,)), ``fold_thresholds`` (list), ``n_folds``.
    """
    y = _as01(y_true, "reference")
    s = np.asarray(scores, float)
    g = np.asarray(groups)
    uniq = np.unique(g)
    k = min(int(n_folds), uniq.size)
    if k < 2:
        raise NotEstimableError("out-of-fold thresholds need at least 2 patients")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(uniq)
    fold_of = {p: i % k for i, p in enumerate(perm)}
    fold = np.array([fold_of[p] for p in g])
    calls = np.zeros(y.size, dtype=int)
    thresholds = []
    for f in range(k):
        test = fold == f
        thr = choose_threshold(y[~test], s[~test], rule=rule)
        thresholds.append(thr)
        calls[test] = (s[test] >= thr).astype(int)
    return {"calls": calls, "fold_thresholds": thresholds, "n_folds": k}
