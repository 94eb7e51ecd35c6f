import numpy as np
import pytest

from qsm_core.dipole import forward_field_ppm
from qsm_core.errors import InputError
from qsm_core.swi import min_intensity_projection, phase_mask, swi

TE = 0.02
HZ_PER_PPM = 127.7


def _vein_scene(rng, n=48, phase_sign=1):
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 + 0.5] * 3, indexing="ij")
    vein = (x**2 + y**2 < 2.0**2) & (np.abs(z) < 18)  # along B0: inside field +chi/3
    chi = 0.45 * vein.astype(np.float32)
    f_hz = forward_field_ppm(chi, voxel_size_mm=(1, 1, 1), b0_dir=(0, 0, 1)) * HZ_PER_PPM
    bg = 0.12 * x + 0.006 * y**2  # smooth background phase (wraps)
    phase = phase_sign * (2 * np.pi * f_hz * TE) + bg
    mag = 1.0 + 0.02 * rng.standard_normal(phase.shape)
    return mag.astype(np.float32), np.angle(np.exp(1j * phase)).astype(np.float32), vein, f_hz


@pytest.mark.parametrize("phase_sign", [1, -1])
def test_swi_darkens_paramagnetic_vein(rng, phase_sign):
    mag, pha, vein, _ = _vein_scene(rng, phase_sign=phase_sign)
    swi_img, mip = swi(mag, pha, voxel_size_mm=(1, 1, 1), phase_sign=phase_sign,
                       sigma_mm=4.0)
    x, y, z = np.meshgrid(*[np.arange(48) - 23.5] * 3, indexing="ij")
    far = (x**2 + y**2 > 8**2) & (x**2 + y**2 < 14**2) & (np.abs(z) < 12)
    core = vein & (x**2 + y**2 < 1.5**2)
    contrast_swi = swi_img[core].mean() / swi_img[far].mean()
    contrast_mag = mag[core].mean() / mag[far].mean()
    assert contrast_mag > 0.95  # no magnitude contrast by construction
    assert contrast_swi < 0.5  # SWI darkens the vein
    assert swi_img[far].mean() > 0.9  # background kept
    # the mIP keeps the vein dark and never brightens anything
    assert np.all(mip <= swi_img + 1e-6)
    assert mip[core].mean() <= swi_img[core].mean()


def test_swi_from_local_field_no_highpass(rng):
    mag, _, vein, f_hz = _vein_scene(rng)
    swi_img, _ = swi(mag, 2 * np.pi * f_hz * TE, voxel_size_mm=(1, 1, 1), highpass=None)
    assert swi_img[vein].mean() < 0.5 * mag[vein].mean()


def test_phase_mask_and_mip_values():
    assert phase_mask(np.array([-2.0, 0.0, np.pi / 2, np.pi, 5.0])).tolist() == [
        1.0, 1.0, 0.5, 0.0, 0.0]
    img = np.ones((4, 4, 16), np.float32)
    img[1, 1, 8] = 0.2
    mip = min_intensity_projection(img, voxel_size_mm=(1, 1, 1), slab_mm=4.0, axis=2)
    assert mip[1, 1, 8] == pytest.approx(0.2)
    assert int(np.isclose(mip[1, 1], 0.2).sum()) == 4  # a 4 mm slab of 1 mm slices
    assert np.all(mip[0] == 1.0)


def test_bad_inputs():
    with pytest.raises(InputError, match="same shape"):
        swi(np.ones((4, 4, 4)), np.ones((4, 4, 5)), voxel_size_mm=(1, 1, 1))
    with pytest.raises(InputError, match="highpass"):
        swi(np.ones((4, 4, 4)), np.ones((4, 4, 4)), voxel_size_mm=(1, 1, 1), highpass="x")
