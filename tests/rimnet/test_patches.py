import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from qsm_core.errors import InputError
from rimnet.patches import (
    QSM_CLIP,
    build_patch_cache,
    extract_patches,
    flair_reference,
    lesion_centroids_vox,
    load_patch_cache,
    load_patch_caches,
    patch_axes,
    patch_coordinates,
    snap_centres,
)
from tests.orientation import stored_as


def _ball(shape, centre, radius_vox):
    g = np.indices(shape, dtype=float)
    r2 = sum((g[a] - centre[a]) ** 2 for a in range(3))
    return r2 <= radius_vox ** 2


def test_linear_ramp_is_sampled_exactly_in_physical_units():
    # chi = 0.001 ppm per mm along axis 0 and 0.002 ppm/mm along axis 2, anisotropic voxels
    vs = np.array([0.8, 1.0, 2.0])
    shape = (80, 64, 32)
    g = np.indices(shape, dtype=float)
    chi_ppm = 0.001 * g[0] * vs[0] + 0.002 * g[2] * vs[2]
    labels = np.zeros(shape, np.int32)
    labels[38:43, 30:35, 15:18] = 7
    p = extract_patches({"qsm": chi_ppm}, labels, [7], voxel_size_mm=vs, patch_mm=16.0,
                        patch_voxels=16, channels=("qsm",))
    assert p.shape == (1, 1, 16, 16, 16) and p.dtype == np.float32
    cen = lesion_centroids_vox(labels, [7])[0]
    np.testing.assert_allclose(cen, [40, 32, 16])
    # expected value at sample (i, j, k): 10 * chi at centre + offsets (1 mm spacing)
    off = np.arange(16) - 7.5
    exp = 10 * (0.001 * (cen[0] * vs[0] + off[:, None, None])
                + 0.002 * (cen[2] * vs[2] + off[None, None, :])) + 0 * off[None, :, None]
    np.testing.assert_allclose(p[0, 0], exp, atol=1e-5)


def test_mask_channels_and_physical_size_with_anisotropic_voxels():
    vs = (1.0, 1.0, 2.0)
    shape = (64, 64, 32)
    labels = np.zeros(shape, np.int32)
    # a sphere of radius 6 mm: 6 voxels in-plane, 3 voxels through-plane
    g = np.indices(shape, dtype=float)
    r_mm = np.sqrt((g[0] - 32) ** 2 + (g[1] - 32) ** 2 + ((g[2] - 16) * 2) ** 2)
    labels[r_mm <= 6] = 3
    labels[32, 44:48, 15:18] = 5  # a neighbour 12-15 mm away
    flair = np.ones(shape, np.float32) * 100
    flair[labels > 0] = 250
    p = extract_patches({"qsm": np.zeros(shape), "flair": flair}, labels, [3, 5],
                        voxel_size_mm=vs, patch_mm=32, patch_voxels=32)
    les, oth = p[0, 2], p[0, 3]
    assert set(np.unique(les)) == {0.0, 1.0}
    # the sphere spans ~12-13 mm in every direction of the (isotropic 1 mm) patch
    for axis in range(3):
        extent = np.any(les > 0, axis=tuple(a for a in range(3) if a != axis)).sum()
        assert 11 <= extent <= 14, (axis, extent)
    assert oth.sum() > 0 and not np.any((oth > 0) & (les > 0))
    # FLAIR: normal-appearing tissue is 1, lesion 2.5
    assert np.isclose(np.median(p[0, 1][les == 0]), 1.0)
    assert np.isclose(p[0, 1][les > 0].max(), 2.5)
    # patch of lesion 5 marks lesion 3 as "others"
    assert p[1, 3].sum() > p[1, 2].sum()


