"""An interpretable, NAIMS-inspired rule-based paramagnetic-rim detector.

It works on the same patches as the CNN (:mod:`rimnet.patches`; it reads the ``qsm``, ``lesion``
and, if present, ``others`` channels), so both scorers share evaluation code. For each lesion:

1. **Regions** (distances in mm from the lesion mask's edge, patch spacing ``patch_mm / P``):
   the *rim band* has an inner part, the lesion's outer shell (``d_in <= rim_inner_mm``,
   2 mm), and an outer part, the tissue just outside (``0 < d_out <= rim_outer_mm``, 1 mm),
   so that a rim lying just inside or just outside the FLAIR mask is seen; the *core* is the
   lesion deeper than ``rim_inner_mm``; *NAWM* is the ring ``nawm_inner_mm < d_out <=
   nawm_outer_mm`` (3-6 mm). Voxels of other lesions are left out of all. Contrast is
   susceptibility minus the NAWM median (ppm). The reference of a rim is
   ``max(core, NAWM)``; lesions too small to have a core (radius <~ 2.5 mm) are compared with
   NAWM only, so a small uniformly hyperintense lesion can pass for a rim -- a known limit of
   any rim-versus-core rule at this size.
2. **Vein suppression**: voxels brighter than ``vein_min_ppm`` above NAWM (rims are
   +0.01...+0.06 ppm, veins +0.3...+0.45 ppm before partial volume) that form a connected
   (26-connectivity) structure reaching further than ``vein_reach_mm`` beyond the lesion edge
   -- a vessel passing by or a central vein leaving the lesion -- are masked, with a one-voxel
   margin. A masked sector counts as not covered; masked core voxels are left out of the core.
3. **Angular coverage** per slice (patch axis ``slice_axis``; axis 2 = the scan's slice axis):
   the band of each slice through the lesion is split into ``n_sectors`` angular sectors around
   the lesion's in-slice centroid; a sector's rim value is the larger of the mean contrasts of
   its inner and its outer band voxels, and the sector is *positive* when that value exceeds
   the reference by ``rim_contrast_ppm`` (0.01 ppm). Coverage = positive sectors / sectors
   holding band voxels (slices with fewer than ``min_sector_fraction`` of the sectors
   populated get 0).
4. **Call** (NAIMS-style): PRL if coverage >= ``coverage_min`` (2/3) on at least
   ``min_slices`` (2) consecutive slices **and** the rim-minus-core contrast is positive.
5. **Score**: the margin ``run_coverage / coverage_min - 1 + rim_minus_nawm_ppm /
   contrast_scale_ppm``, where ``run_coverage`` is the best coverage held over ``min_slices``
   consecutive slices and ``rim_minus_nawm_ppm`` the mean sector rim value. Its sign is
   forced to the call by a monotone map, ``softplus(evidence)`` for a PRL call and
   ``-softplus(-evidence)`` otherwise, so lesions keep their order by evidence within each
   call (a clip to 0 would tie every non-called lesion with some evidence at one score and
   cost ROC AUC).
   ``predict_proba`` is ``sigmoid(margin / temperature)``. (On the simulator this additive
   score ranks lesions better than the coverage alone: ROC AUC 0.67 vs 0.54 on reconstructed
   QSM, see docs/rimnet.md.)

The estimator follows scikit-learn conventions: the constructor only stores parameters,
``fit`` validates ``X`` and sets ``classes_ = [0, 1]`` (optionally tuning ``threshold_`` on the
margin to maximise Youden's J when ``tune_threshold=True``), and returns ``self``.
``X`` may be an array of patches (N, C, P, P, P) or its flattened form (N, C*P**3) together
with ``patch_shape=(C, P, P, P)``.

Speed: the estimator scores lesions with :func:`rim_features_batch`, which gives exactly
what :func:`rim_features` (the readable one-lesion reference) gives, for chunks of lesions
at a time, on worker threads, with the distance tests decided on integer squared distances
wherever that is proven to reproduce the float32 ones (:func:`_integer_cutoffs`).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.base import BaseEstimator, ClassifierMixin

from qsm_core.errors import InputError
from rimnet.patches import DEFAULT_CHANNELS, QSM_SCALE, _median, map_threads, worker_threads

__all__ = ["RuleBasedRimDetector", "rim_features", "rim_features_batch", "truncated_edt",
           "FEATURE_NAMES"]

FEATURE_NAMES = ("run_coverage", "max_coverage", "rim_minus_core_ppm", "rim_minus_nawm_ppm",
                 "nawm_ppm", "n_slices", "n_vein_voxels", "rule_call", "margin")

_STRUCT26 = np.ones((3, 3, 3), bool)


def truncated_edt(mask: np.ndarray, *, spacing_mm: float, max_mm: float) -> np.ndarray:
    """Euclidean distance (mm) to the nearest ``True`` voxel, exact up to ``max_mm``.

    Separable min-plus passes along each axis with offsets of at most ``max_mm``; distances
    beyond ``max_mm`` are >= ``max_mm`` (possibly ``inf``). Faster than a full EDT when only
    short distances matter.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    spacing_mm : float
        Isotropic grid spacing.
    max_mm : float

    Returns
    -------
    ndarray of float32, shape (X, Y, Z)
    """
    d2 = np.where(mask, np.float32(0), np.float32(np.inf))
    t_max = int(np.floor(max_mm / spacing_mm))
    for axis in range(d2.ndim):
        src = np.moveaxis(d2, axis, 0)
        out = src.copy()
        for t in range(1, min(t_max, src.shape[0] - 1) + 1):
            w = np.float32((t * spacing_mm) ** 2)
            np.minimum(out[t:], src[:-t] + w, out=out[t:])
            np.minimum(out[:-t], src[t:] + w, out=out[:-t])
        d2 = np.moveaxis(out, 0, axis)
    return np.sqrt(d2)


def _dilate_cube(mask: np.ndarray, *, first_axis: int = 0) -> np.ndarray:
    """Binary dilation by the 3x3x3 cube (26-neighbourhood), separably along each axis.

    The last three axes are dilated; ``first_axis=1`` treats axis 0 as a stack of masks.
    """
    out = mask.copy()
    for axis in range(first_axis, mask.ndim):
        src = out.copy()
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(lo)] |= src[tuple(hi)]
        out[tuple(hi)] |= src[tuple(lo)]
    return out


def _sq_dist_vox(mask: np.ndarray, t_max: int, big: int, dtype) -> np.ndarray:
    """Squared distance, in voxels, to the nearest ``True`` voxel, as integers.

    The integer twin of :func:`truncated_edt`: the same separable min-plus passes over the
    same candidates (offsets of at most ``t_max`` voxels along each axis), ``big`` where
    there is none.
    """
    return _min_plus_passes(np.where(mask, dtype(0), dtype(big)), range(mask.ndim), t_max,
                            dtype)


def _min_plus_passes(d2: np.ndarray, axes, t_max: int, dtype) -> np.ndarray:
    """Separable min-plus passes (squared offsets up to ``t_max``) along ``axes``."""
    for axis in axes:
        # the pass axis first in memory: every slice below is a run of whole planes
        src = np.ascontiguousarray(np.moveaxis(d2, axis, 0))
        out = src.copy()
        tmp = np.empty_like(src)
        for t in range(1, min(t_max, src.shape[0] - 1) + 1):
            w = dtype(t * t)
            np.add(src[:-t], w, out=tmp[:-t])
            np.minimum(out[t:], tmp[:-t], out=out[t:])
            np.add(src[t:], w, out=tmp[t:])
            np.minimum(out[:-t], tmp[t:], out=out[:-t])
        d2 = np.moveaxis(out, 0, axis)
    return d2


@functools.lru_cache(maxsize=64)
def _integer_cutoffs(spacing_mm: float, t_max: int, tests: tuple) -> tuple | None:
    """Integer squared-distance cutoffs equivalent to threshold tests on truncated_edt.

    ``tests`` holds ``(op, threshold_mm)`` pairs, ``op`` in ``"le"``/``"gt"``. For every
    candidate offset ``(a, b, c)`` (each at most ``t_max``), the distance
    :func:`truncated_edt` reports is ``sqrt(float32((w_a + w_b) + w_c))`` with
    ``w_t = float32((t * spacing_mm) ** 2)``; a test on it is decided by the squared voxel
    distance ``n = a^2 + b^2 + c^2`` alone when every offset with the same ``n`` gives the
    same answer and the float32 distances of different ``n`` keep their order. Returns, per
    test, the largest ``n`` passing a ``le`` test / the largest failing a ``gt`` test (-1:
    none), or None when some test is not decided by ``n`` (the float32 path is then used).
    """
    t = np.arange(t_max + 1)
    w = np.array([np.float32((int(k) * spacing_mm) ** 2) for k in t], np.float32)
    a, b, c = np.meshgrid(t, t, t, indexing="ij")
    n = (a * a + b * b + c * c).ravel()
    d = np.sqrt((w[a] + w[b]) + w[c]).ravel().astype(np.float32)
    order = np.argsort(n, kind="stable")
    n, d = n[order], d[order]
    uniq, first = np.unique(n, return_index=True)
    last = np.r_[first[1:], n.size] - 1
    lo, hi = d[first], d[last]
    for k in range(uniq.size):  # same-n values: min..max
        lo[k], hi[k] = d[first[k]:last[k] + 1].min(), d[first[k]:last[k] + 1].max()
    if np.any(hi[:-1] >= lo[1:]):
        return None
    out = []
    for op, thr in tests:
        lo_pass = (lo <= thr) if op == "le" else (lo > thr)
        hi_pass = (hi <= thr) if op == "le" else (hi > thr)
        if np.any(lo_pass != hi_pass):
            return None
        # both tests are monotone in n: "le" passes up to a cutoff, "gt" fails up to one
        keep = lo_pass if op == "le" else ~lo_pass
        cut = int(uniq[keep].max()) if keep.any() else -1
        if not np.array_equal(keep, uniq <= cut):
            return None
        out.append(cut)
    return tuple(out)


_FAST_DISTANCES = True
"""Decide the distance tests of :func:`rim_features` on integer squared distances when
:func:`_integer_cutoffs` shows it gives the float32 answers (False: always float32)."""


def _bounds(mask: np.ndarray) -> list[tuple[int, int]]:
    """First and last index of the ``True`` voxels along each axis (mask not empty)."""
    out = []
    for a in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
        out.append((int(idx[0]), int(idx[-1])))
    return out


def _distance_regions(les: np.ndarray, *, spacing_mm: float, reach_mm: float,
                      depth_mm: float, inner_mm: float, outer_mm: float,
                      nawm_inner_mm: float, nawm_outer_mm: float, rim_outer_mm: float,
                      vein_mm: float) -> tuple[np.ndarray, ...]:
    """The distance tests of :func:`rim_features` on a cropped lesion mask.

    With ``d_out`` = :func:`truncated_edt` of ``les`` up to ``reach_mm`` and ``d_in`` that of
    ``~les`` up to ``depth_mm``, returns the boolean maps ``les & (d_in <= inner_mm)``,
    ``d_out <= outer_mm``, ``(d_out > nawm_inner_mm) & (d_out <= nawm_outer_mm)``,
    ``d_out > rim_outer_mm`` and ``d_out > vein_mm``. Computed exactly so, or -- the same
    maps, faster -- from integer squared distances (``d_in`` on the lesion's bounding box
    plus one voxel, which holds the nearest non-lesion voxel of every lesion voxel).
    """
    t_in = int(np.floor(depth_mm / spacing_mm))
    # Every test compares with a threshold <= t_out voxels: a distance within it has all its
    # offsets within it, one beyond it stays beyond it with fewer candidates. So fewer
    # offsets than the float32 path's reach_mm give the same maps.
    t_out = int(np.floor(max(outer_mm, nawm_inner_mm, nawm_outer_mm, rim_outer_mm, vein_mm)
                         / spacing_mm))
    cut_out, cut_in = _band_cutoffs(spacing_mm, t_out=t_out, t_in=t_in, reach_mm=reach_mm,
                                    inner_mm=inner_mm, outer_mm=outer_mm,
                                    nawm_inner_mm=nawm_inner_mm, nawm_outer_mm=nawm_outer_mm,
                                    rim_outer_mm=rim_outer_mm, vein_mm=vein_mm)
    if cut_out is None or cut_in is None:
        d_out = truncated_edt(les, spacing_mm=spacing_mm, max_mm=reach_mm)
        d_in = truncated_edt(~les, spacing_mm=spacing_mm, max_mm=depth_mm)
        return (les & (d_in <= inner_mm), d_out <= outer_mm,
                (d_out > nawm_inner_mm) & (d_out <= nawm_outer_mm), d_out > rim_outer_mm,
                d_out > vein_mm)
    n_out = _sq_dist_vox(les, t_out, *_int_kind(t_out))
    c_le, c_nawm_in, c_nawm_out, c_rim, c_vein = cut_out
    crop = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in _bounds(les))
    les_c = les[crop]
    n_in = _sq_dist_vox(~les_c, t_in, *_int_kind(t_in))
    inner = np.zeros_like(les)
    inner[crop] = les_c & (n_in <= cut_in[0])
    return (inner, n_out <= c_le, (n_out > c_nawm_in) & (n_out <= c_nawm_out), n_out > c_rim,
            n_out > c_vein)


def _int_kind(t_max: int) -> tuple[int, type]:
    """Sentinel and dtype for :func:`_sq_dist_vox` with offsets up to ``t_max``."""
    if 3 * t_max * t_max < 200 and 200 + t_max * t_max <= 255:
        return 200, np.uint8
    return 4 * t_max * t_max + 1, np.int32


def _empty_features() -> dict:
    return {"run_coverage": 0.0, "max_coverage": 0.0, "rim_minus_core_ppm": 0.0,
            "rim_minus_nawm_ppm": 0.0, "nawm_ppm": 0.0, "n_slices": 0, "n_vein_voxels": 0,
            "rule_call": 0, "margin": -1.0}


def rim_features(chi_ppm: np.ndarray, lesion: np.ndarray, others: np.ndarray | None = None, *,
                 spacing_mm: float = 1.0, rim_inner_mm: float = 2.0, rim_outer_mm: float = 1.0,
                 nawm_inner_mm: float = 3.0, nawm_outer_mm: float = 6.0, n_sectors: int = 12,
                 rim_contrast_ppm: float = 0.01, coverage_min: float = 2 / 3,
                 min_slices: int = 2, min_sector_fraction: float = 0.5,
                 vein_min_ppm: float = 0.10, vein_reach_mm: float = 3.0,
                 contrast_scale_ppm: float = 0.02, slice_axis: int = 2) -> dict:
    """Rim features of one lesion patch (see the module docstring for the rules).

    Parameters
    ----------
    chi_ppm : ndarray, shape (P, P, P)
        Susceptibility (ppm) on an isotropic grid of ``spacing_mm``.
    lesion : ndarray, shape (P, P, P)
        The lesion's mask (> 0.5 inside).
    others : ndarray, shape (P, P, P), optional
        Other lesions' mask (> 0.5 inside), left out of every region.
    spacing_mm : float
        Grid spacing (mm).

    Returns
    -------
    dict
        ``run_coverage``, ``max_coverage`` (fractions), ``rim_minus_core_ppm``,
        ``rim_minus_nawm_ppm``, ``nawm_ppm``, ``n_slices`` (slices through the lesion),
        ``n_vein_voxels``, ``rule_call`` (0/1) and ``margin`` (the score; >= 0 iff the call).
    """
    les = np.asarray(lesion) > 0.5
    if not les.any():
        return _empty_features()
    oth = (np.asarray(others) > 0.5) if others is not None else np.zeros_like(les)
    # Crop to the lesion's bounding box plus the NAWM ring.
    pad = int(np.ceil(max(nawm_outer_mm, vein_reach_mm + rim_outer_mm) / spacing_mm)) + 2
    box = tuple(slice(max(lo - pad, 0), min(hi + pad + 1, les.shape[a]))
                for a, (lo, hi) in enumerate(_bounds(les)))
    les, oth = les[box], oth[box] & ~les[box]
    chi = np.asarray(chi_ppm, dtype=np.float32)[box]
    if slice_axis != 2:
        les, oth, chi = (np.moveaxis(a, slice_axis, 2) for a in (les, oth, chi))

    # bands are at least one voxel thick, whatever the patch spacing
    in_d, out_d, ring_d, beyond_d, far_d = _distance_regions(
        les, spacing_mm=spacing_mm,
        reach_mm=max(nawm_outer_mm, rim_outer_mm + vein_reach_mm) + spacing_mm,
        depth_mm=rim_inner_mm + spacing_mm, inner_mm=max(rim_inner_mm, spacing_mm * 1.001),
        outer_mm=max(rim_outer_mm, spacing_mm * 1.001), nawm_inner_mm=nawm_inner_mm,
        nawm_outer_mm=nawm_outer_mm, rim_outer_mm=rim_outer_mm,
        vein_mm=rim_outer_mm + vein_reach_mm)
    free = ~oth
    outside = ~les & free
    inner = in_d & free
    outer = outside & out_d
    band = inner | outer
    core = les & ~inner & ~oth
    ring = outside & ring_d
    if not ring.any():
        ring = outside & beyond_d
    nawm = float(_median(chi[ring])) if ring.any() else 0.0
    con = chi - nawm

    # Vein suppression: bright connected structures reaching far beyond the lesion.
    bright = con > vein_min_ppm
    vein = np.zeros_like(les)
    if bright.any():
        comp, n = ndimage.label(bright, structure=_STRUCT26)
        if n:
            # components reaching further than rim_outer_mm + vein_reach_mm from the lesion
            veins = np.flatnonzero(np.bincount(comp[far_d], minlength=n + 1)[1:]) + 1
            if veins.size:
                vein = _dilate_cube(np.isin(comp, veins))
    n_vein = int(np.count_nonzero(vein & (band | core)))
    core_ok = core & ~vein
    # Core reference (contrast to NAWM); lesions too small for a core are compared with NAWM.
    core_ref = float(_median(con[core_ok])) if core_ok.any() else 0.0
    ref = max(core_ref, 0.0)

    # Angular sectors per slice; a sector's rim value is the larger of the mean contrasts of
    # its inner (lesion edge) and outer (just outside) band voxels.
    nk = les.shape[2]
    nbin = nk * n_sectors
    counts_l = les.sum(axis=(0, 1))
    ii, jj = np.indices(les.shape[:2], dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = (les * ii[..., None]).sum(axis=(0, 1)) / counts_l
        cj = (les * jj[..., None]).sum(axis=(0, 1)) / counts_l
    bi, bj, bk = np.nonzero(band)
    on_lesion_slice = counts_l[bk] > 0
    bi, bj, bk = bi[on_lesion_slice], bj[on_lesion_slice], bk[on_lesion_slice]
    ang = np.arctan2(bj - cj[bk], bi - ci[bk])
    sec = np.minimum(((ang + np.pi) / (2 * np.pi) * n_sectors).astype(int), n_sectors - 1)
    key = bk * n_sectors + sec
    usable = ~vein[bi, bj, bk]
    is_in = les[bi, bj, bk]
    vals = con[bi, bj, bk]
    tot = np.bincount(key, minlength=nbin).reshape(nk, n_sectors)
    rim_val = np.full((nk, n_sectors), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for part in (usable & is_in, usable & ~is_in):
            cnt = np.bincount(key[part], minlength=nbin).reshape(nk, n_sectors)
            sm = np.bincount(key[part], weights=vals[part], minlength=nbin).reshape(nk,
                                                                                  n_sectors)
            rim_val = np.fmax(rim_val, sm / cnt)
    has = ~np.isnan(rim_val)
    positive = has & (np.where(has, rim_val, -np.inf) - ref > rim_contrast_ppm)
    available = (tot > 0).sum(axis=1)
    cov = np.where(available >= min_sector_fraction * n_sectors,
                   positive.sum(axis=1) / np.maximum(available, 1), 0.0)
    cov = cov[counts_l > 0]
    w = int(min_slices)
    if cov.size >= w:  # best coverage held over w consecutive slices
        run = cov[:cov.size - w + 1].copy()
        for k in range(1, w):
            np.minimum(run, cov[k:k + run.size], out=run)
        run_cov = float(run.max())
    else:
        run_cov = 0.0
    rim_mean = float(rim_val[has].mean()) if has.any() else 0.0
    rim_minus_core = rim_mean - core_ref

    call = bool(run_cov >= coverage_min - 1e-9 and rim_minus_core > 0)
    # Score: coverage evidence plus rim contrast to NAWM, its sign forced to the call.
    evidence = run_cov / coverage_min - 1.0 + rim_mean / contrast_scale_ppm
    ev = float(evidence)
    margin = float(np.logaddexp(0.0, ev)) if call else -float(np.logaddexp(0.0, -ev))
    return {"run_coverage": run_cov, "max_coverage": float(cov.max()) if cov.size else 0.0,
            "rim_minus_core_ppm": rim_minus_core, "rim_minus_nawm_ppm": rim_mean,
            "nawm_ppm": nawm, "n_slices": int(cov.size), "n_vein_voxels": n_vein,
            "rule_call": int(call), "margin": margin}


def _band_cutoffs(spacing_mm, *, t_out, t_in, reach_mm, inner_mm, outer_mm, nawm_inner_mm,
                  nawm_outer_mm, rim_outer_mm, vein_mm):
    """Integer squared-distance cut-offs of the band tests, or ``(None, None)``.

    ``(None, None)`` when the fast integer path is off or cannot reproduce the float32
    comparisons (see :func:`_integer_cutoffs`); the callers then use float distances.
    """
    if not (_FAST_DISTANCES and t_out * spacing_mm <= reach_mm):
        return None, None
    cut_out = _integer_cutoffs(float(spacing_mm), t_out, (
        ("le", float(outer_mm)), ("gt", float(nawm_inner_mm)), ("le", float(nawm_outer_mm)),
        ("gt", float(rim_outer_mm)), ("gt", float(vein_mm))))
    cut_in = _integer_cutoffs(float(spacing_mm), t_in, (("le", float(inner_mm)),))
    return cut_out, cut_in


_RULE_DEFAULTS = {k: v.default for k, v in inspect.signature(rim_features).parameters.items()
                  if v.kind is inspect.Parameter.KEYWORD_ONLY}
"""The keyword options of :func:`rim_features` and their defaults (the one place they live)."""


def _rule_params(params: dict) -> dict:
    """Every keyword option of :func:`rim_features`: ``params`` over its defaults.

    Raises
    ------
    TypeError
        An option :func:`rim_features` does not have (as a call with it would).
    """
    unknown = sorted(set(params) - set(_RULE_DEFAULTS))
    if unknown:
        raise TypeError(f"rim_features() got unexpected keyword argument(s) {unknown}")
    return {**_RULE_DEFAULTS, **params}


def _band_params(p: dict) -> dict:
    """The options of :func:`_integer_bands` from a :func:`_rule_params` dict."""
    return {k: p[k] for k in ("rim_inner_mm", "rim_outer_mm", "nawm_inner_mm", "nawm_outer_mm",
                              "vein_reach_mm")}


def _box_pad(p: dict) -> int:
    """Voxels around a lesion's bounding box that its NAWM ring and vein reach can touch."""
    return int(np.ceil(max(p["nawm_outer_mm"], p["vein_reach_mm"] + p["rim_outer_mm"])
                       / p["spacing_mm"])) + 2


