"""Veins: planned as polylines in millimetres, rasterised with partial volume.

Kinds (susceptibility of deoxygenated blood, Y ~ 0.6: +0.3..0.45 ppm, Fan et al. MRM 2014;
radii from Duvernoy's atlas and SWI studies, Reichenbach et al. Radiology 1997):

``medullary``   deep medullary veins, 0.3-0.6 mm radius, running from the ventricle walls
                outwards through white matter (the veins of the MS "central vein sign").
``cortical``    pial veins on the brain surface, 0.6-1.3 mm radius, draining upwards.
``deep``        internal cerebral veins, vein of Galen (1-2 mm).
``sinus``       superior sagittal, straight and transverse sinuses (2.5-4 mm).

A plan is a list of :class:`Vein`; :func:`render_veins` paints it into an
:class:`~training.simulate.anatomy.Anatomy`. Lesions add their own central veins and veins
passing their edge through the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.simulate.anatomy import LABEL_IDS, TISSUES, Anatomy, base_anatomy, placement_maps

__all__ = ["Vein", "plan_veins", "render_veins", "tube_fraction", "tube_patches",
           "segment_distance_mm"]


@dataclass(frozen=True)
class Vein:
    """One vessel: a polyline (mm, head frame), a radius (mm) and a susceptibility (ppm)."""

    points_mm: np.ndarray
    radius_mm: float
    chi_ppm: float
    kind: str


def segment_distance_mm(p, a, b):
    """Distance from points ``p`` (..., 3) to the segment ``a``-``b`` (mm)."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def _to_index(affine, pts):
    d = np.diag(affine)[:3]
    return (np.asarray(pts) - affine[:3, 3]) / d