def test_patches_come_out_in_ras_order_however_the_scan_is_stored(rng):
    """A sagittal-stored, flipped copy of a scan gives the same patches as the axial one."""
    shape = (40, 44, 36)
    chi = ndimage.gaussian_filter(rng.standard_normal(shape), 2).astype(np.float32)
    flair = (1.0 + ndimage.gaussian_filter(rng.random(shape), 1)).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    labels[_ball(shape, (18.3, 22.6, 15.1), 4)] = 3
    labels[_ball(shape, (27.0, 12.0, 20.0), 3)] = 5
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-20.0, -22.0, -18.0]
    perm, flip = (2, 0, 1), 1  # stored as (S, L, A): R reversed
    def stored(a):
        return stored_as(a, aff, perm, flip)[0]
    aff2 = stored_as(labels, aff, perm, flip)[1]
    assert patch_axes(aff2) == ((1, 2, 0), (True, False, False))
    kw = dict(voxel_size_mm=(1, 1, 1), patch_mm=15.0, patch_voxels=15,
              channels=("qsm", "flair", "lesion", "others"))
    ref = extract_patches({"qsm": chi, "flair": flair}, labels, [3, 5], affine=aff, **kw)
    np.testing.assert_array_equal(ref, extract_patches({"qsm": chi, "flair": flair}, labels,
                                                       [3, 5], **kw))  # RAS: unchanged
    raw = extract_patches({"qsm": stored(chi), "flair": stored(flair)}, stored(labels),
                          [3, 5], **kw)
    new = extract_patches({"qsm": stored(chi), "flair": stored(flair)}, stored(labels),
                          [3, 5], affine=aff2, **kw)
    assert np.abs(raw - ref).max() > 0.5  # in storage order the patches differ
    np.testing.assert_allclose(new, ref, atol=1e-5)
    # snapped crops of an even size: lesion 5's centre lies on a voxel, halfway between two
    # crops; the tie goes the same way in the world however the scan is stored
    kw.update(patch_mm=16.0, patch_voxels=16, snap_to_voxels=True)
    ref = extract_patches({"qsm": chi, "flair": flair}, labels, [3, 5], affine=aff, **kw)
    new = extract_patches({"qsm": stored(chi), "flair": stored(flair)}, stored(labels),
                          [3, 5], affine=aff2, **kw)
    np.testing.assert_array_equal(new, ref)


def test_edge_lesion_uses_edge_padding():
    shape = (24, 24, 24)
    labels = np.zeros(shape, np.int32)
    labels[0:3, 0:3, 10:13] = 1
    chi = np.full(shape, 0.02)
    chi[0, :, :] = 0.05
    p = extract_patches({"qsm": chi}, labels, [1], voxel_size_mm=(1, 1, 1), patch_mm=16,
                        patch_voxels=16, channels=("qsm", "lesion"))
    assert np.all(np.isfinite(p))
    # everything below index 0 repeats the edge slice (0.5 after scaling)
    cen = lesion_centroids_vox(labels, [1])[0]
    x = patch_coordinates(cen, voxel_size_mm=(1, 1, 1), patch_mm=16, patch_voxels=16)[0]
    assert np.all(p[0, 0][x <= 0] == pytest.approx(0.5))
    assert np.allclose(p[0, 0][x >= 1.0], 0.2)
    assert p[0, 1].sum() == 27  # masks are not padded: 3x3x3 voxels at 1 mm


def test_qsm_is_clipped_and_bad_inputs_are_refused():
    shape = (16, 16, 16)
    labels = np.zeros(shape, np.int32)
    labels[6:9, 6:9, 6:9] = 1
    chi = np.full(shape, 2.0)
    p = extract_patches({"qsm": chi}, labels, [1], voxel_size_mm=(1, 1, 1), channels=("qsm",))
    assert np.all(p == QSM_CLIP)
    with pytest.raises(InputError, match="not found"):
        extract_patches({"qsm": chi}, labels, [2], voxel_size_mm=(1, 1, 1), channels=("qsm",))
    with pytest.raises(InputError, match="resample"):
        extract_patches({"qsm": chi[:-1]}, labels, [1], voxel_size_mm=(1, 1, 1),
                        channels=("qsm",))
    with pytest.raises(InputError, match="needs a 'flair'"):
        extract_patches({"qsm": chi}, labels, [1], voxel_size_mm=(1, 1, 1))
    with pytest.raises(InputError, match="unknown patch channel"):
        extract_patches({"qsm": chi}, labels, [1], voxel_size_mm=(1, 1, 1), channels=("t1",))
    bad = chi.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        extract_patches({"qsm": bad}, labels, [1], voxel_size_mm=(1, 1, 1), channels=("qsm",))
    with pytest.raises(InputError, match="normal-appearing"):
        flair_reference(np.zeros(shape))


