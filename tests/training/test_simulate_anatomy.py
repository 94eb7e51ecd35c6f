import numpy as np
import pytest

from qsm_core.errors import InputError
from training.simulate.anatomy import (
    AIR_CHI_PPM,
    LABEL_IDS,
    TISSUES,
    build_anatomy,
)
from training.simulate.veins import Vein, render_veins, tube_fraction


@pytest.fixture(scope="module")
def proc():
    return build_anatomy(source="procedural", voxel_size_mm=(3, 3, 3), shape=(64, 64, 64),
                         seed=1)


def test_procedural_contract(proc):
    a = proc
    assert a.shape == (64, 64, 64)
    for arr in (a.chi_ppm, a.r2star_s, a.pd, a.flair, a.t1w, a.vein_fraction):
        assert arr.dtype == np.float32 and np.all(np.isfinite(arr))
    assert a.brain_mask.dtype == np.uint8
    # every brain tissue is present and air surrounds the head
    for name in ("wm", "cortical_gm", "ventricle", "skull", "scalp", "csf", "air_cavity",
                 "globus_pallidus", "thalamus"):
        assert (a.labels == LABEL_IDS[name]).any(), name
    assert a.labels[0, 0, 0] == LABEL_IDS["air"]
    assert a.chi_ppm[0, 0, 0] == pytest.approx(AIR_CHI_PPM)
    np.testing.assert_allclose(a.voxel_size_mm, [3, 3, 3])


def test_tissue_values_in_pure_voxels(proc):
    a = proc
    # deep white matter far from partial volume has exactly the tissue value
    wm = (a.labels == LABEL_IDS["wm"]) & (a.vein_fraction == 0)
    vals = a.chi_ppm[wm]
    assert np.median(vals) == pytest.approx(TISSUES["wm"].chi_ppm, abs=1e-6)
    assert np.median(a.r2star_s[wm]) == pytest.approx(TISSUES["wm"].r2star_s, abs=1e-4)
    sk = a.labels == LABEL_IDS["skull"]
    assert np.all(a.chi_ppm[sk & (a.vein_fraction == 0)] == pytest.approx(-2.0))
    # cavities are air, and never inside the brain mask
    cav = a.labels == LABEL_IDS["air_cavity"]
    assert np.all(a.chi_ppm[cav] == pytest.approx(AIR_CHI_PPM))
    assert not (cav & (a.brain_mask > 0)).any()


def test_seeded_veins_reproducible_and_different(proc):
    b = build_anatomy(source="procedural", voxel_size_mm=(3, 3, 3), shape=(64, 64, 64),
                      seed=1)
    c = build_anatomy(source="procedural", voxel_size_mm=(3, 3, 3), shape=(64, 64, 64),
                      seed=2)
    np.testing.assert_array_equal(proc.chi_ppm, b.chi_ppm)
    assert not np.array_equal(proc.vein_fraction, c.vein_fraction)


@pytest.mark.parametrize("radius", [0.3, 0.5, 2.0])
def test_tube_partial_volume_keeps_cross_section(radius):
    # a straight tube along x on a 1 mm grid: fraction summed over a cross-section = pi r^2
    aff = np.eye(4)
    aff[:3, 3] = -20
    f = tube_fraction((41, 41, 41), aff, np.array([[-30.0, 0.3, -0.2], [30.0, 0.3, -0.2]]),
                      radius)
    area = f[20].sum()  # mm^2 (1 mm voxels)
    assert area == pytest.approx(np.pi * radius**2, rel=0.12)


def test_render_vein_sets_label_and_chi(proc):
    a = proc.copy()
    a.vein_fraction[:] = 0
    wm_idx = np.argwhere(a.labels == LABEL_IDS["wm"])[len(np.argwhere(a.labels == 6)) // 2]
    p = a.affine[:3, :3] @ wm_idx + a.affine[:3, 3]
    render_veins(a, [Vein(np.array([p - [0, 0, 6], p + [0, 0, 6]]), 3.0, 0.4, "deep")])
    assert a.labels[tuple(wm_idx)] == LABEL_IDS["vein"]
    assert a.chi_ppm[tuple(wm_idx)] == pytest.approx(0.4, abs=1e-5)


def test_mni_anatomy_places_nuclei_at_mni_coordinates():
    a = build_anatomy(source="mni", voxel_size_mm=(2, 2, 2), seed=0, veins=False)
    inv = np.linalg.inv(a.affine)

    def label_at(xyz):
        i = np.round(inv[:3, :3] @ np.asarray(xyz, float) + inv[:3, 3]).astype(int)
        return a.labels[tuple(i)]

    assert label_at((19, -3, -1)) == LABEL_IDS["globus_pallidus"]
    assert label_at((-25, 2, 1)) == LABEL_IDS["putamen"]
    assert label_at((11, -18, 7)) == LABEL_IDS["thalamus"]
    assert label_at((0, 12, -34)) == LABEL_IDS["air_cavity"]  # sphenoid sinus
    assert label_at((-30, -20, 30)) in (LABEL_IDS["wm"], LABEL_IDS["cortical_gm"])
    # skull-stripped template surrounded by a head: brain mask volume ~1.4-1.9 L
    vol_l = a.brain_mask.sum() * 8 / 1e6
    assert 1.3 < vol_l < 2.0


def test_bad_arguments():
    with pytest.raises(InputError, match="source"):
        build_anatomy(source="nope")
    with pytest.raises(InputError, match="voxel_size_mm"):
        build_anatomy(source="procedural", voxel_size_mm=(0, 1, 1))
    with pytest.raises(InputError, match="shape"):
        build_anatomy(source="mni", shape=(10, 10, 10))
