"""Head anatomy for the simulator: labels, susceptibility, R2*, proton density, FLAIR.

Two sources share one coordinate frame (MNI152 millimetres, RAS+, origin near the anterior
commissure) so that every placement rule (deep grey nuclei, ventricles, infratentorial
region) works on both:

``"mni"``
    The MNI152 2009 template shipped inside nilearn (1 mm, 197x233x189): its grey/white
    matter probability maps and brain mask give cortex, white matter and CSF with partial
    volume; deep grey nuclei are ellipsoids at their MNI centroids; a skull, scalp and air
    cavities (frontal/sphenoid/maxillary sinuses, ear canals, mastoids) are added around
    the skull-stripped brain.
``"procedural"``
    Ellipsoids in the same frame (cerebrum, cerebellum, brainstem, ventricles, the same
    nuclei), for fast tests on ~64^3 grids.

Susceptibility is in ppm relative to CSF (tissue water); air is +9.4 ppm relative to
tissue (design.md section 5). Veins are added per subject by :mod:`training.simulate.veins`.
The tissue table, with sources, is :data:`TISSUES`; docs/simulator.md repeats it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.ndimage as ndi

from qsm_core.errors import InputError
from qsm_core.geometry import voxel_sizes_mm

__all__ = ["LABELS", "LABEL_IDS", "TISSUES", "Tissue", "NUCLEI", "Anatomy", "build_anatomy",
           "base_anatomy", "placement_maps", "voxel_coords_mm", "AIR_CHI_PPM"]

log = logging.getLogger(__name__)

AIR_CHI_PPM = 9.4
"""Air relative to tissue water (ppm): chi_air ~ +0.36, chi_water ~ -9.05 (Schenck 1996)."""

LABELS: dict[int, str] = {
    0: "air", 1: "scalp", 2: "skull", 3: "csf", 4: "ventricle", 5: "cortical_gm", 6: "wm",
    7: "caudate", 8: "putamen", 9: "globus_pallidus", 10: "thalamus", 11: "substantia_nigra",
    12: "red_nucleus", 13: "dentate", 14: "vein", 15: "venous_sinus", 16: "air_cavity",
}
"""Tissue label table of :attr:`Anatomy.labels` (lesions live in separate maps)."""
LABEL_IDS = {v: k for k, v in LABELS.items()}


@dataclass(frozen=True)
class Tissue:
    """Physical properties of one tissue class.

    Attributes
    ----------
    chi_ppm : float
        Susceptibility relative to CSF (ppm).
    r2star_s : float
        R2* at 3 T (1/s).
    pd : float
        GRE signal at TE = 0 (proton density times the T1 factor of a short-TR, ~15 degree
        GRE), relative to CSF = 1.
    flair : float
        FLAIR intensity (CSF suppressed), arbitrary units, white matter ~0.5.
    t1w : float
        T1-weighted intensity, arbitrary units.
    """

    chi_ppm: float
    r2star_s: float
    pd: float
    flair: float
    t1w: float


# chi: Deistung et al. NeuroImage 2013;65:299 and Li et al. NeuroImage 2011;55:1645 (deep GM,
# WM, cortex); Langkammer et al. NeuroImage 2012;62:1593 (chi vs iron); veins: Fan et al. MRM
# 2014 (Y ~ 0.6 -> +0.3..0.45 ppm); bone: Dimov et al. MRM 2018 (~ -2 ppm).
# R2*: Peran et al. Brain 2007, Yao et al. NeuroImage 2009 (3 T).
TISSUES: dict[str, Tissue] = {
    "air": Tissue(AIR_CHI_PPM, 0.0, 0.0, 0.0, 0.0),
    "scalp": Tissue(0.0, 30.0, 0.75, 0.65, 0.8),
    "skull": Tissue(-2.0, 300.0, 0.05, 0.05, 0.1),
    "csf": Tissue(0.0, 3.0, 1.0, 0.04, 0.15),
    "ventricle": Tissue(0.0, 3.0, 1.0, 0.04, 0.15),
    "cortical_gm": Tissue(0.02, 15.0, 0.82, 0.62, 0.55),
    "wm": Tissue(-0.025, 20.0, 0.70, 0.48, 0.85),
    "caudate": Tissue(0.065, 23.0, 0.80, 0.56, 0.6),
    "putamen": Tissue(0.07, 27.0, 0.79, 0.55, 0.62),
    "globus_pallidus": Tissue(0.17, 40.0, 0.74, 0.50, 0.72),
    "thalamus": Tissue(0.01, 20.0, 0.76, 0.54, 0.68),
    "substantia_nigra": Tissue(0.13, 35.0, 0.74, 0.50, 0.65),
    "red_nucleus": Tissue(0.10, 32.0, 0.74, 0.50, 0.68),
    "dentate": Tissue(0.09, 30.0, 0.75, 0.50, 0.66),
    "vein": Tissue(0.40, 45.0, 0.85, 0.30, 0.5),
    "venous_sinus": Tissue(0.35, 40.0, 0.85, 0.25, 0.4),
    "air_cavity": Tissue(AIR_CHI_PPM, 0.0, 0.0, 0.0, 0.0),
}

# Deep grey nuclei: (label, centre of the right-hemisphere copy in MNI mm, semi-axes mm).
# Centroids from MNI atlases (Harvard-Oxford subcortical, Keuken et al. 2014 for SN/RN).
# Each is mirrored to the left hemisphere (x -> -x).
NUCLEI: list[tuple[str, tuple[float, float, float], tuple[float, float, float]]] = [
    ("thalamus", (11.0, -18.0, 7.0), (7.5, 13.0, 8.0)),
    ("caudate", (13.0, 12.0, 10.0), (4.5, 9.0, 7.0)),
    ("caudate", (17.0, -6.0, 20.0), (3.5, 10.0, 4.0)),
    ("putamen", (25.0, 2.0, 1.0), (5.5, 14.0, 8.0)),
    ("globus_pallidus", (19.0, -3.0, -1.0), (3.8, 8.0, 4.5)),
    ("substantia_nigra", (11.0, -17.0, -12.0), (4.0, 7.0, 2.5)),
    ("red_nucleus", (5.0, -19.0, -8.0), (3.2, 3.5, 3.5)),
    ("dentate", (15.0, -57.0, -34.0), (6.0, 8.0, 6.0)),
]

# Air cavities (MNI mm centre, semi-axes mm); kept >= 2 mm away from the brain.
CAVITIES: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = [
    ((0.0, 74.0, 6.0), (12.0, 5.0, 8.0)),        # frontal sinus
    ((0.0, 12.0, -34.0), (10.0, 11.0, 8.0)),     # sphenoid sinus
    ((0.0, 45.0, -42.0), (7.0, 16.0, 10.0)),     # ethmoid cells / nasal cavity
    ((28.0, 35.0, -55.0), (11.0, 14.0, 12.0)),   # maxillary sinus (right)
    ((-28.0, 35.0, -55.0), (11.0, 14.0, 12.0)),  # maxillary sinus (left)
    ((60.0, -22.0, -38.0), (9.0, 3.5, 3.5)),     # ear canal (right)
    ((-60.0, -22.0, -38.0), (9.0, 3.5, 3.5)),    # ear canal (left)
    ((50.0, -42.0, -40.0), (7.0, 8.0, 8.0)),     # mastoid air cells (right)
    ((-50.0, -42.0, -40.0), (7.0, 8.0, 8.0)),    # mastoid air cells (left)
]

# Head layers outside the brain mask (mm): subarachnoid CSF, skull, scalp.
CSF_LAYER_MM = 2.0
SKULL_MM = 6.5
SCALP_MM = 5.5
AIR_MARGIN_MM = 6.0


@dataclass
class Anatomy:
    """A head on a voxel grid in the MNI-mm head frame.

    Attributes
    ----------
    chi_ppm : ndarray, shape (X, Y, Z), float32
        Susceptibility relative to CSF (ppm); air (outside and in cavities) = +9.4.
    labels : ndarray, shape (X, Y, Z), uint8
        Tissue labels, see :data:`LABELS`.
    brain_mask : ndarray, shape (X, Y, Z), uint8
        Brain parenchyma and ventricles (what a QSM brain mask should cover).
    r2star_s : ndarray, float32
        R2* (1/s).
    pd : ndarray, float32
        GRE signal at TE = 0 (relative units, CSF = 1).
    t1w : ndarray, float32
        T1-weighted base contrast.
    flair : ndarray, float32
        FLAIR base contrast (CSF suppressed).
    affine : ndarray, shape (4, 4)
        Voxel -> head-frame (MNI mm) affine, axis-aligned.
    vein_fraction : ndarray, float32
        Partial-volume fraction of venous blood per voxel (0 before veins are added).
    source : str
        ``"mni"`` or ``"procedural"``.
    """

    chi_ppm: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    r2star_s: np.ndarray
    pd: np.ndarray
    t1w: np.ndarray
    flair: np.ndarray
    affine: np.ndarray
    vein_fraction: np.ndarray
    source: str = "mni"
    label_table: dict = field(default_factory=lambda: dict(LABELS))
    key: tuple = ()
    """(source, voxel_size_mm, shape) of the cached base anatomy this head derives from."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape."""
        return tuple(self.chi_ppm.shape)

    @property
    def voxel_size_mm(self) -> np.ndarray:
        """Voxel sizes (mm)."""
        return voxel_sizes_mm(self.affine)

    def copy(self) -> Anatomy:
        """Deep copy of every array."""
        return replace(self, **{k: getattr(self, k).copy() for k in
                                ("chi_ppm", "labels", "brain_mask", "r2star_s", "pd", "t1w",
                                 "flair", "affine", "vein_fraction")})


