"""Temperature scaling of rim logits, fitted on out-of-fold predictions.

Guo et al. (ICML 2017): divide logits by a single temperature ``T > 0`` chosen to minimise the
negative log-likelihood (NLL) on held-out predictions. It changes no ranking (AUCs are
unchanged) and only makes probabilities honest. Class-weighted training (``pos_weight = w``)
shifts the optimal logit by ``log w``; :func:`prior_offset` gives the offset that undoes it,
applied before the temperature: ``p = sigmoid((logit + offset) / T)``.

Training sets are often enriched with rims (the default model trains on 30 % PRLs; general MS
cohorts have 10-12 %, the seed study 54 %). Probabilities calibrated on the training cohort
are then too high for a cohort with fewer rims. :func:`prior_shift` gives the logit shift
that moves them to another prevalence (Saerens, Latinne & Decaestecker, Neural Comput 2002):
``p = sigmoid((logit + offset) / T + shift)``, and :func:`prevalence_weights` reweights the
out-of-fold labels so that :func:`choose_threshold` picks the threshold for that cohort.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from qsm_core.errors import InputError, NotEstimableError

__all__ = ["binary_nll", "fit_temperature", "apply_temperature", "prior_offset",
           "prior_shift", "prevalence_weights", "choose_threshold"]


def binary_nll(logits, labels) -> float:
    """Mean binary negative log-likelihood (nats) of ``sigmoid(logits)`` for 0/1 labels.

    Examples
    --------
    >>> round(binary_nll([0.0, 0.0], [0, 1]), 6)
    0.693147
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    # log(1 + exp(-z)) for y = 1, log(1 + exp(z)) for y = 0, computed stably
    return float(np.mean(np.logaddexp(0.0, np.where(y > 0.5, -z, z))))


def _check(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if z.shape != y.shape or z.size == 0:
        raise InputError(f"logits and labels must be non-empty and of equal length, got "
                         f"{z.shape} and {y.shape}")
    if not np.all(np.isfinite(z)):
        raise InputError("logits contain NaN/Inf")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise InputError("labels must be 0 or 1")
    return z, y


def fit_temperature(logits, labels, *, offset: float = 0.0,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature minimising the NLL of ``sigmoid((logits + offset) / T)``.

    Parameters
    ----------
    logits : array_like, shape (N,)
        Out-of-fold rim logits.
    labels : array_like, shape (N,)
        0/1 labels.
    offset : float
        Logit offset applied before the temperature (see :func:`prior_offset`).
    bounds : (float, float)
        Search interval for ``T``; a log-scale bounded search.

    Returns
    -------
    float
        ``T`` (> 1 softens over-confident logits, < 1 sharpens).

    Raises
    ------
    NotEstimableError
        If the labels hold a single class.
    """
    z, y = _check(logits, labels)
    if y.min() == y.max():
        raise NotEstimableError("temperature scaling needs both classes in the labels")
    z = z + offset
    res = minimize_scalar(lambda lt: binary_nll(z / np.exp(lt), y),
                          bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-5})
    return float(np.exp(res.x))


def apply_temperature(logits, *, temperature: float, offset: float = 0.0,
                      shift: float = 0.0) -> np.ndarray:
    """Calibrated probabilities ``sigmoid((logits + offset) / temperature + shift)``."""
    z = (np.asarray(logits, dtype=np.float64) + offset) / temperature + shift
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def prior_offset(pos_weight: float) -> float:
    """Logit offset that undoes a positive-class weight ``w`` in the BCE loss: ``-log w``."""
    if not pos_weight > 0:
        raise InputError(f"pos_weight must be > 0, got {pos_weight}")
    return float(-np.log(pos_weight))


def _check_prevalence(value, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise InputError(f"{name} must be a fraction in (0, 1), got {value}")
    return value


def prior_shift(train_prevalence: float, target_prevalence: float) -> float:
    """Logit shift moving calibrated probabilities from one rim prevalence to another.

    ``logit(target) - logit(train)``: the Bayes correction for a change of class priors
    when the class-conditional score distributions stay the same.

    Examples
    --------
    >>> round(prior_shift(0.3, 0.3), 6)
    0.0
    >>> round(prior_shift(0.5, 0.2), 6)
    -1.386294
    """
    s = _check_prevalence(train_prevalence, "train_prevalence")
    t = _check_prevalence(target_prevalence, "target_prevalence")
    return float(np.log(t / (1.0 - t)) - np.log(s / (1.0 - s)))


def prevalence_weights(labels, target_prevalence: float) -> np.ndarray:
    """Per-lesion weights that give 0/1 ``labels`` the positive share ``target_prevalence``.

    Positives get ``target / train``, negatives ``(1 - target) / (1 - train)`` (``train`` is
    the positive share of ``labels``); the weights sum to ``len(labels)``.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    t = _check_prevalence(target_prevalence, "target_prevalence")
    s = y.mean() if y.size else 0.0
    if not 0.0 < s < 1.0:
        raise NotEstimableError("reweighting to a prevalence needs both classes in the labels")
    return np.where(y > 0.5, t / s, (1.0 - t) / (1.0 - s))


def choose_threshold(probs, labels, *, rule: str = "kappa", weights=None) -> float:
    """Decision threshold on calibrated probabilities.

    Parameters
    ----------
    probs : array_like, shape (N,)
    labels : array_like, shape (N,)
    rule : {'kappa', 'youden', 'f1', 'half'}
        ``kappa``: maximise Cohen's kappa of the calls with the labels (the agreement the
        readers are judged by); ``youden``: maximise sensitivity + specificity - 1; ``f1``:
        maximise F1; ``half``: 0.5.
    weights : array_like, shape (N,), optional
        Lesion weights of the confusion counts (e.g. :func:`prevalence_weights`).

    Returns
    -------
    float
        A threshold in (0, 1); calls are ``probs >= threshold``.
    """
    if rule == "half":
        return 0.5
    if rule not in ("kappa", "youden", "f1"):
        raise InputError(f"unknown threshold rule {rule!r}; choose kappa, youden, f1 or half")
    p, y = _check(probs, labels)
    if y.min() == y.max():
        raise NotEstimableError("choosing a threshold needs both classes in the labels")
    cands = np.unique(p)
    # thresholds halfway between consecutive distinct scores (and the extremes)
    cands = np.concatenate([[cands[0]], 0.5 * (cands[1:] + cands[:-1])]) if cands.size > 1 \
        else cands
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.shape != y.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError("weights must be finite, non-negative and one per label")
    order = np.argsort(-p)
    ps = p[order]
    cum_w = np.concatenate([[0.0], np.cumsum(w[order])])  # weight called positive, by k
    cum_tp = np.concatenate([[0.0], np.cumsum((w * y)[order])])
    n, npos = cum_w[-1], cum_tp[-1]
    best, best_t = -np.inf, 0.5
    for t in cands:
        i = np.searchsorted(-ps, -t, side="right")  # lesions called positive (p >= t)
        k, tp = cum_w[i], cum_tp[i]
        fp = k - tp
        fn = npos - tp
        tn = n - k - fn
        if rule == "youden":
            score = tp / npos + tn / (n - npos) - 1.0
        elif rule == "f1":
            score = 2 * tp / max(2 * tp + fp + fn, 1)
        else:
            po = (tp + tn) / n
            pe = (k * npos + (n - k) * (n - npos)) / n**2
            score = (po - pe) / (1 - pe) if pe < 1 else 0.0
        if score > best:
            best, best_t = score, float(t)
    return float(min(max(best_t, 1e-6), 1 - 1e-6))