def test_no_lesions_gives_empty_array():
    p = extract_patches({"qsm": np.zeros((8, 8, 8))}, np.zeros((8, 8, 8), np.int32), [],
                        voxel_size_mm=(1, 1, 1), patch_voxels=8, channels=("qsm", "lesion"))
    assert p.shape == (0, 2, 8, 8, 8)


def test_patch_cache_round_trip(tmp_path, rng):
    a = rng.normal(size=(3, 2, 8, 8, 8)).astype(np.float32)
    b = rng.normal(size=(2, 2, 8, 8, 8)).astype(np.float32)
    ta = pd.DataFrame({"participant_id": ["sub-01"] * 3, "session_id": ["n/a"] * 3,
                       "lesion_id": [1, 2, 3], "label": [0, 1, 0]})
    tb = pd.DataFrame({"participant_id": ["sub-02"] * 2, "session_id": ["ses-01"] * 2,
                       "lesion_id": [1, 4], "label": [1, 1]})
    out = build_patch_cache(tmp_path / "cache", [(a, ta), (b, tb)], channels=("qsm", "lesion"),
                            patch_mm=8.0, patch_voxels=8, metadata={"seed": 3})
    patches, table = load_patch_cache(out)
    np.testing.assert_array_equal(patches, np.concatenate([a, b]))
    assert table["patch_index"].tolist() == [0, 1, 2, 3, 4]
    assert table["label"].tolist() == [0, 1, 0, 1, 1]
    assert table["session_id"].tolist() == ["n/a"] * 3 + ["ses-01"] * 2
    assert table.attrs["channels"] == ["qsm", "lesion"]
    assert table.attrs["metadata"] == {"seed": 3}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    with pytest.raises(InputError, match="already exists"):
        build_patch_cache(out, [(a, ta)], channels=("qsm", "lesion"), patch_mm=8.0,
                          patch_voxels=8)
    with pytest.raises(InputError, match="expected"):
        build_patch_cache(tmp_path / "c2", [(a[:, :1], ta)], channels=("qsm", "lesion"),
                          patch_mm=8.0, patch_voxels=8)
    with pytest.raises(InputError, match="not a patch cache"):
        load_patch_cache(tmp_path / "nothing")


def test_patch_cache_float16(tmp_path, rng):
    a = rng.normal(size=(2, 1, 4, 4, 4)).astype(np.float32)
    t = pd.DataFrame({"participant_id": ["sub-01"] * 2, "session_id": ["n/a"] * 2,
                      "lesion_id": [1, 2]})
    out = build_patch_cache(tmp_path / "c", [(a, t)], channels=("qsm",), patch_mm=4.0,
                            patch_voxels=4, dtype=np.float16)
    patches, _ = load_patch_cache(out)
    assert patches.dtype == np.float16
    np.testing.assert_allclose(patches.astype(np.float32), a, atol=2e-3)


def _cache(path, patches, ids, **kw):
    table = pd.DataFrame({"participant_id": ids, "session_id": ["n/a"] * len(ids),
                          "lesion_id": np.arange(1, len(ids) + 1), "label": [0, 1][:len(ids)]})
    geometry = {"channels": ("qsm",), "patch_mm": 4.0, "patch_voxels": 4} | kw
    return build_patch_cache(path, [(patches, table)], **geometry)


