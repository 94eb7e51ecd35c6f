"""Lesion rendering and acquisition physics of the simulator."""

import numpy as np
import pytest
from scipy import ndimage

from qsm_core import ppm_to_hz
from qsm_core.dipole import forward_field_ppm
from qsm_core.errors import InputError
from qsm_core.geometry import b0_dir_from_affine
from training.simulate import acquisition as acq
from training.simulate.anatomy import LABEL_IDS, TISSUES, Anatomy, build_anatomy
from training.simulate.lesions import (
    TYPE_CODES,
    Lesion,
    LesionStyle,
    assign_type,
    rasterise,
    render_lesions,
)


def _flat_wm(shape=(40, 40, 40), vox=1.0) -> Anatomy:
    """A block of pure white matter (no partial volume) for lesion tests."""
    a = build_anatomy(source="procedural", voxel_size_mm=(4, 4, 4), shape=(16, 16, 16),
                      veins=False)
    aff = np.diag([vox, vox, vox, 1.0])
    aff[:3, 3] = -(np.array(shape) - 1) / 2 * vox
    full = {k: np.full(shape, getattr(TISSUES["wm"], k), np.float32)
            for k in ("chi_ppm", "r2star_s", "pd", "flair", "t1w")}
    return Anatomy(labels=np.full(shape, LABEL_IDS["wm"], np.uint8),
                   brain_mask=np.ones(shape, np.uint8), affine=aff,
                   vein_fraction=np.zeros(shape, np.float32), source="test", key=a.key,
                   **full)


def _lesion(**kw):
    base = dict(lesion_id=1, centre_mm=np.zeros(3), rotation=np.eye(3),
                blobs=[(np.zeros(3), np.array([6.0, 4.5, 4.0]))], location="deep_wm",
                shape_seed=7, irregularity=0.1)
    base.update(kw)
    return Lesion(**base)


def test_prl_rim_contrast_coverage_and_thickness():
    a = _flat_wm()
    les = _lesion(qsm_type="rim", rim_variant="complete", rim_chi_ppm=0.04,
                  rim_thickness_mm=1.0, rim_coverage=1.0, core_chi_ppm=0.0)
    maps = render_lesions(a, [les])
    lab, rim = maps["lesion_labels"], maps["rim_mask"]
    wm = TISSUES["wm"].chi_ppm
    assert maps["stats"][1]["rim_coverage"] == pytest.approx(1.0)
    # the rim is +0.04 ppm above NAWM (partial volume at most halves it), the core is NAWM
    d = a.chi_ppm[rim > 0] - wm
    assert d.max() == pytest.approx(0.04, abs=1e-6) and d.min() >= 0.02 - 1e-6
    assert np.median(d) == pytest.approx(0.04, abs=1e-6)
    core = (lab == 1) & (rim == 0)
    assert np.median(a.chi_ppm[core] - wm) == pytest.approx(0.0, abs=1e-6)
    # a 1 mm rim on a 1 mm grid is one voxel thick: every rim voxel touches the outside
    import scipy.ndimage as ndi
    outer = (lab == 1) & ~ndi.binary_erosion(lab == 1, structure=np.ones((3, 3, 3)))
    assert np.all(outer[rim > 0])
    assert maps["type_map"][lab == 1].max() == TYPE_CODES["rim"]
    # FLAIR hyperintense, R2* higher in the iron rim than in the core
    assert a.flair[lab == 1].min() > 1.4 * TISSUES["wm"].flair
    assert a.r2star_s[rim > 0].mean() > a.r2star_s[core].mean()


@pytest.mark.parametrize("coverage", [0.3, 0.5, 0.85])
def test_rim_coverage_follows_parameter(coverage):
    a = _flat_wm()
    les = _lesion(qsm_type="rim", rim_variant="incomplete", rim_chi_ppm=0.03,
                  rim_thickness_mm=1.5, rim_coverage=coverage)
    cov = render_lesions(a, [les])["stats"][1]["rim_coverage"]
    assert cov == pytest.approx(coverage, abs=0.15)


def test_confluent_and_irregular_shapes_are_grid_independent():
    les = _lesion(blobs=[(np.zeros(3), np.array([5.0, 4.0, 3.5])),
                         (np.array([6.0, 0, 0]), np.array([4.0, 3.5, 3.0]))],
                  irregularity=0.2)
    _, in1, _, _ = rasterise(les, _flat_wm(vox=1.0).affine, (40, 40, 40))
    _, in2, _, _ = rasterise(les, _flat_wm(shape=(80, 80, 80), vox=0.5).affine, (80, 80, 80))
    v1, v2 = in1.sum() * 1.0, in2.sum() * 0.125
    assert v1 == pytest.approx(v2, rel=0.08)  # same shape in mm on both grids


