"""Shared input checks, cropping/padding and k-space helpers of the inversions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qsm_core.dipole import dipole_kernel, padded_shape
from qsm_core.errors import InputError

__all__ = ["Grid", "prepare", "finish", "hermitian_scale", "REFERENCES",
           "divide_in_kspace"]

REFERENCES = ("mask_mean", "none")


@dataclass
class Grid:
    """A field cropped to its mask's bounding box and zero-padded for FFTs.

    Attributes
    ----------
    field_ppm : ndarray, shape ``shape``, float32
        Field on the padded grid, zero outside the mask.
    mask : ndarray, shape ``shape``, bool
    shape : tuple of int
        Padded (FFT-friendly) grid shape.
    box : tuple of slice
        Where the cropped block sits inside the padded grid.
    crop : tuple of slice
        Where the cropped block sits inside the input array.
    in_shape : tuple of int
    voxel_size_mm, b0_dir : ndarray, shape (3,)
    """

    field_ppm: np.ndarray
    mask: np.ndarray
    shape: tuple
    box: tuple
    crop: tuple
    in_shape: tuple
    voxel_size_mm: np.ndarray
    b0_dir: np.ndarray

    def kernel(self) -> np.ndarray:
        """Dipole kernel D(k) on this grid, rfftn layout, float32."""
        return dipole_kernel(self.shape, voxel_size_mm=self.voxel_size_mm,
                             b0_dir=self.b0_dir, real_fft=True)


def _check_vec3(value, name: str, positive: bool) -> np.ndarray:
    v = np.asarray(value, dtype=float).reshape(-1)
    bad = v.shape != (3,) or not np.all(np.isfinite(v))
    bad = bad or (np.any(v <= 0) if positive else np.linalg.norm(v) == 0)
    if bad:
        what = "three positive voxel sizes in mm" if positive else "a non-zero 3-vector"
        raise InputError(f"{name} must be {what}, got {value!r}")
    return v if positive else v / np.linalg.norm(v)


def prepare(local_field_ppm, mask, *, voxel_size_mm, b0_dir, pad_voxels,
            method: str) -> Grid:
    """Validate the inputs of an inversion and crop/pad them to an FFT grid.

    Parameters
    ----------
    local_field_ppm : ndarray, shape (X, Y, Z)
        Local (tissue) field in ppm of B0.
    mask : ndarray, shape (X, Y, Z)
        Brain mask (non-zero inside).
    voxel_size_mm, b0_dir : sequence of 3 floats
    pad_voxels : int or sequence of 3 ints
        Zero padding on each side of the mask's bounding box.
    method : str
        Name used in error messages.

    Returns
    -------
    Grid

    Raises
    ------
    InputError
        Not 3D, shapes differ, NaN/Inf in the field, empty mask, bad voxel size or B0.
    """
    field = np.asarray(local_field_ppm)
    m = np.asarray(mask)
    if field.ndim != 3:
        raise InputError(f"{method}: local_field_ppm must be a 3D volume, got shape "
                         f"{field.shape}; pass one echo-combined field (X, Y, Z)")
    if m.shape != field.shape:
        raise InputError(f"{method}: mask shape {m.shape} does not match local_field_ppm "
                         f"shape {field.shape}; resample the mask onto the field's grid")
    if not np.issubdtype(field.dtype, np.number) or np.iscomplexobj(field):
        raise InputError(f"{method}: local_field_ppm must be real numbers, got {field.dtype}")
    if not np.all(np.isfinite(field)):
        raise InputError(f"{method}: local_field_ppm contains NaN or Inf; set them to 0 and "
                         "exclude them from the mask")
    if not np.all(np.isfinite(m)):
        raise InputError(f"{method}: mask contains NaN or Inf")
    m = m != 0
    if not m.any():
        raise InputError(f"{method}: the mask is empty; give a brain mask with at least one "
                         "voxel inside")
    vox = _check_vec3(voxel_size_mm, "voxel_size_mm", positive=True)
    b0 = _check_vec3(b0_dir, "b0_dir", positive=False)
    pads = np.broadcast_to(np.asarray(pad_voxels, dtype=int), (3,))
    if np.any(pads < 1):
        raise InputError(f"{method}: pad_voxels must be >= 1, got {pad_voxels!r}")
    idx = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    crop = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
    cshape = tuple(s.stop - s.start for s in crop)
    shape = padded_shape(cshape, pads)
    start = [(s - n) // 2 for s, n in zip(shape, cshape)]
    box = tuple(slice(b, b + n) for b, n in zip(start, cshape))
    mg = np.zeros(shape, dtype=bool)
    mg[box] = m[crop]
    fg = np.zeros(shape, dtype=np.float32)
    fg[box] = np.where(m[crop], field[crop], 0).astype(np.float32)
    return Grid(fg, mg, shape, box, crop, field.shape, vox, b0)


def finish(chi_grid: np.ndarray, grid: Grid, *, reference: str) -> np.ndarray:
    """Crop a grid-sized susceptibility back to the input shape, zero outside the mask.

    Parameters
    ----------
    chi_grid : ndarray, shape ``grid.shape``
    grid : Grid
    reference : {"mask_mean", "none"}
        ``"mask_mean"`` subtracts the mean inside the mask (the dipole kernel does not
        determine the mean, D(0) = 0).

    Returns
    -------
    ndarray, shape ``grid.in_shape``, float32
    """
    if reference not in REFERENCES:
        raise InputError(f"reference must be one of {REFERENCES}, got {reference!r}")
    block = np.asarray(chi_grid, dtype=np.float32)[grid.box]
    m = grid.mask[grid.box]
    if reference == "mask_mean":
        block = block - np.float32(block[m].mean(dtype=np.float64))
    out = np.zeros(grid.in_shape, dtype=np.float32)
    out[grid.crop] = np.where(m, block, np.float32(0))
    return out


def hermitian_scale(shape) -> np.ndarray:
    """``sqrt(N / w)`` on the rfftn half-spectrum grid, broadcastable, float32.

    ``w`` is 1 on the ``k_z = 0`` plane (and the Nyquist plane for even sizes) and 2
    elsewhere, so that ``||x||^2 = sum(w |X|^2) / N``: scaling a half spectrum by
    ``1 / sqrt(N / w)`` makes the FFT an isometry, which lets LSQR run with its unknown
    in k-space (one FFT pair per iteration instead of two).
    """
    n = int(np.prod(shape))
    m2 = shape[2] // 2 + 1
    w = np.full(m2, 2.0)
    w[0] = 1.0
    if shape[2] % 2 == 0:
        w[-1] = 1.0
    return np.sqrt(n / w).astype(np.float32)[None, None, :]


def divide_in_kspace(grid: Grid, inverse_kernel: np.ndarray, *, device: str,
                     reference: str) -> np.ndarray:
    """Invert in k-space: IFFT(inverse_kernel * FFT(field)) on the padded grid, then finish.

    The closed-form inversions (TKD, Tikhonov) differ only in ``inverse_kernel``
    (shape of the rFFT spectrum, float32).
    """
    from qsm_core.backend import get_backend

    bk = get_backend(device)
    spec = bk.rfftn(bk.asarray(grid.field_ppm))
    bk.mul_spec(spec, bk.kernel(inverse_kernel), out=spec)
    chi = bk.to_numpy(bk.irfftn(spec, grid.shape))
    return finish(chi, grid, reference=reference)