def test_several_caches_stack_and_keep_patients_apart(tmp_path, rng):
    a = rng.normal(size=(2, 1, 4, 4, 4)).astype(np.float32)
    b = rng.normal(size=(1, 1, 4, 4, 4)).astype(np.float32)
    ca = _cache(tmp_path / "cohortA", a, ["sub-001", "sub-002"], dtype=np.float16)
    cb = _cache(tmp_path / "cohortB", b, ["sub-001"])
    patches, table = load_patch_caches([ca, cb])
    np.testing.assert_allclose(patches, np.concatenate([a.astype(np.float16), b]))
    assert patches.dtype == np.float32 and table.attrs["dtype"] == "float32"
    # sub-001 of cohort A and of cohort B are different people
    assert table["participant_id"].tolist() == ["cohortA/sub-001", "cohortA/sub-002",
                                                "cohortB/sub-001"]
    assert table["patch_index"].tolist() == [0, 1, 2]
    assert table.attrs["sources"] == [str(ca), str(cb)]
    # without a clash the ids are left alone
    cc = _cache(tmp_path / "cohortC", b, ["sub-009"])
    _, table = load_patch_caches([ca, cc])
    assert table["participant_id"].tolist() == ["sub-001", "sub-002", "sub-009"]
    # caches with the same folder name are told apart by their parent folder
    c1 = _cache(tmp_path / "cohort1" / "patches", a, ["sub-001", "sub-002"])
    c2 = _cache(tmp_path / "cohort2" / "patches", b, ["sub-001"])
    _, table = load_patch_caches([c1, c2])
    assert table["participant_id"].tolist() == ["cohort1/patches/sub-001",
                                                "cohort1/patches/sub-002",
                                                "cohort2/patches/sub-001"]
    # one cache: exactly load_patch_cache
    p1, t1 = load_patch_caches([ca])
    assert p1.dtype == np.float16 and "source_cache" not in t1.columns


def test_caches_with_different_settings_are_refused(tmp_path, rng):
    a = rng.normal(size=(1, 1, 4, 4, 4)).astype(np.float32)
    ca = _cache(tmp_path / "a", a, ["sub-001"])
    cb = _cache(tmp_path / "b", a, ["sub-002"], patch_mm=8.0)
    with pytest.raises(InputError, match=r"b: patch cache differs .* patch_mm \(8.0 vs 4.0\)"):
        load_patch_caches([ca, cb])
    with pytest.raises(InputError, match="given twice"):
        load_patch_caches([ca, tmp_path / "a"])
    with pytest.raises(InputError, match="at least one"):
        load_patch_caches([])


def test_snapped_centres_put_every_sample_on_a_voxel(rng):
    cents = rng.uniform(10, 50, size=(40, 3))
    # 1 mm samples: 1 mm axes snap (P = 32: samples at centre - 15.5 + k), 0.9 mm does not,
    # 0.5 mm axes snap with 2-voxel steps, 2 mm slices (half-voxel steps) are left alone
    got = snap_centres(cents, voxel_size_mm=(1.0, 0.9, 0.5), patch_mm=32.0, patch_voxels=32)
    assert np.all(np.abs(got[:, 0] - cents[:, 0]) <= 0.5)
    np.testing.assert_array_equal((got[:, 0] - 15.5) % 1, 0)
    np.testing.assert_array_equal(got[:, 1], cents[:, 1])
    np.testing.assert_array_equal((got[:, 2] - 31.0) % 1, 0)
    assert np.all(np.abs(got[:, 2] - cents[:, 2]) <= 0.5)
    same = snap_centres(cents, voxel_size_mm=(1.0, 1.0, 2.0), patch_mm=32.0, patch_voxels=32)
    np.testing.assert_array_equal(same[:, 2], cents[:, 2])


def test_snapped_patch_is_an_exact_crop_of_the_scan(rng):
    shape = (48, 50, 46)
    chi = rng.normal(0.0, 0.05, shape).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    labels[20:24, 22:27, 19:23] = 1
    cen = lesion_centroids_vox(labels, [1])  # (21.5, 24, 20.5): not on the sample grid
    kw = dict(voxel_size_mm=(1, 1, 1), patch_mm=16.0, patch_voxels=16, channels=("qsm",))
    snapped = extract_patches({"qsm": chi}, labels, [1], snap_to_voxels=True, **kw)[0, 0]
    s = [int(np.floor(c - 7.5 + 0.5)) for c in cen[0]]
    crop = chi[s[0]:s[0] + 16, s[1]:s[1] + 16, s[2]:s[2] + 16]
    np.testing.assert_array_equal(snapped, np.clip(crop * np.float32(10.0), -5, 5))
    # unsnapped, the fractional centre interpolates: the same values, blurred (lower spread)
    plain = extract_patches({"qsm": chi}, labels, [1], **kw)[0, 0]
    assert plain.std() < 0.8 * snapped.std()
