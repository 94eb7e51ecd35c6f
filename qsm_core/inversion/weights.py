"""Data-fidelity weights of the iterative inversions (from the field's noise).

The multi-echo fit gives the standard deviation of the field in every voxel
(:attr:`qsm_core.echo_fit.EchoFit.noise_std_hz`); weighting the data term of a
least-squares inversion by its inverse makes it the maximum-likelihood fit under
independent Gaussian noise, so voxels whose field is unreliable (low magnitude at the
brain edge, veins and sinuses with short T2*, model failures) pull the solution less.
"""

from __future__ import annotations

import numpy as np

from qsm_core.errors import InputError
from qsm_core.inversion._common import Grid

__all__ = ["noise_weights", "grid_weights"]


def noise_weights(noise_std, mask) -> np.ndarray:
    """Data weights ``1 / noise_std`` inside ``mask``, normalised to mean 1 there.

    Parameters
    ----------
    noise_std : ndarray, shape (X, Y, Z)
        Standard deviation of the field (any unit, e.g.
        :attr:`qsm_core.echo_fit.EchoFit.noise_std_hz`); zero means unknown and gets
        weight 0.
    mask : ndarray, shape (X, Y, Z)

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        Zero outside ``mask``.

    Raises
    ------
    InputError
        Shapes differ, NaN/Inf or negative values inside the mask, or no positive value.

    Examples
    --------
    >>> noise_weights(np.array([[[1.0, 2.0, 0.0]]]), np.ones((1, 1, 3))).round(3).tolist()
    [[[2.0, 1.0, 0.0]]]
    """
    sd = np.asarray(noise_std, dtype=np.float32)
    m = np.asarray(mask) != 0
    if sd.shape != m.shape:
        raise InputError(f"noise_std shape {sd.shape} does not match the mask shape {m.shape}; "
                         "pass the noise map of the same field")
    if not np.all(np.isfinite(sd[m])) or np.any(sd[m] < 0):
        raise InputError("noise_std must be finite and non-negative inside the mask")
    good = m & (sd > 0)
    if not good.any():
        raise InputError("noise_std is zero everywhere inside the mask; no weights can be "
                         "formed (use no weights)")
    w = np.zeros(sd.shape, np.float32)
    w[good] = 1.0 / sd[good]
    return w / np.float32(w[m].mean(dtype=np.float64))


def grid_weights(weights, grid: Grid, *, method: str) -> np.ndarray:
    """User data weights on an inversion grid: zero outside the mask, mean 1 inside.

    Parameters
    ----------
    weights : ndarray, shape ``grid.in_shape``
        Non-negative weights (any scale).
    grid : Grid
        From :func:`qsm_core.inversion._common.prepare`.
    method : str
        Name used in error messages.

    Returns
    -------
    ndarray, shape ``grid.shape``, float32
    """
    w = np.asarray(weights)
    if w.shape != grid.in_shape:
        raise InputError(f"{method}: weights shape {w.shape} does not match the field shape "
                         f"{grid.in_shape}; pass one weight per voxel")
    if not np.issubdtype(w.dtype, np.number) or np.iscomplexobj(w):
        raise InputError(f"{method}: weights must be real numbers, got {w.dtype}")
    out = np.zeros(grid.shape, np.float32)
    out[grid.box] = np.where(grid.mask[grid.box], w[grid.crop], 0.0)
    inside = out[grid.mask]
    if not np.all(np.isfinite(inside)) or np.any(inside < 0):
        raise InputError(f"{method}: weights must be finite and non-negative inside the mask")
    total = float(inside.mean(dtype=np.float64))
    if not total > 0:
        raise InputError(f"{method}: weights are zero everywhere inside the mask")
    out /= np.float32(total)
    return out
