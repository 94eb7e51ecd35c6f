"""Fixed-physical-size patches around lesions, and a disk cache of them for training.

Every lesion gets a cube of ``patch_mm`` millimetres (default 32 mm) centred on its centroid,
resampled to ``patch_voxels`` voxels a side (default 32, i.e. 1 mm spacing), whatever the voxel
size of the scan (anisotropic voxels such as 0.9x0.9x2 mm are fine). The cube is cut along the
array axes of the input volumes (no interpolation to world space); given the volumes' affine,
its axes are then put in RAS order (:func:`patch_axes`: the array axis closest to world x
first, flipped to run left to right, and so on), so that patch axis 2 runs inferior to
superior whether a scan is stored axially, sagittally or coronally, as in the (axial)
training scans. Images are resampled trilinearly, masks by nearest neighbour.
Outside the volume, images repeat their nearest edge value ("edge padding") while masks are 0
(nothing is known to be lesion there).

Channels (any subset, in any order, by name):

``qsm``
    Susceptibility scaled to ``chi_ppm * QSM_SCALE`` (10, so 0.1 ppm -> 1.0) and clipped to
    ``+-QSM_CLIP`` (5.0, i.e. +-0.5 ppm; veins reach ~0.45 ppm, rims 0.01-0.06 ppm).
``flair``
    FLAIR divided by the median FLAIR of normal-appearing tissue (``flair_reference``; by
    default the median over voxels that are inside ``brain_mask`` -- or, without one, above 10 %
    of the 99th percentile -- and outside every lesion), then clipped to ``[0, FLAIR_CLIP]``
    (5.0). Normal-appearing white matter is then about 1 and lesions about 1.5-3.
``lesion``
    This lesion's own mask (1 inside, 0 outside).
``others``
    Every other lesion's mask (1 inside another lesion, 0 elsewhere).
``swi``
    Optional: an SWI/magnitude image divided by its normal-appearing median, like FLAIR.

The cache (:func:`build_patch_cache`) is a folder with ``patches.npy`` (memory-mappable,
shape (N, C, P, P, P)), ``table.tsv`` (one row per patch, in order, with its keys and labels)
and ``cache.json`` (channels, patch size, normalisation constants).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from qsm_core.errors import InputError
from qsm_core.geometry import closest_ras
from qsm_core.io.atomic import atomic_path, write_json

__all__ = [
    "QSM_SCALE",
    "QSM_CLIP",
    "FLAIR_CLIP",
    "DEFAULT_CHANNELS",
    "PATCH_MM",
    "PATCH_VOXELS",
    "normalise_qsm",
    "flair_reference",
    "flair_reference_in_qsm_mask",
    "normalise_flair",
    "lesion_centroids_vox",
    "patch_coordinates",
    "snap_centres",
    "patch_axes",
    "to_ras_axes",
    "snappable_axes",
    "extract_patches",
    "build_patch_cache",
    "load_patch_cache",
    "load_patch_caches",
]

PATCH_MM = 32.0
"""Default patch side (mm)."""
PATCH_VOXELS = 32
"""Default samples per side (1 mm sampling: 1-2 mm rims stay sharp)."""

log = logging.getLogger(__name__)

QSM_SCALE = 10.0
QSM_CLIP = 5.0
FLAIR_CLIP = 5.0
DEFAULT_CHANNELS = ("qsm", "flair", "lesion", "others")
_IMAGE_CHANNELS = ("qsm", "flair", "swi")
_MASK_CHANNELS = ("lesion", "others")


def normalise_qsm(chi_ppm: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Scale susceptibility (ppm) to the network's range: ``clip(chi_ppm * 10, -5, 5)``.

    ``out`` (float32, the shape of ``chi_ppm``; may be ``chi_ppm`` itself) receives the
    result in place.

    Examples
    --------
    >>> [round(float(v), 3) for v in normalise_qsm(np.array([0.05, -0.02, 0.9]))]
    [0.5, -0.2, 5.0]
    """
    x = np.asarray(chi_ppm, dtype=np.float32)
    if out is None:
        return np.clip(x * np.float32(QSM_SCALE), -QSM_CLIP, QSM_CLIP)
    np.multiply(x, np.float32(QSM_SCALE), out=out)
    return np.clip(out, -QSM_CLIP, QSM_CLIP, out=out)


