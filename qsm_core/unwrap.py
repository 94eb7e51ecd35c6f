"""Laplacian phase unwrapping (Schofield & Zhu, Opt. Lett. 2003).

The Laplacian of the true phase is computed from the wrapped phase alone,

    lap(phi) = cos(phi) lap(sin(phi)) - sin(phi) lap(cos(phi)),

and inverted with a fast Poisson solver: a DCT, which is the FFT solver applied to the
fully mirror-padded volume (no wrap-around, zero-flux boundary), with the physical voxel
sizes in the stencil so that anisotropic voxels are exact. On the discrete 7-point
stencil the right-hand side equals ``sum_n sin(phi_n - phi) / h_n^2`` over the six
neighbours. By default (``formula='wrapped'``) the sine is replaced by the wrapped
difference ``arg exp(i (phi_n - phi))``, which agrees with it to third order but makes
the right-hand side the *exact* discrete Laplacian of the unwrapped phase wherever
neighbour differences are below pi (as in least-squares unwrapping, Ghiglia & Romero
1994); the sine form underestimates steep phase gradients (by 14 % at 0.9 rad/voxel).
``formula='sincos'`` keeps the literal form.

The result is *smooth but not congruent*: it equals the true phase plus a function that
is harmonic (zero Laplacian) wherever the Laplacian was trusted, plus a constant. Such a
harmonic error is removed later by background-field removal (V-SHARP, PDF), which is why
QSM pipelines can use this unwrapper. ``congruent=True`` adds the usual congruence step
``wrapped + 2 pi round((smooth - wrapped) / 2 pi)``, which is exact wherever the smooth
estimate is within pi of the truth, but introduces new 2 pi jumps where it is not.

On a torch device (``device="cuda"`` or ``"torch-cpu"``) the Poisson solve is the FFT
solve on the mirrored volume itself (:meth:`~qsm_core.backend.TorchBackend.mirror`;
torch has no DCT), which is the same operator: the eigenvalues of the periodic Laplacian on
the ``2n`` grid, ``2 cos(2 pi k / 2n) - 2``, are the DCT-II ones.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from qsm_core.backend import NumpyBackend, get_backend
from qsm_core.dipole import _check_voxel_size
from qsm_core.errors import InputError

__all__ = ["laplacian_unwrap", "laplacian_eigenvalues"]


def laplacian_eigenvalues(shape, *, voxel_size_mm, dtype=np.float32) -> np.ndarray:
    """Eigenvalues of the 7-point Laplacian with Neumann boundaries on a DCT-II grid.

    Returns
    -------
    ndarray, shape ``shape``
        ``sum_i (2 cos(pi k_i / n_i) - 2) / h_i^2`` (zero at k = 0, negative elsewhere).
    """
    v = _check_voxel_size(voxel_size_mm)
    terms = []
    for axis, n in enumerate(shape):
        k = np.arange(n) / n
        t = (2.0 * np.cos(np.pi * k) - 2.0) / v[axis] ** 2
        sh = [1, 1, 1]
        sh[axis] = t.size
        terms.append(t.reshape(sh))
    return (terms[0] + terms[1] + terms[2]).astype(dtype)


def _phase_laplacian(phase, v, mask, formula, be):
    """Discrete Laplacian (Neumann boundary) of the unwrapped phase from the wrapped phase.

    Neighbour differences enter as ``wrap(phi_n - phi)`` (``formula='wrapped'``) or
    ``sin(phi_n - phi)`` (``'sincos'``, the stencil form of
    ``cos(phi) lap(sin(phi)) - sin(phi) lap(cos(phi))``). Differences across the volume
    edge, and with a mask those touching a voxel outside it, are zero (no flux), so the
    Laplacian sums to zero as the Neumann solver requires.
    """
    lap = be.zeros_like(phase)
    for axis in range(3):
        n = phase.shape[axis]
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, n - 1)
        hi[axis] = slice(1, n)
        lo, hi = tuple(lo), tuple(hi)
        d = phase[hi] - phase[lo]
        d = be.wrap(d) if formula == "wrapped" else be.sin(d)
        if mask is not None:
            d *= mask[hi]
            d *= mask[lo]
        d *= float(1.0 / v[axis] ** 2)
        lap[lo] += d
        lap[hi] -= d
    return lap


def _periodic_eigenvalues(shape, v) -> np.ndarray:
    """Eigenvalues of the periodic 7-point Laplacian on ``shape``, rfftn layout (float32)."""
    terms = []
    for axis, n in enumerate(shape):
        k = np.arange(n // 2 + 1 if axis == 2 else n) / n
        t = (2.0 * np.cos(2.0 * np.pi * k) - 2.0) / v[axis] ** 2
        sh = [1, 1, 1]
        sh[axis] = t.size
        terms.append(t.reshape(sh))
    return (terms[0] + terms[1] + terms[2]).astype(np.float32)


def _poisson_neumann(lap, v, be):
    """Solve ``L u = lap`` (7-point Laplacian, zero-flux edges), ``u`` of zero mean.

    numpy: DCT-II, divide by the Laplacian's eigenvalues, inverse DCT. torch: the same
    operator as a periodic FFT solve on the mirrored volume, cropped back.
    """
    if isinstance(be, NumpyBackend):
        spec = scipy.fft.dctn(lap, type=2, workers=be.workers, overwrite_x=True)
        eig = laplacian_eigenvalues(lap.shape, voxel_size_mm=v)
        eig[0, 0, 0] = 1.0
        spec /= eig
        spec[0, 0, 0] = 0.0
        return scipy.fft.idctn(spec, type=2, workers=be.workers, overwrite_x=True)
    shape = tuple(lap.shape)
    ext_shape = tuple(2 * n for n in shape)
    spec = be.rfftn(be.mirror(lap))
    eig = _periodic_eigenvalues(ext_shape, v)
    eig[0, 0, 0] = 1.0
    inv = 1.0 / eig
    inv[0, 0, 0] = 0.0
    spec *= be.asarray(inv)
    return be.irfftn(spec, ext_shape)[:shape[0], :shape[1], :shape[2]]


def _bbox(mask, margin):
    """Bounding box of ``mask`` plus ``margin``, grown to fast transform lengths."""
    sl = []
    for axis in range(3):
        n_full = mask.shape[axis]
        idx = np.nonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))[0]
        lo = max(int(idx[0]) - margin, 0)
        hi = min(int(idx[-1]) + 1 + margin, n_full)
        want = min(int(scipy.fft.next_fast_len(hi - lo, real=True)), n_full)
        lo = max(min(lo - (want - (hi - lo)) // 2, n_full - want), 0)
        sl.append(slice(lo, lo + want))
    return tuple(sl)


def laplacian_unwrap(phase_rad: np.ndarray, *, voxel_size_mm, pad_voxels=0, mask=None,
                     congruent: bool = False, formula: str = "wrapped",
                     workers: int = -1, device: str = "cpu") -> np.ndarray:
    """Unwrap a 3D phase image with the Laplacian method.

    Parameters
    ----------
    phase_rad : ndarray, shape (X, Y, Z)
        Wrapped phase (rad), any range.
    voxel_size_mm : sequence of 3 floats
        Voxel sizes along the array axes (mm).
    pad_voxels : int or sequence of 3 ints
        Extra edge-replicated margin per side. The Poisson solve is a DCT, i.e. the FFT
        solve on the fully mirror-padded volume, so there is no wrap-around to pad
        against and the default is 0.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Where the phase is trusted (e.g. a tissue/signal mask). Phase differences touching
        a voxel outside it are dropped, so noise-only voxels cannot leak into the result;
        inside, the result then differs from the truth by a harmonic function (removed by
        background-field removal). The solve runs on the mask's bounding box (plus two
        voxels) and the result is 0 beyond it. Default: trust every voxel, which is exact
        (up to a constant) when all neighbour differences of the true phase are below pi.
    congruent : bool
        If True, return ``phase + 2 pi round((smooth - phase) / 2 pi)`` (congruent with the
        input, see the module docstring).
    formula : {'wrapped', 'sincos'}
        How the phase Laplacian is formed on the 7-point stencil, see the module docstring.
    workers : int
        DCT threads (-1: all cores; numpy only).
    device : {"cpu", "torch-cpu", "cuda"}
        Where the Laplacian and the Poisson solve run (see the module docstring); the
        result is the same within float32 rounding.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        Unwrapped phase (rad). Without ``congruent`` it is defined up to a constant and
        returned with zero mean over the (padded) volume, so that the result is a *linear*
        function of the true phase: unwrapping echoes ``phi0 + 2 pi f TE`` separately
        then gives results that are exactly affine in TE, as a multi-echo fit needs.
        With ``congruent`` it differs from the truth by multiples of 2 pi.

    Examples
    --------
    >>> x = np.linspace(0, 12 * np.pi, 32)[:, None, None] * np.ones((1, 8, 8))
    >>> u = laplacian_unwrap(np.angle(np.exp(1j * x)), voxel_size_mm=(1, 1, 1))
    >>> bool(np.allclose(u - u[0], x - x[0], atol=1e-3))
    True
    """
    phase = np.asarray(phase_rad)
    if phase.ndim != 3:
        raise InputError(f"laplacian_unwrap needs a 3D phase image, got shape {phase.shape}")
    if not np.all(np.isfinite(phase)):
        raise InputError("phase_rad contains NaN or Inf; replace them (e.g. by 0) before "
                         "unwrapping")
    v = _check_voxel_size(voxel_size_mm)
    if formula not in ("wrapped", "sincos"):
        raise InputError(f"formula must be 'wrapped' or 'sincos', got {formula!r}")
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != phase.shape:
            raise InputError(f"mask shape {mask.shape} does not match phase shape "
                             f"{phase.shape}")
        if not mask.any():
            raise InputError("the unwrapping mask is empty; pass mask=None or a mask with "
                             "tissue in it")
    pads = np.broadcast_to(np.asarray(pad_voxels, dtype=int), (3,))
    if np.any(pads < 0):
        raise InputError(f"pad_voxels must be >= 0, got {pad_voxels!r}")
    phase = phase.astype(np.float32, copy=False)
    full_shape = phase.shape
    box = tuple(slice(0, n) for n in full_shape)
    if mask is not None:  # nothing outside the mask enters: solve on its bounding box
        box = _bbox(mask, margin=2)
        phase, mask = phase[box], mask[box]
    if np.any(pads > 0):
        phase_p = np.pad(phase, [(p, p) for p in pads], mode="edge")
        mask_p = None if mask is None else np.pad(mask, [(p, p) for p in pads], mode="edge")
    else:
        phase_p, mask_p = phase, mask
    be = get_backend(device, workers=workers)
    lap = _phase_laplacian(be.asarray(phase_p), v,
                           None if mask_p is None else be.as_bool(mask_p), formula, be)
    sol = be.to_numpy(_poisson_neumann(lap, v, be))
    del lap
    sol = sol[tuple(slice(p, p + n) for p, n in zip(pads, phase.shape))]
    if congruent:
        sol = phase + 2 * np.pi * np.round((sol - phase) / (2 * np.pi))
    out = np.zeros(full_shape, np.float32)
    out[box] = sol
    return out
