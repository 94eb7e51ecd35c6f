"""Truncated k-space division (TKD; Shmueli et al., MRM 2009)."""

from __future__ import annotations

import numpy as np

from qsm_core.errors import InputError
from qsm_core.inversion._common import divide_in_kspace, prepare

__all__ = ["tkd", "tkd_inverse_kernel"]


def tkd_inverse_kernel(d: np.ndarray, threshold: float) -> np.ndarray:
    """``1 / D`` where ``|D| > threshold``, else ``sign(D) / threshold`` (0 at D = 0).

    Examples
    --------
    >>> tkd_inverse_kernel(np.array([0.3, -0.05, 0.0]), 0.1).tolist()
    [3.3333333333333335, -10.0, 0.0]
    """
    d = np.asarray(d)
    safe = np.where(np.abs(d) > threshold, d, threshold)
    return np.where(np.abs(d) > threshold, 1.0 / safe, np.sign(d) / threshold).astype(d.dtype)


def tkd(local_field_ppm, mask, *, voxel_size_mm, b0_dir, threshold: float = 0.19,
        device: str = "cpu", pad_voxels=16, reference: str = "mask_mean") -> np.ndarray:
    """Susceptibility by truncated k-space division.

    Parameters
    ----------
    local_field_ppm : ndarray, shape (X, Y, Z)
        Local field (ppm of B0).
    mask : ndarray, shape (X, Y, Z)
        Brain mask.
    voxel_size_mm : sequence of 3 floats
        Voxel sizes along the array axes (mm).
    b0_dir : sequence of 3 floats
        B0 direction in voxel axes (:func:`qsm_core.geometry.b0_dir_from_affine`).
    threshold : float
        Truncation level of ``|D|`` in (0, 1/3].
    device : {"cpu", "torch-cpu", "cuda"}
    pad_voxels : int or sequence of 3 ints
        Zero padding around the mask's bounding box.
    reference : {"mask_mean", "none"}
        Subtract the mean inside the mask (default) or not.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        Susceptibility (ppm), zero outside the mask.
    """
    if not 0.0 < threshold <= 1.0 / 3.0:
        raise InputError(f"tkd: threshold must be in (0, 1/3], got {threshold!r}")
    grid = prepare(local_field_ppm, mask, voxel_size_mm=voxel_size_mm, b0_dir=b0_dir,
                   pad_voxels=pad_voxels, method="tkd")
    return divide_in_kspace(grid, tkd_inverse_kernel(grid.kernel(), threshold),
                            device=device, reference=reference)