def test_no_rims_infratentorially(rng):
    les = _lesion(location="infratentorial")
    for _ in range(20):
        t = assign_type(les, rng, prl=True,
                        type_probs={"iso": 1, "hypo_rim": 1, "incomplete_rim": 1},
                        style=LesionStyle(central_vein_prob=0, vein_at_edge_prob=0))
        assert t.qsm_type in ("iso",) and not t.truth_prl


def test_fourier_resample_grid_and_intensity():
    x = np.ones((30, 30, 30), np.float32)
    shape, scale = acq.grid_for(x.shape, (1, 1, 1), (0.9, 0.9, 2.0))
    assert shape == (40, 40, 15) and np.allclose(scale, [0.9, 0.9, 2.0])
    y = acq.fourier_resample(x, (1, 1, 1), (0.9, 0.9, 2.0))
    assert y.shape == shape
    assert y[5:25, 5:25, 3:12].mean() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(InputError, match="ratio"):
        acq.grid_for(x.shape, (1, 1, 1), (1.2345, 1, 1))


@pytest.mark.parametrize("tesla", [3.0, 7.0])
def test_gre_phase_encodes_forward_field_and_r2star(tesla):
    """Noise-free echoes: phase differences = 2 pi gbar B0 f dTE; magnitude decays at R2*,
    which grows in proportion to B0 (the anatomy's R2* is at 3 T)."""
    anat = build_anatomy(source="procedural", voxel_size_mm=(3, 3, 3), shape=(48, 48, 48),
                         seed=0)
    rot = acq.tilt_rotation(4.0, 30.0)
    aff = acq.world_affine(anat, rot)
    field = acq.total_field(anat, aff)
    # the same forward model, with the tilted B0 in voxel axes
    b0 = b0_dir_from_affine(aff)
    assert b0 == pytest.approx(rot.T @ [0, 0, 1])
    chi = acq.blur_outside_brain(anat.chi_ppm, anat.brain_mask)
    direct = forward_field_ppm(chi - 9.4, voxel_size_mm=(3, 3, 3), b0_dir=b0, pad_voxels=8)
    brain = anat.brain_mask > 0
    assert np.abs(field - direct)[brain].max() < 0.05  # only padding differences
    sc = acq.at_field_strength(acq.ScannerPreset("t", "T", 3.0, (0.004, 0.008), snr=1e9),
                                tesla)
    mag, pha = acq.acquire_gre(anat, field, scanner=sc, voxel_size_mm=(3, 3, 3),
                               rng=np.random.default_rng(0))
    assert mag.shape == (48, 48, 48, 2) and pha.dtype == np.float32
    assert pha.min() >= -np.pi and pha.max() < np.pi
    dphi = np.angle(np.exp(1j * (pha[..., 1] - pha[..., 0])))
    want = np.angle(np.exp(1j * 2 * np.pi * ppm_to_hz(tesla) * field * 0.004))
    wm = (anat.labels == LABEL_IDS["wm"]) & (anat.vein_fraction == 0)
    err = np.abs(np.angle(np.exp(1j * (dphi - want))))[wm]
    assert np.median(err) < 1e-3
    ratio = mag[..., 1][wm] / mag[..., 0][wm]
    assert np.median(ratio) == pytest.approx(np.exp(-20.0 * tesla / 3.0 * 0.004), rel=0.01)


def test_field_strength_is_checked():
    sc = acq.get_scanner("siemens")
    assert acq.at_field_strength(sc, None) is sc
    assert acq.at_field_strength(sc, 1.5).echo_times_s == sc.echo_times_s
    for bad in (0.1, 20.0):
        with pytest.raises(InputError, match="field strength"):
            acq.at_field_strength(sc, bad)


def test_blur_outside_brain_keeps_the_brain_and_uniform_regions():
    anat = build_anatomy(source="procedural", voxel_size_mm=(3, 3, 3), shape=(48, 48, 48),
                         seed=0)
    brain = anat.brain_mask > 0
    out = acq.blur_outside_brain(anat.chi_ppm, anat.brain_mask, sigma_voxels=1.0)
    np.testing.assert_array_equal(out[brain], anat.chi_ppm[brain])  # the truth is untouched
    air = anat.labels == LABEL_IDS["air"]
    far = ndimage.distance_transform_edt(air) > 5  # air over 5 sigma from any tissue
    assert far.any()
    np.testing.assert_allclose(out[far], 9.4, atol=1e-4)
    assert np.abs(out - anat.chi_ppm).max() > 1.0  # the air/tissue edges are blurred
    np.testing.assert_array_equal(acq.blur_outside_brain(anat.chi_ppm, anat.brain_mask,
                                                         sigma_voxels=0), anat.chi_ppm)
    with pytest.raises(InputError, match="blur"):
        acq.blur_outside_brain(anat.chi_ppm, anat.brain_mask, sigma_voxels=-1)


