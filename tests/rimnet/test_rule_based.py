import numpy as np
import pytest
from scipy import ndimage
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from qsm_core.errors import InputError
from rimnet.patches import QSM_SCALE
from rimnet.rule_based import RuleBasedRimDetector, rim_features, truncated_edt

P = 32


def make_patch(rng, *, rim_ppm=0.0, rim_deg=360.0, vein_offset_mm=None, central_vein=False,
               lesion_ppm=0.0, noise_ppm=0.01, radius_mm=5.0):
    """A 4-channel patch (qsm, flair, lesion, others) at 1 mm: ovoid lesion, NAWM -0.02 ppm.

    rim_ppm: shell 4-6.5 mm from the centre covering angles [0, rim_deg) in-plane;
    vein_offset_mm: a 0.35 ppm vein along axis 0 at j = -offset (tangent to the lesion);
    central_vein: the same vein through the centre.
    """
    g = np.indices((P, P, P), dtype=float) - (P - 1) / 2
    r = np.sqrt(g[0] ** 2 + g[1] ** 2 + (g[2] * 1.2) ** 2)
    les = r <= radius_mm
    chi = np.full((P, P, P), -0.02) + rng.normal(0, noise_ppm, (P, P, P))
    chi[les] += lesion_ppm
    ang = np.degrees(np.arctan2(g[1], g[0])) % 360
    chi[(r > radius_mm - 1) & (r <= radius_mm + 1.5) & (ang < rim_deg)] += rim_ppm
    if vein_offset_mm is not None or central_vein:
        off = 0.0 if central_vein else vein_offset_mm
        d = np.sqrt((g[1] + off) ** 2 + g[2] ** 2)
        chi += 0.35 * np.exp(-d ** 2 / (2 * 0.8 ** 2))
    chi = ndimage.gaussian_filter(chi, 0.6)
    x = np.zeros((4, P, P, P), np.float32)
    x[0] = np.clip(chi * QSM_SCALE, -5, 5)
    x[1] = 1.0 + les
    x[2] = les
    return x


@pytest.fixture
def det():
    return RuleBasedRimDetector().fit(np.zeros((1, 4, P, P, P), np.float32))


def test_truncated_edt_matches_scipy_within_range(rng):
    m = rng.random((20, 24, 18)) > 0.99
    d = truncated_edt(m, spacing_mm=0.5, max_mm=4.0)
    ref = ndimage.distance_transform_edt(~m, sampling=0.5)
    near = ref <= 4.0
    np.testing.assert_allclose(d[near], ref[near], atol=1e-5)
    assert np.all(d[~near] >= 4.0)


def test_complete_rim_is_called_and_plain_lesions_are_not(rng, det):
    rims = np.stack([make_patch(rng, rim_ppm=0.04) for _ in range(3)])
    plain = np.stack([make_patch(rng) for _ in range(3)])
    f = det.explain(rims)
    assert f["rule_call"].tolist() == [1, 1, 1]
    assert (f["run_coverage"] >= 2 / 3).all()
    # the shell adds 0.04 ppm over part of the band: contrast ~0.02-0.03 ppm
    assert f["rim_minus_core_ppm"].between(0.01, 0.04).all()
    assert np.allclose(f["nawm_ppm"], -0.02, atol=0.003)
    g = det.explain(plain)
    assert g["rule_call"].tolist() == [0, 0, 0]
    assert (g["run_coverage"] < 0.2).all()
    assert det.predict(np.concatenate([rims, plain])).tolist() == [1, 1, 1, 0, 0, 0]


def test_vein_passing_by_and_central_vein_are_not_rims(rng, det):
    x = np.stack([make_patch(rng, vein_offset_mm=6.0), make_patch(rng, central_vein=True)])
    f = det.explain(x)
    assert f["rule_call"].tolist() == [0, 0]
    assert (f["n_vein_voxels"] > 20).all()