def _integer_bands(spacing_mm, *, rim_inner_mm, rim_outer_mm, nawm_inner_mm, nawm_outer_mm,
                   vein_reach_mm):
    """Voxel reaches and integer cut-offs of the band tests of the batched paths.

    Returns ``(t_out, t_in, cut_out, cut_in)``: the outer and inner reach in voxels and the
    :func:`_band_cutoffs` of the bands :func:`rim_features` uses (each at least one voxel
    thick, whatever the patch spacing); the cut-offs are None where the integer tests do
    not reproduce the float32 ones.
    """
    inner_mm = max(rim_inner_mm, spacing_mm * 1.001)
    outer_mm = max(rim_outer_mm, spacing_mm * 1.001)
    vein_mm = rim_outer_mm + vein_reach_mm
    t_in = int(np.floor((rim_inner_mm + spacing_mm) / spacing_mm))
    t_out = int(np.floor(max(outer_mm, nawm_inner_mm, nawm_outer_mm, rim_outer_mm, vein_mm)
                         / spacing_mm))
    reach_mm = max(nawm_outer_mm, rim_outer_mm + vein_reach_mm) + spacing_mm
    cut_out, cut_in = _band_cutoffs(spacing_mm, t_out=t_out, t_in=t_in, reach_mm=reach_mm,
                                    inner_mm=inner_mm, outer_mm=outer_mm,
                                    nawm_inner_mm=nawm_inner_mm, nawm_outer_mm=nawm_outer_mm,
                                    rim_outer_mm=rim_outer_mm, vein_mm=vein_mm)
    return t_out, t_in, cut_out, cut_in


