import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from evaluation import binary
from evaluation._common import round_half_up
from evaluation.harness import evaluate
from evaluation.report import fmt_ci
from qsm_core.errors import InputError


@pytest.mark.parametrize("k,n", [(0, 5), (1, 21), (5, 5), (20, 21), (26, 32), (7, 100)])
def test_clopper_pearson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = binary.clopper_pearson(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-10)
    assert hi == pytest.approx(ci.high, abs=1e-10)


def _seed_cohort():
    """32 MS patients (26 with >= 1 consensus rim) and 21 NMOSD (1 with a rim; 8 lesion-free)."""
    parts, les = [], []
    for i in range(53):
        ms = i < 32
        pid = f"sub-{i + 1:03d}"
        parts.append({"participant_id": pid, "diagnosis": "MS" if ms else "NMOSD"})
        if not ms and i >= 32 + 13:          # 8 NMOSD without any lesion
            continue
        n_les = 5 if ms else 2
        has_rim = (i < 26) if ms else (i == 32)
        for lid in range(1, n_les + 1):
            les.append({"participant_id": pid, "session_id": "n/a", "lesion_id": lid,
                        "centroid_x_mm": 0.0, "centroid_y_mm": 0.0, "centroid_z_mm": 0.0,
                        "volume_mm3": 30.0, "consensus": int(has_rim and lid <= 2)})
    return pd.DataFrame(parts), pd.DataFrame(les)


def test_seed_check_per_patient_sensitivity_specificity():
    part, les = _seed_cohort()
    res = evaluate(part, les, [], n_boot=10)
    e = res["patient"]["rules"][">=1"]["consensus"]
    sens, spec = e["sensitivity"], e["specificity"]
    assert (sens["k"], sens["n"], spec["k"], spec["n"]) == (26, 32, 20, 21)
    # rounded half up, as the paper rounds (26/32 = 81.25 %)
    assert [round_half_up(100 * sens[x], 1) for x in ("estimate", "ci_low", "ci_high")] == \
        ["81.3", "63.6", "92.8"]
    assert [round_half_up(100 * spec[x], 1) for x in ("estimate", "ci_low", "ci_high")] == \
        ["95.2", "76.2", "99.9"]
    # and the report shows exactly these numbers
    assert fmt_ci(sens, pct=True) == "81.3% (63.6–92.8)"
    assert fmt_ci(spec, pct=True) == "95.2% (76.2–99.9)"
    # ">= 4" is never met with 2 rims per patient: sensitivity 0/32, specificity 21/21
    e4 = res["patient"]["rules"][">=4"]["consensus"]
    assert (e4["sensitivity"]["k"], e4["specificity"]["k"]) == (0, 21)


def test_sens_spec_counts():
    r = binary.sens_spec([1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0])
    assert r["counts"] == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    assert r["sensitivity"]["estimate"] == pytest.approx(2 / 3)
    assert r["specificity"]["estimate"] == pytest.approx(3 / 4)
    empty = binary.sens_spec([0, 0], [0, 1])["sensitivity"]
    assert empty["estimate"] is None and "denominator" in empty["not_estimable"]


def test_thresholds_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.7, 0.6, 0.2, 0.65, 0.15, 0.1, 0.05])
    # J at thresholds: 0.7 -> .5 + 1; 0.6 -> .75 + .75; 0.2 -> 1 + .75 (the maximum)
    assert binary.youden_threshold(y, s) == pytest.approx(0.2)
    assert binary.threshold_for_sensitivity(y, s, target=0.75) == pytest.approx(0.6)
    assert binary.threshold_for_sensitivity(y, s, target=0.5) == pytest.approx(0.7)
    assert binary.parse_threshold_rule("sensitivity=0.9") == ("sensitivity", 0.9)
    assert binary.parse_threshold_rule("0.5") == ("fixed", 0.5)
    with pytest.raises(InputError, match="unknown threshold rule"):
        binary.parse_threshold_rule("best")


def test_out_of_fold_thresholds_are_chosen_on_other_patients(rng):
    n = 120
    groups = np.repeat(np.arange(30), 4)
    y = (rng.random(n) < 0.4).astype(int)
    s = y + rng.normal(size=n)
    r = binary.out_of_fold_calls(y, s, groups, rule="youden", n_folds=3, seed=1)
    perm = np.random.default_rng(1).permutation(np.unique(groups))
    fold_of = {p: i % 3 for i, p in enumerate(perm)}
    fold = np.array([fold_of[g] for g in groups])
    for f in range(3):
        thr = binary.youden_threshold(y[fold != f], s[fold != f])
        assert r["fold_thresholds"][f] == pytest.approx(thr)
        np.testing.assert_array_equal(r["calls"][fold == f], (s[fold == f] >= thr).astype(int))
