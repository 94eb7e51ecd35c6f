"""Closed-form Tikhonov inversion: ``chi = F^-1[ D F(f) / (D^2 + alpha) ]``."""

from __future__ import annotations

import numpy as np

from qsm_core.errors import InputError
from qsm_core.inversion._common import divide_in_kspace, prepare

__all__ = ["tikhonov"]


def tikhonov(local_field_ppm, mask, *, voxel_size_mm, b0_dir, alpha: float = 0.005,
             device: str = "cpu", pad_voxels=16, reference: str = "mask_mean") -> np.ndarray:
    """Susceptibility minimising ``||D*chi - f||^2 + alpha ||chi||^2`` in closed form.

    Parameters
    ----------
    local_field_ppm : ndarray, shape (X, Y, Z)
        Local field (ppm of B0).
    mask : ndarray, shape (X, Y, Z)
        Brain mask.
    voxel_size_mm : sequence of 3 floats
        Voxel sizes along the array axes (mm).
    b0_dir : sequence of 3 floats
        B0 direction in voxel axes.
    alpha : float
        Regularisation weight (> 0); larger is smoother and more underestimated.
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
    if not (np.isfinite(alpha) and alpha > 0):
        raise InputError(f"tikhonov: alpha must be a positive number, got {alpha!r}")
    grid = prepare(local_field_ppm, mask, voxel_size_mm=voxel_size_mm, b0_dir=b0_dir,
                   pad_voxels=pad_voxels, method="tikhonov")
    d = grid.kernel()
    return divide_in_kspace(grid, d / (d * d + np.float32(alpha)), device=device,
                            reference=reference)
