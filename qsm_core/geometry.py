"""Image geometry: voxel sizes and the B0 direction in voxel axes.

The scanner's B0 points along world +z (RAS+ for NIfTI). The dipole kernel needs it in
the array's own axes: with ``R`` the affine's 3x3 part with each column divided by its
voxel size (a pure rotation, possibly with a reflection), ``b_hat = R.T @ z``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qsm_core.errors import InputError

__all__ = ["voxel_sizes_mm", "rotation_from_affine", "b0_dir_from_affine", "affine_from_rotation",
           "Reorientation", "closest_ras"]


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


@dataclass(frozen=True)
class Reorientation:
    """Axis order and directions between a stored grid and its closest RAS grid.

    Only permutations and flips of the voxel axes (no resampling), so both ways are exact.
    Made by :func:`closest_ras`.

    Attributes
    ----------
    ornt : ndarray, shape (3, 2)
        nibabel orientation from the stored axes to RAS: row ``i`` is the RAS axis that
        stored axis ``i`` becomes and ``-1`` where it is reversed.
    stored_shape : tuple of 3 ints
        Spatial shape of the stored grid.
    stored_axcodes : str
        Where the stored axes point, e.g. ``"LPS"`` or ``"ASR"``.
    """

    ornt: np.ndarray
    stored_shape: tuple[int, int, int]
    stored_axcodes: str

    @property
    def is_identity(self) -> bool:
        """True when the stored axes already point R, A, S (nothing to do)."""
        return bool(np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]]))

    def to_ras(self, arr) -> np.ndarray:
        """``arr`` (shape ``stored_shape`` + trailing axes) on the RAS grid, C-contiguous."""
        from nibabel.orientations import apply_orientation

        a = np.asarray(arr)
        return a if self.is_identity else np.ascontiguousarray(apply_orientation(a, self.ornt))

    def from_ras(self, arr) -> np.ndarray:
        """Inverse of :meth:`to_ras`: an array on the RAS grid back on the stored grid."""
        from nibabel.orientations import apply_orientation

        a = np.asarray(arr)
        if self.is_identity:
            return a
        inverse = np.empty_like(self.ornt)
        for stored_axis, (ras_axis, flip) in enumerate(self.ornt):
            inverse[int(ras_axis)] = (stored_axis, flip)
        return np.ascontiguousarray(apply_orientation(a, inverse))

    def ras_affine(self, affine) -> np.ndarray:
        """Voxel-to-world affine of the RAS grid (every voxel keeps its world position)."""
        from nibabel.orientations import inv_ornt_aff

        return np.asarray(affine, float) @ inv_ornt_aff(self.ornt, self.stored_shape)

    def stored_axis(self, ras_axis: int) -> int:
        """The stored axis that becomes RAS axis ``ras_axis``."""
        return int(np.flatnonzero(self.ornt[:, 0] == ras_axis)[0])


def closest_ras(affine, shape) -> Reorientation:
    """How to store an image with axes closest to R, A, S (as ``nibabel.as_closest_canonical``).

    The QSM pipeline processes every scan on this grid, so that its result does not depend
    on the order or direction in which a file stores the axes (iLSQR's gradient weights use
    one-sided differences, which do).

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine (mm) of the stored grid.
    shape : sequence of >= 3 ints
        Shape of the stored image (the first three are spatial).

    Returns
    -------
    Reorientation

    Examples
    --------
    Sagittal slices stored as (A, S, L):

    >>> aff = np.array([[0, 0, -1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.]])
    >>> r = closest_ras(aff, (4, 5, 6))
    >>> r.stored_axcodes, r.is_identity, r.to_ras(np.zeros((4, 5, 6, 2))).shape
    ('ASL', False, (6, 4, 5, 2))
    """
    from nibabel.orientations import io_orientation, ornt2axcodes

    aff = np.asarray(affine, float)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise InputError(f"an affine must be a finite 4x4 matrix, got shape {aff.shape}")
    ornt = io_orientation(aff)  # row = stored axis: (RAS axis, +1 or -1)
    if np.isnan(ornt).any():
        raise InputError("the affine is degenerate (a zero or repeated axis); fix the "
                         "image header")
    return Reorientation(ornt=ornt.astype(int), stored_shape=tuple(int(n) for n in shape[:3]),
                         stored_axcodes="".join(ornt2axcodes(ornt)))