def _sq_dist_vox_batch(mask: np.ndarray, t_max: int, big: int, dtype) -> np.ndarray:
    """:func:`_sq_dist_vox` of each mask of a stack, shape (N, X, Y, Z)."""
    return _min_plus_passes(np.where(mask, dtype(0), dtype(big)), (1, 2, 3), t_max, dtype)


def _dilate_cube_batch(mask: np.ndarray) -> np.ndarray:
    """:func:`_dilate_cube` of each mask of a stack, shape (N, X, Y, Z)."""
    return _dilate_cube(mask, first_axis=1)


_BATCH = 8
"""Lesions per chunk in :func:`rim_features_batch`."""


def rim_features_batch(chi_ppm: np.ndarray, lesion: np.ndarray,
                       others: np.ndarray | None = None, **params) -> list[dict]:
    """:func:`rim_features` of a stack of patches, computed together, with identical results.

    Parameters
    ----------
    chi_ppm, lesion, others : ndarray, shape (N, P, P, P)
        As for :func:`rim_features`, one patch per row (``others`` optional).
    **params
        The keyword options of :func:`rim_features`.

    Returns
    -------
    list of dict
        One :func:`rim_features` dict per patch, equal to it bit for bit.

    Notes
    -----
    Each patch is processed on the whole patch instead of its cropped box, with the box
    applied where it matters (vein components, the fallback NAWM ring, box-relative slice
    centroids), and the distance tests taken from integer squared distances: the same
    numbers in a few dozen array operations per chunk instead of a few hundred per lesion.
    When the integer tests are not proven equal (:func:`_integer_cutoffs`), the lesions go
    through :func:`rim_features` one by one.
    """
    chi_ppm, lesion = np.asarray(chi_ppm), np.asarray(lesion)
    others = None if others is None else np.asarray(others)
    n = len(chi_ppm)
    params = _rule_params(params)
    if _COMPILED and n:
        fast = _rim_features_compiled(chi_ppm, lesion, others, params)
        if fast is not None:
            return fast
    # chunks of lesions of similar size share a box size close to their own
    order = np.argsort((lesion > 0.5).reshape(n, -1).sum(axis=1), kind="stable")
    chunks = [order[s:s + _BATCH] for s in range(0, n, _BATCH)]
    feats = map_threads(lambda rows: _rim_features_chunk(
        chi_ppm[rows], lesion[rows], None if others is None else others[rows], params),
        chunks)
    out: list[dict] = [{}] * n
    for rows, fs in zip(chunks, feats):
        for r, f in zip(rows, fs):
            out[r] = f
    return out


