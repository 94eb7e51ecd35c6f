import numpy as np
import pytest

from qsm_core.errors import InputError
from qsm_core.mask import brain_mask, dilate_ball, erode_ball


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _head(rng, shape=(64, 64, 56), vox=(1.0, 1.0, 1.0), snr=10.0, echoes=4):
    x, y, z = np.meshgrid(*[(np.arange(n) - n / 2) * v for n, v in zip(shape, vox)],
                          indexing="ij")
    tissue = (x / 26) ** 2 + (y / 22) ** 2 + (z / 20) ** 2 < 1
    # tissue with internal structure: a dark (fast-decaying) nucleus and bright CSF
    nucleus = (x - 5) ** 2 + y**2 + z**2 < 5**2
    pd = np.where(tissue, 1.0, 0.0)
    r2s = np.where(nucleus, 80.0, 20.0)
    te = np.linspace(0.005, 0.03, echoes)
    sig = pd[..., None] * np.exp(-r2s[..., None] * te)
    sigma = 1.0 / snr
    noise = sigma * (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape))
    return np.abs(sig + noise).astype(np.float32), tissue


def test_brain_mask_dice_on_noisy_sphere(rng):
    mag, truth = _head(rng)
    m = brain_mask(mag, voxel_size_mm=(1, 1, 1))
    assert m.dtype == np.uint8
    assert _dice(m, truth) > 0.95


def test_brain_mask_anisotropic_and_single_echo(rng):
    mag, truth = _head(rng, shape=(64, 64, 28), vox=(1.0, 1.0, 2.0), echoes=1)
    m = brain_mask(mag[..., 0], voxel_size_mm=(1, 1, 2))
    assert _dice(m, truth) > 0.95


def test_brain_mask_removes_detached_blob_and_fills_holes(rng):
    mag, truth = _head(rng)
    mag[2:6, 2:6, 2:6, :] = 1.0  # a bright detached blob (e.g. an eye or a marker)
    mag[30:34, 30:34, 26:30, :] = 0.0  # a signal void inside the tissue
    m = brain_mask(mag, voxel_size_mm=(1, 1, 1)).astype(bool)
    assert not m[2:6, 2:6, 2:6].any()
    assert m[30:34, 30:34, 26:30].all()


def test_dark_fraction_drops_enclosed_voids(rng):
    mag, truth = _head(rng)
    mag[30:34, 30:34, 26:30, :] = 0.0  # a signal void inside the tissue
    m = brain_mask(mag, voxel_size_mm=(1, 1, 1), dark_fraction=0.5).astype(bool)
    assert not m[31:33, 31:33, 27:29].any()
    assert _dice(m, truth) > 0.95


def test_erosion_option_and_threshold(rng):
    mag, truth = _head(rng)
    m0 = brain_mask(mag, voxel_size_mm=(1, 1, 1))
    m2 = brain_mask(mag, voxel_size_mm=(1, 1, 1), erode_mm=2.0)
    assert m2.sum() < m0.sum()
    assert np.all(m0[m2.astype(bool)] == 1)
    m_thr = brain_mask(mag, voxel_size_mm=(1, 1, 1), threshold=0.5)
    assert _dice(m_thr, truth) > 0.95


@pytest.mark.parametrize("radius", [2.0, 5.0])
def test_ball_morphology_matches_distance(radius):
    m = np.zeros((40, 40, 40), bool)
    m[5:35, 5:35, 5:35] = True
    e = erode_ball(m, radius, voxel_size_mm=(1, 1, 1))
    side = 30 - 2 * int(radius)
    assert e.sum() == side**3
    d = dilate_ball(e, radius, voxel_size_mm=(1, 1, 1))
    assert d.sum() <= m.sum() and d[20, 20, 20]


def test_bad_inputs():
    with pytest.raises(InputError, match="all zeros"):
        brain_mask(np.zeros((8, 8, 8)), voxel_size_mm=(1, 1, 1))
    with pytest.raises(InputError, match="3D or 4D"):
        brain_mask(np.ones((8, 8)), voxel_size_mm=(1, 1, 1))
    bad = np.ones((8, 8, 8))
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        brain_mask(bad, voxel_size_mm=(1, 1, 1))
