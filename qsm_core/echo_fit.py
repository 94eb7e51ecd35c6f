"""Multi-echo frequency estimation: unwrap each echo, then a weighted fit of phase vs TE.

Phase model (design.md section 4)::

    phase_e = phi0 + phase_sign * 2 pi * f * TE_e + noise_e,

with ``phase_sign = +1`` the right-handed default (positive frequency = paramagnetic field
shift gives positive phase); pass ``phase_sign=-1`` for data in the opposite (left-handed)
convention. The frequency ``f`` returned is always in the right-handed sense.

Unwrapping uses :func:`qsm_core.unwrap.laplacian_unwrap`, whose output is a linear
function of the true phase (up to a harmonic function and a constant), so the unwrapped
echoes stay exactly affine in TE and the fitted slope is the true frequency up to a
harmonic function, which background-field removal then takes away. By default
(``unwrap='differences'``) the first echo is unwrapped, then each echo-to-echo difference
``arg(z_e conj(z_{e-1}))``, and the unwrapped differences are summed. Where every
neighbour difference is below pi both routes give the same result (the sum telescopes),
but the differences evolve over ``TE_e - TE_{e-1}`` instead of ``TE_e``: a late echo
near an air-tissue interface, whose spatial phase gradient exceeds pi per voxel and
breaks per-echo unwrapping, is still unwrapped correctly (on the MNI head phantom at 3 T
this removed field errors of several Hz in the orbitofrontal and temporal cortex).

The fit is weighted least squares. The phase noise of echo e has variance
``sigma^2 / m_e^2`` (``m_e`` the magnitude, ``sigma`` the complex noise std), so the
inverse-variance weights are ``w_e = m_e^2``. ``phi0`` (the phase at TE = 0, from the
transmit and receive chain) is spatially smooth, so by default (``phase_offset='smooth'``)
the per-voxel intercepts of a first fit are replaced by a Gaussian-weighted local linear
fit of them (``offset_sigma_mm``, weights = their inverse variance) and the slope is
fitted through that offset: ``f = sum(w t (u - phi0)) / (2 pi sum(w t^2))``, the
familiar ``m^2 TE^2``-weighted frequency. A free intercept per voxel
(``phase_offset='voxel'``) leaves only ``sum(w (t - t_mean)^2)`` of ``sum(w t^2)`` to the
slope: ~2.5x the frequency noise for four echoes from 7 to 26 ms.
The standard error of the slope, ``sigma^2 / sum(w t^2)`` (``sigma^2 sum(w) / det`` with a
free intercept), gives ``noise_std_hz``, with ``sigma^2`` from the weighted residuals
(``E - 1`` or ``E - 2`` degrees of freedom) pooled over a small Gaussian
(``noise_pool_mm``: a few degrees of freedom per voxel make it very noisy). With fewer
than two residual degrees of freedom ``sigma`` is estimated once from the background
(Rayleigh statistics of the lowest-magnitude voxels) instead; ``EchoFit.noise_method``
says which. One echo has no intercept: ``phi0 = 0`` is assumed.

The constants that the Poisson solves drop are restored per echo and kept affine in TE
(:func:`_restore_constants`), so they cannot bend the fit's residuals.

``device="cuda"`` (or ``"torch-cpu"``) runs the unwrapping, the fit and its Gaussian
filters on torch (:mod:`qsm_core.backend`); arrays still go in and come out as
numpy, and the result is the same within float32 rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qsm_core.backend import NumpyBackend, get_backend
from qsm_core.errors import InputError
from qsm_core.unwrap import laplacian_unwrap

__all__ = ["EchoFit", "fit_frequency", "check_echo_inputs"]

log = logging.getLogger(__name__)


@dataclass
class EchoFit:
    """Result of :func:`fit_frequency`.

    Attributes
    ----------
    frequency_hz : ndarray, shape (X, Y, Z), float32
        Field offset frequency (Hz), right-handed sense, up to a harmonic function.
    phase_offset_rad : ndarray, shape (X, Y, Z), float32
        Fitted ``phi0`` (rad), unwrapped (zeros for a single echo).
    noise_std_hz : ndarray, shape (X, Y, Z), float32
        Standard error of ``frequency_hz`` (Hz); large where the signal is weak.
    unwrapped_phase_rad : ndarray, shape (X, Y, Z, E), float32
        The unwrapped echoes (in the input's sign convention).
    noise_method : str
        ``'residual'`` (per-voxel fit residuals) or ``'background'`` (one noise level
        from the background, for fewer than three echoes).
    """

    frequency_hz: np.ndarray
    phase_offset_rad: np.ndarray
    noise_std_hz: np.ndarray
    unwrapped_phase_rad: np.ndarray
    noise_method: str


def check_echo_inputs(phase_rad, magnitude, te_s):
    """Validate and normalise multi-echo inputs.

    Parameters
    ----------
    phase_rad, magnitude : array_like, shape (X, Y, Z, E) or (X, Y, Z)
        Echoes last; a 3D array is one echo.
    te_s : float or sequence of E floats
        Echo times (s), strictly increasing and positive.

    Returns
    -------
    phase, magnitude : ndarray, shape (X, Y, Z, E), float32
    te : ndarray, shape (E,), float64

    Raises
    ------
    InputError
        On shape mismatch, wrong TE count, non-increasing or non-positive TE, NaN/Inf.
    """
    phase = np.asarray(phase_rad)
    mag = np.asarray(magnitude)
    te = np.atleast_1d(np.asarray(te_s, dtype=float))
    if phase.ndim == 3:
        phase = phase[..., None]
    if mag.ndim == 3:
        mag = mag[..., None]
    if phase.ndim != 4 or mag.ndim != 4:
        raise InputError(f"phase and magnitude must be 3D (one echo) or 4D (X, Y, Z, echo), "
                         f"got shapes {np.shape(phase_rad)} and {np.shape(magnitude)}; "
                         "2D images are not supported, stack slices into a volume")
    if phase.shape != mag.shape:
        raise InputError(f"magnitude shape {mag.shape} does not match phase shape "
                         f"{phase.shape}; pass the magnitude and phase of the same echoes")
    if min(phase.shape[:3]) < 2:
        raise InputError(f"phase must be a 3D volume, got spatial shape {phase.shape[:3]}")
    if te.ndim != 1 or te.size != phase.shape[3]:
        raise InputError(f"got {te.size} echo times for {phase.shape[3]} echoes; give one "
                         "echo time (s) per echo, in the order of the last axis")
    if not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise InputError(f"echo times must be positive and finite (in seconds), got "
                         f"{te.tolist()}")
    if np.any(te > 1.0):
        raise InputError(f"echo times look like milliseconds ({te.tolist()}); give them in "
                         "seconds")
    if np.any(np.diff(te) <= 0):
        raise InputError(f"echo times must be strictly increasing, got {te.tolist()}; sort "
                         "the echoes by TE")
    if not np.all(np.isfinite(phase)):
        raise InputError("phase contains NaN or Inf; fix the input images")
    if not np.all(np.isfinite(mag)):
        raise InputError("magnitude contains NaN or Inf; fix the input images")
    if np.any(mag < 0):
        raise InputError("magnitude has negative values; pass the magnitude images, not "
                         "real/imaginary parts")
    return phase.astype(np.float32, copy=False), mag.astype(np.float32, copy=False), te


def background_noise_std(magnitude: np.ndarray, *, fraction: float = 0.1) -> float:
    """Complex-noise std estimated from the lowest-magnitude voxels (Rayleigh statistics).

    For pure noise, magnitude is Rayleigh with ``E[m^2] = 2 sigma^2``. The darkest
    ``fraction`` of voxels of the first echo stands for the background; if the image has
    little background this overestimates nothing worse than the true level of dim tissue.
    """
    m = np.asarray(magnitude, dtype=np.float64).ravel()
    thr = np.quantile(m, fraction)
    sel = m[m <= thr]
    sigma = float(np.sqrt(np.mean(sel**2) / 2.0)) if sel.size else 0.0
    if sigma <= 0:
        sigma = float(np.sqrt(np.mean(m**2) / 2.0)) * 1e-3 + 1e-12
    return sigma


def _restore_constants(unwrapped, phase, mag, region, te=None,
                       max_voxels: int = 200_000):
    """Add back each echo's spatial-mean phase, which the Poisson solve drops.

    The offset of echo e is the ``m^2``-weighted circular mean of ``wrapped - unwrapped``
    over ``region`` (at most ``max_voxels`` evenly spaced voxels), so the result is
    congruent on average; the offsets are then unwrapped along TE, assuming the mean
    phase moves by less than pi between consecutive echoes, and (with ``te`` and more
    than two echoes) replaced by their least-squares line in TE. Spatial constants are
    harmonic, so this only makes ``phi0`` and ``f`` readable; background removal would
    take them away anyway.
    """
    n_echo = phase.shape[3]
    if region is None:
        idx = np.arange(int(np.prod(phase.shape[:3])))
    else:
        idx = np.flatnonzero(np.asarray(region, bool))
    if idx.size == 0:
        return
    idx = idx[:: max(1, idx.size // max_voxels)]
    # gather the voxels by coordinates: reshaping a Fortran-ordered 4D series (as NIfTI
    # loads) to (voxels, echoes) would copy all of it first (0.26 s per array at 1 mm)
    at = np.unravel_index(idx, phase.shape[:3])
    p = phase[at].astype(np.float64)
    u = unwrapped[at].astype(np.float64)
    w = mag[at].astype(np.float64) ** 2
    offsets = np.unwrap(np.angle(np.sum(w * np.exp(1j * (p - u)), axis=0)))
    if te is not None and n_echo > 2:
        # The dropped constants are the spatial means of phi0 + 2 pi f TE: affine in TE.
        # The circular mean is not (the harmonic part each solve adds varies in space,
        # so its circular mean bends with TE by ~0.1 rad on a head), and a bend would be
        # read as noise by the fit's residuals: keep the offsets' least-squares line.
        design = np.stack([np.ones(n_echo), np.asarray(te, float)], axis=1)
        coef, *_ = np.linalg.lstsq(design, offsets, rcond=None)
        offsets = design @ coef
    for e in range(n_echo):
        unwrapped[..., e] += np.float32(offsets[e])


def _box_of(sel, shape):
    region = np.asarray(sel, bool).reshape(shape)
    idx = [np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != ax)))
           for ax in range(3)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


def _smooth_within(values, weights, sel, shape, sigma_mm, voxel_size_mm, be):
    """Weighted Gaussian average of per-voxel ``values`` over the selected voxels.

    ``values``, ``weights``: 1D, one entry per voxel of the flat boolean ``sel`` (numpy);
    returns ``G*(w v) / G*(w)`` at those voxels (normalised convolution on the
    selection's bounding box, so voxels outside it do not pull the average down).
    """
    box = _box_of(sel, shape)
    sig = [float(sigma_mm) / float(h) for h in np.asarray(voxel_size_mm, float)]
    sel_box = be.as_bool(np.asarray(sel, bool).reshape(shape)[box])
    num = be.zeros(sel_box.shape)
    den = be.zeros(sel_box.shape)
    num[sel_box] = weights * values
    den[sel_box] = weights
    num = be.gaussian_filter(num, sig)
    den = be.gaussian_filter(den, sig)
    return be.as_float32(num[sel_box] / be.maximum(den[sel_box], 1e-30))


def _local_linear(values, weights, sel, shape, sigma_mm, voxel_size_mm, be):
    """Gaussian-weighted local *linear* fit of per-voxel ``values`` over the selection.

    At every selected voxel ``x0`` fits ``a + g . (x - x0)`` to the values of the
    selected voxels by least squares with weights ``w(x) G(x - x0)`` and returns ``a``
    (first-order normalised convolution). Unlike the local mean it has no bias for a
    linear trend where the Gaussian is cut by the selection's edge (the mean is pulled
    towards the interior by ``gradient x centroid shift``). The moments come from
    Gaussian-derivative filters: ``sum (x - x0) G w = s^2 (G' * w)`` and
    ``sum (x - x0)^2 G w = s^4 (G'' * w) + s^2 (G * w)``.
    """
    box = _box_of(sel, shape)
    sig = [float(sigma_mm) / float(h) for h in np.asarray(voxel_size_mm, float)]
    sel_box = be.as_bool(np.asarray(sel, bool).reshape(shape)[box])
    w = be.zeros(sel_box.shape)
    w[sel_box] = weights
    wv = be.zeros(sel_box.shape)
    wv[sel_box] = weights * values

    def filtered(arr, orders):
        """``{order: (G^(order) * arr)[sel]}``, sharing the 1D passes of common prefixes."""
        out, cache = {}, {(): arr}
        for order in orders:
            for k in range(1, 4):
                key = order[:k]
                if key not in cache:
                    cache[key] = be.gaussian_filter1d(cache[key[:-1]], sig[k - 1],
                                                      axis=k - 1, order=key[-1])
            out[order] = be.as_float64(cache[order][sel_box])
            for k in (3, 2):  # drop what no later order shares
                if not any(o[:k] == order[:k] for o in orders[orders.index(order) + 1:]):
                    cache.pop(order[:k], None)
        return out

    s2 = [s * s for s in sig]  # Python floats: they multiply numpy arrays and tensors alike
    unit = [tuple(int(a == i) for a in range(3)) for i in range(3)]
    second = {(i, j): tuple(a + b for a, b in zip(unit[i], unit[j]))
              for i in range(3) for j in range(i, 3)}
    fw = filtered(w, sorted({(0, 0, 0), *unit, *second.values()}, reverse=True))
    fp = filtered(wv, sorted({(0, 0, 0), *unit}, reverse=True))
    del w, wv
    m0, p0 = fw[(0, 0, 0)], fp[(0, 0, 0)]
    m = [s2[i] * fw[unit[i]] for i in range(3)]
    p = [s2[i] * fp[unit[i]] for i in range(3)]
    # M_ij = sum (x_i - x0_i)(x_j - x0_j) G w, with a small ridge (1e-3 of its interior
    # value) so that thin selections fall back to the local mean
    mm = {}
    for (i, j), order in second.items():
        mm[i, j] = s2[i] * s2[j] * fw[order]
        if i == j:
            mm[i, j] = mm[i, j] + (1.0 + 1e-3) * s2[i] * m0
    # Schur complement: a = (p0 - m.M^-1 p) / (m0 - m.M^-1 m); M^-1 by cofactors
    a, b, c = mm[0, 0], mm[1, 1], mm[2, 2]
    d, e, f = mm[0, 1], mm[1, 2], mm[0, 2]
    c00, c11, c22 = b * c - e * e, a * c - f * f, a * b - d * d
    c01, c12, c02 = f * e - d * c, d * f - a * e, d * e - b * f
    det = a * c00 + d * c01 + f * c02
    det = be.where(abs(det) > 0, det, 1.0)

    def quad(x, y):  # x . adj(M) y
        return (x[0] * (c00 * y[0] + c01 * y[1] + c02 * y[2])
                + x[1] * (c01 * y[0] + c11 * y[1] + c12 * y[2])
                + x[2] * (c02 * y[0] + c12 * y[1] + c22 * y[2]))

    num = p0 - quad(m, p) / det
    den = m0 - quad(m, m) / det
    local_mean = p0 / be.maximum(m0, 1e-30)
    good = den > 1e-3 * m0
    out = be.where(good, num / be.where(good, den, 1.0), local_mean)
    return be.as_float32(out)


def fit_frequency(phase_rad, magnitude, te_s, *, voxel_size_mm, phase_sign: int = +1,
                  mask=None, unwrap_mask=None, unwrap: str = "differences",
                  phase_offset: str = "smooth", offset_sigma_mm: float = 2.0,
                  noise_pool_mm: float = 2.0, workers: int = -1,
                  device: str = "cpu") -> EchoFit:
    """Frequency map from multi-echo phase (unwrap each echo, weighted fit over TE).

    Parameters
    ----------
    phase_rad : array_like, shape (X, Y, Z, E) or (X, Y, Z)
        Wrapped phase (rad) of each echo, echoes last.
    magnitude : array_like, same shape
        Magnitude of each echo (any scale); gives the fit weights ``m^2``.
    te_s : sequence of E floats
        Echo times (s), strictly increasing.
    voxel_size_mm : sequence of 3 floats
    phase_sign : {+1, -1}
        Sign in ``phase = phi0 + phase_sign * 2 pi f TE``; see the module docstring.
    mask : ndarray, shape (X, Y, Z), optional
        Voxels outside are set to zero in every output (they are still unwrapped).
    unwrap_mask : ndarray, shape (X, Y, Z), optional
        Passed to :func:`~qsm_core.unwrap.laplacian_unwrap` as the trusted region.
    unwrap : {'differences', 'echoes'}
        ``'differences'`` (default): unwrap the first echo, then each echo-to-echo phase
        difference, and sum; ``'echoes'``: unwrap every echo on its own. See the module
        docstring.
    phase_offset : {'smooth', 'voxel'}
        ``'smooth'`` (default): ``phi0`` is taken as spatially smooth (it is the
        transmit/receive phase at TE = 0): the per-voxel intercepts are averaged with a
        Gaussian of ``offset_sigma_mm`` (weighted by their inverse variance, within the
        mask) and the slope is fitted through that offset; ``'voxel'``: a free intercept
        per voxel. See the module docstring. Ignored for one echo.
    offset_sigma_mm : float
        Gaussian sigma (mm) of the ``phi0`` average.
    noise_pool_mm : float
        Gaussian sigma (mm) over which the residual noise variance ``sigma^2`` is pooled
        (it has only ``E - 1`` or ``E - 2`` degrees of freedom per voxel); 0 = per voxel.
    workers : int
        FFT threads (numpy only).
    device : {"cpu", "torch-cpu", "cuda"}
        Where the unwrapping and the fit run (see the module docstring).

    Returns
    -------
    EchoFit

    Examples
    --------
    >>> te = np.array([0.005, 0.010, 0.015])
    >>> ph = 0.3 + 2 * np.pi * 20.0 * te * np.ones((4, 4, 4, 1))
    >>> fit = fit_frequency(np.angle(np.exp(1j * ph)), np.ones_like(ph), te,
    ...                     voxel_size_mm=(1, 1, 1))
    >>> round(float(fit.frequency_hz.mean()), 3), round(float(fit.phase_offset_rad.mean()), 3)
    (20.0, 0.3)
    """
    phase, mag, te = check_echo_inputs(phase_rad, magnitude, te_s)
    if phase_sign not in (1, -1):
        raise InputError(f"phase_sign must be +1 or -1, got {phase_sign!r}")
    n_echo = te.size
    shape = phase.shape[:3]
    for name, m in (("mask", mask), ("unwrap_mask", unwrap_mask)):
        if m is not None and np.shape(m) != shape:
            raise InputError(f"{name} shape {np.shape(m)} does not match the image shape "
                             f"{shape}")
    if unwrap not in ("differences", "echoes"):
        raise InputError(f"unwrap must be 'differences' or 'echoes', got {unwrap!r}")
    if phase_offset not in ("smooth", "voxel"):
        raise InputError(f"phase_offset must be 'smooth' or 'voxel', got {phase_offset!r}")
    if not (np.isfinite(noise_pool_mm) and noise_pool_mm >= 0):
        raise InputError(f"noise_pool_mm must be >= 0 (mm), got {noise_pool_mm!r}")
    if phase_offset == "smooth" and not (np.isfinite(offset_sigma_mm) and offset_sigma_mm > 0):
        raise InputError(f"offset_sigma_mm must be a positive number of mm, got "
                         f"{offset_sigma_mm!r}")
    be = get_backend(device, workers=workers)
    unwrap_opts = {"voxel_size_mm": voxel_size_mm, "mask": unwrap_mask, "workers": workers,
                   "device": device}
    unwrapped = np.empty_like(phase)
    unwrapped[..., 0] = laplacian_unwrap(phase[..., 0], **unwrap_opts)
    for e in range(1, n_echo):
        if unwrap == "echoes":
            unwrapped[..., e] = laplacian_unwrap(phase[..., e], **unwrap_opts)
        else:
            step = NumpyBackend.wrap(phase[..., e] - phase[..., e - 1])
            unwrapped[..., e] = unwrapped[..., e - 1] + laplacian_unwrap(step, **unwrap_opts)
    _restore_constants(unwrapped, phase, mag, unwrap_mask if mask is None else mask, te)
    # the fit is per voxel: do it on the voxels that are kept only
    sel = (np.ones(shape, bool) if mask is None else np.asarray(mask).astype(bool)).ravel()
    u = be.asarray(unwrapped.reshape(-1, n_echo)[sel])
    w = be.asarray(mag.reshape(-1, n_echo)[sel])
    w = w * w
    wmax = float(w.max()) if sel.any() else 0.0
    w += max(wmax, 1e-30) * 1e-12  # no all-zero weight voxels
    two_pi = 2.0 * np.pi
    if n_echo == 1:
        slope = u[:, 0] / float(te[0])
        phi0 = be.zeros(slope.shape)
        sigma = background_noise_std(mag[..., 0])
        var_f = (sigma**2 / w[:, 0]) / float((two_pi * te[0]) ** 2)
        method = "background"
    else:
        t = be.asarray(te)
        sw = w.sum(axis=1)
        wt = w * t
        st = wt.sum(axis=1)
        stt = (wt * t).sum(axis=1)
        sp = (w * u).sum(axis=1)
        stp = (wt * u).sum(axis=1)
        del wt
        det = be.maximum(sw * stt - st * st, 1e-30)
        slope = (sw * stp - st * sp) / det
        phi0 = (sp - slope * st) / sw
        if phase_offset == "smooth":
            # phi0 is smooth: estimate it locally (inverse-variance weighted Gaussian
            # average of the per-voxel intercepts), then fit the slope through it.
            phi0 = _local_linear(phi0, det / be.maximum(stt, 1e-30), sel, shape,
                                 offset_sigma_mm, voxel_size_mm, be)
            slope = (stp - phi0 * st) / be.maximum(stt, 1e-30)
            dof = n_echo - 1
        else:
            dof = n_echo - 2
        if dof >= 2:
            resid = u - phi0[:, None] - slope[:, None] * t
            sigma2 = (w * resid * resid).sum(axis=1) / float(dof)
            del resid
            if noise_pool_mm > 0:
                # a few degrees of freedom per voxel make sigma^2 very noisy (1 / sigma
                # heavy-tailed): pool it locally; the voxel's own magnitudes still set
                # its standard error below.
                sigma2 = _smooth_within(sigma2, be.full(sigma2.shape, 1.0, np.float32), sel,
                                        shape, noise_pool_mm, voxel_size_mm, be)
            method = "residual"
        else:
            sigma2 = background_noise_std(mag[..., 0]) ** 2
            method = "background"
        if phase_offset == "smooth":
            var_f = sigma2 / be.maximum(stt, 1e-30) / two_pi**2
        else:
            var_f = sigma2 * sw / det / two_pi**2

    def scatter(values):
        out = np.zeros(shape, np.float32)
        out.reshape(-1)[sel] = be.to_numpy(values)
        return out

    freq = scatter(slope * phase_sign / two_pi)
    phi0 = scatter(phi0)
    noise = scatter(be.sqrt(be.as_float32(var_f)))
    log.info("echo fit: %d echo(es), noise estimate from %s", n_echo, method)
    return EchoFit(frequency_hz=freq, phase_offset_rad=phi0, noise_std_hz=noise,
                   unwrapped_phase_rad=unwrapped, noise_method=method)
