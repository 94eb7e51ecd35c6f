"""Brain mask from GRE magnitude (BET-like, no surface model).

Steps: echo-combined magnitude (root of the sum of squares over echoes), light Gaussian
smoothing, a robust threshold (Otsu's between-class variance on the intensities below the
99.5th percentile, or a user threshold as a fraction of that percentile), the largest
connected component, 3D hole filling, a morphological opening with a ball of ``open_mm``
that cuts thin bridges (e.g. to scalp or neck), the largest component again, optionally
dropping voxels far darker than the threshold that hole filling brought back
(``dark_fraction``), and an optional erosion of ``erode_mm``. Ball morphology uses the
physical voxel sizes (structuring elements for small radii, Euclidean distance transforms
for large ones), so it is right for anisotropic voxels.

In :func:`qsm_core.pipeline.reconstruct` a user-supplied mask always wins over this one.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from qsm_core.dipole import _check_voxel_size
from qsm_core.errors import InputError

__all__ = ["brain_mask", "otsu_threshold", "ball_structure", "erode_ball", "dilate_ball",
           "largest_component"]

log = logging.getLogger(__name__)


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold maximising the between-class variance of a histogram.

    Examples
    --------
    >>> v = np.r_[np.zeros(100), np.ones(100) * 10]
    >>> 0 < otsu_threshold(v) < 10
    True
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or np.ptp(v) == 0:
        raise InputError("cannot threshold a constant image; the magnitude has no contrast")
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of a boolean mask (empty stays empty)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def ball_structure(radius_mm: float, *, voxel_size_mm) -> np.ndarray:
    """Boolean ball of ``radius_mm`` on the voxel grid (odd shape, centred).

    Examples
    --------
    >>> int(ball_structure(1.0, voxel_size_mm=(1, 1, 1)).sum())
    7
    """
    v = _check_voxel_size(voxel_size_mm)
    half = np.floor(radius_mm / v + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, v)], indexing="ij")
    return (grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2) <= radius_mm**2 + 1e-9


# above this radius (in voxels) the distance transform beats a structuring element
_EDT_RADIUS_VOXELS = 3.5


def _on_bbox(fn, mask, margin_voxels):
    """Apply a morphological ``fn`` on the mask's bounding box (+ margin) only."""
    if not mask.any():
        return fn(mask)
    sl = []
    for axis in range(3):
        idx = np.nonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))[0]
        sl.append(slice(max(int(idx[0]) - margin_voxels[axis], 0),
                        min(int(idx[-1]) + 1 + margin_voxels[axis], mask.shape[axis])))
    sl = tuple(sl)
    out = np.zeros(mask.shape, bool)
    out[sl] = fn(mask[sl])
    return out


def erode_ball(mask: np.ndarray, radius_mm: float, *, voxel_size_mm) -> np.ndarray:
    """Erosion by a ball of ``radius_mm`` (the volume edge counts as outside)."""
    mask = np.asarray(mask, bool)
    if radius_mm <= 0:
        return mask.copy()
    v = _check_voxel_size(voxel_size_mm)
    margin = [1] * 3
    return _on_bbox(lambda m: _erode_ball(m, radius_mm, v), mask, margin)


def dilate_ball(mask: np.ndarray, radius_mm: float, *, voxel_size_mm) -> np.ndarray:
    """Dilation by a ball of ``radius_mm``."""
    mask = np.asarray(mask, bool)
    if radius_mm <= 0:
        return mask.copy()
    v = _check_voxel_size(voxel_size_mm)
    margin = [int(np.ceil(radius_mm / s)) + 1 for s in v]
    return _on_bbox(lambda m: _dilate_ball(m, radius_mm, v), mask, margin)


def _erode_ball(mask, radius_mm, v):
    if radius_mm / v.min() <= _EDT_RADIUS_VOXELS:
        return ndimage.binary_erosion(mask, ball_structure(radius_mm, voxel_size_mm=v),
                                      border_value=0)
    padded = np.pad(mask, 1)
    dist = ndimage.distance_transform_edt(padded, sampling=v)[1:-1, 1:-1, 1:-1]
    return dist > radius_mm + 1e-9