def flair_reference(flair: np.ndarray, *, lesion_labels: np.ndarray | None = None,
                    brain_mask: np.ndarray | None = None) -> float:
    """Median FLAIR intensity of normal-appearing tissue.

    Parameters
    ----------
    flair : ndarray, shape (X, Y, Z)
    lesion_labels : ndarray, shape (X, Y, Z), optional
        Lesion voxels (non-zero) are excluded.
    brain_mask : ndarray, shape (X, Y, Z), optional
        Voxels to consider; default: those above 10 % of the 99th percentile (foreground).

    Returns
    -------
    float
        A strictly positive reference intensity.

    Notes
    -----
    On volumes of more than 2,000,000 voxels the median is taken over the regular sub-grid of
    every second voxel along each axis (1/8 of the voxels; ~200,000 brain voxels at 1 mm).
    The sub-grid is the same whatever the arrays' memory order (NIfTI volumes load
    Fortran-ordered, lesion maps may not), and cutting it costs ~1/10 of a full-volume
    selection across mixed layouts, which dominated the per-scan cost of ``predict``. On the
    held-out simulated cohort (10 scans, 164 lesions) it moves the reference by at most 0.1 %
    from the full-volume median, the default model's probabilities by at most 5e-4, and no
    call.
    """
    flair = np.asarray(flair)
    step = _REFERENCE_GRID if flair.size > _REFERENCE_GRID_ABOVE else 1
    grid = (slice(None, None, step),) * flair.ndim
    fl = flair[grid]
    if brain_mask is not None:
        sel = np.asarray(brain_mask)[grid]
        sel = sel.copy() if sel.dtype == bool else sel > 0
    else:
        hi = float(np.percentile(fl, 99))
        sel = fl > 0.1 * hi
    if lesion_labels is not None:
        sel &= np.asarray(lesion_labels)[grid] == 0
    vals = fl[sel]
    ref = float(_median(vals)) if vals.size else 0.0
    if not np.isfinite(ref) or ref <= 0:
        raise InputError("FLAIR has no positive normal-appearing tissue to normalise by "
                         "(empty, all-zero or negative image); check the FLAIR file")
    return ref


def flair_reference_in_qsm_mask(flair: np.ndarray, *, qsm: np.ndarray,
                                lesion_labels: np.ndarray) -> float:
    """:func:`flair_reference` with ``brain_mask = qsm != 0`` (none if the QSM is all 0).

    What ``predict`` and training use (the QSM's own brain mask), in one compiled pass over
    the reference sub-grid instead of a full-volume mask and several copies; the same
    value bit for bit.

    Parameters
    ----------
    flair, qsm, lesion_labels : ndarray, shape (X, Y, Z)
        On one grid, any memory order.

    Returns
    -------
    float
    """
    flair, qsm, labels = (np.asarray(a) for a in (flair, qsm, lesion_labels))
    simple = (flair.ndim == 3 and flair.shape == qsm.shape == labels.shape
              and all(a.dtype.kind in "biuf" for a in (flair, qsm, labels))
              and all(a.flags.c_contiguous or a.flags.f_contiguous
                      for a in (flair, qsm, labels)))
    if not simple:
        brain = qsm != 0
        return flair_reference(flair, lesion_labels=labels,
                               brain_mask=brain if brain.any() else None)
    from rimnet import _kernels

    step = _REFERENCE_GRID if flair.size > _REFERENCE_GRID_ABOVE else 1
    vals = _kernels.reference_values(flair, qsm, labels, step)
    if vals.size == 0 and not _kernels.any_nonzero(qsm):
        return flair_reference(flair, lesion_labels=labels, brain_mask=None)
    ref = float(_median(vals)) if vals.size else 0.0
    if not np.isfinite(ref) or ref <= 0:
        raise InputError("FLAIR has no positive normal-appearing tissue to normalise by "
                         "(empty, all-zero or negative image); check the FLAIR file")
    return ref


_REFERENCE_GRID = 2
_REFERENCE_GRID_ABOVE = 2_000_000
"""Volumes larger than this (voxels) get their FLAIR reference on a sub-grid."""


def _median(values: np.ndarray):
    """``np.median`` of a 1-D array, bit for bit, with one selection instead of two.

    ``np.median`` of an even-sized array partitions around both middle ranks, which costs
    ~6x a single ``np.partition``; the lower middle value is the maximum of the part below
    the upper one. NaN anywhere gives NaN, as with ``np.median``.

    Examples
    --------
    >>> float(_median(np.array([3.0, 1.0, 4.0, 1.5])))
    2.25
    """
    values = np.asarray(values).ravel()
    n = values.size
    if n < 3:
        return np.median(values)
    k = n // 2
    part = np.partition(values, k)
    if np.isnan(part[-1]) or np.isnan(part[k]):  # NaNs sort last
        return np.median(values)
    if n % 2:
        return np.mean(part[k:k + 1])
    return np.mean(np.array([part[:k].max(), part[k]], dtype=part.dtype))


def normalise_flair(flair: np.ndarray, *, reference: float,
                    out: np.ndarray | None = None) -> np.ndarray:
    """``clip(flair / reference, 0, 5)`` as float32.

    ``out`` receives the result in place, as in :func:`normalise_qsm`.
    """
    x = np.asarray(flair, dtype=np.float32)
    if out is None:
        return np.clip(x / np.float32(reference), 0.0, FLAIR_CLIP)
    np.divide(x, np.float32(reference), out=out)
    return np.clip(out, 0.0, FLAIR_CLIP, out=out)