_COMPILED = True
"""Score with the compiled kernel (:func:`rimnet._kernels.rule_features`) where it applies
(integer distance tests proven, slice axis 2); False: the numpy chunks below."""


def _rim_features_compiled(chi_ppm, lesion, others, p: dict, *,
                           qsm_scale: float = 1.0) -> list[dict] | None:
    """:func:`rim_features_batch` by the compiled kernel, or None where it does not apply.

    ``chi_ppm`` may instead be susceptibility times ``qsm_scale`` (float32), which the kernel
    divides by ``np.float32(qsm_scale)`` as numpy would.

    The kernel runs the steps of :func:`rim_features` lesion by lesion with the same
    float32/float64 operations in the same order (integer distance tests, exact medians,
    sector sums in voxel order, numpy's pairwise mean), so the features are the same bits.
    """
    if p["slice_axis"] != 2 or chi_ppm.ndim != 4 or chi_ppm.shape[1:] != lesion.shape[1:]:
        return None
    t_out, t_in, cut_out, cut_in = _integer_bands(p["spacing_mm"], **_band_params(p))
    if cut_out is None or cut_in is None:
        return None
    from rimnet import _kernels

    _kernels.set_threads(worker_threads())
    res = _kernels.rule_features(
        chi_ppm, lesion, others, pad=_box_pad(p), t_out=t_out, t_in=t_in,
        cuts=(*cut_out, cut_in[0]), n_sectors=int(p["n_sectors"]),
        rim_contrast_ppm=p["rim_contrast_ppm"], coverage_min=p["coverage_min"],
        min_slices=int(p["min_slices"]), min_sector_fraction=p["min_sector_fraction"],
        vein_min_ppm=p["vein_min_ppm"], qsm_scale=qsm_scale)
    coverage_min, contrast_scale_ppm = p["coverage_min"], p["contrast_scale_ppm"]
    out = []
    for run_cov, max_cov, rim_mean, core_ref, nawm, n_sl, n_vein, call in res:
        if n_sl < 0:
            out.append(_empty_features())
            continue
        call = bool(call)
        ev = float(run_cov / coverage_min - 1.0 + rim_mean / contrast_scale_ppm)
        margin = float(np.logaddexp(0.0, ev)) if call else -float(np.logaddexp(0.0, -ev))
        out.append({"run_coverage": float(run_cov), "max_coverage": float(max_cov),
                    "rim_minus_core_ppm": float(rim_mean) - float(core_ref),
                    "rim_minus_nawm_ppm": float(rim_mean), "nawm_ppm": float(nawm),
                    "n_slices": int(n_sl), "n_vein_voxels": int(n_vein),
                    "rule_call": int(call), "margin": margin})
    return out


