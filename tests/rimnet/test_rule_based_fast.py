"""The integer-distance path of rim_features gives exactly the float32 (reference) features."""

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import rimnet.rule_based as rb
from rimnet.patches import QSM_SCALE
from rimnet.rule_based import RuleBasedRimDetector


def random_patches(rng, n=10, p=32):
    """Random lesions: irregular blobs, some touching the patch edge, rims, veins, others."""
    out = np.zeros((n, 4, p, p, p), np.float32)
    g = np.indices((p, p, p), dtype=float)
    for k in range(n):
        c = rng.uniform(p / 2 - 4, p / 2 + 4, 3) if k % 5 else rng.uniform(1, 6, 3)
        r = rng.uniform(1.2, 7.0, 3)
        rho = np.sqrt(sum(((g[a] - c[a]) / r[a]) ** 2 for a in range(3)))
        les = rho <= 1.0
        les &= rng.random(les.shape) > 0.05  # ragged edges and holes
        chi = rng.normal(-0.02, 0.015, (p, p, p))
        if k % 2:
            chi[(rho > 0.8) & (rho <= 1.4)] += rng.uniform(0.01, 0.08)
        if k % 3 == 0:  # a vein along axis 0
            j, kk = (int(c[1]), int(c[2])) if k % 2 else (int(c[1] + r[1] + 1), int(c[2]))
            chi[:, max(j, 0):j + 2, max(kk, 0):kk + 2] += 0.4
        others = (np.sqrt(sum((g[a] - c[a] - 9) ** 2 for a in range(3))) <= 3) & ~les
        out[k, 0] = np.clip(ndimage.gaussian_filter(chi, 0.5) * QSM_SCALE, -5, 5)
        out[k, 1] = 1 + les
        out[k, 2] = les
        out[k, 3] = others
    return out


def _both(monkeypatch, det, X):
    fast = det.explain(X)
    monkeypatch.setattr(rb, "_FAST_DISTANCES", False)
    ref = det.explain(X)
    monkeypatch.setattr(rb, "_FAST_DISTANCES", True)
    return fast, ref


@pytest.mark.parametrize("kw", [
    {},
    {"patch_mm": 32.0 * 4 / 3},  # 1.333 mm spacing (24-sample patches of 32 mm)
    {"slice_axis": 0, "rim_outer_mm": 1.5, "nawm_inner_mm": 2.5, "vein_reach_mm": 2.0},
    {"patch_mm": 16.0, "rim_inner_mm": 1.0, "nawm_outer_mm": 4.0},  # 0.5 mm spacing
])
def test_fast_distances_give_the_reference_features(rng, monkeypatch, kw):
    X = random_patches(rng)
    det = RuleBasedRimDetector(**kw).fit(X[:1])
    fast, ref = _both(monkeypatch, det, X)
    pd.testing.assert_frame_equal(fast, ref, check_exact=True)
    assert fast["n_slices"].gt(0).all()


def test_regions_equal_the_float32_maps(rng):
    # the five distance maps themselves, on random masks, at several spacings
    for spacing in (1.0, 0.5, 4 / 3, 0.9):
        les = ndimage.binary_opening(rng.random((22, 26, 20)) > 0.55)
        kw = dict(spacing_mm=spacing, reach_mm=7.0 + spacing, depth_mm=2.0 + spacing,
                  inner_mm=max(2.0, spacing * 1.001), outer_mm=max(1.0, spacing * 1.001),
                  nawm_inner_mm=3.0, nawm_outer_mm=6.0, rim_outer_mm=1.0, vein_mm=4.0)
        fast = rb._distance_regions(les, **kw)
        rb._FAST_DISTANCES = False
        try:
            ref = rb._distance_regions(les, **kw)
        finally:
            rb._FAST_DISTANCES = True
        for f, r in zip(fast, ref):
            np.testing.assert_array_equal(f, r)


def test_ambiguous_threshold_falls_back_to_float32(rng):
    # 50 = 7^2 + 1 = 5^2 + 5^2: at this spacing and threshold, float32 rounding of the two
    # offsets decides the test differently, so the integer path must decline, and the
    # features still equal the reference
    s, t = 1.0279629309206157, 7.268795592623659
    assert rb._integer_cutoffs(1.0, 7, (("le", 1.001), ("gt", 3.0), ("le", 6.0))) == (1, 9, 36)
    assert rb._integer_cutoffs(s, 7, (("le", t),)) is None
    les = ndimage.binary_opening(rng.random((24, 24, 24)) > 0.5)
    kw = dict(spacing_mm=s, reach_mm=8.0, depth_mm=2.0 + s, inner_mm=2.0, outer_mm=s * 1.001,
              nawm_inner_mm=3.0, nawm_outer_mm=t, rim_outer_mm=1.0, vein_mm=4.0)
    fast = rb._distance_regions(les, **kw)
    d_out = rb.truncated_edt(les, spacing_mm=s, max_mm=8.0)
    np.testing.assert_array_equal(fast[2], (d_out > 3.0) & (d_out <= t))


@pytest.mark.parametrize("kw", [
    {},
    {"spacing_mm": 4 / 3},
    {"slice_axis": 0, "rim_outer_mm": 1.5},
    {"slice_axis": 1, "n_sectors": 8, "min_slices": 3},
    {"spacing_mm": 0.5, "rim_inner_mm": 1.0, "nawm_outer_mm": 4.0},
])
def test_batch_equals_one_by_one(rng, kw):
    X = random_patches(rng, n=13)
    X[4, 2:] = 0  # an empty lesion channel
    chi = X[:, 0] / QSM_SCALE
    one = [rb.rim_features(chi[i], X[i, 2], X[i, 3], **kw) for i in range(len(X))]
    assert rb.rim_features_batch(chi, X[:, 2], X[:, 3], **kw) == one
    one = [rb.rim_features(chi[i], X[i, 2], **kw) for i in range(len(X))]
    assert rb.rim_features_batch(chi, X[:, 2], **kw) == one
    assert one[4] == rb._empty_features()


def test_batch_falls_back_when_integer_tests_are_not_proven(rng, monkeypatch):
    X = random_patches(rng, n=4)
    chi = X[:, 0] / QSM_SCALE
    calls = []
    real = rb.rim_features
    monkeypatch.setattr(rb, "rim_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(rb, "_FAST_DISTANCES", False)
    out = rb.rim_features_batch(chi, X[:, 2], X[:, 3])
    assert len(calls) == 4 and out == [real(chi[i], X[i, 2], X[i, 3]) for i in range(4)]