def voxel_coords_mm(affine: np.ndarray, shape, *, sparse: bool = True):
    """Head-frame coordinates (mm) of voxel centres for an axis-aligned affine.

    Returns three arrays broadcastable to ``shape`` (x, y, z in mm).
    """
    aff = np.asarray(affine, float)
    if not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3]))):
        raise InputError("the anatomy grid must be axis-aligned (diagonal affine)")
    axes = [aff[i, 3] + aff[i, i] * np.arange(shape[i], dtype=np.float32) for i in range(3)]
    return np.meshgrid(*axes, indexing="ij", sparse=sparse)


def _ellipsoid_weight(coords, centre, semi, voxel_mm: float) -> np.ndarray:
    """Soft (one-voxel partial volume) indicator of an axis-aligned ellipsoid."""
    x, y, z = coords
    rho = np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                  + ((z - centre[2]) / semi[2]) ** 2)
    # signed distance ~ (rho - 1) * min semi-axis; soften over one voxel
    d = (1.0 - rho) * min(semi)
    return np.clip(d / voxel_mm + 0.5, 0.0, 1.0).astype(np.float32)


def _mni_tissue_maps(voxel_size_mm):
    """MNI152 2009 GM/WM probabilities, brain mask and T1 on a grid of ``voxel_size_mm``."""
    from nilearn import datasets

    imgs = [datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1),
            datasets.load_mni152_brain_mask(resolution=1),
            datasets.load_mni152_template(resolution=1)]
    arrs = [np.asarray(im.dataobj, dtype=np.float32) for im in imgs]
    aff = np.asarray(imgs[0].affine, float)
    v = np.asarray(voxel_size_mm, float)
    if not np.allclose(v, 1.0):
        src_shape = np.array(arrs[0].shape)
        shape = tuple(int(n) for n in np.floor((src_shape - 1) / v) + 1)
        out = []
        for a in arrs:
            sig = np.maximum(v - 1.0, 0.0) / 2.355
            if np.any(sig > 0):
                a = ndi.gaussian_filter(a, sig)
            out.append(ndi.affine_transform(a, np.diag(v), output_shape=shape, order=1,
                                            mode="nearest").astype(np.float32))
        arrs = out
        aff = aff @ np.diag([*v, 1.0])
    gm, wm, mask, t1 = arrs
    return gm, wm, mask > 0.5, t1, aff


