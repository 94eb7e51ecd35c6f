"""Image geometry: voxel sizes and the B0 direction in voxel axes.

The scanner's B0 points along world +z (RAS+ for NIfTI). The dipole kernel needs it in
the array's own axes: with ``R`` the affine's 3x3 part with each column divided by its
voxel size (a pure rotation, possibly with a reflection), ``b_hat = R.T @ z``.
"""

from __future__ import annotations

import numpy as np

from qsm_core.errors import InputError

__all__ = ["voxel_sizes_mm", "rotation_from_affine", "b0_dir_from_affine", "affine_from_rotation"]


def voxel_sizes_mm(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the three array axes of a 4x4 affine.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)

    Returns
    -------
    ndarray, shape (3,)
        Column norms of the affine's 3x3 part.

    Examples
    --------
    >>> voxel_sizes_mm(np.diag([0.9, 0.9, 2.0, 1.0])).tolist()
    [0.9, 0.9, 2.0]
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(sizes <= 0):
        raise InputError("affine has a zero-length voxel axis; fix the NIfTI header (pixdim)")
    return sizes


def rotation_from_affine(affine: np.ndarray) -> np.ndarray:
    """The 3x3 direction-cosine matrix of an affine (columns: array axes in world space).

    Shears are removed by the nearest orthogonal matrix (polar decomposition), which keeps
    a possible reflection.
    """
    affine = np.asarray(affine, dtype=float)
    m = affine[:3, :3] / voxel_sizes_mm(affine)
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def b0_dir_from_affine(affine: np.ndarray, b0_world=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Unit B0 direction expressed in the array's voxel axes.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Voxel-to-world (scanner RAS+, mm) affine.
    b0_world : sequence of 3 floats
        B0 direction in world coordinates; +z for a scanner-aligned NIfTI.

    Returns
    -------
    ndarray, shape (3,)
        Unit vector ``R.T @ b0_world``.

    Examples
    --------
    Sagittal slices stored as (A, S, R): the third world axis (S) is array axis 1.

    >>> aff = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.]])
    >>> b0_dir_from_affine(aff).round(6).tolist()
    [0.0, 1.0, 0.0]
    """
    b = np.asarray(b0_world, dtype=float)
    b = b / np.linalg.norm(b)
    out = rotation_from_affine(affine).T @ b
    return out / np.linalg.norm(out)


def affine_from_rotation(rotation: np.ndarray, voxel_size_mm, origin_mm=(0.0, 0.0, 0.0)):
    """Build a 4x4 affine from a rotation, voxel sizes (mm) and an origin (mm)."""
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(rotation, float) * np.asarray(voxel_size_mm, float)[None, :]
    aff[:3, 3] = origin_mm
    return aff
