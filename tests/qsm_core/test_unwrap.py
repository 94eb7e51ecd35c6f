import numpy as np
import pytest

from qsm_core.errors import InputError
from qsm_core.unwrap import laplacian_unwrap


def _grid(shape, vox=(1.0, 1.0, 1.0)):
    return np.meshgrid(*[(np.arange(n) - n / 2) * v for n, v in zip(shape, vox)],
                       indexing="ij")


def _smooth_phase(shape, vox=(1.0, 1.0, 1.0)):
    x, y, z = _grid(shape, vox)
    return (0.01 * x**2 + 0.3 * y + 0.005 * z**2
            + 3.0 * np.exp(-((x - 5) ** 2 + y**2 + z**2) / 50.0)).astype(np.float32)


def _wrap(p):
    return np.angle(np.exp(1j * p)).astype(np.float32)


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (0.9, 0.9, 2.0)])
def test_unwrap_many_wraps_exact_up_to_constant(vox):
    shape = (48, 48, 32)
    true = _smooth_phase(shape, vox)
    assert np.ptp(true) > 6 * np.pi  # several wraps
    u = laplacian_unwrap(_wrap(true), voxel_size_mm=vox)
    d = u - true
    assert np.ptp(d) < 1e-3  # a constant offset only


def test_unwrap_congruent_is_truth_plus_2pi_k_inside_mask(rng):
    shape = (48, 48, 48)
    true = _smooth_phase(shape)
    x, y, z = _grid(shape)
    mask = x**2 + y**2 + z**2 < 20**2
    noisy = true + rng.normal(0, 0.1, shape).astype(np.float32)
    u = laplacian_unwrap(_wrap(noisy), voxel_size_mm=(1, 1, 1), congruent=True)
    k = (u - noisy) / (2 * np.pi)
    assert np.allclose(k, np.round(k), atol=1e-3)  # congruent with the input
    diff = (u - noisy)[mask]
    assert np.ptp(diff) < 1e-3  # one constant 2 pi k inside the mask
    assert abs(diff[0] / (2 * np.pi) - round(diff[0] / (2 * np.pi))) < 1e-4


def test_unwrap_masked_error_is_harmonic():
    # with a mask, the result differs from the truth by a harmonic function: its discrete
    # Laplacian vanishes in the mask interior
    shape = (40, 40, 40)
    true = _smooth_phase(shape)
    x, y, z = _grid(shape)
    mask = x**2 + y**2 + z**2 < 17**2
    u = laplacian_unwrap(_wrap(true), voxel_size_mm=(1, 1, 1), mask=mask)
    err = (u - true).astype(np.float64)
    lap = sum(np.roll(err, 1, a) + np.roll(err, -1, a) - 2 * err for a in range(3))
    inner = x**2 + y**2 + z**2 < 15**2
    assert np.abs(lap[inner]).max() < 1e-3
    assert np.std(err[inner]) > 0.1  # it is not the identity: the harmonic part is real


def test_sincos_formula_close_for_gentle_phase():
    shape = (32, 32, 32)
    x, y, z = _grid(shape)
    true = (0.15 * x + 0.004 * y**2).astype(np.float32)
    a = laplacian_unwrap(_wrap(true), voxel_size_mm=(1, 1, 1), formula="sincos")
    b = laplacian_unwrap(_wrap(true), voxel_size_mm=(1, 1, 1))
    assert np.ptp(b - true) < 1e-3
    assert np.ptp(a - true) < 0.5  # the sine form is only approximate


def test_unwrap_linear_in_phase():
    # zero-mean output: unwrapping is a linear map of the true phase (needed by echo fit)
    shape = (24, 24, 24)
    p1 = _smooth_phase(shape)
    u1 = laplacian_unwrap(_wrap(p1), voxel_size_mm=(1, 1, 1))
    u2 = laplacian_unwrap(_wrap(2 * p1), voxel_size_mm=(1, 1, 1))
    assert np.allclose(u2, 2 * u1, atol=1e-3)


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((4, 4)), "3D"),
    (np.full((4, 4, 4), np.nan), "NaN"),
])
def test_unwrap_bad_input(bad, msg):
    with pytest.raises(InputError, match=msg):
        laplacian_unwrap(bad, voxel_size_mm=(1, 1, 1))


def test_unwrap_empty_mask_and_bad_formula():
    with pytest.raises(InputError, match="empty"):
        laplacian_unwrap(np.zeros((4, 4, 4)), voxel_size_mm=(1, 1, 1),
                         mask=np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="formula"):
        laplacian_unwrap(np.zeros((4, 4, 4)), voxel_size_mm=(1, 1, 1), formula="x")
