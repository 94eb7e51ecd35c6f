"""The batched on-grid patch path and the fast median give exactly the reference results."""

import numpy as np
import pytest

import rimnet.patches as patches
from rimnet.patches import extract_patches, flair_reference, lesion_centroids_vox


def _scan(rng, shape=(60, 64, 56), n=14, dtype=np.float32):
    chi = rng.normal(-0.02, 0.05, shape).astype(dtype)
    chi[rng.random(shape) < 0.001] = 0.9  # clipped values
    flair = rng.gamma(4.0, 25.0, shape).astype(dtype)
    labels = np.zeros(shape, np.int32)
    g = np.indices(shape, dtype=float)
    for k in range(1, n + 1):
        # some lesions close to the volume edge, where the per-lesion path takes over
        c = [rng.uniform(1, s - 2) if k % 4 == 0 else rng.uniform(17, s - 18) for s in shape]
        r = rng.uniform(1.0, 4.0, 3)
        m = sum(((g[a] - c[a]) / r[a]) ** 2 for a in range(3)) <= 1
        labels[m & (labels == 0)] = 3 * k  # non-consecutive labels
    ids = [int(i) for i in np.unique(labels) if i > 0]
    return chi, flair, labels, ids


def _reference_path(monkeypatch):
    monkeypatch.setattr(patches, "_on_grid_lesions",
                        lambda cents, *a, **k: np.zeros(len(cents), bool))


@pytest.mark.parametrize("snap", [False, True])
@pytest.mark.parametrize("layout", ["C", "F"])  # NIfTI volumes load Fortran-ordered
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", [
    ((1.0, 1.0, 1.0), 32.0, 32, ("qsm", "flair", "lesion", "others")),
    ((1.0, 1.0, 1.0), 16.0, 16, ("lesion", "others", "flair", "qsm")),
    ((0.5, 0.5, 0.5), 12.0, 24, ("qsm", "lesion")),
    ((0.9, 0.9, 2.0), 32.0, 32, ("qsm", "flair", "lesion", "others")),  # off-grid: reference
    # voxel sizes as read from an oblique affine: 1 mm to within float error
    ((0.99999997, 1.00000002, 1.00000003), 32.0, 32, ("qsm", "flair", "lesion", "others")),
])
def test_batched_path_equals_per_lesion_path_bit_for_bit(rng, monkeypatch, dtype, geometry,
                                                         layout, snap):
    vs, patch_mm, p, channels = geometry
    chi, flair, labels, ids = _scan(rng, dtype=dtype)
    chi, flair, labels = (np.asarray(a, order=layout) for a in (chi, flair, labels))
    cents = lesion_centroids_vox(labels, ids)
    cents[::3] = np.round(cents[::3])  # integer centres: zero interpolation weights
    cents[1::5] = np.floor(cents[1::5]) + 0.5
    kw = dict(voxel_size_mm=vs, patch_mm=patch_mm, patch_voxels=p, channels=channels,
              centroids_vox=cents, snap_to_voxels=snap)
    if snap:
        cents = patches.snap_centres(cents, voxel_size_mm=vs, patch_mm=patch_mm, patch_voxels=p)
    on_grid = patches._on_grid_lesions(cents, labels.shape, voxel_size_mm=np.asarray(vs),
                                       patch_mm=patch_mm, patch_voxels=p)
    fast = extract_patches({"qsm": chi, "flair": flair}, labels, ids, **kw)
    _reference_path(monkeypatch)
    ref = extract_patches({"qsm": chi, "flair": flair}, labels, ids, **kw)
    np.testing.assert_array_equal(fast, ref)
    if vs[2] == 2.0:
        assert not on_grid.any()
    else:  # both paths were exercised
        assert 0 < on_grid.sum() < len(ids)


def test_nan_near_a_lesion_is_still_refused(rng):
    chi, flair, labels, ids = _scan(rng)
    cents = lesion_centroids_vox(labels, ids)
    i, j, k = np.round(cents[1]).astype(int)
    chi[i, j, k] = np.nan
    with pytest.raises(Exception, match="NaN"):
        extract_patches({"qsm": chi}, labels, ids, voxel_size_mm=(1, 1, 1),
                        channels=("qsm", "lesion"), centroids_vox=cents)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 1001, 2_000_000])
def test_median_is_numpys(rng, n):
    for v in (rng.normal(100, 5, n).astype(np.float32), np.round(rng.normal(0, 3, n)),
              rng.integers(0, 9, n).astype(np.int16)):
        a, b = patches._median(v), np.median(v)
        assert a == b and type(a) is type(b)


def test_flair_reference_is_layout_free_and_close_to_the_full_median(rng):
    flair = rng.gamma(4.0, 25.0, (140, 130, 120)).astype(np.float32)  # 2.2 M voxels: sub-grid
    labels = (rng.random(flair.shape) < 0.02).astype(np.int32)
    brain = rng.random(flair.shape) < 0.97
    full = float(np.median(flair[brain & (labels == 0)]))
    ref = flair_reference(flair, lesion_labels=labels, brain_mask=brain)
    assert abs(ref - full) / full < 2e-3
    for order in ("F", "C"):
        assert flair_reference(np.asarray(flair, order=order),
                               lesion_labels=np.asarray(labels, order="C"),
                               brain_mask=np.asarray(brain.astype(np.uint8), order=order)) == ref
    # small volumes: the exact median of every normal-appearing voxel
    small = flair[:100, :100, :100]
    sel = brain[:100, :100, :100] & (labels[:100, :100, :100] == 0)
    assert flair_reference(small, lesion_labels=labels[:100, :100, :100],
                           brain_mask=brain[:100, :100, :100]) == float(np.median(small[sel]))


def test_threads_do_not_change_patches_or_rule_features(rng, monkeypatch):
    from rimnet.patches import worker_threads
    from rimnet.rule_based import rim_features_batch

    chi, flair, labels, ids = _scan(rng, n=20)
    kw = dict(voxel_size_mm=(1, 1, 1), patch_mm=16.0, patch_voxels=16)
    res = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        assert worker_threads() == int(threads)
        p = extract_patches({"qsm": chi, "flair": flair}, labels, ids, **kw)
        res[threads] = (p, rim_features_batch(p[:, 0] / 10.0, p[:, 2], p[:, 3], spacing_mm=1.0))
    np.testing.assert_array_equal(res["1"][0], res["3"][0])
    assert res["1"][1] == res["3"][1]


def test_near_whole_voxel_sizes_take_the_batched_crop(rng):
    """1 mm to within float error (an oblique affine's voxel sizes) cuts the same crops as
    exactly 1 mm, by the batched path."""
    chi, flair, labels, ids = _scan(rng)
    kw = dict(patch_mm=32.0, patch_voxels=32, channels=("qsm", "flair", "lesion", "others"),
              snap_to_voxels=True)
    vs = (0.99999997, 1.00000002, 1.00000003)
    cents = patches.snap_centres(lesion_centroids_vox(labels, ids), voxel_size_mm=vs,
                                 patch_mm=32.0, patch_voxels=32)
    inner = patches._on_grid_lesions(cents, labels.shape, voxel_size_mm=np.asarray(vs),
                                     patch_mm=32.0, patch_voxels=32)
    assert inner.sum() >= len(ids) // 2  # all but the lesions near the edge
    exact = extract_patches({"qsm": chi, "flair": flair}, labels, ids, voxel_size_mm=(1, 1, 1),
                            **kw)
    near = extract_patches({"qsm": chi, "flair": flair}, labels, ids, voxel_size_mm=vs, **kw)
    np.testing.assert_array_equal(near, exact)
