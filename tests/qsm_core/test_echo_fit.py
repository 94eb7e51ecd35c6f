import numpy as np
import pytest

from qsm_core.echo_fit import fit_frequency
from qsm_core.errors import InputError

TE_SIEMENS = np.array([7.2e-3, 13.4e-3, 19.6e-3, 25.8e-3])


def _phantom(shape=(40, 40, 32), te=TE_SIEMENS, noise=0.02, rng=None, phase_sign=1):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    f_hz = (40.0 * x**2 + 30.0 * y - 20.0 * z + 10.0).astype(np.float32)
    phi0 = (0.8 * x - 0.5 * y**2 + 0.4).astype(np.float32)
    r2s = 20.0 + 10.0 * (x > 0)
    mag = np.stack([np.exp(-r2s * t) for t in te], axis=-1).astype(np.float32)
    sig = mag * np.exp(1j * (phi0[..., None]
                             + phase_sign * 2 * np.pi * f_hz[..., None] * te))
    if noise:
        sig = sig + noise * (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape))
    return np.abs(sig), np.angle(sig), f_hz, phi0


@pytest.mark.parametrize("phase_sign", [1, -1])
def test_fit_recovers_frequency_and_offset(rng, phase_sign):
    mag, pha, f_true, phi0 = _phantom(rng=rng, phase_sign=phase_sign)
    assert np.ptp(2 * np.pi * f_true * TE_SIEMENS[-1]) > 6 * np.pi  # wrapped data
    fit = fit_frequency(pha, mag, TE_SIEMENS, voxel_size_mm=(1, 1, 1), phase_sign=phase_sign)
    err = fit.frequency_hz - f_true
    assert abs(float(np.median(err))) < 0.5  # constants restored
    assert float(np.std(err)) < 1.0  # Hz; noise-limited
    assert float(np.std(fit.phase_offset_rad - phi0)) < 0.05
    # the reported standard error matches the actual error spread (within 35 %)
    ratio = float(np.std(err)) / float(np.sqrt(np.mean(fit.noise_std_hz**2)))
    assert 0.65 < ratio < 1.35
    assert fit.noise_method == "residual"
    assert fit.frequency_hz.dtype == np.float32


def test_fit_noise_free_exact():
    mag, pha, f_true, phi0 = _phantom(noise=0)
    fit = fit_frequency(pha, mag, TE_SIEMENS, voxel_size_mm=(1, 1, 1), phase_offset="voxel")
    assert np.abs(fit.frequency_hz - f_true).max() < 0.01
    assert np.abs(fit.phase_offset_rad - phi0).max() < 1e-3
    # smooth phi0: the local linear fit is exact for linear trends (also at the edges),
    # the curvature of phi0 (-0.5 y^2) leaves sigma^2 phi0'' / 2 (~0.003 rad, 0.02 Hz)
    fit = fit_frequency(pha, mag, TE_SIEMENS, voxel_size_mm=(1, 1, 1))
    assert np.abs(fit.frequency_hz - f_true).max() < 0.06
    assert np.abs(fit.phase_offset_rad - phi0).max() < 0.01


def test_single_echo_and_two_echoes(rng):
    te1 = np.array([0.02])
    mag, pha, f_true, _ = _phantom(te=te1, noise=0)
    # single echo: no intercept (phi0 taken as 0), so use phi0 = 0 data
    x = np.exp(1j * 2 * np.pi * f_true[..., None] * te1)
    fit = fit_frequency(np.angle(x)[..., 0], mag[..., 0], 0.02, voxel_size_mm=(1, 1, 1))
    assert np.abs(fit.frequency_hz - f_true).max() < 0.01
    assert fit.noise_method == "background"
    te2 = TE_SIEMENS[:2]
    mag, pha, f_true, _ = _phantom(te=te2, noise=0.01, rng=rng)
    fit = fit_frequency(pha, mag, te2, voxel_size_mm=(1, 1, 1))
    assert float(np.std(fit.frequency_hz - f_true)) < 2.0


def test_magnitude_weighting_beats_uniform(rng):
    # one echo is nearly noise: magnitude^2 weights must ignore it
    mag, pha, f_true, _ = _phantom(rng=rng, noise=0.02)
    mag[..., 3] *= 0.05
    z = mag[..., 3] * np.exp(1j * pha[..., 3])
    z = z + 0.02 * (rng.standard_normal(z.shape) + 1j * rng.standard_normal(z.shape))
    pha[..., 3], mag[..., 3] = np.angle(z), np.abs(z)
    fit_w = fit_frequency(pha, mag, TE_SIEMENS, voxel_size_mm=(1, 1, 1))
    fit_u = fit_frequency(pha, np.ones_like(mag), TE_SIEMENS, voxel_size_mm=(1, 1, 1))
    assert np.std(fit_w.frequency_hz - f_true) < 0.5 * np.std(fit_u.frequency_hz - f_true)


def test_mask_zeroes_outside():
    mag, pha, _, _ = _phantom(noise=0)
    mask = np.zeros(mag.shape[:3], np.uint8)
    mask[5:30, 5:30, 5:20] = 1
    fit = fit_frequency(pha, mag, TE_SIEMENS, voxel_size_mm=(1, 1, 1), mask=mask)
    assert np.all(fit.frequency_hz[mask == 0] == 0)
    assert np.all(fit.noise_std_hz[mask == 0] == 0)


