"""Patient-cluster bootstrap: resample patients, keep all their lesions together.

Lesions of one patient are correlated (same brain, same scan, same reader session), so
confidence intervals that resample lesions independently are too narrow. Here every
replicate draws patients with replacement and takes all lesions of each drawn patient.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from evaluation._common import not_estimable
from qsm_core.errors import InputError, NotEstimableError

__all__ = ["cluster_indices", "cluster_bootstrap"]


def cluster_indices(clusters) -> list[np.ndarray]:
    """Row indices of each cluster (in order of first appearance)."""
    c = np.asarray(clusters)
    _, first, inv = np.unique(c, return_index=True, return_inverse=True)
    order = np.argsort(first)
    return [np.flatnonzero(inv == i) for i in order]


def cluster_bootstrap(statistic: Callable[[np.ndarray], np.ndarray], clusters, *,
                      n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                      max_failed_fraction: float = 0.1) -> list[dict]:
    """Percentile intervals of one or more statistics under patient resampling.

    Parameters
    ----------
    statistic : callable
        ``statistic(idx) -> array of shape (K,)`` evaluated on the rows ``idx`` (with
        repeats). It may raise :class:`NotEstimableError` (e.g. a replicate with a single
        class), or return NaN for one of its K values; such replicates are dropped and
        counted.
    clusters : array_like, shape (N,)
        Cluster (patient) label of every row.
    n_boot : int
        Replicates.
    alpha : float
        1 - confidence level.
    seed : int
        Seed of the generator (results are reproducible).
    max_failed_fraction : float
        If more replicates than this fail for a statistic, it is not estimable.

    Returns
    -------
    list of dict
        One per statistic: ``ci_low``, ``ci_high``, ``se`` (bootstrap SD), ``n_boot``,
        ``n_failed``, ``method``; or a not-estimable entry.
    """
    if n_boot < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}")
    groups = cluster_indices(clusters)
    if len(groups) < 2:
        raise NotEstimableError("the cluster bootstrap needs at least 2 patients")
    rng = np.random.default_rng(seed)
    values = []
    failed_all = 0
    for _ in range(int(n_boot)):
        pick = rng.integers(0, len(groups), size=len(groups))
        idx = np.concatenate([groups[i] for i in pick])
        try:
            values.append(np.atleast_1d(np.asarray(statistic(idx), dtype=float)))
        except NotEstimableError:
            failed_all += 1
    method = (f"patient-cluster bootstrap, {n_boot} replicates, percentile "
              f"{100 * (1 - alpha):g}% interval, seed {seed}")
    if not values:
        raise NotEstimableError(f"every bootstrap replicate failed ({n_boot})")
    v = np.vstack(values)
    out = []
    for k in range(v.shape[1]):
        col = v[:, k]
        ok = col[np.isfinite(col)]
        n_failed = failed_all + (col.size - ok.size)
        if ok.size < 2 or n_failed > max_failed_fraction * n_boot:
            out.append(not_estimable(
                f"{n_failed} of {n_boot} bootstrap replicates were not estimable "
                f"(e.g. a single class after resampling patients)", n_failed=int(n_failed)))
            continue
        lo, hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
        out.append({"ci_low": float(lo), "ci_high": float(hi), "se": float(ok.std(ddof=1)),
                    "n_boot": int(n_boot), "n_failed": int(n_failed), "method": method})
    return out
