import numpy as np
import pytest
from scipy.stats import norm

from evaluation import roc
from evaluation.bootstrap import cluster_bootstrap, cluster_indices
from qsm_core.errors import NotEstimableError


def test_cluster_indices_group_rows():
    g = cluster_indices(["b", "a", "b", "c", "a"])
    assert [x.tolist() for x in g] == [[0, 2], [1, 4], [3]]


def test_resamples_whole_patients_and_is_reproducible():
    clusters = np.repeat(np.arange(10), 3)
    seen = []

    def stat(idx):
        # every drawn patient contributes all 3 of its rows
        counts = np.bincount(clusters[idx], minlength=10)
        assert np.all(counts % 3 == 0)
        seen.append(len(idx))
        return np.array([idx.mean()])

    a = cluster_bootstrap(stat, clusters, n_boot=50, seed=3)
    b = cluster_bootstrap(stat, clusters, n_boot=50, seed=3)
    assert a == b and set(seen) == {30}


def test_failed_replicates_counted_or_not_estimable():
    clusters = np.arange(6)

    def flaky(idx):
        if idx.min() == 0:
            raise NotEstimableError("single class")
        return np.array([1.0])

    r = cluster_bootstrap(flaky, clusters, n_boot=200, seed=0)[0]
    assert "not_estimable" in r and r["n_failed"] > 20


def _simulate(rng, n_patients=40, lesions=6, sd_patient=0.7, shift=1.0):
    clusters = np.repeat(np.arange(n_patients), lesions)
    u = rng.normal(0, sd_patient, n_patients)[clusters]
    y = (rng.random(clusters.size) < 0.35).astype(int)
    s = shift * y + u + rng.normal(size=clusters.size)
    return y, s, clusters


@pytest.mark.slow
def test_cluster_bootstrap_covers_true_auc(rng):
    """>= 90 % of 95 % intervals cover the population AUC = Phi(shift / sqrt(2 sd_u^2 + 2))."""
    true_auc = norm.cdf(1.0 / np.sqrt(2 * 0.7**2 + 2))
    reps, hits = 200, 0
    for r in range(reps):
        y, s, clusters = _simulate(rng)

        def stat(idx, y=y, s=s):
            yb = y[idx]
            if yb.all() or not yb.any():
                raise NotEstimableError("single class")
            return np.array([roc.fast_metrics(yb.astype(bool), s[idx])[0]])

        ci = cluster_bootstrap(stat, clusters, n_boot=400, seed=r)[0]
        hits += ci["ci_low"] <= true_auc <= ci["ci_high"]
    coverage = hits / reps
    print(f"cluster bootstrap coverage {coverage:.3f} (true AUC {true_auc:.3f})")
    assert coverage >= 0.90
