"""The torch code path of the stages before the inversion gives the numpy path's result.

``device="torch-cpu"`` runs exactly the code that ``device="cuda"`` runs, on the CPU, so
these tests check the GPU path's algorithms on machines without a GPU; where torch sees a
GPU they run on ``cuda`` as well. Each compares the two paths on the same inputs (float32
tolerance), and the physics is checked against the truth where a stage has one (the numpy
path's own tests cover the rest).
"""

import numpy as np
import pytest
import torch
from scipy import ndimage

from qsm_core.backend import NumpyBackend, get_backend
from qsm_core.background import pdf, restore_harmonic, vsharp
from qsm_core.dipole import forward_field_ppm
from qsm_core.echo_fit import fit_frequency
from qsm_core.pipeline import reconstruct
from qsm_core.unwrap import _poisson_neumann, laplacian_unwrap

from .test_pipeline import TE, _nrmse, _phantom

VOX = (1.0, 1.2, 2.0)
B0 = (0.0, 0.1, 1.0)
TORCH_DEVICES = ["torch-cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rel(a, b) -> float:
    """max |a - b| relative to max |a|."""
    return float(np.abs(np.asarray(a, float) - b).max() / max(np.abs(a).max(), 1e-30))


@pytest.fixture(scope="module", params=TORCH_DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def torch_be(device):
    return get_backend(device)


@pytest.fixture(scope="module")
def head():
    """Ellipsoid 'brain' with a smooth field, a sphere and an outside source."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 36, 30)], indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.75) ** 2 + (z / 0.7) ** 2 < 1
    chi = np.where(brain, 0.05 * np.sin(4 * x), 0.0)
    chi += 0.1 * (((x - 0.2) ** 2 + y**2 + z**2) < 0.03)
    chi[1:4, 8:28, 8:22] = 9.0  # air-like source outside the brain
    return {"x": x, "y": y, "z": z, "brain": brain, "chi": chi.astype(np.float32)}


@pytest.mark.parametrize("order", [0, 1, 2])
def test_gaussian_filter1d_matches_scipy(torch_be, rng, order):
    x = rng.standard_normal((9, 11, 13)).astype(np.float32)
    for axis in range(3):
        want = ndimage.gaussian_filter1d(x, 1.7, axis=axis, order=order, mode="constant",
                                         truncate=3.0)
        got = torch_be.to_numpy(torch_be.gaussian_filter1d(torch_be.asarray(x), 1.7, axis,
                                                           order))
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    sig = (1.0, 2.0, 0.7)
    np.testing.assert_allclose(
        torch_be.to_numpy(torch_be.gaussian_filter(torch_be.asarray(x), sig)),
        NumpyBackend.gaussian_filter(x, sig), atol=1e-6)


def test_mirror_poisson_is_the_dct_solve(torch_be, rng):
    """Periodic FFT solve on the mirrored volume == DCT-II solve (same operator)."""
    lap = rng.standard_normal((12, 10, 9)).astype(np.float32)
    lap -= lap.mean()  # solvable with zero-flux edges
    v = np.array([1.0, 1.3, 2.0])
    want = _poisson_neumann(lap.copy(), v, NumpyBackend())
    got = torch_be.to_numpy(_poisson_neumann(torch_be.asarray(lap), v, torch_be))
    assert _rel(want, got) < 1e-5


def test_wrap_is_the_same(torch_be):
    a = np.linspace(-20, 20, 1001).astype(np.float32)
    want = NumpyBackend.wrap(a.copy())
    got = torch_be.to_numpy(torch_be.wrap(torch_be.asarray(a)))
    assert np.all(np.abs(want) <= np.pi + 1e-6)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_unwrap_and_echo_fit(head, rng, device):
    x, y, z, brain = head["x"], head["y"], head["z"], head["brain"]
    f = 30 * (x**2 - y**2) + 20 * z + 5 * np.exp(-((x - 0.2) ** 2 + y**2 + z**2) / 0.02)
    te = np.array([0.006, 0.012, 0.018, 0.024])
    phase = 0.5 * x[..., None] + 2 * np.pi * f[..., None] * te
    phase = np.angle(np.exp(1j * (phase + rng.normal(0, 0.05, phase.shape)))).astype(np.float32)
    mag = ((1 + 0.3 * y)[..., None] * np.exp(-te / 0.05)).astype(np.float32)
    mag = np.broadcast_to(mag, phase.shape).copy()
    trust = np.zeros(brain.shape, bool)
    trust[2:-2, 2:-2, 2:-2] = True
    u = {d: laplacian_unwrap(phase[..., 3], voxel_size_mm=VOX, mask=trust, device=d)
         for d in ("cpu", device)}
    assert _rel(u["cpu"], u[device]) < 1e-5
    for offset in ("smooth", "voxel"):
        fits = {d: fit_frequency(phase, mag, te, voxel_size_mm=VOX, mask=brain,
                                 unwrap_mask=trust, phase_offset=offset, device=d)
                for d in ("cpu", device)}
        a, b = fits["cpu"], fits[device]
        assert _rel(a.frequency_hz, b.frequency_hz) < 1e-5
        assert _rel(a.phase_offset_rad, b.phase_offset_rad) < 1e-4
        assert _rel(a.noise_std_hz, b.noise_std_hz) < 1e-3
        assert a.noise_method == b.noise_method == "residual"
    # physics: noise-free, every voxel trusted, the unwrapping is exact up to a constant
    clean = np.angle(np.exp(1j * (0.5 * x[..., None] + 2 * np.pi * f[..., None] * te)))
    fit = fit_frequency(clean.astype(np.float32), mag, te, voxel_size_mm=VOX, mask=brain,
                        device=device)
    err = fit.frequency_hz[brain] - f[brain]
    assert np.std(err) < 1e-3 * np.std(f[brain])  # measured: 3e-5 of it


def test_vsharp_restoration_pdf_forward_field(head, device):
    brain, chi = head["brain"], head["chi"]
    total = forward_field_ppm(chi, voxel_size_mm=VOX, b0_dir=B0) * 128.0
    true_local = forward_field_ppm(np.where(brain, chi, 0), voxel_size_mm=VOX, b0_dir=B0) * 128
    out = {}
    for d in ("cpu", device):
        local, mask_out = vsharp(total, brain, voxel_size_mm=VOX, device=d)
        restored = restore_harmonic(vsharp, local, brain, mask_out, voxel_size_mm=VOX,
                                    b0_dir=B0, device=d)
        ff = forward_field_ppm(chi, voxel_size_mm=VOX, b0_dir=B0, device=d)
        local_pdf, _ = pdf(total, brain, voxel_size_mm=VOX, b0_dir=B0, max_iter=30, device=d)
        out[d] = (local, mask_out, restored, ff, local_pdf)
    (l0, m0, r0, f0, p0), (l1, m1, r1, f1, p1) = out["cpu"], out[device]
    np.testing.assert_array_equal(m0, m1)
    assert _rel(l0, l1) < 1e-5 and _rel(r0, r1) < 1e-5 and _rel(f0, f1) < 1e-5
    assert _rel(p0, p1) < 1e-2  # 30 CG iterations amplify float32 rounding
    # and the background is gone: the outside source dominates the total field
    fm = m1.astype(bool)
    assert np.abs(total - true_local)[fm].std() > 5 * np.abs(l1 - true_local)[fm].std()


def test_reconstruct_on_torch_matches_numpy(device):
    ph = _phantom(np.random.default_rng(3), n=40)
    res = {d: reconstruct(ph["mag"], ph["phase"], TE, affine=ph["affine"], field_strength_t=3.0,
                          method="tkd", device=d) for d in ("cpu", device)}
    a, b = res["cpu"], res[device]
    np.testing.assert_array_equal(a.brain_mask, b.brain_mask)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert _rel(a.total_field_hz, b.total_field_hz) < 1e-5
    assert _rel(a.local_field_hz, b.local_field_hz) < 1e-4
    assert _rel(a.chi_ppm, b.chi_ppm) < 1e-4
    assert b.parameters["device"] == device
    fm = b.mask.astype(bool)
    assert abs(_nrmse(a.chi_ppm, ph["chi"], fm) - _nrmse(b.chi_ppm, ph["chi"], fm)) < 1e-4
