"""Dipole kernel and the forward model chi -> field: the one forward model of qsmrim.

Conventions (design.md section 4): susceptibility in ppm, positive = paramagnetic; the
relative field ``delta_B / B0`` in ppm; the kernel in k-space

    D(k) = 1/3 - (k . b_hat)^2 / |k|^2,    D(0) = 0,

with k on the physical grid (cycles/mm along each array axis, so anisotropic voxels are
exact) and ``b_hat`` the unit B0 direction in voxel axes
(:func:`qsm_core.geometry.b0_dir_from_affine`). Arrays are zero-padded before the FFT to
avoid wrap-around.

This continuous kernel is what every inversion in qsmrim uses. The simulator can also
compute fields with the *discrete* kernel (``kind="discrete"``): the same formula with each
``2 pi k_i`` replaced by the finite-difference wavenumber ``2 sin(pi k_i dx_i) / dx_i``, i.e.
the field that solves the 7-point-Laplacian form of the magnetostatic equation. The two agree
at low spatial frequencies and differ near Nyquist, where rims and veins live; simulating
with one and inverting with the other is a test that does not commit the "inverse crime"
(forward and inverse model sharing one discretisation).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from qsm_core.backend import get_backend
from qsm_core.errors import InputError

__all__ = ["DIPOLE_KERNELS", "dipole_kernel", "forward_field_ppm", "padded_shape", "pad_to",
           "crop_from"]

DIPOLE_KERNELS = ("continuous", "discrete")


def _check_b0(b0_dir) -> np.ndarray:
    b = np.asarray(b0_dir, dtype=float).reshape(-1)
    if b.shape != (3,) or not np.all(np.isfinite(b)) or np.linalg.norm(b) == 0:
        raise InputError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}")
    return b / np.linalg.norm(b)


def _check_voxel_size(voxel_size_mm) -> np.ndarray:
    v = np.asarray(voxel_size_mm, dtype=float).reshape(-1)
    if v.shape != (3,) or np.any(~np.isfinite(v)) or np.any(v <= 0):
        raise InputError(f"voxel_size_mm must be three positive numbers, got {voxel_size_mm!r}")
    return v


def dipole_kernel(shape, *, voxel_size_mm, b0_dir, real_fft: bool = True,
                  dtype=np.float32, kind: str = "continuous") -> np.ndarray:
    """Unit dipole kernel D(k) on an FFT grid.

    Parameters
    ----------
    shape : tuple of 3 ints
        Grid shape (after any padding).
    voxel_size_mm : sequence of 3 floats
        Voxel sizes along the array axes (mm).
    b0_dir : sequence of 3 floats
        B0 direction in voxel axes (normalised here).
    real_fft : bool
        If True the kernel has shape ``(n0, n1, n2 // 2 + 1)`` for ``rfftn`` spectra.
    dtype : numpy dtype
    kind : {"continuous", "discrete"}
        ``continuous`` (default): k on the physical grid. ``discrete``: the finite-difference
        wavenumbers ``2 sin(pi k_i dx_i) / dx_i`` (see the module docstring).

    Returns
    -------
    ndarray
        D(k) with D(0) = 0, values in [-2/3, 1/3].

    Examples
    --------
    >>> d = dipole_kernel((8, 8, 8), voxel_size_mm=(1, 1, 1), b0_dir=(0, 0, 1))
    >>> float(d[0, 0, 0]), float(d[0, 0, 1]), float(d[1, 0, 0])
    (0.0, -0.6666666865348816, 0.3333333432674438)
    """
    if len(shape) != 3:
        raise InputError(f"dipole_kernel needs a 3D shape, got {shape!r}")
    if kind not in DIPOLE_KERNELS:
        raise InputError(f"dipole kernel kind must be one of {DIPOLE_KERNELS}, got {kind!r}")
    v = _check_voxel_size(voxel_size_mm)
    b = _check_b0(b0_dir)
    ks = [np.fft.fftfreq(shape[0], d=v[0]), np.fft.fftfreq(shape[1], d=v[1]),
          np.fft.rfftfreq(shape[2], d=v[2]) if real_fft else np.fft.fftfreq(shape[2], d=v[2])]
    if kind == "discrete":  # finite-difference wavenumbers (any common scale cancels)
        ks = [2.0 * np.sin(np.pi * k * d) / d for k, d in zip(ks, v)]
    # The Nyquist sample of an even axis stands for +k and -k at once (numpy calls it -k,
    # rfftfreq +k). The cross terms k_i k_j b_i b_j of (k . b)^2 are odd in k_i there, so
    # they take the average over both signs, zero: the kernel is then Hermitian (a real
    # operator) and does not depend on which axis is stored last.
    nyq = [np.arange(k.size) == n // 2 if n % 2 == 0 else np.zeros(k.size, bool)
           for k, n in zip(ks, shape)]
    grid = np.meshgrid(*ks, indexing="ij", sparse=True)
    odd = np.meshgrid(*[np.where(q, 0.0, k) for k, q in zip(ks, nyq)], indexing="ij",
                      sparse=True)
    kb2 = (odd[0] * b[0] + odd[1] * b[1] + odd[2] * b[2]) ** 2
    for g, q, bi in zip(grid, nyq, b):
        if q.any():
            kb2 = kb2 + np.where(q.reshape(g.shape), g * bi, 0.0) ** 2
    k2sum = grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb2 / k2sum
    d[0, 0, 0] = 0.0
    return d.astype(dtype, copy=False)


def padded_shape(shape, pad_voxels) -> tuple[int, int, int]:
    """Shape after padding each side by ``pad_voxels``, rounded up to a fast FFT size."""
    pads = np.broadcast_to(np.asarray(pad_voxels, dtype=int), (3,))
    return tuple(int(scipy.fft.next_fast_len(int(n + 2 * p), real=True))
                 for n, p in zip(shape, pads))


def pad_to(arr: np.ndarray, shape) -> np.ndarray:
    """Zero-pad ``arr`` to ``shape``, centred (the original sits at :func:`crop_from`)."""
    before = [(s - n) // 2 for s, n in zip(shape, arr.shape)]
    out = np.zeros(shape, dtype=arr.dtype)
    out[tuple(slice(b, b + n) for b, n in zip(before, arr.shape))] = arr
    return out


def crop_from(arr: np.ndarray, shape) -> np.ndarray:
    """Inverse of :func:`pad_to`: the centred block of ``shape``."""
    before = [(s - n) // 2 for s, n in zip(arr.shape, shape)]
    return arr[tuple(slice(b, b + n) for b, n in zip(before, shape))]


def forward_field_ppm(chi_ppm: np.ndarray, *, voxel_size_mm, b0_dir, pad_voxels=None,
                      workers: int = -1, device: str = "cpu",
                      kernel: str = "continuous") -> np.ndarray:
    """Relative field (ppm of B0) produced by a susceptibility distribution.

    Parameters
    ----------
    chi_ppm : ndarray, shape (X, Y, Z)
        Susceptibility (ppm); any reference, since D(0) = 0 removes the mean.
    voxel_size_mm : sequence of 3 floats
    b0_dir : sequence of 3 floats
        B0 direction in voxel axes.
    pad_voxels : int or sequence of 3 ints, optional
        Zero padding per side; default half the array size (no wrap-around for sources
        inside the volume).
    workers : int
        FFT threads (-1: all cores; numpy only).
    device : {"cpu", "torch-cpu", "cuda"}
        Where the FFTs run (:mod:`qsm_core.backend`); numpy in and out.
    kernel : {"continuous", "discrete"}
        Discretisation of the dipole kernel (:func:`dipole_kernel`); inversions use
        ``continuous``.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        Field ``delta_B / B0`` in ppm (multiply by :func:`qsm_core.ppm_to_hz` for Hz).
    """
    chi = np.asarray(chi_ppm)
    if chi.ndim != 3:
        raise InputError(f"chi_ppm must be 3D, got shape {chi.shape}")
    if not np.all(np.isfinite(chi)):
        raise InputError("chi_ppm contains NaN or Inf")
    if pad_voxels is None:
        pad_voxels = [n // 2 for n in chi.shape]
    shape = padded_shape(chi.shape, pad_voxels)
    be = get_backend(device, workers=workers)
    d = dipole_kernel(shape, voxel_size_mm=voxel_size_mm, b0_dir=b0_dir, kind=kernel)
    spec = be.rfftn(be.asarray(pad_to(chi.astype(np.float32), shape)))
    spec *= be.asarray(d)
    field = be.to_numpy(be.irfftn(spec, shape))
    return crop_from(field, chi.shape).astype(np.float32)