def lesion_centroids_vox(lesion_labels: np.ndarray, lesion_ids: Sequence[int]) -> np.ndarray:
    """Centres of mass (voxel coordinates) of the given labels, shape (N, 3).

    Raises
    ------
    InputError
        If a label is absent from the map.
    """
    ids = [int(i) for i in lesion_ids]
    if not ids:
        return np.zeros((0, 3))
    present = np.bincount(lesion_labels.ravel().astype(np.int64, copy=False),
                          minlength=max(ids) + 1)
    missing = [i for i in ids if i <= 0 or i >= present.size or present[i] == 0]
    if missing:
        raise InputError(f"lesion id(s) {missing[:10]} not found in the lesion label map")
    cents = ndimage.center_of_mass(np.ones(lesion_labels.shape, np.float32), lesion_labels, ids)
    return np.asarray(cents, dtype=float).reshape(len(ids), 3)


def patch_coordinates(centre_vox, *, voxel_size_mm, patch_mm: float,
                      patch_voxels: int) -> list[np.ndarray]:
    """Sample positions (fractional voxel indices) of a patch along each array axis.

    The patch spacing is ``patch_mm / patch_voxels`` mm; samples are centred on ``centre_vox``.

    Returns
    -------
    list of 3 ndarrays, each shape (patch_voxels,)
    """
    offs = _sample_offsets_vox(voxel_size_mm, patch_mm=patch_mm, patch_voxels=patch_voxels)
    return [float(centre_vox[a]) + offs[a] for a in range(3)]


#: A sample spacing within this fraction of a whole number of voxels counts as whole:
#: voxel sizes read from an oblique affine carry float error (0.99999997 mm for 1 mm).
_WHOLE_STEP_RTOL = 1e-5


def _sample_offsets_vox(voxel_size_mm, *, patch_mm: float, patch_voxels: int) -> np.ndarray:
    """Offsets of the samples from the patch centre in voxels, shape (3, P).

    Along an axis where the spacing is a whole number of voxels to within
    :data:`_WHOLE_STEP_RTOL`, the offsets are exact multiples of that number, so snapped
    samples land exactly on voxels (the batched crop of :func:`_extract_on_grid` applies).
    """
    step_vox = (patch_mm / patch_voxels) / np.asarray(voxel_size_mm, dtype=float)
    whole = np.round(step_vox)
    step_vox = np.where((whole >= 1) & (np.abs(step_vox - whole) <= _WHOLE_STEP_RTOL * whole),
                        whole, step_vox)
    k = np.arange(patch_voxels) - (patch_voxels - 1) / 2.0
    return step_vox[:, None] * k[None, :]


def snap_centres(centres_vox: np.ndarray, *, voxel_size_mm, patch_mm: float,
                 patch_voxels: int, tol: float = 1e-3, runs_back=None) -> np.ndarray:
    """Move patch centres by < 1/2 voxel so that the patch samples land on voxel centres.

    Along each axis where the patch spacing is a whole number of voxels (e.g. 1 mm samples of
    a 1 mm scan), the centre is moved to the nearest position at which every sample falls
    exactly on a voxel; the patch is then a crop of the scan, with no interpolation to blur
    a 1 mm rim by a random fraction of a voxel. Other axes (e.g. 1 mm samples of 0.9 mm or
    2 mm voxels) are left alone and sampled trilinearly.

    Parameters
    ----------
    centres_vox : ndarray, shape (N, 3)
        Patch centres in voxel coordinates.
    voxel_size_mm : sequence of 3 floats
    patch_mm, patch_voxels : float, int
        Patch side (mm) and samples per side.
    tol : float
        How close to a whole number (in voxels) the sample spacing must be.
    runs_back : sequence of 3 bools, optional
        Array axes that run towards lower world coordinates (left, posterior, inferior;
        :func:`patch_axes`). A centre exactly halfway between two snapped positions (a
        centre on a voxel, with an even ``patch_voxels``) goes to the one further along the
        world axis, so a scan stored in any orientation gives the same crop. Default: every
        axis runs forward (RAS storage).

    Returns
    -------
    ndarray, shape (N, 3)
        The centres, moved by at most 1/2 voxel along the snapped axes.
    """
    cents = np.array(centres_vox, dtype=float).reshape(-1, 3)
    step_vox = (patch_mm / patch_voxels) / np.asarray(voxel_size_mm, dtype=float)
    back = (False, False, False) if runs_back is None else tuple(bool(b) for b in runs_back)
    for a in snappable_axes(voxel_size_mm, patch_mm=patch_mm, patch_voxels=patch_voxels,
                            tol=tol):
        whole = np.round(step_vox[a])
        half = (patch_voxels - 1) / 2.0 * whole
        if back[a]:  # ties towards lower array index = higher world coordinate
            cents[:, a] = np.ceil(cents[:, a] - half - 0.5) + half
        else:
            cents[:, a] = np.floor(cents[:, a] - half + 0.5) + half
    return cents


def snappable_axes(voxel_size_mm, *, patch_mm: float, patch_voxels: int,
                   tol: float = 1e-3) -> list[int]:
    """Array axes along which the patch spacing is a whole number of voxels (0, 1, 2).

    Along those :func:`snap_centres` makes the samples voxels; along the others patches are
    interpolated (e.g. 1 mm samples of 0.9 mm pixels or 2 mm slices).
    """
    step_vox = (patch_mm / patch_voxels) / np.asarray(voxel_size_mm, dtype=float)
    whole = np.round(step_vox)
    return [a for a in range(3) if whole[a] >= 1 and abs(step_vox[a] - whole[a]) <= tol]


