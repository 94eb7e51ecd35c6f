import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluation import roc
from qsm_core.errors import InputError, NotEstimableError

# A small table with ties, within and across classes.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
S = np.array([0.9, 0.8, 0.8, 0.4, 0.8, 0.3, 0.2, 0.4, 0.1, 0.6, 0.5])
S2 = np.array([0.7, 0.9, 0.3, 0.5, 0.6, 0.2, 0.4, 0.1, 0.3, 0.8, 0.2])


def psi(x, y):
    return 1.0 if x > y else (0.5 if x == y else 0.0)


def hand_components(y, s):
    pos = [s[i] for i in range(len(y)) if y[i] == 1]
    neg = [s[i] for i in range(len(y)) if y[i] == 0]
    m, n = len(pos), len(neg)
    total = 0.0
    for x in pos:
        for z in neg:
            total += psi(x, z)
    auc = total / (m * n)
    v10 = []
    for x in pos:
        acc = 0.0
        for z in neg:
            acc += psi(x, z)
        v10.append(acc / n)
    v01 = []
    for z in neg:
        acc = 0.0
        for x in pos:
            acc += psi(x, z)
        v01.append(acc / m)
    return auc, v10, v01


def sample_cov(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    return sum((u - ma) * (v - mb) for u, v in zip(a, b)) / (len(a) - 1)


def test_delong_equals_mann_whitney_and_structural_variance_by_hand():
    auc, v10, v01 = hand_components(Y, S)
    m, n = len(v10), len(v01)
    var = sample_cov(v10, v10) / m + sample_cov(v01, v01) / n
    res = roc.delong(Y, S)
    assert res["estimate"] == pytest.approx(auc, abs=1e-12)
    assert res["variance"] == pytest.approx(var, abs=1e-12)
    # Mann-Whitney U / (m n) from scipy as a second, independent value
    from scipy.stats import mannwhitneyu
    u = mannwhitneyu(S[Y == 1], S[Y == 0]).statistic
    assert res["estimate"] == pytest.approx(u / (m * n), abs=1e-12)
    assert res["ci_low"] < auc < res["ci_high"]


def test_paired_delong_matches_hand_covariance():
    a1, v10a, v01a = hand_components(Y, S)
    a2, v10b, v01b = hand_components(Y, S2)
    m, n = len(v10a), len(v01a)
    var = ((sample_cov(v10a, v10a) + sample_cov(v10b, v10b) - 2 * sample_cov(v10a, v10b)) / m
           + (sample_cov(v01a, v01a) + sample_cov(v01b, v01b) - 2 * sample_cov(v01a, v01b)) / n)
    res = roc.delong_paired(Y, S, S2)
    assert res["auc_a"] == pytest.approx(a1)
    assert res["auc_b"] == pytest.approx(a2)
    assert res["variance"] == pytest.approx(var, abs=1e-12)
    z = (a1 - a2) / np.sqrt(var)
    assert res["z"] == pytest.approx(z)
    from scipy.stats import norm
    assert res["p_value"] == pytest.approx(2 * norm.sf(abs(z)))


def test_paired_delong_identical_scorers():
    res = roc.delong_paired(Y, S, S)
    assert res["estimate"] == 0 and res["p_value"] == 1.0


def test_auc_ap_pauc_match_sklearn(rng):
    y = (rng.random(300) < 0.2).astype(int)
    s = np.round(y * 0.8 + rng.normal(size=300), 1)  # rounded: many ties
    assert roc.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert roc.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    for f in (0.05, 0.1, 0.3):
        assert roc.partial_auc(y, s, max_fpr=f) == pytest.approx(
            roc_auc_score(y, s, max_fpr=f), abs=1e-10)
    # the unchecked one-sort path used by the bootstrap gives the same three numbers
    auc, ap, pa = roc.fast_metrics(y.astype(bool), s, max_fpr=0.1)
    assert auc == pytest.approx(roc.roc_auc(y, s), abs=1e-12)
    assert ap == pytest.approx(roc.average_precision(y, s), abs=1e-12)
    assert pa == pytest.approx(roc.partial_auc(y, s, max_fpr=0.1), abs=1e-12)
    # standardised pAUC of a perfect and a chance scorer
    assert roc.partial_auc(y, y.astype(float), max_fpr=0.1) == pytest.approx(1.0)


def test_roc_curve_endpoints():
    c = roc.roc_curve(Y, S)
    assert (c["fpr"][0], c["tpr"][0]) == (0.0, 0.0)
    assert (c["fpr"][-1], c["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(c["fpr"]) >= 0) and np.all(np.diff(c["tpr"]) >= 0)


def test_bad_inputs():
    with pytest.raises(NotEstimableError, match="one class"):
        roc.delong(np.zeros(5), np.arange(5.0))
    with pytest.raises(InputError, match="non-finite"):
        roc.delong(Y, np.r_[S[:-1], np.nan])
    with pytest.raises(InputError, match="0/1"):
        roc.delong(np.r_[Y[:-1], 2], S)