def _rim_features_chunk(chi_ppm, lesion, others, p: dict) -> list[dict]:
    """:func:`rim_features` of a chunk of patches together (:func:`rim_features_batch`).

    ``p`` holds every option of :func:`rim_features` (:func:`_rule_params`).
    """
    spacing_mm, slice_axis, n_sectors = p["spacing_mm"], p["slice_axis"], p["n_sectors"]
    rim_contrast_ppm, coverage_min = p["rim_contrast_ppm"], p["coverage_min"]
    min_slices, min_sector_fraction = p["min_slices"], p["min_sector_fraction"]
    vein_min_ppm, contrast_scale_ppm = p["vein_min_ppm"], p["contrast_scale_ppm"]
    t_out, t_in, cut_out, cut_in = _integer_bands(spacing_mm, **_band_params(p))
    if cut_out is None or cut_in is None:
        return [rim_features(c, le, None if others is None else o, **p)
                for c, le, o in zip(chi_ppm, lesion, others if others is not None
                                    else [None] * len(chi_ppm))]

    les_all = lesion > 0.5
    nonempty = les_all.reshape(len(les_all), -1).any(axis=1)
    results: list[dict | None] = [None] * len(les_all)
    for i in np.flatnonzero(~nonempty):
        results[i] = _empty_features()
    rows = np.flatnonzero(nonempty)
    if rows.size == 0:
        return results
    # each lesion's box (its bounding box plus the NAWM ring), as rim_features crops it;
    # the chunk is cut to one common box size around them, `inbox` marking each one's own
    les_rows = les_all[rows]
    m, shape = len(rows), les_rows.shape[1:]
    pad = _box_pad(p)
    lo = np.zeros((m, 3), int)
    hi = np.zeros((m, 3), int)
    p01 = les_rows.any(axis=3)
    profiles = (p01.any(axis=2), p01.any(axis=1), les_rows.any(axis=1).any(axis=1))
    for a, prof in enumerate(profiles):  # prof: (m, shape[a])
        first = np.argmax(prof, axis=1)
        last = shape[a] - 1 - np.argmax(prof[:, ::-1], axis=1)
        lo[:, a] = np.maximum(first - pad, 0)
        hi[:, a] = np.minimum(last + pad + 1, shape[a])
    size = (hi - lo).max(axis=0)
    org = np.minimum(lo, np.asarray(shape) - size)  # where each lesion's common box starts
    cut = [tuple(slice(o, o + b) for o, b in zip(org[k], size)) for k in range(m)]
    les = np.stack([les_rows[k][cut[k]] for k in range(m)])
    oth = (np.stack([others[r][cut[k]] for k, r in enumerate(rows)]) > 0.5
           if others is not None else np.zeros_like(les))
    oth &= ~les
    chi = np.stack([np.asarray(chi_ppm[r][cut[k]], dtype=np.float32)
                    for k, r in enumerate(rows)])
    inbox = np.ones_like(les)
    for a in range(3):
        idx = np.arange(size[a])[None, :] + org[:, a, None]
        sel = (idx >= lo[:, a, None]) & (idx < hi[:, a, None])
        view = [m, 1, 1, 1]
        view[a + 1] = size[a]
        inbox &= sel.reshape(view)
    lo = lo - org  # box starts in the common boxes' coordinates
    if slice_axis != 2:
        les, oth, chi, inbox = (np.moveaxis(x, slice_axis + 1, 3) for x in (les, oth, chi, inbox))
        order = [a for a in range(3) if a != slice_axis] + [slice_axis]
        lo = lo[:, order]

    # distance tests (see _distance_regions; lesion voxels all lie inside their box).
    # Lesion bounding boxes, united over the chunk, per axis:
    spans = []
    for a in (1, 2, 3):
        idx = np.flatnonzero(les.any(axis=tuple(b for b in (0, 1, 2, 3) if b != a)))
        spans.append((int(idx[0]), int(idx[-1])))
    # d_out: a voxel more than t_out voxels from every bounding box along some axis has no
    # candidate within t_out: its value is the sentinel there as on the whole box
    big, kind = _int_kind(t_out)
    crop = (slice(None),) + tuple(slice(max(f - t_out, 0), e + t_out + 1) for f, e in spans)
    n_out = np.full(les.shape, big, kind)
    n_out[crop] = _sq_dist_vox_batch(les[crop], t_out, big, kind)
    # d_in only on the bounding boxes plus one voxel, which hold the nearest non-lesion
    # voxel of every lesion voxel (as in _distance_regions)
    crop = (slice(None),) + tuple(slice(max(f - 1, 0), e + 2) for f, e in spans)
    n_in = _sq_dist_vox_batch(~les[crop], t_in, *_int_kind(t_in))
    c_le, c_nawm_in, c_nawm_out, c_rim, c_vein = cut_out
    free = ~oth
    outside = ~les & free & inbox
    inner = np.zeros_like(les)
    inner[crop] = les[crop] & (n_in <= cut_in[0]) & free[crop]
    outer = outside & (n_out <= c_le)
    band = inner | outer
    core = les & ~inner
    ring = outside & (n_out > c_nawm_in) & (n_out <= c_nawm_out)
    no_ring = ~ring.reshape(m, -1).any(axis=1)
    if no_ring.any():
        ring[no_ring] = outside[no_ring] & (n_out[no_ring] > c_rim)
    nawm = np.array([float(_median(chi[k][ring[k]])) if ring[k].any() else 0.0
                     for k in range(m)])
    con = chi - nawm.astype(np.float32)[:, None, None, None]

    # vein suppression, components labelled within each box
    bright = (con > vein_min_ppm) & inbox
    vein = np.zeros_like(les)
    for k in np.flatnonzero(bright.reshape(m, -1).any(axis=1)):
        comp, nc = ndimage.label(bright[k], structure=_STRUCT26)
        veins = np.flatnonzero(np.bincount(comp[(n_out[k] > c_vein) & bright[k]],
                                           minlength=nc + 1)[1:]) + 1
        if veins.size:
            vein[k] = np.isin(comp, veins)
    if vein.any():
        vein = _dilate_cube_batch(vein)
    n_vein = (vein & (band | core)).reshape(m, -1).sum(axis=1)
    core_ok = core & ~vein
    core_ref = np.array([float(_median(con[k][core_ok[k]])) if core_ok[k].any() else 0.0
                         for k in range(m)])
    ref = np.maximum(core_ref, 0.0)

    # angular sectors per slice, with box-relative centroids as in rim_features
    nk = les.shape[3]
    counts_l = les.sum(axis=(1, 2))  # (m, nk)
    ii = np.arange(les.shape[1])
    jj = np.arange(les.shape[2])
    si = (les.sum(axis=2) * ii[None, :, None]).sum(axis=1) - lo[:, 0, None] * counts_l
    sj = (les.sum(axis=1) * jj[None, :, None]).sum(axis=1) - lo[:, 1, None] * counts_l
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = si.astype(np.float64) / counts_l
        cj = sj.astype(np.float64) / counts_l
    bn, bi, bj, bk = np.nonzero(band)
    keep = counts_l[bn, bk] > 0
    bn, bi, bj, bk = bn[keep], bi[keep], bj[keep], bk[keep]
    ang = np.arctan2((bj - lo[bn, 1]) - cj[bn, bk], (bi - lo[bn, 0]) - ci[bn, bk])
    sec = np.minimum(((ang + np.pi) / (2 * np.pi) * n_sectors).astype(int), n_sectors - 1)
    key = (bn * nk + bk) * n_sectors + sec  # slice order is all that matters: absolute
    nbin = m * nk * n_sectors
    usable = ~vein[bn, bi, bj, bk]
    is_in = les[bn, bi, bj, bk]
    vals = con[bn, bi, bj, bk]
    tot = np.bincount(key, minlength=nbin).reshape(m, nk, n_sectors)
    rim_val = np.full((m, nk, n_sectors), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for part in (usable & is_in, usable & ~is_in):
            cnt = np.bincount(key[part], minlength=nbin).reshape(m, nk, n_sectors)
            sm = np.bincount(key[part], weights=vals[part], minlength=nbin).reshape(
                m, nk, n_sectors)
            rim_val = np.fmax(rim_val, sm / cnt)
    has = ~np.isnan(rim_val)
    positive = has & (np.where(has, rim_val, -np.inf) - ref[:, None, None]
                      > rim_contrast_ppm)
    available = (tot > 0).sum(axis=2)
    cov_all = np.where(available >= min_sector_fraction * n_sectors,
                       positive.sum(axis=2) / np.maximum(available, 1), 0.0)
    w = int(min_slices)
    for k, row in enumerate(rows):
        cov = cov_all[k][counts_l[k] > 0]
        if cov.size >= w:
            run = cov[:cov.size - w + 1].copy()
            for j in range(1, w):
                np.minimum(run, cov[j:j + run.size], out=run)
            run_cov = float(run.max())
        else:
            run_cov = 0.0
        hk = has[k]
        rim_mean = float(rim_val[k][hk].mean()) if hk.any() else 0.0
        rim_minus_core = rim_mean - float(core_ref[k])
        call = bool(run_cov >= coverage_min - 1e-9 and rim_minus_core > 0)
        ev = float(run_cov / coverage_min - 1.0 + rim_mean / contrast_scale_ppm)
        margin = float(np.logaddexp(0.0, ev)) if call else -float(np.logaddexp(0.0, -ev))
        results[row] = {
            "run_coverage": run_cov, "max_coverage": float(cov.max()) if cov.size else 0.0,
            "rim_minus_core_ppm": rim_minus_core, "rim_minus_nawm_ppm": rim_mean,
            "nawm_ppm": float(nawm[k]), "n_slices": int(cov.size),
            "n_vein_voxels": int(n_vein[k]), "rule_call": int(call), "margin": margin}
    return results


class RuleBasedRimDetector(ClassifierMixin, BaseEstimator):
    """NAIMS-inspired rule-based PRL detector with a scikit-learn interface.

    Parameters
    ----------
    channels : tuple of str
        Channel names of the patches (must include ``qsm`` and ``lesion``).
    patch_mm : float
        Physical side of the patches (mm); the grid spacing is ``patch_mm / P``.
    patch_shape : tuple of 4 ints, optional
        ``(C, P, P, P)``; needed when ``X`` is given flattened (N, C*P**3).
    rim_inner_mm, rim_outer_mm : float
        Rim band: lesion voxels within ``rim_inner_mm`` of its edge and outside voxels within
        ``rim_outer_mm`` (2 and 1 mm).
    nawm_inner_mm, nawm_outer_mm : float
        Normal-appearing white-matter reference ring (3-6 mm outside the edge).
    n_sectors : int
        Angular sectors per slice (12, i.e. 30 degrees).
    rim_contrast_ppm : float
        Sector rim value above ``max(core, NAWM)`` that makes a sector positive (0.01 ppm).
    coverage_min : float
        Coverage needed per slice (2/3).
    min_slices : int
        Consecutive slices needing that coverage (2).
    min_sector_fraction : float
        A slice counts only if at least this fraction of its sectors holds band voxels.
    vein_min_ppm, vein_reach_mm : float
        Vein suppression: structures brighter than 0.10 ppm above NAWM that reach more than
        3 mm beyond the rim band are masked.
    contrast_scale_ppm : float
        Scale of the contrast term of the margin (0.02 ppm).
    temperature : float
        ``predict_proba = sigmoid((margin - threshold_) / temperature)``.
    slice_axis : int
        Patch axis across slices (2).
    tune_threshold : bool
        If True, ``fit`` chooses ``threshold_`` on the margin maximising Youden's J; else
        ``threshold_ = 0`` and the call is exactly the NAIMS-style rule.
    """

    def __init__(self, *, channels=DEFAULT_CHANNELS, patch_mm=32.0, patch_shape=None,
                 rim_inner_mm=2.0, rim_outer_mm=1.0, nawm_inner_mm=3.0, nawm_outer_mm=6.0,
                 n_sectors=12, rim_contrast_ppm=0.01, coverage_min=2 / 3, min_slices=2,
                 min_sector_fraction=0.5, vein_min_ppm=0.10, vein_reach_mm=3.0,
                 contrast_scale_ppm=0.02, temperature=0.1, slice_axis=2, tune_threshold=False):
        self.channels = channels
        self.patch_mm = patch_mm
        self.patch_shape = patch_shape
        self.rim_inner_mm = rim_inner_mm
        self.rim_outer_mm = rim_outer_mm
        self.nawm_inner_mm = nawm_inner_mm
        self.nawm_outer_mm = nawm_outer_mm
        self.n_sectors = n_sectors
        self.rim_contrast_ppm = rim_contrast_ppm
        self.coverage_min = coverage_min
        self.min_slices = min_slices
        self.min_sector_fraction = min_sector_fraction
        self.vein_min_ppm = vein_min_ppm
        self.vein_reach_mm = vein_reach_mm
        self.contrast_scale_ppm = contrast_scale_ppm
        self.temperature = temperature
        self.slice_axis = slice_axis
        self.tune_threshold = tune_threshold

    # -- input handling -------------------------------------------------------------------
    def _patches(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim == 2:
            if self.patch_shape is None:
                raise InputError("X is 2-D (flattened patches): set patch_shape=(C, P, P, P)")
            shape = tuple(int(s) for s in self.patch_shape)
            if X.shape[1] != int(np.prod(shape)):
                raise InputError(f"X has {X.shape[1]} features, patch_shape {shape} needs "
                                 f"{int(np.prod(shape))}")
            X = X.reshape((X.shape[0], *shape))
        if X.ndim != 5:
            raise InputError(f"X must be patches (N, C, P, P, P) or (N, C*P^3), got {X.shape}")
        chans = tuple(self.channels)
        if X.shape[1] != len(chans):
            raise InputError(f"patches have {X.shape[1]} channels but channels={chans}")
        for need in ("qsm", "lesion"):
            if need not in chans:
                raise InputError(f"the rule-based detector needs a {need!r} channel; "
                                 f"channels={chans}")
        # a sum carries NaN/Inf (one cheap pass); only a non-finite sum, which can also be
        # an overflow, needs the element-wise test
        if not np.isfinite(X.sum()) and not np.all(np.isfinite(X)):
            raise InputError("patches contain NaN/Inf")
        return X

    def _margins(self, X) -> pd.DataFrame:
        X = self._patches(X)
        chans = tuple(self.channels)
        iq, il = chans.index("qsm"), chans.index("lesion")
        io = chans.index("others") if "others" in chans else None
        spacing = float(self.patch_mm) / X.shape[-1]
        kw = {k: getattr(self, k) for k in (
            "rim_inner_mm", "rim_outer_mm", "nawm_inner_mm", "nawm_outer_mm", "n_sectors",
            "rim_contrast_ppm", "coverage_min", "min_slices", "min_sector_fraction",
            "vein_min_ppm", "vein_reach_mm", "contrast_scale_ppm", "slice_axis")}
        others = X[:, io] if io is not None else None
        rows = None
        if _COMPILED and X.dtype == np.float32 and len(X):
            # the kernel divides by QSM_SCALE itself (the same float32 division), which
            # saves a copy of the QSM channel
            rows = _rim_features_compiled(X[:, iq], X[:, il], others,
                                          _rule_params({**kw, "spacing_mm": spacing}),
                                          qsm_scale=QSM_SCALE)
        if rows is None:
            rows = rim_features_batch(X[:, iq] / QSM_SCALE, X[:, il], others,
                                      spacing_mm=spacing, **kw)
        return pd.DataFrame(rows, columns=list(FEATURE_NAMES))

    # -- estimator API --------------------------------------------------------------------
    def fit(self, X, y=None):
        """Validate ``X``; tune ``threshold_`` if asked. Returns ``self``."""
        self.classes_ = np.array([0, 1])
        X = self._patches(X)
        self.n_features_in_ = int(np.prod(X.shape[1:]))
        self.threshold_ = 0.0
        if self.tune_threshold:
            if y is None:
                raise InputError("tune_threshold=True needs labels y")
            y = np.asarray(y).astype(int).ravel()
            if len(y) != len(X) or not np.isin(y, (0, 1)).all():
                raise InputError("y must hold one 0/1 label per patch")
            if y.min() == y.max():
                raise InputError("tune_threshold=True needs both classes in y")
            m = self._margins(X)["margin"].to_numpy()
            cands = np.unique(m)
            j = [(np.mean(m[y == 1] >= t) - np.mean(m[y == 0] >= t)) for t in cands]
            self.threshold_ = float(cands[int(np.argmax(j))])
        return self

    def _check_fitted(self):
        if not hasattr(self, "threshold_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("call fit (it tunes nothing by default) before predicting")

    def explain(self, X) -> pd.DataFrame:
        """Per-lesion features behind the call (one row per patch, :data:`FEATURE_NAMES`)."""
        return self._margins(X)

    def decision_function(self, X) -> np.ndarray:
        """Margin minus ``threshold_``, shape (N,); >= 0 means a PRL call."""
        self._check_fitted()
        return self._margins(X)["margin"].to_numpy(float) - self.threshold_

    def predict_proba(self, X) -> np.ndarray:
        """Shape (N, 2): columns follow ``classes_`` = [0, 1]."""
        d = self.decision_function(X)
        p1 = 1.0 / (1.0 + np.exp(-np.clip(d / self.temperature, -50, 50)))
        return np.stack([1.0 - p1, p1], axis=1)

    def predict(self, X) -> np.ndarray:
        """0/1 calls, shape (N,)."""
        return (self.decision_function(X) >= 0).astype(int)

    def score_and_call(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Probability of a rim and the call in one pass (what the predictor writes)."""
        self._check_fitted()
        d = self._margins(X)["margin"].to_numpy(float) - self.threshold_
        p1 = 1.0 / (1.0 + np.exp(-np.clip(d / self.temperature, -50, 50)))
        return p1, (d >= 0).astype(int)