def _linear_axis(coords: np.ndarray, size: int):
    """Indices and weights for 1-D linear interpolation with edge clamping."""
    c = np.clip(coords, 0.0, size - 1.0)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, size - 1)
    w1 = (c - i0).astype(np.float32)
    return i0, i1, w1


def _sample_linear(vol: np.ndarray, coords: list[np.ndarray], transform=None) -> np.ndarray:
    """Separable trilinear sampling of ``vol`` on the tensor grid ``coords`` (edge padding).

    ``transform`` (an element-wise function) is applied to the cropped block before
    interpolation, which equals transforming the whole volume first, at a fraction of the cost.
    """
    axes = [_linear_axis(coords[a], vol.shape[a]) for a in range(3)]
    los = [int(i0.min()) for i0, _, _ in axes]
    his = [int(i1.max()) + 1 for _, i1, _ in axes]
    out = vol[los[0]:his[0], los[1]:his[1], los[2]:his[2]]
    if transform is not None:
        out = transform(out)
    for axis, (i0, i1, w1) in enumerate(axes):
        a = np.take(out, i0 - los[axis], axis=axis)
        b = np.take(out, i1 - los[axis], axis=axis)
        shape = [1, 1, 1]
        shape[axis] = -1
        out = a + (b - a) * w1.reshape(shape)
    return out.astype(np.float32, copy=False)


