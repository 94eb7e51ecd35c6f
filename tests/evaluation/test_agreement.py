import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

from evaluation import agreement
from qsm_core.errors import NotEstimableError


def _from_table(t):
    a, b = [], []
    for i in range(len(t)):
        for j in range(len(t)):
            a += [i] * t[i][j]
            b += [j] * t[i][j]
    return np.array(a), np.array(b)


def test_cohen_kappa_hand_table():
    # 2x2: po = 35/50 = 0.7; rows (25, 25)/50, cols (30, 20)/50 -> pe = .5*.6 + .5*.4 = .5
    t = [[20, 5], [10, 15]]
    a, b = _from_table(t)
    r = agreement.cohen_kappa(a, b)
    assert r["observed_agreement"] == pytest.approx(0.7)
    assert r["expected_agreement"] == pytest.approx(0.5)
    assert r["estimate"] == pytest.approx(0.4)
    assert r["estimate"] == pytest.approx(cohen_kappa_score(a, b))
    # Fleiss-Cohen-Everitt SE by hand with explicit loops
    n = 50
    p = [[c / n for c in row] for row in t]
    rows = [sum(p[i]) for i in range(2)]
    cols = [sum(p[i][j] for i in range(2)) for j in range(2)]
    k = 0.4
    A = 0.0
    for i in range(2):
        A += p[i][i] * (1 - (rows[i] + cols[i]) * (1 - k)) ** 2
    B = 0.0
    for i in range(2):
        for j in range(2):
            if i != j:
                B += p[i][j] * (cols[i] + rows[j]) ** 2
    B *= (1 - k) ** 2
    C = (k - 0.5 * (1 - k)) ** 2
    se = (A + B - C) ** 0.5 / ((1 - 0.5) * n ** 0.5)
    assert r["se"] == pytest.approx(se)
    assert r["ci_low"] == pytest.approx(0.4 - 1.959964 * se, abs=1e-5)


def test_cohen_kappa_three_categories_vs_sklearn():
    t = [[10, 2, 1], [3, 8, 2], [0, 1, 12]]
    a, b = _from_table(t)
    assert agreement.cohen_kappa(a, b)["estimate"] == pytest.approx(cohen_kappa_score(a, b))


def test_cohen_kappa_constant_is_not_estimable():
    with pytest.raises(NotEstimableError):
        agreement.cohen_kappa([1, 1, 1], [1, 1, 1])


def test_fleiss_kappa_published_example():
    # Fleiss (1971) example as tabulated on Wikipedia: kappa = 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
              [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
              [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert agreement.fleiss_kappa_from_counts(counts)["estimate"] == pytest.approx(0.2099, abs=1e-4)


def test_fleiss_equals_cohen_like_for_matrix_input():
    m = np.array([[1, 1], [0, 0], [1, 0], [0, 0], [1, 1], [0, 1]])
    r = agreement.fleiss_kappa(m)
    # by hand: P_i = 1,1,0,1,1,0 -> Pbar = 4/6; p(1) = 6/12 -> Pe = .5
    assert r["estimate"] == pytest.approx((4 / 6 - 0.5) / 0.5)


def test_icc_shrout_fleiss_example():
    x = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9],
                  [6, 2, 4, 7]])
    i2 = agreement.icc(x, kind="2,1")
    i3 = agreement.icc(x, kind="3,1")
    # Shrout & Fleiss (1979) Table 4: ICC(2,1) = .29, ICC(3,1) = .71
    assert i2["estimate"] == pytest.approx(0.29, abs=0.005)
    assert i3["estimate"] == pytest.approx(0.71, abs=0.006)
    # F-based 95% CIs (as published for this table, e.g. pingouin's docs): [.02, .76], [.34, .95]
    assert (round(i2["ci_low"], 2), round(i2["ci_high"], 2)) == (0.02, 0.76)
    assert (round(i3["ci_low"], 2), round(i3["ci_high"], 2)) == (0.34, 0.95)


def test_mcnemar_exact_and_midp():
    a = np.array([1] * 9 + [0] * 3 + [1] * 20 + [0] * 30)
    b = np.array([0] * 9 + [1] * 3 + [1] * 20 + [0] * 30)
    r = agreement.mcnemar(a, b)
    assert (r["b"], r["c"]) == (9, 3)
    assert r["p_value"] == pytest.approx(binomtest(3, 12, 0.5).pvalue)
    from scipy.stats import binom
    mid = agreement.mcnemar(a, b, method="midp")["p_value"]
    assert mid == pytest.approx(binomtest(3, 12, 0.5).pvalue - binom.pmf(3, 12, 0.5))
    assert agreement.mcnemar([1, 0], [1, 0])["p_value"] == 1.0


def test_spearman_constant_not_estimable():
    with pytest.raises(NotEstimableError, match="constant"):
        agreement.spearman([1, 1, 1, 1], [1, 2, 3, 4])
