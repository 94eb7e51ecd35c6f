"""Background field removal: V-SHARP, PDF and LBV.

Both take the total field (Hz, any linear unit works) and a brain mask and return the
local field, produced by sources inside the mask, with the mask it is valid on.

Every method has the signature
``f(total_field_hz, mask, *, voxel_size_mm, b0_dir=None, **opts) -> (local_hz, mask_out)``;
:data:`BGREMOVE_METHODS` maps names to them.

V-SHARP (Li et al., NeuroImage 2011; Wu et al., MRM 2012)
    The field of sources outside the mask is harmonic inside it, so it equals its own
    spherical mean (SMV). ``(delta - S_r) * f`` keeps only the local field wherever a ball
    of radius r fits inside the mask. Radii go from large (``radii_mm[0]``, 12 mm, better
    conditioned) down to one voxel near the edge (:func:`default_radii_mm`); each voxel
    takes the largest radius that fits. The composite is deconvolved once with the largest kernel,
    ``1 - S_R(k)``, truncating ``|1 - S_R| < tsvd_threshold`` (TSVD), and the result is
    kept on the mask eroded by the smallest radius. V-SHARP does not depend on B0.

PDF, projection onto dipole fields (de Rochefort et al., MRM 2010; Liu et al., NMR
Biomed 2011)
    Find the susceptibility ``x`` outside the mask whose field best explains the total
    field inside it, ``min || W M (f - D (1-M) x) ||^2``, by conjugate gradients on the
    normal equations; the local field is ``f - D (1-M) x`` on the mask. D is the dipole
    kernel of :mod:`qsm_core.dipole`, so PDF needs ``b0_dir``. Sources must lie in the field
    of view; the FFTs are zero-padded by ``pad_voxels``.

LBV, Laplacian boundary value (Zhou et al., NMR Biomed 2014)
    The background field is harmonic inside the mask, so it is the solution of Laplace's
    equation with the total field's values on the mask boundary. Writing the local field
    ``l = f - f_b``: ``lap l = lap f`` inside, ``l = 0`` on the boundary, one Poisson
    solve (7-point anisotropic Laplacian, multigrid-preconditioned CG,
    :func:`qsm_core.lbv.poisson_dirichlet`) on the mask's bounding box. The boundary is
    the mask's outer voxel layer (6-connectivity); ``peel_mm`` drops more of the edge,
    where the local field is forced towards zero. LBV does not depend on B0.

V-SHARP, PDF and :func:`restore_harmonic` take ``device="cuda"`` (or ``"torch-cpu"``) to
run their FFTs and masks on torch (:mod:`qsm_core.backend`), with numpy arrays
in and out and the same result within float32 rounding. LBV's multigrid runs on the CPU.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import scipy.fft
from scipy import ndimage

from qsm_core.backend import NumpyBackend, get_backend
from qsm_core.dipole import _check_b0, _check_voxel_size, dipole_kernel
from qsm_core.errors import InputError
from qsm_core.lbv import laplacian_7pt, poisson_dirichlet
from qsm_core.mask import ball_structure, erode_ball

__all__ = ["vsharp", "pdf", "lbv", "BGREMOVE_METHODS", "smv_kernel_spectrum",
           "default_radii_mm", "restore_harmonic", "HIGHPASS_METHODS"]

log = logging.getLogger(__name__)


def _check_field_mask(total_field_hz, mask):
    field = np.asarray(total_field_hz)
    if field.ndim != 3:
        raise InputError(f"total field must be 3D, got shape {field.shape}")
    if not np.all(np.isfinite(field)):
        raise InputError("total field contains NaN or Inf; fix the field map")
    m = np.asarray(mask)
    if m.shape != field.shape:
        raise InputError(f"mask shape {m.shape} does not match field shape {field.shape}; "
                         "pass the brain mask of the same image")
    m = m.astype(bool)
    if not m.any():
        raise InputError("the brain mask is empty; pass a mask that covers the brain")
    return field.astype(np.float32, copy=False), m


def default_radii_mm(voxel_size_mm, *, max_radius_mm: float = 12.0) -> tuple[float, ...]:
    """V-SHARP radii: ``max_radius_mm`` down to one (largest) voxel.

    The ladder ``R, 2R/3, 5R/12`` (12, 8, 5 mm), then 3 and 2 mm, then one voxel: the
    interior uses the well-conditioned large kernel and the edge gets several small
    ones. On the MNI head phantom it is as accurate as 1-2 mm steps (TKD NRMSE 0.766 vs
    0.765, same deep-nucleus errors) at 58 % of the time.

    Examples
    --------
    >>> default_radii_mm((1, 1, 1))
    (12.0, 8.0, 5.0, 3.0, 2.0, 1.0)
    >>> default_radii_mm((0.9, 0.9, 2.0))
    (12.0, 8.0, 5.0, 3.0, 2.0)
    """
    v = _check_voxel_size(voxel_size_mm)
    vmax = float(v.max())
    r = float(max_radius_mm)
    ladder = [r, 2.0 * r / 3.0, 5.0 * r / 12.0, 3.0, 2.0]
    radii = {round(x, 6) for x in ladder if vmax - 1e-9 <= x <= r} | {round(vmax, 6)}
    return tuple(sorted(radii, reverse=True))


def smv_kernel_spectrum(shape, radius_mm: float, *, voxel_size_mm, workers: int = -1,
                        return_count: bool = False):
    """``rfftn`` of the normalised ball of ``radius_mm`` centred at the origin (periodic).

    With ``return_count`` also return the number of voxels in the ball.
    """
    spec, count = _smv_spectrum(shape, radius_mm, voxel_size_mm, NumpyBackend(workers))
    return (spec, count) if return_count else spec


def _smv_spectrum(shape, radius_mm, voxel_size_mm, be):
    """:func:`smv_kernel_spectrum` on the backend ``be``: (spectrum, voxels in the ball)."""
    ball = ball_structure(radius_mm, voxel_size_mm=voxel_size_mm)
    k = np.zeros(shape, np.float32)
    half = [b // 2 for b in ball.shape]
    idx = np.nonzero(ball)
    k[tuple((i - h) % n for i, h, n in zip(idx, half, shape))] = 1.0 / idx[0].size
    return be.as_float32(be.rfftn(be.asarray(k)).real), int(idx[0].size)


def _bbox(mask, margin):
    sl = []
    for axis in range(3):
        proj = np.any(mask, axis=tuple(a for a in range(3) if a != axis))
        idx = np.nonzero(proj)[0]
        lo = max(int(idx[0]) - margin[axis], 0)
        hi = min(int(idx[-1]) + 1 + margin[axis], mask.shape[axis])
        sl.append(slice(lo, hi))
    return tuple(sl)


def vsharp(total_field_hz, mask, *, voxel_size_mm, radii_mm=None,
           tsvd_threshold: float = 0.05, refine_iter: int = 2, b0_dir=None,
           workers: int = -1, device: str = "cpu"):
    """V-SHARP background field removal.

    Parameters
    ----------
    total_field_hz : ndarray, shape (X, Y, Z)
        Total field (Hz; any linear unit, returned in the same).
    mask : ndarray, shape (X, Y, Z)
        Brain mask (nonzero = inside).
    voxel_size_mm : sequence of 3 floats
    radii_mm : sequence of floats, optional
        SMV radii (mm); default :func:`default_radii_mm` (12 mm down to one voxel).
    tsvd_threshold : float
        Truncation of the deconvolution ``1 - S_R(k)`` with the largest radius.
    refine_iter : int
        Extra fixed-point iterations ``x += deconv(target - composite(x))`` that make the
        result consistent with every radius's high-pass data, not only the largest
        kernel's; they cut the edge error of plain V-SHARP (0 = as published; see
        docs/pipeline.md for the measurements behind the default of 2).
    b0_dir : ignored
        Accepted so that every background method has the same signature; V-SHARP does not
        depend on the field direction.
    workers : int
        FFT threads (numpy only).
    device : {"cpu", "torch-cpu", "cuda"}
        Where the FFTs run (see the module docstring).

    Returns
    -------
    local_hz : ndarray, shape (X, Y, Z), float32
        Local field, zero outside ``mask_out``.
    mask_out : ndarray of uint8, shape (X, Y, Z)
        The mask eroded by the smallest radius (where ``local_hz`` is valid).
    """
    field, m = _check_field_mask(total_field_hz, mask)
    v = _check_voxel_size(voxel_size_mm)
    radii = default_radii_mm(v) if radii_mm is None else tuple(float(r) for r in radii_mm)
    if len(radii) == 0 or min(radii) <= 0:
        raise InputError(f"radii_mm must be positive, got {radii_mm!r}")
    radii = tuple(sorted(radii, reverse=True))
    if not 0 < tsvd_threshold < 1:
        raise InputError(f"tsvd_threshold must be in (0, 1), got {tsvd_threshold!r}")
    if refine_iter < 0:
        raise InputError(f"refine_iter must be >= 0, got {refine_iter!r}")
    rmax = radii[0]
    margin = [int(np.ceil(rmax / s)) + 1 for s in v]
    sl = _bbox(m, margin)
    mc = m[sl]
    shape = tuple(int(scipy.fft.next_fast_len(n + 2 * g, real=True))
                  for n, g in zip(mc.shape, margin))
    off = [(s - n) // 2 for s, n in zip(shape, mc.shape)]
    inner = tuple(slice(o, o + n) for o, n in zip(off, mc.shape))
    be = get_backend(device, workers=workers)
    mpad = np.zeros(shape, np.float32)
    mpad[inner] = mc
    # which radius each voxel uses: the largest whose ball fits inside the mask, i.e.
    # where the ball's convolution with the mask is the full ball (FFT, like the field)
    mspec = be.rfftn(be.asarray(mpad))
    mpad = be.as_bool(mpad)
    which = be.full(shape, -1, np.int8)
    highpass = {}
    for i, r in enumerate(radii):
        s_r, n_ball = _smv_spectrum(shape, r, v, be)
        inside = be.irfftn(mspec * s_r, shape)
        fits = (inside > 1.0 - 0.5 / n_ball) & (which < 0) & mpad
        del inside
        if i == 0 or be.any(fits):
            highpass[i] = 1.0 - s_r
        which[fits] = i
    del mspec
    assigned = which >= 0
    if not be.any(assigned):
        raise InputError(f"the brain mask is thinner than the smallest V-SHARP radius "
                         f"({radii[-1]} mm); pass a larger mask or smaller radii_mm")
    used = [i for i in highpass if be.any(which == i)]

    def composite(x_spec):
        out = be.zeros(shape)
        for i in used:
            hp = be.irfftn(x_spec * highpass[i], shape)
            sel = which == i
            out[sel] = hp[sel]
        return out

    kernel = highpass[0]
    keep = abs(kernel) > tsvd_threshold
    inv = be.where(keep, 1.0 / be.where(keep, kernel, 1.0), 0.0)

    def deconvolve(y):
        spec = be.rfftn(y)
        spec *= inv
        return be.as_float32(be.irfftn(spec, shape)) * assigned

    fpad = np.zeros(shape, np.float32)
    fpad[inner] = field[sl] * mc
    target = composite(be.rfftn(be.asarray(fpad)))
    del fpad
    local = deconvolve(target)
    for _ in range(refine_iter):
        local += deconvolve(target - composite(be.rfftn(local)))
    local = be.to_numpy(local)
    assigned = be.to_numpy(assigned)
    out = np.zeros(field.shape, np.float32)
    out[sl] = local[inner]
    mask_out = np.zeros(field.shape, np.uint8)
    mask_out[sl] = assigned[inner]
    log.info("V-SHARP: radii %s mm, %d -> %d voxels", radii, int(m.sum()), int(mask_out.sum()))
    return out, mask_out


def pdf(total_field_hz, mask, *, voxel_size_mm, b0_dir, weight=None, tol: float = 1e-2,
        max_iter: int = 100, pad_voxels=16, workers: int = -1, device: str = "cpu"):
    """Projection onto dipole fields (PDF) background removal.

    Parameters
    ----------
    total_field_hz : ndarray, shape (X, Y, Z)
        Total field (Hz; any linear unit, returned in the same).
    mask : ndarray, shape (X, Y, Z)
        Brain mask (nonzero = inside).
    voxel_size_mm : sequence of 3 floats
    b0_dir : sequence of 3 floats
        B0 direction in voxel axes (:func:`qsm_core.geometry.b0_dir_from_affine`).
    weight : ndarray, shape (X, Y, Z), optional
        Data weights inside the mask (e.g. ``1 / noise_std``); default uniform.
    tol : float
        Stop when the normal-equation residual falls below ``tol`` times its start.
    max_iter : int
        Maximum conjugate-gradient iterations.
    pad_voxels : int or sequence of 3 ints
        Zero padding per side of the FFTs (background sources must be in the FOV).
    workers : int
        FFT threads (numpy only).
    device : {"cpu", "torch-cpu", "cuda"}
        Where the FFTs and the CG run (see the module docstring).

    Returns
    -------
    local_hz : ndarray, shape (X, Y, Z), float32
        Local field on the mask, zero outside.
    mask_out : ndarray of uint8, shape (X, Y, Z)
        The input mask (PDF does not erode).
    """
    field, m = _check_field_mask(total_field_hz, mask)
    v = _check_voxel_size(voxel_size_mm)
    if b0_dir is None:
        raise InputError("pdf needs b0_dir (the B0 direction in voxel axes, from "
                         "qsm_core.geometry.b0_dir_from_affine)")
    b = _check_b0(b0_dir)
    if weight is None:
        w2 = m.astype(np.float32)
    else:
        w = np.asarray(weight, dtype=np.float32)
        if w.shape != field.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise InputError("weight must be finite, non-negative and of the field's shape")
        w2 = (w * m) ** 2
        w2 /= max(float(w2[m].mean()), 1e-30)
    pads = np.broadcast_to(np.asarray(pad_voxels, dtype=int), (3,))
    shape = tuple(int(scipy.fft.next_fast_len(int(n + 2 * p), real=True))
                  for n, p in zip(field.shape, pads))
    off = [(s - n) // 2 for s, n in zip(shape, field.shape)]
    inner = tuple(slice(o, o + n) for o, n in zip(off, field.shape))
    be = get_backend(device, workers=workers)
    d = be.asarray(dipole_kernel(shape, voxel_size_mm=v, b0_dir=b))
    outside = np.zeros(shape, np.float32)
    outside[inner] = ~m  # background sources: inside the FOV, outside the mask
    outside = be.asarray(outside)
    w2p = np.zeros(shape, np.float32)
    w2p[inner] = w2
    w2p = be.asarray(w2p)

    def conv(x):
        return be.as_float32(be.irfftn(be.rfftn(x) * d, shape))

    def normal_op(x):
        return outside * conv(w2p * conv(outside * x))

    fpad = np.zeros(shape, np.float32)
    fpad[inner] = field * m
    rhs = outside * conv(w2p * be.asarray(fpad))
    x = be.zeros(shape)
    r = be.copy(rhs)
    p = be.copy(r)
    rr = be.dot(r, r)
    rr0 = rr
    if rr0 == 0:
        return (field * m).astype(np.float32), m.astype(np.uint8)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        ap = normal_op(p)
        alpha = rr / max(be.dot(p, ap), 1e-30)
        x += float(alpha) * p
        r -= float(alpha) * ap
        rr_new = be.dot(r, r)
        if np.sqrt(rr_new / rr0) < tol:
            rr = rr_new
            break
        p *= float(rr_new / rr)
        p += r
        rr = rr_new
    log.info("PDF: %d CG iterations, relative residual %.3g", it, np.sqrt(rr / rr0))
    background = be.to_numpy(conv(outside * x))[inner]
    local = ((field - background) * m).astype(np.float32)
    return local, m.astype(np.uint8)


def lbv(total_field_hz, mask, *, voxel_size_mm, peel_mm: float = 0.0, tol: float = 1e-5,
        max_iter: int = 100, b0_dir=None):
    """Laplacian boundary value (LBV) background field removal.

    Parameters
    ----------
    total_field_hz : ndarray, shape (X, Y, Z)
        Total field (Hz; any linear unit, returned in the same).
    mask : ndarray, shape (X, Y, Z)
        Brain mask (nonzero = inside).
    voxel_size_mm : sequence of 3 floats
    peel_mm : float
        After the solve, erode the result's mask by this much (a ball, mm): the local
        field is forced to zero on the boundary and is least accurate next to it.
    tol : float
        Relative residual of the Poisson solve.
    max_iter : int
        Maximum preconditioned-CG iterations (each is one multigrid V-cycle).
    b0_dir : ignored
        Accepted so that every background method has the same signature; LBV does not
        depend on the field direction.

    Returns
    -------
    local_hz : ndarray, shape (X, Y, Z), float32
        Local field, zero outside ``mask_out``.
    mask_out : ndarray of uint8, shape (X, Y, Z)
        The mask without its outer voxel layer (6-connectivity), eroded by ``peel_mm``.
    """
    field, m = _check_field_mask(total_field_hz, mask)
    v = _check_voxel_size(voxel_size_mm)
    if peel_mm < 0:
        raise InputError(f"peel_mm must be >= 0, got {peel_mm!r}")
    sl = _bbox(m, [0, 0, 0])
    mc = np.pad(m[sl], 1)
    interior = ndimage.binary_erosion(mc, ndimage.generate_binary_structure(3, 1),
                                      border_value=0)
    if not interior.any():
        raise InputError("the brain mask has no interior voxel (it is one voxel thin); "
                         "pass a mask that covers the brain")
    f = np.pad(field[sl], 1) * mc
    # every interior voxel's 6 neighbours are in the mask, so the Laplacian there uses
    # measured values only
    rhs = laplacian_7pt(f, tuple(1.0 / v**2))
    rhs *= np.float32(-1.0)
    local, info = poisson_dirichlet(rhs, interior, voxel_size_mm=v, tol=tol,
                                    max_iter=max_iter, return_info=True)
    if info["relative_residual"] > tol:
        log.warning("LBV: Poisson solve stopped at relative residual %.2g after %d "
                    "iterations (tol %.2g)", info["relative_residual"], info["iterations"],
                    tol)
    keep = interior
    if peel_mm > 0:
        keep = erode_ball(interior, peel_mm, voxel_size_mm=v)
    out = np.zeros(field.shape, np.float32)
    out[sl] = (local * keep)[1:-1, 1:-1, 1:-1]
    mask_out = np.zeros(field.shape, np.uint8)
    mask_out[sl] = keep[1:-1, 1:-1, 1:-1]
    log.info("LBV: %d -> %d voxels, %d iterations", int(m.sum()), int(mask_out.sum()),
             info["iterations"])
    return out, mask_out


def restore_harmonic(remove, local_hz, mask, mask_out, *, voxel_size_mm, b0_dir,
                     n_iter: int = 1, pad_voxels: int = 16, device: str = "cpu",
                     **remove_options):
    """Give back the part of the local field that a high-pass background removal drops.

    V-SHARP and LBV keep ``P l``, a high-pass of the local field ``l``: the part of ``l``
    that is harmonic inside the mask (set by its values at the edge; largest near the
    edge and in structures that the mask cuts, such as a sinus) and, for V-SHARP, its
    lowest frequencies are removed with the background. But ``l`` is the field of
    sources *inside* the mask, ``l = D chi``, so ``(I - P) D chi`` is known once ``chi``
    is: with ``chi_0`` from a quick inversion of ``P f`` (TKD), the local field becomes
    ``P f + (I - P) D chi_0``, on the final mask. The true ``chi`` is a fixed point of
    this map (``P f = P D chi``); errors of ``chi_0`` enter only through ``(I - P) D``,
    which drops their high frequencies (streaks, noise).

    Parameters
    ----------
    remove : callable
        The background removal used (a value of :data:`BGREMOVE_METHODS`).
    local_hz : ndarray, shape (X, Y, Z)
        Its output ``P f`` (any linear unit).
    mask : ndarray, shape (X, Y, Z)
        The mask it was given.
    mask_out : ndarray, shape (X, Y, Z)
        The mask it returned (where ``local_hz`` is valid).
    voxel_size_mm, b0_dir : sequence of 3 floats
    n_iter : int
        Fixed-point iterations (each: one TKD, one forward field, one ``remove``).
    pad_voxels : int
        Zero padding of the forward-field FFTs around the mask's bounding box.
    device : {"cpu", "torch-cpu", "cuda"}
        Where the TKD, the forward field and ``remove`` run (``remove`` gets it when it
        takes a ``device`` argument).
    **remove_options
        Passed to ``remove`` (use the same options as for the data).

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        The restored local field, zero outside ``mask_out``.
    """
    from qsm_core.dipole import forward_field_ppm
    from qsm_core.inversion.tkd import tkd

    m = np.asarray(mask).astype(bool)
    fm = np.asarray(mask_out).astype(bool)
    if n_iter < 0:
        raise InputError(f"n_iter must be >= 0, got {n_iter!r}")
    if not fm.any() or n_iter == 0:
        return (np.asarray(local_hz, np.float32) * fm).astype(np.float32)
    v = _check_voxel_size(voxel_size_mm)
    b = _check_b0(b0_dir)
    base = (np.asarray(local_hz, np.float32) * fm).astype(np.float32)
    sl = _bbox(m, [0, 0, 0])
    field = base
    if device != "cpu" and "device" in inspect.signature(remove).parameters:
        remove_options = {**remove_options, "device": device}
    for _ in range(int(n_iter)):
        # TKD is linear, so chi_0 comes out in "field units" and D chi_0 goes back to them
        chi0 = tkd(field, fm, voxel_size_mm=v, b0_dir=b, device=device)
        g = np.zeros(base.shape, np.float32)
        g[sl] = forward_field_ppm(chi0[sl], voxel_size_mm=v, b0_dir=b, pad_voxels=pad_voxels,
                                  device=device)
        g_local, _ = remove(g * m, m, voxel_size_mm=v, b0_dir=b, **remove_options)
        h = np.where(fm, g - g_local, 0.0).astype(np.float32)
        h[fm] -= np.float32(h[fm].mean(dtype=np.float64))
        field = base + h
    log.info("harmonic restoration: %d iteration(s), %.3g rms added", n_iter,
             float(np.sqrt(np.mean(np.square(field[fm] - base[fm])))))
    return field.astype(np.float32)


BGREMOVE_METHODS = {"vsharp": vsharp, "pdf": pdf, "lbv": lbv}
"""Background removal methods by name (the CLI's ``--bgremove`` choices)."""

HIGHPASS_METHODS = ("vsharp", "lbv")
"""Methods that drop the harmonic part of the local field (:func:`restore_harmonic`)."""