def _sample_nearest(vol: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    """Nearest-neighbour sampling on the tensor grid ``coords``; 0 outside the volume."""
    idx, inside = [], []
    for a, c in enumerate(coords):
        i = np.floor(c + 0.5).astype(np.intp)
        inside.append((i >= 0) & (i < vol.shape[a]))
        idx.append(np.clip(i, 0, vol.shape[a] - 1))
    out = vol[np.ix_(*idx)]
    if not all(m.all() for m in inside):
        keep = (inside[0][:, None, None] & inside[1][None, :, None]
                & inside[2][None, None, :])
        out = np.where(keep, out, 0)
    return out


def worker_threads() -> int:
    """Threads for the per-lesion array work of patches and the rule-based detector.

    ``OMP_NUM_THREADS`` when set (the convention torch and BLAS follow too), else the CPU
    cores this process may run on. Results never depend on it: lesions are split into
    independent groups.
    """
    from qsm_core.backend import resolve_workers

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return resolve_workers(-1)


def map_threads(fn, items: list, *, min_items: int = 2) -> list:
    """``[fn(i) for i in items]``, on :func:`worker_threads` threads when worthwhile.

    numpy releases the GIL inside its array loops, so independent groups of lesions overlap.
    """
    n = min(worker_threads(), len(items))
    if n < 2 or len(items) < min_items:
        return [fn(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, items))


def _grid_axes(cents: np.ndarray, *, voxel_size_mm, patch_mm: float, patch_voxels: int):
    """Per-lesion sample positions as in :func:`patch_coordinates`, shape (N, 3, P)."""
    offs = _sample_offsets_vox(voxel_size_mm, patch_mm=patch_mm, patch_voxels=patch_voxels)
    return cents[:, :, None] + offs[None, :, :]


def _on_grid_lesions(cents: np.ndarray, shape, *, voxel_size_mm, patch_mm: float,
                     patch_voxels: int) -> np.ndarray:
    """Lesions whose patch samples fall on consecutive voxels, away from the volume edge.

    For those (the common case of a patch spacing equal to the voxel size, e.g. 32 mm in 32
    samples at 1 mm), trilinear sampling is a shifted crop, and every lesion can be cut in one
    batched gather (:func:`_extract_on_grid`) with the same arithmetic as the per-lesion
    path.
    """
    c = _grid_axes(cents, voxel_size_mm=voxel_size_mm, patch_mm=patch_mm,
                   patch_voxels=patch_voxels)
    size = np.asarray(shape, dtype=float)[None, :, None]
    i0 = np.floor(c)
    near = np.floor(c + 0.5)
    return (np.all(c >= 0, axis=(1, 2)) & np.all(i0 + 1 <= size - 1, axis=(1, 2))
            & np.all(np.diff(i0, axis=2) == 1, axis=(1, 2))
            & np.all(np.diff(near, axis=2) == 1, axis=(1, 2))
            & np.all(near[..., :1] >= 0, axis=(1, 2))
            & np.all(near[..., -1:] <= size - 1, axis=(1, 2)))


def _extract_on_grid(prepared: dict, labels: np.ndarray, ids: np.ndarray, cents: np.ndarray,
                     *, channels, voxel_size_mm, patch_mm: float, patch_voxels: int,
                     out: np.ndarray, rows_out: np.ndarray) -> None:
    """Patches of on-grid lesions (:func:`_on_grid_lesions`), by compiled gathers.

    Bit for bit what :func:`_sample_linear` / :func:`_sample_nearest` give lesion by lesion
    (the same crop, element-wise normalisation and three 1-D interpolations
    ``a + (b - a) * w``, see :func:`rimnet._kernels.gather_linear`), in one pass per lesion
    and channel that reads the volume in its memory order, lesions spread over
    :func:`worker_threads` threads. Lesion ``i`` goes to ``out[rows_out[i]]``.
    """
    from rimnet import _kernels

    p = patch_voxels
    c = _grid_axes(cents, voxel_size_mm=voxel_size_mm, patch_mm=patch_mm, patch_voxels=p)
    i0 = np.floor(c).astype(np.intp)
    w1 = (c - i0).astype(np.float32)  # (N, 3, P), as _linear_axis computes it
    starts = i0[:, :, 0]
    near = np.floor(c[..., 0] + 0.5).astype(np.intp)
    _kernels.set_threads(worker_threads())
    for ch, name in enumerate(channels):
        if name in prepared:
            vol, _, (divide, scale, lo, hi) = prepared[name]
            _kernels.gather_linear(vol, starts, w1, rows_out, ch, out, divide=divide,
                                   scale=scale, lo=lo, hi=hi)
    masks = {name: ch for ch, name in enumerate(channels) if name in _MASK_CHANNELS}
    if masks:
        _kernels.gather_masks(labels, near, ids, rows_out, out,
                              lesion_channel=masks.get("lesion"),
                              others_channel=masks.get("others"))


def patch_axes(affine) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Which array axis lies closest to each world axis (R, A, S), and whether it runs back.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine of the volumes.

    Returns
    -------
    axes : tuple of 3 ints
        ``axes[w]``: the array axis closest to world axis ``w``.
    flips : tuple of 3 bools
        ``flips[w]``: that array axis runs towards lower ``w`` (left, posterior, inferior).

    Examples
    --------
    Sagittal slices stored as (A, S, L):

    >>> patch_axes(np.array([[0, 0, -1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.]]))
    ((2, 0, 1), (True, False, False))
    """
    reo = closest_ras(affine, (1, 1, 1))  # the array axes' world axes, shape-independent
    axes = tuple(reo.stored_axis(w) for w in range(3))
    return axes, tuple(bool(reo.ornt[a, 1] < 0) for a in axes)


def to_ras_axes(patches: np.ndarray, affine) -> np.ndarray:
    """Patches (N, C, P, P, P) cut along the array axes, with their axes in RAS order.

    Returns ``patches`` itself when the volumes are stored RAS already (the simulator's and
    most axial scans' case), else a C-contiguous reordered copy (:func:`patch_axes`).
    """
    axes, flips = patch_axes(affine)
    if axes == (0, 1, 2) and not any(flips):
        return patches
    out = np.transpose(patches, (0, 1, *(2 + a for a in axes)))
    flip_dims = tuple(2 + w for w in range(3) if flips[w])
    if flip_dims:
        out = np.flip(out, axis=flip_dims)
    return np.ascontiguousarray(out)


def extract_patches(volumes: dict[str, np.ndarray], lesion_labels: np.ndarray,
                    lesion_ids: Sequence[int] | None = None, *, voxel_size_mm,
                    patch_mm: float = PATCH_MM, patch_voxels: int = PATCH_VOXELS,
                    channels: Sequence[str] = DEFAULT_CHANNELS,
                    centroids_vox: np.ndarray | None = None,
                    brain_mask: np.ndarray | None = None,
                    flair_ref: float | None = None, swi_ref: float | None = None,
                    snap_to_voxels: bool = False, affine=None) -> np.ndarray:
    """Cut a fixed physical-size, normalised multi-channel patch around each lesion.

    Parameters
    ----------
    volumes : dict of str to ndarray, each shape (X, Y, Z)
        Images on the same grid as ``lesion_labels``: ``"qsm"`` (susceptibility, ppm),
        ``"flair"`` (any intensity unit), optionally ``"swi"``. Only those named in
        ``channels`` are needed.
    lesion_labels : ndarray of int, shape (X, Y, Z)
        Lesion label map (0 = background, k = lesion ``k``).
    lesion_ids : sequence of int, optional
        Lesions to extract, in output order (default: every label, ascending).
    voxel_size_mm : sequence of 3 floats
        Voxel size of the volumes along the array axes (mm).
    patch_mm : float
        Side of the cube (mm).
    patch_voxels : int
        Samples per side of the output patch.
    channels : sequence of str
        Channel names, among ``qsm``, ``flair``, ``swi``, ``lesion``, ``others``.
    centroids_vox : ndarray, shape (N, 3), optional
        Patch centres in voxel coordinates (default: the lesions' centres of mass).
    brain_mask : ndarray, shape (X, Y, Z), optional
        Region used for the FLAIR/SWI normal-appearing-tissue reference.
    flair_ref, swi_ref : float, optional
        Reference intensities overriding the medians (e.g. computed once per scan).
    snap_to_voxels : bool
        Move each centre by < 1/2 voxel so that the samples are voxels wherever the patch
        spacing allows (:func:`snap_centres`): crops instead of interpolated patches. A
        model must be given patches cut the way its training patches were (its
        ``config["snap_to_voxels"]``).
    affine : ndarray, shape (4, 4), optional
        The volumes' voxel-to-world affine: the patches' axes are then put in RAS order
        (:func:`to_ras_axes`), whatever the storage order of the scan. None keeps the array
        axes.

    Returns
    -------
    ndarray, shape (N, C, patch_voxels, patch_voxels, patch_voxels), float32
        Channel values as described in the module docstring; never NaN.

    Raises
    ------
    InputError
        Unknown channel, missing volume, shape mismatch, non-finite values, unknown lesion id.
    """
    channels = tuple(channels)
    bad = [c for c in channels if c not in _IMAGE_CHANNELS + _MASK_CHANNELS]
    if bad or not channels:
        raise InputError(f"unknown patch channel(s) {bad}; choose among "
                         f"{list(_IMAGE_CHANNELS + _MASK_CHANNELS)}")
    labels = np.asarray(lesion_labels)
    if labels.ndim != 3:
        raise InputError(f"lesion label map must be 3D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise InputError("lesion label map has non-integer values; label it first "
                             "(rimnet.lesions.label_lesions)")
        labels = labels.astype(np.int32)
    vs = np.asarray(voxel_size_mm, dtype=float).reshape(-1)
    if vs.size != 3 or np.any(~np.isfinite(vs)) or np.any(vs <= 0):
        raise InputError(f"voxel_size_mm must be 3 positive numbers, got {voxel_size_mm!r}")
    if patch_mm <= 0 or int(patch_voxels) < 2:
        raise InputError(f"patch_mm must be > 0 and patch_voxels >= 2, got {patch_mm}, "
                         f"{patch_voxels}")
    patch_voxels = int(patch_voxels)
    if lesion_ids is None:
        lesion_ids = [int(i) for i in np.unique(labels) if i > 0]
    ids = [int(i) for i in lesion_ids]

    prepared: dict[str, tuple] = {}
    for name in channels:
        if name in _MASK_CHANNELS:
            continue
        if name not in volumes or volumes[name] is None:
            raise InputError(f"patch channel {name!r} needs a {name!r} volume; got "
                             f"{sorted(k for k, v in volumes.items() if v is not None)}")
        vol = np.asarray(volumes[name])
        if vol.shape != labels.shape:
            raise InputError(f"{name} volume has shape {vol.shape} but the lesion map has "
                             f"{labels.shape}; resample the lesion map to the {name} grid "
                             "(rimnet.lesions.resample_labels_to)")
        if name == "qsm":
            prepared[name] = (vol, normalise_qsm, (False, QSM_SCALE, -QSM_CLIP, QSM_CLIP))
        else:
            ref = flair_ref if name == "flair" else swi_ref
            if ref is None:
                if not np.all(np.isfinite(vol)):
                    raise InputError(f"{name} volume has NaN/Inf voxels; fix or mask them "
                                     "first")
                ref = flair_reference(vol, lesion_labels=labels, brain_mask=brain_mask)
            prepared[name] = (vol, functools.partial(normalise_flair, reference=ref),
                              (True, ref, 0.0, FLAIR_CLIP))

    n = len(ids)
    # every row is filled below, by the batched or the per-lesion path
    out = np.empty((n, len(channels), patch_voxels, patch_voxels, patch_voxels), np.float32)
    if n == 0:
        return out
    if centroids_vox is None:
        cents = lesion_centroids_vox(labels, ids)
    else:
        cents = np.asarray(centroids_vox, dtype=float).reshape(n, 3)
    if snap_to_voxels:
        runs_back = None
        if affine is not None:
            axes, flips = patch_axes(affine)
            runs_back = [False] * 3
            for w in range(3):
                runs_back[axes[w]] = flips[w]
        cents = snap_centres(cents, voxel_size_mm=vs, patch_mm=patch_mm,
                             patch_voxels=patch_voxels, runs_back=runs_back)
    on_grid = _on_grid_lesions(cents, labels.shape, voxel_size_mm=vs, patch_mm=patch_mm,
                               patch_voxels=patch_voxels)
    fast = np.flatnonzero(on_grid)
    if fast.size:
        _extract_on_grid(prepared, labels, np.asarray(ids)[fast], cents[fast], channels=channels,
                         voxel_size_mm=vs, patch_mm=patch_mm, patch_voxels=patch_voxels,
                         out=out, rows_out=fast)
    for k in np.flatnonzero(~on_grid):
        lid, cen = ids[k], cents[k]
        coords = patch_coordinates(cen, voxel_size_mm=vs, patch_mm=patch_mm,
                                   patch_voxels=patch_voxels)
        lab = None
        for c, name in enumerate(channels):
            if name in prepared:
                vol, fn, _ = prepared[name]
                out[k, c] = _sample_linear(vol, coords, fn)
            else:
                if lab is None:
                    lab = _sample_nearest(labels, coords)
                if name == "lesion":
                    out[k, c] = lab == lid
                else:
                    out[k, c] = (lab > 0) & (lab != lid)
    # masks are 0/1 and images clipped to +-5, so only NaN can be there, and a sum carries it
    bad_ch = [name for c, name in enumerate(channels)
              if name in prepared and not np.isfinite(out[:, c].sum())]
    if bad_ch:
        raise InputError(f"{bad_ch} volume(s) have NaN/Inf voxels near the lesions; fix or "
                         "mask them first")
    return out if affine is None else to_ras_axes(out, affine)


def _npy_header(shape, dtype) -> bytes:
    """A .npy (version 1.0) header for a C-ordered array of ``shape`` and ``dtype``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def build_patch_cache(cache_dir, chunks: Iterable[tuple[np.ndarray, pd.DataFrame]], *,
                      channels: Sequence[str] = DEFAULT_CHANNELS, patch_mm: float = 32.0,
                      patch_voxels: int = 32, dtype=np.float32, metadata: dict | None = None,
                      snap_to_voxels: bool = False, overwrite: bool = False) -> Path:
    """Write patches and their table to a cache folder, streaming chunk by chunk.

    Parameters
    ----------
    cache_dir : str or Path
        Output folder (created). It holds ``patches.npy``, ``table.tsv`` and ``cache.json``.
    chunks : iterable of (ndarray, DataFrame)
        Pairs of patches, shape (n_i, C, P, P, P), and a table of n_i rows (keys such as
        participant_id/session_id/lesion_id and labels). A single pair may be passed inside a
        list. Chunks are appended in order, so memory stays at one chunk.
    channels : sequence of str
        Channel names of axis 1 (recorded in ``cache.json``).
    patch_mm, patch_voxels : float, int
        Patch geometry (recorded, and checked against the arrays).
    dtype : numpy dtype
        Storage type (float32, or float16 to halve the size).
    metadata : dict, optional
        Extra provenance written into ``cache.json``.
    snap_to_voxels : bool
        Whether the patches were cut with ``extract_patches(snap_to_voxels=True)``
        (recorded; a model trained on the cache cuts its patches the same way).
    overwrite : bool
        Replace an existing cache.

    Returns
    -------
    Path
        ``cache_dir``.
    """
    cache_dir = Path(cache_dir)
    if (cache_dir / "cache.json").exists() and not overwrite:
        raise InputError(f"{cache_dir}: a patch cache already exists; pass overwrite=True "
                         "(--overwrite) or choose another folder")
    cache_dir.mkdir(parents=True, exist_ok=True)
    channels = tuple(channels)
    shape_tail = (len(channels), patch_voxels, patch_voxels, patch_voxels)
    tables = []
    n_total = 0
    fd, raw_name = tempfile.mkstemp(prefix=".patches.", suffix=".raw", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as raw:
            for patches, table in chunks:
                patches = np.asarray(patches)
                if patches.shape[1:] != shape_tail:
                    raise InputError(f"patch chunk has shape {patches.shape}, expected "
                                     f"(n, {', '.join(map(str, shape_tail))})")
                if len(table) != len(patches):
                    raise InputError(f"patch chunk has {len(patches)} patches but its table "
                                     f"{len(table)} rows")
                if not np.all(np.isfinite(patches)):
                    raise InputError("refusing to cache patches with NaN/Inf values")
                raw.write(np.ascontiguousarray(patches, dtype=dtype).tobytes())
                tables.append(pd.DataFrame(table).reset_index(drop=True))
                n_total += len(patches)
        table = (pd.concat(tables, ignore_index=True) if tables
                 else pd.DataFrame(columns=["participant_id", "session_id", "lesion_id"]))
        table.insert(0, "patch_index", np.arange(n_total))
        with atomic_path(cache_dir / "patches.npy") as tmp:
            with open(tmp, "wb") as f, open(raw_name, "rb") as raw:
                f.write(_npy_header((n_total, *shape_tail), dtype))
                shutil.copyfileobj(raw, f, length=1 << 22)
    finally:
        if os.path.exists(raw_name):
            os.unlink(raw_name)
    with atomic_path(cache_dir / "table.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a")
    meta = {"channels": list(channels), "patch_mm": float(patch_mm),
            "patch_voxels": int(patch_voxels), "snap_to_voxels": bool(snap_to_voxels),
            "n_patches": int(n_total),
            "dtype": np.dtype(dtype).name, "qsm_scale": QSM_SCALE, "qsm_clip": QSM_CLIP,
            "flair_clip": FLAIR_CLIP, "metadata": metadata or {}}
    write_json(cache_dir / "cache.json", meta)  # written last: marks a complete cache
    log.info("wrote %d patches to %s", n_total, cache_dir)
    return cache_dir


def load_patch_cache(cache_dir, *, mmap: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """Open a patch cache written by :func:`build_patch_cache`.

    Parameters
    ----------
    cache_dir : str or Path
    mmap : bool
        Memory-map ``patches.npy`` read-only (default) instead of reading it.

    Returns
    -------
    patches : ndarray, shape (N, C, P, P, P)
        With ``patches.dtype`` as stored; metadata from ``cache.json`` is in ``table.attrs``.
    table : DataFrame
        N rows in patch order (``patch_index`` column first).
    """
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "cache.json"
    if not meta_path.is_file():
        raise InputError(f"{cache_dir}: not a patch cache (no cache.json); build one with "
                         "`qsmrim extract` or rimnet.patches.build_patch_cache")
    try:
        meta = json.loads(meta_path.read_text())
        patches = np.load(cache_dir / "patches.npy", mmap_mode="r" if mmap else None)
        table = pd.read_csv(cache_dir / "table.tsv", sep="\t", na_values=["n/a"],
                            keep_default_na=False,
                            dtype={"participant_id": str, "session_id": str})
    except (OSError, ValueError) as exc:
        raise InputError(f"{cache_dir}: corrupted patch cache ({exc}); rebuild it") from None
    if "session_id" in table.columns:
        table["session_id"] = table["session_id"].fillna("n/a")
    if len(table) != len(patches) or patches.shape[1] != len(meta["channels"]):
        raise InputError(f"{cache_dir}: patches.npy {patches.shape} does not match table.tsv "
                         f"({len(table)} rows) / channels {meta['channels']}; rebuild it")
    meta.setdefault("snap_to_voxels", False)  # caches written before the option existed
    table.attrs.update(meta)
    return patches, table


_GEOMETRY_KEYS = ("channels", "patch_mm", "patch_voxels", "snap_to_voxels", "qsm_scale",
                  "qsm_clip", "flair_clip")


def load_patch_caches(cache_dirs: Sequence) -> tuple[np.ndarray, pd.DataFrame]:
    """Open one or several patch caches as one training set.

    Several caches (e.g. two cohorts extracted separately) must share channels, patch geometry
    and normalisation; their patches are read into memory and stacked in the order given.
    Patients are told apart by cache: if a ``participant_id`` occurs in more than one cache
    (``sub-001`` of two simulated cohorts, or of two sites), every ``participant_id`` becomes
    ``<cache folder name>/<participant_id>`` (``<parent>/<folder>/<participant_id>`` if the
    folder names coincide) so that cross-validation never treats two people as one.

    Parameters
    ----------
    cache_dirs : sequence of str or Path
        One or more cache folders written by :func:`build_patch_cache`.

    Returns
    -------
    patches : ndarray, shape (N, C, P, P, P)
        Memory-mapped for a single cache, in memory (float32) for several.
    table : DataFrame
        N rows in patch order, with a ``source_cache`` column (the folder) when several caches
        are given; ``attrs`` holds the first cache's metadata plus ``sources``.
    """
    cache_dirs = [Path(c) for c in cache_dirs]
    if not cache_dirs:
        raise InputError("no patch cache given; pass at least one --patches CACHE")
    if len(cache_dirs) == 1:
        return load_patch_cache(cache_dirs[0])
    if len({c.resolve() for c in cache_dirs}) != len(cache_dirs):
        raise InputError(f"the same patch cache is given twice in {[str(c) for c in cache_dirs]}")
    loaded = [load_patch_cache(c) for c in cache_dirs]
    meta0 = loaded[0][1].attrs
    for cache, (_, table) in zip(cache_dirs[1:], loaded[1:]):
        diff = [k for k in _GEOMETRY_KEYS if table.attrs.get(k) != meta0.get(k)]
        if diff:
            raise InputError(
                f"{cache}: patch cache differs from {cache_dirs[0]} in "
                + ", ".join(f"{k} ({table.attrs.get(k)} vs {meta0.get(k)})" for k in diff)
                + "; rebuild the caches with the same `qsmrim extract` settings")
    names = [c.name for c in cache_dirs]  # e.g. siteA, siteB
    if len(set(names)) != len(names):  # e.g. cohort1/patches, cohort2/patches
        names = [f"{c.parent.name}/{c.name}" for c in cache_dirs]
    if len(set(names)) != len(names):
        names = [f"cache{i}" for i in range(len(cache_dirs))]
    ids = [set(t["participant_id"].astype(str)) for _, t in loaded]
    clash = set().union(*[a & b for i, a in enumerate(ids) for b in ids[i + 1:]])
    tables = []
    for name, cache, (_, table) in zip(names, cache_dirs, loaded):
        table = table.copy()
        if clash:
            table["participant_id"] = name + "/" + table["participant_id"].astype(str)
        table["source_cache"] = str(cache)
        tables.append(table)
    if clash:
        log.info("%d participant ids occur in more than one cache (e.g. %s); they are "
                 "qualified by cache as <cache>/<participant_id>", len(clash), sorted(clash)[0])
    table = pd.concat(tables, ignore_index=True)
    table["patch_index"] = np.arange(len(table))
    patches = np.concatenate([np.asarray(p, dtype=np.float32) for p, _ in loaded])
    table.attrs.update({**meta0, "n_patches": len(table), "dtype": "float32",
                        "sources": [str(c) for c in cache_dirs]})
    return patches, table