def _procedural_tissue_maps(voxel_size_mm, shape):
    """Ellipsoid brain in the MNI frame: GM shell, WM core, CSF in ventricles."""
    v = np.asarray(voxel_size_mm, float)
    if shape is None:
        shape = tuple(int(np.ceil(200.0 / vi)) for vi in v)
    shape = tuple(int(s) for s in shape)
    fov = np.array(shape) * v
    centre_fov = np.array([0.0, -18.0, -2.0])
    origin = centre_fov - (np.array(shape) - 1) / 2.0 * v
    aff = np.diag([*v, 1.0])
    aff[:3, 3] = origin
    coords = voxel_coords_mm(aff, shape)
    vm = float(v.mean())
    # scale the brain to the field of view when a tiny FOV is asked for
    s = min(1.0, float(fov.min()) / 200.0)
    brain = np.maximum.reduce([
        _ellipsoid_weight(coords, (0, -17 * s, 8 * s), (66 * s, 84 * s, 58 * s), vm),
        _ellipsoid_weight(coords, (0, -62 * s, -34 * s), (46 * s, 26 * s, 18 * s), vm),
        _ellipsoid_weight(coords, (0, -28 * s, -35 * s), (11 * s, 11 * s, 28 * s), vm),
    ])
    mask = brain > 0.5
    depth = ndi.distance_transform_edt(mask, sampling=v).astype(np.float32)
    gm_w = np.clip((max(3.0 * s, 1.5 * vm) + 0.5 * vm - depth) / vm, 0, 1) * brain
    vent = np.maximum(_ellipsoid_weight(coords, (12 * s, -5 * s, 14 * s),
                                        (7 * s, 24 * s, 9 * s), vm),
                      _ellipsoid_weight(coords, (-12 * s, -5 * s, 14 * s),
                                        (7 * s, 24 * s, 9 * s), vm))
    gm = (gm_w * (1 - vent)).astype(np.float32)
    wm = np.clip(brain - gm_w - vent, 0, 1).astype(np.float32)
    t1 = (0.85 * wm + 0.6 * gm + 0.3 * vent).astype(np.float32)
    return gm, wm, mask, t1, aff


