"""iLSQR dipole inversion (Li, Wang, Wu, Liu et al., NeuroImage 2015;108:111-122).

The four published steps, as implemented here (see ``docs/ilsqr.md`` for the choices
made where the paper is vague):

1. **Laplacian-weighted LSQR**: ``min || W (D*chi - f) ||`` with ``W`` = mask x a weight
   from the magnitude of the field's Laplacian (1 below its 60th percentile inside the
   mask, falling linearly to 0.2 at the 99.9th), stopped at ``tol_lsqr``.
2. **FastQSM edge prior**: ``sign(D) F(f)``, blended with a spherically smoothed copy
   where ``|D|`` is small, rescaled by least squares to a TKD (threshold 1/8) solution.
3. **Streaking estimate**: LSQR for ``chi_s`` restricted to the ill-conditioned cone
   ``|D| < 0.1`` so that the weighted gradients ``W_g grad(chi_s)`` match
   ``W_g grad(chi_LSQR)``; ``W_g`` is 1 where ``|grad chi_fast|`` is below its 50th
   percentile, 0 above its 70th, linear in between (i.e. the smooth regions, where any
   structure of ``chi_LSQR`` is streaking), stopped at ``tol_streak``.
4. ``chi = mask (chi_LSQR - chi_s)``.

Both LSQR problems keep their unknown in k-space (the half spectrum scaled to make the
FFT an isometry), so each iteration costs one FFT pair. Everything runs in float32 on
the mask's bounding box plus padding, on numpy/scipy (``device="cpu"``) or torch
(``"torch-cpu"``, ``"cuda"``) through :mod:`qsm_core.backend`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.fft

from qsm_core.backend import get_backend, resolve_workers
from qsm_core.errors import InputError
from qsm_core.inversion._common import Grid, finish, hermitian_scale, prepare
from qsm_core.inversion.ilsqr_ops import ConeGradientOp as _ConeGradientOp
from qsm_core.inversion.ilsqr_ops import WeightedDipoleOp as _WeightedDipoleOp
from qsm_core.inversion.lsqr import lsqr
from qsm_core.inversion.tkd import tkd_inverse_kernel
from qsm_core.inversion.weights import grid_weights

__all__ = ["ilsqr", "laplacian_weights", "gradient_weights", "ILSQRInfo"]

log = logging.getLogger(__name__)

LAPLACIAN_PERCENTILES = (60.0, 99.9)
LAPLACIAN_MIN_WEIGHT = 0.2
GRADIENT_PERCENTILES = (50.0, 70.0)
CONE_THRESHOLD = 0.1
FAST_TKD_THRESHOLD = 1.0 / 8.0
FAST_BLEND_D = 0.1
FAST_SPHERE_RADIUS_MM = 2.0


@dataclass
class ILSQRInfo:
    """Diagnostics of one :func:`ilsqr` run (times in seconds).

    Attributes
    ----------
    grid_shape : tuple of int
        Padded FFT grid.
    n_iter : dict
        Iterations of ``"lsqr"`` and ``"streak"``.
    stop : dict
        Stop reason of each LSQR.
    iter_times_s : dict
        Wall time of each iteration, per LSQR.
    fft_times_s : dict
        Time spent in FFT calls inside the iterations, per LSQR.
    step_times_s : dict
        Wall time of each step (``prepare``, ``lsqr``, ``fast``, ``streak``, ``finish``).
    chi_lsqr_ppm, chi_fast_ppm, chi_streak_ppm : ndarray or None
        Intermediate maps (input shape), kept when ``keep_intermediate=True``.
    """

    grid_shape: tuple = ()
    n_iter: dict = field(default_factory=dict)
    stop: dict = field(default_factory=dict)
    iter_times_s: dict = field(default_factory=dict)
    fft_times_s: dict = field(default_factory=dict)
    step_times_s: dict = field(default_factory=dict)
    chi_lsqr_ppm: np.ndarray | None = None
    chi_fast_ppm: np.ndarray | None = None
    chi_streak_ppm: np.ndarray | None = None


def _ramp_down(x: np.ndarray, lo: float, hi: float, floor: float) -> np.ndarray:
    """1 below ``lo``, ``floor`` above ``hi``, linear in between."""
    if hi <= lo:
        return np.where(x <= lo, 1.0, floor).astype(np.float32)
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return (1.0 - (1.0 - floor) * t).astype(np.float32)


def laplacian_weights(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm) -> np.ndarray:
    """Data weights of step 1 from the magnitude of the field's Laplacian.

    The Laplacian uses only neighbours inside the mask (no spikes at the brain edge).

    Parameters
    ----------
    field_ppm : ndarray, shape (X, Y, Z)
        Field; must be zero-padded by at least one voxel around the mask.
    mask : ndarray of bool, shape (X, Y, Z)
    voxel_size_mm : sequence of 3 floats

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        In [0.2, 1] inside the mask, 0 outside.
    """
    f = field_ppm.astype(np.float32)
    m = mask.astype(bool)
    lap = np.zeros_like(f)
    for ax, h in enumerate(voxel_size_mm):
        for step in (1, -1):
            fn = np.roll(f, -step, axis=ax)
            mn = np.roll(m, -step, axis=ax)
            lap += np.where(mn, fn - f, 0.0).astype(np.float32) / np.float32(h * h)
    mag = np.abs(lap[m])
    lo, hi = np.percentile(mag, LAPLACIAN_PERCENTILES)
    w = np.zeros_like(f)
    w[m] = _ramp_down(mag, lo, hi, LAPLACIAN_MIN_WEIGHT)
    return w


def gradient_weights(chi_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm) -> np.ndarray:
    """Per-component weights of step 3 from the FastQSM prior's gradient.

    Parameters
    ----------
    chi_ppm : ndarray, shape (X, Y, Z)
        Edge prior (padded by at least one voxel around the mask).
    mask : ndarray of bool, shape (X, Y, Z)
    voxel_size_mm : sequence of 3 floats

    Returns
    -------
    ndarray, shape (3, X, Y, Z), float32
        ``w(x) / h_j`` where both ends of the forward difference along axis ``j`` are in
        the mask, else 0; ``w`` is 1 below the 50th percentile of ``|grad chi|`` in the
        mask, 0 above the 70th, linear in between. Dividing by the voxel size makes the
        weighted difference a weighted derivative (per mm).
    """
    m = mask.astype(bool)
    grads = []
    for ax, h in enumerate(voxel_size_mm):
        grads.append((np.roll(chi_ppm, -1, axis=ax) - chi_ppm) / np.float32(h))
    gmag = np.sqrt(sum(g * g for g in grads))
    lo, hi = np.percentile(gmag[m], GRADIENT_PERCENTILES)
    w = np.zeros(chi_ppm.shape, np.float32)
    w[m] = _ramp_down(gmag[m], lo, hi, 0.0)
    out = np.empty((3,) + chi_ppm.shape, np.float32)
    for ax, h in enumerate(voxel_size_mm):
        both = m & np.roll(m, -1, axis=ax)
        out[ax] = np.where(both, w / np.float32(h), 0.0)
    return out


def _sphere_spectrum(shape, voxel_size_mm, radius_mm: float) -> np.ndarray:
    """Spectrum (rfftn) of a unit-sum sphere centred at the origin (periodic), real float32."""
    axes = [np.minimum(np.arange(n), n - np.arange(n)) * h for n, h in zip(shape, voxel_size_mm)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    ball = (x * x + y * y + z * z <= radius_mm * radius_mm).astype(np.float32)
    ball /= ball.sum()
    return scipy.fft.rfftn(ball, workers=resolve_workers(-1)).real.astype(np.float32)


def _fast_qsm(bk, grid: Grid, spec_f, d: np.ndarray) -> np.ndarray:
    """FastQSM edge prior on the grid (numpy), rescaled to a TKD(1/8) solution."""
    absd = np.abs(d)
    blend = np.clip(absd / FAST_BLEND_D, 0.0, 1.0)
    sphere = _sphere_spectrum(grid.shape, grid.voxel_size_mm, FAST_SPHERE_RADIUS_MM)
    k_fast = np.sign(d) * (blend + (1.0 - blend) * sphere)
    spec = bk.mul_spec(spec_f, bk.kernel(k_fast))
    chi_fast = bk.to_numpy(bk.irfftn(spec, grid.shape))
    spec = bk.mul_spec(spec_f, bk.kernel(tkd_inverse_kernel(d, FAST_TKD_THRESHOLD)))
    chi_tkd = bk.to_numpy(bk.irfftn(spec, grid.shape))
    m = grid.mask
    a = chi_fast[m].astype(np.float64)
    b = chi_tkd[m].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denom = float(a @ a)
    scale = float(a @ b) / denom if denom > 0 else 0.0
    return (chi_fast * np.float32(scale)).astype(np.float32)


def _tqdm_progress():
    from tqdm.auto import tqdm

    bars = {}

    def report(label, it, max_iter, rel_res):
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=max_iter, desc=f"iLSQR {label}", leave=False)
        bar.update(1)
        bar.set_postfix(rel_res=f"{rel_res:.3g}")

    def close():
        for bar in bars.values():
            bar.close()

    return report, close


def ilsqr(local_field_ppm, mask, *, voxel_size_mm, b0_dir, tol_lsqr: float = 0.01,
          tol_streak: float = 1e-3, max_iter: int = 50, max_iter_streak: int = 15,
          device: str = "cpu", progress=None, pad_voxels=12, reference: str = "mask_mean",
          return_info: bool = False, keep_intermediate: bool = False,
          precondition: bool = True, weights=None):
    """Susceptibility by iLSQR (Li et al. 2015).

    Parameters
    ----------
    local_field_ppm : ndarray, shape (X, Y, Z)
        Local (tissue) field in ppm of B0, background removed.
    mask : ndarray, shape (X, Y, Z)
        Brain mask (non-zero inside).
    voxel_size_mm : sequence of 3 floats
        Voxel sizes along the array axes (mm).
    b0_dir : sequence of 3 floats
        B0 direction in voxel axes (:func:`qsm_core.geometry.b0_dir_from_affine`).
    tol_lsqr : float
        LSQR tolerance of step 1 (relative residual / normal-equation residual).
    tol_streak : float
        LSQR tolerance of step 3.
    max_iter : int
        Iteration cap of step 1.
    max_iter_streak : int
        Iteration cap of step 3 (with ``precondition=False`` it needs ~50-100).
    device : {"cpu", "torch-cpu", "cuda"}
        ``"cpu"``: numpy/scipy; ``"torch-cpu"``/``"cuda"``: the same algorithm in torch.
    progress : callable or bool, optional
        ``True`` shows tqdm bars; a callable gets ``(step, iteration, max_iter, rel_res)``.
    pad_voxels : int or sequence of 3 ints
        Zero padding around the mask's bounding box.
    reference : {"mask_mean", "none"}
        Subtract the mean inside the mask (default) or not.
    return_info : bool
        Also return an :class:`ILSQRInfo`.
    precondition : bool
        Right-precondition step 3 by ``1 / |G(k)|`` (the gradient's k-space magnitude):
        the same least-squares problem, reached in ~15 instead of 100+ iterations, with a
        smaller error on noisy fields (docs/ilsqr.md). ``False``: plain LSQR as published.
    keep_intermediate : bool
        Store the step maps in the info (implies nothing unless ``return_info``).
    weights : ndarray, shape (X, Y, Z), optional
        Data-fidelity weights of step 1, e.g. the inverse of the field's noise standard
        deviation (:func:`qsm_core.inversion.weights.noise_weights`); they multiply the
        Laplacian weights, after normalisation to mean 1 inside the mask. ``None``:
        Laplacian weights only.

    Returns
    -------
    chi_ppm : ndarray, shape (X, Y, Z), float32
        Susceptibility (ppm), zero outside the mask.
    info : ILSQRInfo
        Only if ``return_info``.
    """
    for name, tol in (("tol_lsqr", tol_lsqr), ("tol_streak", tol_streak)):
        if not (np.isfinite(tol) and 0 < tol < 1):
            raise InputError(f"ilsqr: {name} must be in (0, 1), got {tol!r}")
    if int(max_iter) < 1 or int(max_iter_streak) < 1:
        raise InputError(f"ilsqr: max_iter and max_iter_streak must be >= 1, got "
                         f"{max_iter!r}, {max_iter_streak!r}")
    max_iter_streak = int(max_iter_streak)
    info = ILSQRInfo()
    close = None
    if progress is True:
        progress, close = _tqdm_progress()
    elif progress is False:
        progress = None

    t0 = time.perf_counter()
    grid = prepare(local_field_ppm, mask, voxel_size_mm=voxel_size_mm, b0_dir=b0_dir,
                   pad_voxels=pad_voxels, method="ilsqr")
    bk = get_backend(device)
    info.grid_shape = grid.shape
    d = grid.kernel()
    scale = hermitian_scale(grid.shape)
    vox = grid.voxel_size_mm
    w_lap = laplacian_weights(grid.field_ppm, grid.mask, vox)
    if weights is not None:
        w_lap *= grid_weights(weights, grid, method="ilsqr")
    info.step_times_s["prepare"] = time.perf_counter() - t0

    try:
        # Step 1: Laplacian-weighted LSQR.
        t0 = time.perf_counter()
        op1 = _WeightedDipoleOp(bk, grid, d, scale, w_lap)
        b1 = bk.asarray((w_lap * grid.field_ppm)[grid.box])
        res1 = lsqr(op1, b1, atol=tol_lsqr, btol=tol_lsqr, max_iter=int(max_iter),
                    progress=progress, label="lsqr")
        info.fft_times_s["lsqr"] = op1.fft.fft_s
        chi_lsqr = op1.solution_image(res1.x)
        del op1, b1, res1.x
        info.n_iter["lsqr"], info.stop["lsqr"] = res1.n_iter, res1.stop
        info.iter_times_s["lsqr"] = res1.times_s
        info.step_times_s["lsqr"] = time.perf_counter() - t0

        # Step 2: FastQSM edge prior -> gradient weights.
        t0 = time.perf_counter()
        spec_f = bk.rfftn(bk.asarray(grid.field_ppm))
        chi_fast = _fast_qsm(bk, grid, spec_f, d)
        del spec_f
        w_grad = gradient_weights(chi_fast, grid.mask, vox)
        info.step_times_s["fast"] = time.perf_counter() - t0

        # Step 3: streaking on the ill-conditioned cone.
        t0 = time.perf_counter()
        cone = np.abs(d) < CONE_THRESHOLD
        op3 = _ConeGradientOp(bk, grid, cone, scale, w_grad, precondition=precondition)
        b3 = op3.rhs(chi_lsqr)
        res3 = lsqr(op3, b3, atol=tol_streak, btol=tol_streak, max_iter=max_iter_streak,
                    progress=progress, label="streak")
        chi_streak = op3.image(res3.x)
        info.n_iter["streak"], info.stop["streak"] = res3.n_iter, res3.stop
        info.iter_times_s["streak"] = res3.times_s
        info.fft_times_s["streak"] = op3.fft.fft_s
        info.step_times_s["streak"] = time.perf_counter() - t0
    finally:
        if close is not None:
            close()

    # Step 4: subtraction.
    t0 = time.perf_counter()
    chi_lsqr_np = bk.to_numpy(chi_lsqr)
    chi_streak_np = bk.to_numpy(chi_streak)
    chi = finish(chi_lsqr_np - chi_streak_np, grid, reference=reference)
    info.step_times_s["finish"] = time.perf_counter() - t0
    if not return_info:
        return chi
    if keep_intermediate:
        info.chi_lsqr_ppm = finish(chi_lsqr_np, grid, reference=reference)
        info.chi_fast_ppm = finish(chi_fast, grid, reference=reference)
        info.chi_streak_ppm = finish(chi_streak_np, grid, reference="none")
    return chi, info