def _smv_residual_hz(field_ppm, region, radius_vox=3):
    """RMS (Hz at 3 T) of ``f - SMV(f)`` on ``region``: zero for a field harmonic there."""
    g = np.indices((2 * radius_vox + 1,) * 3) - radius_vox
    ball = ((g ** 2).sum(0) <= radius_vox ** 2).astype(np.float32)
    f = field_ppm * ppm_to_hz(3.0)
    r = f - ndimage.convolve(f, ball / ball.sum(), mode="nearest")
    return float(np.sqrt(np.mean(r[region] ** 2)))


def test_background_field_is_harmonic_in_the_brain_with_tilted_b0():
    """The field of the sources outside the brain must be harmonic inside it, tilt or not.

    Point-sampled air edges ring (Gibbs) through the k-space kernel when B0 is oblique to
    the grid: a non-harmonic field inside the brain, here larger than the local field,
    that no background removal can take away. The partial-volume blur removes most of it.
    """
    anat = build_anatomy(source="procedural", voxel_size_mm=(2, 2, 2), shape=(64, 64, 64),
                         seed=0)
    inner = ndimage.binary_erosion(anat.brain_mask > 0, iterations=4)
    aff = acq.world_affine(anat, acq.tilt_rotation(10.0, 30.0))
    local = acq.total_field(anat, aff, brain_only=True)
    local_hz = float(np.std(local[inner]) * ppm_to_hz(3.0))
    sharp = _smv_residual_hz(acq.total_field(anat, aff, background_blur_voxels=0) - local,
                             inner)
    blurred = _smv_residual_hz(acq.total_field(anat, aff) - local, inner)
    assert sharp > 0.8 * local_hz  # the artefact the blur is there for (1.3 Hz vs 1.2 Hz)
    assert blurred < 0.2 * sharp and blurred < 0.2 * local_hz  # 0.15 Hz
    upright = acq.world_affine(anat, acq.tilt_rotation(0.0, 30.0))
    level = _smv_residual_hz(acq.total_field(anat, upright)
                             - acq.total_field(anat, upright, brain_only=True), inner)
    assert level < 0.1 * local_hz  # 0.04 Hz without tilt


def test_gre_noise_matches_stated_snr():
    anat = build_anatomy(source="procedural", voxel_size_mm=(3, 3, 3), shape=(48, 48, 48),
                         seed=0, veins=False)
    field = np.zeros(anat.shape, np.float32)
    sc = acq.ScannerPreset("t", "T", 3.0, (0.001,), snr=20.0)
    mag, _ = acq.acquire_gre(anat, field, scanner=sc, voxel_size_mm=(3, 3, 3),
                             rng=np.random.default_rng(1))
    # outside the head the magnitude is Rayleigh noise: mean = sigma sqrt(pi/2)
    air = anat.labels == LABEL_IDS["air"]
    sigma = mag[..., 0][air].mean() / np.sqrt(np.pi / 2)
    assert sigma == pytest.approx(TISSUES["wm"].pd / 20.0, rel=0.05)


def test_irregularity_makes_outlines_lobulated():
    """Boundary noise of amplitude 0.5 gives a rougher outline than none (S / V^(2/3))."""
    import scipy.ndimage as ndi

    def surface_to_volume(irregularity):
        les = _lesion(blobs=[(np.zeros(3), np.array([7.0, 6.0, 5.5]))],
                      irregularity=irregularity, shape_seed=3)
        _, inside, _, _ = rasterise(les, _flat_wm(shape=(48, 48, 48), vox=0.5).affine,
                                    (48, 48, 48))
        surface = inside & ~ndi.binary_erosion(inside)
        return surface.sum() / inside.sum() ** (2 / 3)  # does not depend on the size

    smooth, rough = surface_to_volume(0.0), surface_to_volume(0.5)
    assert rough > 1.15 * smooth


def test_lesion_style_irregularity_range_is_drawn_and_validated(rng):
    from training.simulate.lesions import place_lesion
    from training.simulate.presets import get_preset

    base = build_anatomy(source="procedural", voxel_size_mm=(2, 2, 2), shape=(64, 72, 64),
                         veins=False)
    style = LesionStyle(irregularity_min=0.35, irregularity_max=0.4)
    drawn = [place_lesion(base, rng, lesion_id=k + 1, location="deep_wm", style=style,
                          existing=[]).irregularity for k in range(6)]
    assert min(drawn) >= 0.35 and max(drawn) <= 0.4
    preset = get_preset("general-ms", {"MS.style.irregularity_min": "0.3",
                                       "MS.style.irregularity_max": "0.5"})
    assert (preset.groups[0].style.irregularity_min,
            preset.groups[0].style.irregularity_max) == (0.3, 0.5)
    with pytest.raises(InputError, match="irregularity_min <= style.irregularity_max"):
        get_preset("general-ms", {"MS.style.irregularity_max": "0.05"})