def tube_patches(shape, affine, points_mm, radius_mm):
    """Yield ``(slices, fraction)`` patches of a tube along a polyline.

    A tube thinner than a voxel keeps its cross-section area (fraction
    ``3 r^2 / h^2 (1 - d / h)`` within ``h`` of the axis, ``h`` the mean voxel size); a
    thicker one gets a one-voxel soft edge.
    """
    aff = np.asarray(affine, float)
    vox = np.abs(np.diag(aff)[:3])
    h = float(vox.mean())
    pts = np.asarray(points_mm, float)
    reach = radius_mm + h
    for a, b in zip(pts[:-1], pts[1:]):
        ia, ib = _to_index(aff, a), _to_index(aff, b)
        r_vox = reach / vox
        lo = np.maximum(np.floor(np.minimum(ia, ib) - r_vox).astype(int), 0)
        hi = np.minimum(np.ceil(np.maximum(ia, ib) + r_vox).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        axes = [aff[i, 3] + aff[i, i] * np.arange(lo[i], hi[i]) for i in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        d = segment_distance_mm(grid, a, b)
        if radius_mm < h:
            f = np.minimum(1.0, 3.0 * radius_mm**2 / h**2 * np.clip(1.0 - d / h, 0, 1))
        else:
            f = np.clip((radius_mm - d) / h + 0.5, 0.0, 1.0)
        yield tuple(slice(a_, b_) for a_, b_ in zip(lo, hi)), f.astype(np.float32)


def tube_fraction(shape, affine, points_mm, radius_mm, out=None):
    """Partial-volume fraction of a tube along a polyline, max-combined into ``out``.

    Parameters
    ----------
    shape : tuple of 3 ints
    affine : ndarray (4, 4), axis-aligned
    points_mm : ndarray (N, 3)
    radius_mm : float
    out : ndarray, optional
        float32 array of ``shape`` updated in place.

    Returns
    -------
    ndarray, float32, shape ``shape``
    """
    if out is None:
        out = np.zeros(shape, np.float32)
    for sl, f in tube_patches(shape, affine, points_mm, radius_mm):
        np.maximum(out[sl], f, out=out[sl])
    return out


def _value_at(arr, affine, p):
    idx = np.round(_to_index(affine, p)).astype(int)
    if np.any(idx < 0) or np.any(idx >= arr.shape):
        return None
    return arr[tuple(idx)]


def _medullary(base: Anatomy, rng, n: int) -> list[Vein]:
    maps = placement_maps(base.key)
    dv = maps["dist_ventricle_mm"]
    lab = base.labels
    wm = lab == LABEL_IDS["wm"]
    cand = np.argwhere(wm & (dv > 0.5) & (dv < 4.0))
    if len(cand) == 0:
        return []
    aff = base.affine
    veins = []
    for _ in range(n):
        i0 = cand[rng.integers(len(cand))]
        p = aff[:3, :3] @ i0 + aff[:3, 3]
        # initial direction: away from the ventricle (distance-map gradient)
        g = np.array([_grad(dv, i0, ax) for ax in range(3)])
        d = g / (np.linalg.norm(g) + 1e-6) + 0.2 * rng.normal(size=3)
        d /= np.linalg.norm(d)
        length = rng.uniform(12.0, 35.0)
        pts = [p.copy()]
        for _step in range(int(length / 1.5)):
            p = p + 1.5 * d
            v = _value_at(lab, aff, p)
            if v is None or v != LABEL_IDS["wm"]:
                break
            pts.append(p.copy())
            d = d + 0.12 * rng.normal(size=3)
            d /= np.linalg.norm(d)
        if len(pts) >= 4:
            veins.append(Vein(np.array(pts[::2] if len(pts) > 6 else pts),
                              float(rng.uniform(0.3, 0.6)), float(rng.uniform(0.3, 0.45)),
                              "medullary"))
    return veins


def _grad(arr, idx, ax):
    lo = idx.copy()
    hi = idx.copy()
    lo[ax] = max(lo[ax] - 1, 0)
    hi[ax] = min(hi[ax] + 1, arr.shape[ax] - 1)
    return float(arr[tuple(hi)]) - float(arr[tuple(lo)])


def _surface_points(base: Anatomy):
    from scipy.spatial import cKDTree

    key = base.key
    cache = _surface_points.__dict__.setdefault("cache", {})
    if key not in cache:
        lab = base.labels
        shell = (base.brain_mask == 0) & (lab == LABEL_IDS["csf"])
        idx = np.argwhere(shell)
        pts = idx @ base.affine[:3, :3].T + base.affine[:3, 3]
        cache[key] = (pts, cKDTree(pts))
    return cache[key]


def _snap_path(tree, pts_all, start, target, rng, length, step=2.5):
    p = start
    pts = [p]
    for _ in range(int(length / step)):
        d = target - p
        dist = np.linalg.norm(d)
        if dist < step:
            break
        d = d / dist + 0.35 * rng.normal(size=3)
        q = p + step * d / np.linalg.norm(d)
        _, j = tree.query(q)
        p = pts_all[j]
        if np.linalg.norm(p - pts[-1]) < 0.5:
            break
        pts.append(p)
    return np.array(pts)


def _cortical(base: Anatomy, rng, n: int) -> list[Vein]:
    pts_all, tree = _surface_points(base)
    if len(pts_all) == 0:
        return []
    up = pts_all[pts_all[:, 2] > np.percentile(pts_all[:, 2], 35)]
    ztop = pts_all[:, 2].max()
    veins = []
    for _ in range(n):
        s = up[rng.integers(len(up))]
        target = np.array([0.0, s[1] + rng.normal(0, 10), ztop + 5])
        path = _snap_path(tree, pts_all, s, target, rng, rng.uniform(30, 90))
        if len(path) >= 3:
            veins.append(Vein(path, float(rng.uniform(0.6, 1.3)), float(rng.uniform(0.3, 0.45)),
                              "cortical"))
    return veins


def _sinuses_and_deep(base: Anatomy, rng) -> list[Vein]:
    pts_all, tree = _surface_points(base)
    veins = []
    j = lambda: rng.normal(0, 1.0, size=3)  # noqa: E731
    # superior sagittal sinus: over the midline, along the top of the brain
    mid = pts_all[np.abs(pts_all[:, 0]) < 2.0]
    if len(mid):
        ys = np.arange(np.percentile(mid[:, 1], 5), np.percentile(mid[:, 1], 97), 6.0)
        sss = []
        for y in ys:
            sel = mid[np.abs(mid[:, 1] - y) < 3.0]
            if len(sel):
                sss.append([0.0, y, sel[:, 2].max() + 1.5])
        if len(sss) >= 2:
            veins.append(Vein(np.array(sss), float(rng.uniform(3.0, 4.0)),
                              float(rng.uniform(0.3, 0.4)), "sinus"))
    # internal cerebral veins, vein of Galen, straight sinus (MNI mm)
    for sx in (2.5, -2.5):
        veins.append(Vein(np.array([[sx, 2.0, 15.0], [sx, -15.0, 16.0], [sx * 0.6, -33.0, 13.0]])
                          + j(), float(rng.uniform(0.9, 1.3)), 0.4, "deep"))
    veins.append(Vein(np.array([[0.0, -33.0, 13.0], [0.0, -42.0, 10.0], [0.0, -48.0, 6.0]]),
                      float(rng.uniform(1.5, 2.0)), 0.4, "deep"))
    veins.append(Vein(np.array([[0.0, -48.0, 6.0], [0.0, -70.0, 4.0], [0.0, -95.0, 2.0]]),
                      float(rng.uniform(2.0, 2.8)), 0.35, "sinus"))
    # transverse sinuses: snapped to the brain surface
    if len(pts_all):
        for sx in (1.0, -1.0):
            raw = np.array([[0.0, -100.0, 2.0], [30 * sx, -97.0, -8.0], [48 * sx, -82.0, -18.0],
                            [48 * sx, -65.0, -32.0]])
            snapped = np.array([pts_all[tree.query(p)[1]] for p in raw])
            veins.append(Vein(snapped, float(rng.uniform(2.5, 3.5)), 0.35, "sinus"))
    return veins


def plan_veins(base: Anatomy, rng: np.random.Generator, *, n_medullary: int | None = None,
               n_cortical: int | None = None) -> list[Vein]:
    """Random veins of one subject (polylines in mm); cheap, no rasterisation.

    Parameters
    ----------
    base : Anatomy
        A base anatomy (:func:`~training.simulate.anatomy.base_anatomy`).
    rng : numpy Generator
    n_medullary, n_cortical : int, optional
        Numbers of deep medullary and cortical veins (default 60 and 18, scaled down on
        coarse procedural grids).
    """
    base = base_anatomy(*base.key) if base.key else base
    scale = 1.0 if base.source == "mni" else 0.4
    n_med = int(round(60 * scale)) if n_medullary is None else n_medullary
    n_cort = int(round(18 * scale)) if n_cortical is None else n_cortical
    return _medullary(base, rng, n_med) + _cortical(base, rng, n_cort) + \
        _sinuses_and_deep(base, rng)


def render_veins(anat: Anatomy, veins: list[Vein]) -> None:
    """Paint veins into ``anat`` in place (chi, R2*, PD, FLAIR, labels, vein_fraction).

    Veins never replace air (small veins not skull either); a voxel becomes label ``vein``
    (or ``venous_sinus``) where its venous fraction is at least one half.
    """
    if not veins:
        return
    shape = anat.shape
    air = np.isin(anat.labels, [LABEL_IDS["air"], LABEL_IDS["air_cavity"]])
    skull = anat.labels == LABEL_IDS["skull"]
    for kind in ("sinus", "other"):
        # dural sinuses lie between brain and skull: they may replace bone, never air
        protect = air if kind == "sinus" else (air | skull)
        sel = [v for v in veins if (v.kind == "sinus") == (kind == "sinus")]
        if not sel:
            continue
        # chi varies per vein: accumulate fraction-weighted chi per group
        frac = np.zeros(shape, np.float32)
        chi_acc = np.zeros(shape, np.float32)
        for v in sel:
            for sl, f in tube_patches(shape, anat.affine, v.points_mm, v.radius_mm):
                upd = f > frac[sl]
                chi_acc[sl][upd] = v.chi_ppm
                np.maximum(frac[sl], f, out=frac[sl])
        frac[protect] = 0.0
        tis = TISSUES["venous_sinus" if kind == "sinus" else "vein"]
        m = frac > 0
        f = frac[m]
        anat.chi_ppm[m] = (1 - f) * anat.chi_ppm[m] + f * chi_acc[m]
        anat.r2star_s[m] = (1 - f) * anat.r2star_s[m] + f * tis.r2star_s
        anat.pd[m] = (1 - f) * anat.pd[m] + f * tis.pd
        anat.flair[m] = (1 - f) * anat.flair[m] + f * tis.flair
        anat.t1w[m] = (1 - f) * anat.t1w[m] + f * tis.t1w
        anat.labels[frac >= 0.5] = LABEL_IDS["venous_sinus" if kind == "sinus" else "vein"]
        np.maximum(anat.vein_fraction, frac, out=anat.vein_fraction)