def _dilate_ball(mask, radius_mm, v):
    if radius_mm / v.min() <= _EDT_RADIUS_VOXELS:
        return ndimage.binary_dilation(mask, ball_structure(radius_mm, voxel_size_mm=v))
    dist = ndimage.distance_transform_edt(~mask, sampling=v)
    return dist <= radius_mm + 1e-9


def brain_mask(magnitude, *, voxel_size_mm, threshold=None, smooth_mm: float = 1.0,
               open_mm: float = 2.0, erode_mm: float = 0.0,
               dark_fraction: float = 0.0) -> np.ndarray:
    """Brain (tissue) mask from magnitude.

    Parameters
    ----------
    magnitude : array_like, shape (X, Y, Z) or (X, Y, Z, E)
        Magnitude image(s); echoes are combined by root-sum-of-squares.
    voxel_size_mm : sequence of 3 floats
    threshold : float, optional
        Threshold as a fraction (0-1) of the 99.5th percentile of the combined, smoothed
        magnitude. Default: Otsu's threshold.
    smooth_mm : float
        Gaussian smoothing sigma (mm) before thresholding (0: none).
    open_mm : float
        Radius (mm) of the ball used for the morphological opening (0: none).
    erode_mm : float
        Final erosion radius (mm). Default 0: V-SHARP erodes the mask itself.
    dark_fraction : float
        After hole filling, voxels whose (unsmoothed) combined magnitude is below
        ``dark_fraction`` times the threshold are dropped again, e.g. 0.5: skull and air
        cavities enclosed by tissue, whose phase is noise. Default 0 keeps them (interior
        signal voids stay in the mask); the pipeline's 2 mm erosion removes the edge ones.

    Returns
    -------
    ndarray of uint8, shape (X, Y, Z)
        1 inside the brain, 0 outside.

    Raises
    ------
    InputError
        Bad shape, NaN/Inf, a constant image, or an empty result.
    """
    mag = np.asarray(magnitude)
    if mag.ndim == 4:
        comb = np.sqrt(np.sum(mag.astype(np.float32) ** 2, axis=3))
    elif mag.ndim == 3:
        comb = mag.astype(np.float32)
    else:
        raise InputError(f"magnitude must be 3D or 4D (X, Y, Z, echo), got shape {mag.shape}")
    if not np.all(np.isfinite(comb)):
        raise InputError("magnitude contains NaN or Inf; fix the input images")
    v = _check_voxel_size(voxel_size_mm)
    raw = comb
    if smooth_mm > 0:
        comb = ndimage.gaussian_filter(comb, sigma=smooth_mm / v, mode="nearest")
    top = float(np.percentile(comb, 99.5))
    if top <= 0:
        raise InputError("magnitude is all zeros; cannot compute a brain mask")
    if threshold is None:
        thr = otsu_threshold(comb[comb <= top])
    else:
        if not 0 < float(threshold) < 1:
            raise InputError(f"threshold must be a fraction in (0, 1), got {threshold!r}")
        thr = float(threshold) * top
    m = largest_component(comb > thr)
    m = _on_bbox(ndimage.binary_fill_holes, m, [1, 1, 1])
    if open_mm > 0:
        m = dilate_ball(erode_ball(m, open_mm, voxel_size_mm=v), open_mm, voxel_size_mm=v) & m
        m = largest_component(m)
        m = _on_bbox(ndimage.binary_fill_holes, m, [1, 1, 1])
    if dark_fraction > 0:
        m &= raw >= dark_fraction * thr
        m = largest_component(m)
    if erode_mm > 0:
        m = erode_ball(m, erode_mm, voxel_size_mm=v)
    if not m.any():
        raise InputError("the brain mask is empty; check the magnitude images or pass a "
                         "mask (--mask)")
    log.info("brain mask: threshold %.4g, %d voxels", thr, int(m.sum()))
    return m.astype(np.uint8)