@pytest.mark.parametrize("kwargs, msg", [
    ({"te": [0.01, 0.02, 0.03]}, "4 echoes"),
    ({"te": [0.02, 0.01, 0.03, 0.04]}, "increasing"),
    ({"te": [-0.01, 0.01, 0.02, 0.03]}, "positive"),
    ({"te": [7.2, 13.4, 19.6, 25.8]}, "milliseconds"),
    ({"mag_shape": (10, 10, 8, 3)}, "does not match"),
    ({"nan": True}, "NaN"),
    ({"ndim2": True}, "2D"),
    ({"sign": 2}, "phase_sign"),
])
def test_bad_inputs(kwargs, msg):
    pha = np.zeros((10, 10, 8, 4), np.float32)
    mag = np.ones(kwargs.get("mag_shape", pha.shape), np.float32)
    te = kwargs.get("te", TE_SIEMENS)
    if kwargs.get("nan"):
        pha[0, 0, 0, 0] = np.nan
    if kwargs.get("ndim2"):
        pha, mag = pha[:, :, 0, 0], mag[:, :, 0, 0]
    with pytest.raises(InputError, match=msg):
        fit_frequency(pha, mag, te, voxel_size_mm=(1, 1, 1), phase_sign=kwargs.get("sign", 1))


def test_smooth_offset_cuts_noise_and_keeps_the_field(rng):
    # phi0 is smooth: fitting the slope through its local average instead of a free
    # intercept per voxel cuts the frequency noise (Siemens TEs: Sum w t^2 vs
    # Sum w (t - t_mean)^2, ~2.5x in std) without biasing the field
    mag, pha, f_true, phi0 = _phantom(rng=rng, noise=0.03)
    kw = dict(voxel_size_mm=(1, 1, 1))
    fit_s = fit_frequency(pha, mag, TE_SIEMENS, phase_offset="smooth", **kw)
    fit_v = fit_frequency(pha, mag, TE_SIEMENS, phase_offset="voxel", **kw)
    inner = (slice(4, -4),) * 3
    err_s = (fit_s.frequency_hz - f_true)[inner]
    err_v = (fit_v.frequency_hz - f_true)[inner]
    assert float(np.std(err_s)) < 0.5 * float(np.std(err_v))
    assert abs(float(np.median(err_s))) < 0.2
    assert float(np.std(fit_s.phase_offset_rad[inner] - phi0[inner])) < 0.02
    # both standard errors match the actual spread
    for fit, err in ((fit_s, err_s), (fit_v, err_v)):
        ratio = float(np.std(err)) / float(np.sqrt(np.mean(fit.noise_std_hz[inner] ** 2)))
        assert 0.8 < ratio < 1.25


def test_noise_estimate_is_unbiased_with_a_harmonic_offset(rng):
    # a large field gradient makes the Poisson solves' dropped constants differ from the
    # circular mean by a TE-dependent bend; the offsets must stay affine in TE or the
    # fit's residuals (hence noise_std_hz) absorb the bend
    shape = (40, 40, 32)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    f_hz = (150.0 * x * y + 120.0 * (x**2 - z**2) + 60.0 * y).astype(np.float32)
    mag = np.stack([np.exp(-20.0 * t) * np.ones(shape) for t in TE_SIEMENS], -1)
    sig = mag * np.exp(1j * 2 * np.pi * f_hz[..., None] * TE_SIEMENS)
    sig = sig + 0.02 * (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape))
    fit = fit_frequency(np.angle(sig), np.abs(sig), TE_SIEMENS, voxel_size_mm=(1, 1, 1),
                        phase_offset="voxel")
    err = fit.frequency_hz - f_hz
    err = err - np.median(err)
    inner = (slice(4, -4),) * 3
    ratio = float(np.std(err[inner])) / float(np.sqrt(np.mean(fit.noise_std_hz[inner] ** 2)))
    assert 0.8 < ratio < 1.25


def test_pooled_noise_is_stable(rng):
    mag, pha, _, _ = _phantom(rng=rng, noise=0.03)
    kw = dict(voxel_size_mm=(1, 1, 1))
    pooled = fit_frequency(pha, mag, TE_SIEMENS, **kw).noise_std_hz
    raw = fit_frequency(pha, mag, TE_SIEMENS, noise_pool_mm=0, **kw).noise_std_hz
    inner = (slice(4, -4),) * 3
    # per-voxel estimates from 3 degrees of freedom spread widely; pooled ones do not
    spread = lambda a: float(np.percentile(a[inner], 99) / np.percentile(a[inner], 50))  # noqa: E731
    assert spread(raw) > 2.0
    assert spread(pooled) < 1.6


@pytest.mark.parametrize("kwargs, msg", [
    ({"phase_offset": "free"}, "phase_offset"),
    ({"offset_sigma_mm": 0.0}, "offset_sigma_mm"),
    ({"noise_pool_mm": -1.0}, "noise_pool_mm"),
])
def test_bad_fit_options(kwargs, msg):
    pha = np.zeros((10, 10, 8, 4), np.float32)
    with pytest.raises(InputError, match=msg):
        fit_frequency(pha, np.ones_like(pha), TE_SIEMENS, voxel_size_mm=(1, 1, 1), **kwargs)