def test_vein_suppression_prevents_a_false_call(rng):
    # half a rim plus a vein along the uncovered side: only vein suppression avoids the call
    x = np.stack([make_patch(rng, rim_ppm=0.04, rim_deg=180, vein_offset_mm=6.0)
                  for _ in range(2)])
    with_supp = RuleBasedRimDetector().fit(x)
    without = RuleBasedRimDetector(vein_min_ppm=np.inf).fit(x)
    assert with_supp.predict(x).tolist() == [0, 0]
    assert without.predict(x).tolist() == [1, 1]
    assert (with_supp.explain(x)["run_coverage"] <= 0.55).all()


def test_partial_rim_and_hyperintense_lesion_fail_the_rule(rng, det):
    partial = make_patch(rng, rim_ppm=0.05, rim_deg=150)
    hyper = make_patch(rng, lesion_ppm=0.05)  # iron throughout: no rim-minus-core contrast
    f = det.explain(np.stack([partial, hyper]))
    assert f["rule_call"].tolist() == [0, 0]
    assert f.loc[0, "max_coverage"] < 0.6
    assert f.loc[1, "rim_minus_core_ppm"] < 0


def test_score_ranks_rims_above_non_rims_and_grows_with_contrast(rng, det):
    pos = [make_patch(rng, rim_ppm=rng.uniform(0.02, 0.06)) for _ in range(6)]
    neg = [make_patch(rng, vein_offset_mm=6.0) for _ in range(3)]
    neg += [make_patch(rng, rim_ppm=0.04, rim_deg=120) for _ in range(3)]
    X = np.stack(pos + neg)
    y = np.r_[np.ones(6), np.zeros(6)]
    p = det.predict_proba(X)[:, 1]
    assert roc_auc_score(y, p) == 1.0
    weak, strong = (det.decision_function(make_patch(rng, rim_ppm=c)[None])[0]
                    for c in (0.006, 0.05))
    assert strong > weak


def test_estimator_contract(rng):
    X = np.stack([make_patch(rng, rim_ppm=0.04), make_patch(rng), make_patch(rng)])
    est = RuleBasedRimDetector(rim_contrast_ppm=0.012)
    with pytest.raises(NotFittedError):
        est.predict(X)
    c = clone(est)
    assert c.get_params()["rim_contrast_ppm"] == 0.012
    assert est.fit(X, [1, 0, 0]) is est
    assert est.classes_.tolist() == [0, 1]
    proba = est.predict_proba(X)
    assert proba.shape == (3, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert est.predict(X).tolist() == (proba[:, 1] >= 0.5).astype(int).tolist()
    assert est.predict(X).tolist() == [1, 0, 0]
    p, call = est.score_and_call(X)
    np.testing.assert_allclose(p, proba[:, 1])
    # flattened 2-D input with patch_shape gives the same scores
    flat = RuleBasedRimDetector(patch_shape=(4, P, P, P)).fit(X.reshape(3, -1))
    np.testing.assert_allclose(flat.decision_function(X.reshape(3, -1)),
                               est.decision_function(X))
    assert flat.n_features_in_ == 4 * P ** 3
    with pytest.raises(InputError, match="patch_shape"):
        RuleBasedRimDetector().fit(X.reshape(3, -1))
    with pytest.raises(InputError, match="'lesion' channel"):
        RuleBasedRimDetector(channels=("qsm", "flair", "x", "y")).fit(X)


def test_tune_threshold_maximises_youden(rng):
    X = np.stack([make_patch(rng, rim_ppm=0.04), make_patch(rng, rim_ppm=0.04, rim_deg=200),
                  make_patch(rng), make_patch(rng)])
    y = [1, 1, 0, 0]
    est = RuleBasedRimDetector(tune_threshold=True).fit(X, y)
    assert est.threshold_ < 0  # the incomplete rim is a positive here: threshold moves down
    assert est.predict(X).tolist() == y
    with pytest.raises(InputError, match="both classes"):
        RuleBasedRimDetector(tune_threshold=True).fit(X, [1, 1, 1, 1])


def test_empty_lesion_channel_scores_zero():
    f = rim_features(np.zeros((P, P, P)), np.zeros((P, P, P)))
    assert f["rule_call"] == 0 and f["margin"] < 0
