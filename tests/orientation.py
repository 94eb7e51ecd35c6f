"""Test helper: the same image stored with its axes in another order (same world geometry)."""

import numpy as np


def stored_as(arr, affine, perm, flip_axis):
    """``arr`` (3D, or 3D + trailing axes) with its axes in order ``perm``, axis ``flip_axis``
    of the result reversed, and the affine that keeps every voxel at its world position."""
    a = np.flip(np.transpose(arr, tuple(perm) + tuple(range(3, arr.ndim))), axis=flip_axis)
    aff = np.array(affine, dtype=float)
    aff[:3, :3] = affine[:3, list(perm)]
    aff[:3, 3] += aff[:3, flip_axis] * (a.shape[flip_axis] - 1)
    aff[:3, flip_axis] *= -1
    return np.ascontiguousarray(a), aff