@functools.lru_cache(maxsize=4)
def base_anatomy(source: str, voxel_size_mm: tuple, shape: tuple | None) -> Anatomy:
    """The subject-independent head (no veins), cached per process.

    Parameters
    ----------
    source : {'mni', 'procedural'}
    voxel_size_mm : tuple of 3 floats
    shape : tuple of 3 ints or None
        Grid shape for ``'procedural'`` (default: a 200 mm field of view).
    """
    v = np.asarray(voxel_size_mm, float)
    shape_arg = shape
    if source == "mni":
        gm, wm, mask, t1, aff = _mni_tissue_maps(v)
    elif source == "procedural":
        gm, wm, mask, t1, aff = _procedural_tissue_maps(v, shape)
    else:
        raise InputError(f"anatomy source must be 'mni' or 'procedural', got {source!r}")
    vm = float(v.mean())
    gm = np.where(mask, gm, 0).astype(np.float32)
    wm = np.where(mask, wm, 0).astype(np.float32)
    csf = np.where(mask, np.clip(1 - gm - wm, 0, 1), 0).astype(np.float32)

    if source == "mni":
        # crop to the head (brain + layers + air margin) to save FFT time
        margin = CSF_LAYER_MM + SKULL_MM + SCALP_MM + AIR_MARGIN_MM
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - np.ceil(margin / v).astype(int), 0)
        hi = np.minimum(idx.max(0) + np.ceil(margin / v).astype(int) + 1, mask.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        gm, wm, csf, mask, t1 = gm[sl], wm[sl], csf[sl], mask[sl], t1[sl]
        aff = aff.copy()
        aff[:3, 3] += aff[:3, :3] @ lo
    shape = mask.shape
    coords = voxel_coords_mm(aff, shape)
    x, y, z = coords

    labels = np.zeros(shape, np.uint8)
    probs = np.stack([csf, gm, wm])
    tissue = np.argmax(probs, axis=0)
    labels[mask & (tissue == 0)] = LABEL_IDS["csf"]
    labels[mask & (tissue == 1)] = LABEL_IDS["cortical_gm"]
    labels[mask & (tissue == 2)] = LABEL_IDS["wm"]
    # ventricles: large CSF components near the centre of the brain
    central = (np.abs(x) < 35) & (y > -50) & (y < 35) & (z > -5) & (z < 35)
    cc, n = ndi.label((labels == LABEL_IDS["csf"]) & central)
    if n:
        sizes = ndi.sum_labels(np.ones(shape), cc, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= max(8, 400.0 / np.prod(v))) + 1
        labels[np.isin(cc, keep)] = LABEL_IDS["ventricle"]

    # property maps: partial-volume mixture of csf/gm/wm inside the brain
    def mix(attr):
        t = TISSUES
        return (csf * getattr(t["csf"], attr) + gm * getattr(t["cortical_gm"], attr)
                + wm * getattr(t["wm"], attr)).astype(np.float32)

    props = {a: mix(a) for a in ("chi_ppm", "r2star_s", "pd", "flair", "t1w")}
    # deep grey nuclei (soft ellipsoids inside the brain, never in the ventricles)
    not_vent = (labels != LABEL_IDS["ventricle"]) & mask
    for name, c, semi in NUCLEI:
        for sx in (1.0, -1.0):
            cc_ = (sx * c[0], c[1], c[2])
            box = _box(aff, shape, cc_, semi, pad_mm=2 * vm)
            if box is None:
                continue
            sub = tuple(a[box] if a.ndim else a for a in np.broadcast_arrays(x, y, z))
            w = _ellipsoid_weight(sub, cc_, semi, vm) * not_vent[box]
            tis = TISSUES[name]
            for a in props:
                props[a][box] = (1 - w) * props[a][box] + w * getattr(tis, a)
            lab = labels[box]
            lab[w >= 0.5] = LABEL_IDS[name]

    # head layers from the distance to the brain
    dist_out = ndi.distance_transform_edt(~mask, sampling=v).astype(np.float32)
    head_lab = np.zeros(shape, np.uint8)
    csf_mm = max(CSF_LAYER_MM, float(v.max()))  # at least one voxel of outer CSF
    head_lab[(dist_out > 0) & (dist_out <= csf_mm)] = LABEL_IDS["csf"]
    head_lab[(dist_out > csf_mm) & (dist_out <= csf_mm + SKULL_MM)] = LABEL_IDS["skull"]
    head_lab[(dist_out > csf_mm + SKULL_MM)
             & (dist_out <= csf_mm + SKULL_MM + SCALP_MM)] = LABEL_IDS["scalp"]
    # air cavities wrapped in bone, never within 2 mm of the brain
    for c, semi in CAVITIES:
        box = _box(aff, shape, c, np.asarray(semi) + 4.0, pad_mm=0)
        if box is None:
            continue
        sub = tuple(a[box] if a.ndim else a for a in np.broadcast_arrays(x, y, z))
        far = dist_out[box] > 2.0
        bone = (_ellipsoid_weight(sub, c, np.asarray(semi) + 3.0, vm) > 0.5) & far
        air = (_ellipsoid_weight(sub, c, semi, vm) > 0.5) & far
        hl = head_lab[box]
        hl[bone & (hl != LABEL_IDS["csf"])] = LABEL_IDS["skull"]
        hl[air] = LABEL_IDS["air_cavity"]
    outside = ~mask
    labels[outside] = head_lab[outside]
    for name in ("scalp", "skull", "csf", "air", "air_cavity"):
        sel = outside & (labels == LABEL_IDS[name])
        for a in props:
            props[a][sel] = getattr(TISSUES[name], a)
    if source == "mni":
        # the template's own T1 inside the brain (keeps its cortical folding visible)
        props["t1w"] = np.where(mask, t1, props["t1w"]).astype(np.float32)

    return Anatomy(chi_ppm=props["chi_ppm"], labels=labels,
                   brain_mask=mask.astype(np.uint8), r2star_s=props["r2star_s"],
                   pd=props["pd"], t1w=props["t1w"], flair=props["flair"], affine=aff,
                   vein_fraction=np.zeros(shape, np.float32), source=source,
                   key=(source, tuple(float(a) for a in v), shape_arg))


def _box(affine, shape, centre_mm, semi_mm, *, pad_mm: float):
    """Index slices of the voxel box around an axis-aligned ellipsoid (None if outside)."""
    aff = np.asarray(affine, float)
    d = np.diag(aff)[:3]
    lo = (np.asarray(centre_mm) - np.asarray(semi_mm) - pad_mm - aff[:3, 3]) / d
    hi = (np.asarray(centre_mm) + np.asarray(semi_mm) + pad_mm - aff[:3, 3]) / d
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    lo = np.clip(np.floor(lo).astype(int), 0, shape)
    hi = np.clip(np.ceil(hi).astype(int) + 1, 0, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def build_anatomy(*, source: str = "mni", voxel_size_mm=(1.0, 1.0, 1.0), seed: int = 0,
                  shape=None, veins: bool = True) -> Anatomy:
    """A subject's head: the template anatomy plus that subject's veins.

    Parameters
    ----------
    source : {'mni', 'procedural'}
        ``'mni'``: MNI152 2009 (nilearn, offline); ``'procedural'``: ellipsoids (tests).
    voxel_size_mm : sequence of 3 floats
        Grid spacing (the template is resampled when not 1 mm).
    seed : int
        Seeds the subject's veins.
    shape : tuple of 3 ints, optional
        Grid shape for ``'procedural'`` (default: 200 mm field of view).
    veins : bool
        Add cortical, medullary and deep veins and the dural sinuses.

    Returns
    -------
    Anatomy
        A fresh copy (safe to modify).

    Examples
    --------
    >>> a = build_anatomy(source="procedural", voxel_size_mm=(4, 4, 4), shape=(48, 48, 48))
    >>> a.chi_ppm.shape, a.chi_ppm.dtype.name
    ((48, 48, 48), 'float32')
    """
    v = np.asarray(voxel_size_mm, float).reshape(-1)
    if v.shape != (3,) or np.any(~np.isfinite(v)) or np.any(v <= 0) or np.any(v > 4.0):
        raise InputError(f"voxel_size_mm must be three numbers in (0, 4] mm, got "
                         f"{voxel_size_mm!r}")
    if shape is not None and source != "procedural":
        raise InputError("shape is only used with source='procedural'")
    base = base_anatomy(source, tuple(float(a) for a in v),
                        None if shape is None else tuple(int(s) for s in shape))
    anat = base.copy()
    if veins:
        from training.simulate.veins import plan_veins, render_veins

        render_veins(anat, plan_veins(base, np.random.default_rng(seed)))
    return anat


@functools.lru_cache(maxsize=4)
def placement_maps(key: tuple) -> dict:
    """Distance maps of a base anatomy used to place veins and lesions (cached).

    Parameters
    ----------
    key : tuple
        :attr:`Anatomy.key` of a base anatomy.

    Returns
    -------
    dict
        ``dist_ventricle_mm``, ``dist_cortex_mm`` (to cortical GM), ``dist_csf_mm`` (to any
        CSF, ventricles or outside the brain), ``dist_deep_gm_mm`` (to the nuclei), all
        float32 arrays on the base grid.
    """
    base = base_anatomy(*key)
    v = base.voxel_size_mm
    lab = base.labels
    deep = np.isin(lab, [LABEL_IDS[n] for n in ("caudate", "putamen", "globus_pallidus",
                                                 "thalamus", "substantia_nigra",
                                                 "red_nucleus", "dentate")])
    not_brain_or_csf = (base.brain_mask == 0) | np.isin(
        lab, [LABEL_IDS["csf"], LABEL_IDS["ventricle"]])

    def edt(m):
        return ndi.distance_transform_edt(~m, sampling=v).astype(np.float32)

    return {"dist_ventricle_mm": edt(lab == LABEL_IDS["ventricle"]),
            "dist_cortex_mm": edt(lab == LABEL_IDS["cortical_gm"]),
            "dist_csf_mm": edt(not_brain_or_csf),
            "dist_deep_gm_mm": edt(deep)}
