"""MS/NMOSD white-matter lesions: placement, QSM lesion types, rims, confounders, rendering.

A lesion is planned as parameters in millimetres (:class:`Lesion`), independent of any
voxel grid, and rendered onto an anatomy by :func:`render_lesions`. Sources of every value
are in docs/simulator.md; the main ones:

- QSM lesion types iso/hypo/hyper/hypo-intense rim/paramagnetic rim: Ann Neurol 2022
  classification (e.g. Zhang Y. et al.); rims 1-2 mm, +0.01..+0.06 ppm above NAWM and
  covering >= 2/3 of the edge for a PRL (NAIMS consensus, Bagnato et al. Brain 2024;
  Dal-Bianco et al. Acta Neuropathol 2017; Absinta et al. JCI 2016).
- Lesion shape and location: ovoid, long axis along the medullary vein, perpendicular to
  the ventricles (Dawson's fingers); 3-20 mm; periventricular / juxtacortical / deep WM /
  infratentorial (McDonald criteria locations). No rims infratentorially (seed study).
- Lesion R2* lower in the core (demyelination) and higher in iron rims (Bagnato et al. Brain
  2011; Yao et al. 2012); FLAIR hyperintense (1.5-2.2 x NAWM).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import scipy.ndimage as ndi

from qsm_core.errors import InputError
from training.simulate.anatomy import LABEL_IDS, Anatomy, placement_maps
from training.simulate.veins import Vein, segment_distance_mm

__all__ = ["Lesion", "QSM_TYPES", "RIM_VARIANTS", "LOCATIONS", "LesionStyle", "place_lesion",
           "assign_type", "with_rim_core", "render_lesions", "lesion_veins", "infratentorial",
           "TYPE_CODES"]

QSM_TYPES = ("iso", "hypo", "hyper", "hypo_rim", "rim")
TYPE_CODES = {t: i + 1 for i, t in enumerate(QSM_TYPES)}
"""Integer codes of the lesion-type map (0 = no lesion); microbleeds are 6, calcifications 7."""
RIM_VARIANTS = ("none", "complete", "incomplete", "layered")
LOCATIONS = ("periventricular", "juxtacortical", "deep_wm", "infratentorial")
PARENCHYMA = [LABEL_IDS[n] for n in ("wm", "cortical_gm", "caudate", "putamen",
                                     "globus_pallidus", "thalamus", "vein")]


def infratentorial(x, y, z):
    """True below the tentorium in MNI mm: cerebellum and brainstem (approximate box rules)."""
    return (z < -12.0) & ((y < -42.0) | ((np.abs(x) < 15.0) & (y < -12.0)))


@dataclass
class Lesion:
    """One lesion, planned in millimetres (head frame).

    Geometry: a union of ellipsoid blobs (one, or 2-3 for a confluent lesion) in the
    lesion's own frame, with a smooth noise perturbation of the boundary. QSM: a core
    offset and, for rim types, a rim of given thickness, amplitude and angular coverage.
    All susceptibilities are offsets relative to the surrounding normal-appearing tissue.
    """

    lesion_id: int
    centre_mm: np.ndarray
    rotation: np.ndarray
    blobs: list  # [(offset_mm (3,), semi_axes_mm (3,))] in the lesion frame
    location: str
    shape_seed: int
    irregularity: float = 0.15
    qsm_type: str = "iso"
    rim_variant: str = "none"
    core_chi_ppm: float = 0.0
    rim_chi_ppm: float = 0.0
    rim_thickness_mm: float = 0.0
    rim_coverage: float = 0.0
    rim_direction: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    flair_ratio: float = 1.8
    r2star_core_delta_s: float = -5.0
    enhancing: bool = False
    central_vein: bool = False
    vein_at_edge: bool = False
    deposit: str = "none"  # 'microbleed' | 'calcification' | 'none'
    deposit_offset_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    confluent: bool = False
    near: str = ""  # 'deep_gm' | 'cortex' | ''
    veins: list = field(default_factory=list)  # lesion-specific Vein objects
    new: bool = False
    new_rim: bool = False
    prior_enhancing: bool = False

    @property
    def long_axis_mm(self) -> float:
        """Longest extent (mm) of the blob union along the lesion's axes."""
        ext = [np.abs(o) + s for o, s in self.blobs]
        return float(2 * np.max(ext))

    @property
    def extent_mm(self) -> float:
        """Radius (mm) of a sphere that contains the lesion and its rim."""
        return float(max(np.linalg.norm(o) + max(s) for o, s in self.blobs)
                     * (1 + 2 * self.irregularity) + self.rim_thickness_mm + 1.0)

    @property
    def truth_prl(self) -> bool:
        """Paramagnetic rim lesion by the NAIMS definition (>= 2/3 of the edge)."""
        return self.qsm_type == "rim" and self.rim_variant in ("complete", "layered")

    @property
    def nominal_volume_mm3(self) -> float:
        """Volume of the largest blob's ellipsoid plus a share of the others (mm^3)."""
        vols = sorted((4.0 / 3.0 * np.pi * float(np.prod(s)) for _, s in self.blobs),
                      reverse=True)
        return float(vols[0] + 0.6 * sum(vols[1:]))

    def evolve(self, **changes) -> Lesion:
        """A copy with some attributes changed (for follow-up sessions)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class LesionStyle:
    """Distributions of lesion geometry and location for one diagnosis.

    Attributes
    ----------
    location_probs : dict
        Probabilities of periventricular / juxtacortical / deep_wm / infratentorial.
    long_axis_median_mm, long_axis_sigma : float
        Log-normal long axis (clipped to 3-20 mm).
    confluent_prob : float
        Probability that a lesion is a confluent union of 2-3 blobs.
    prl_size_bias : float
        PRLs are drawn among a patient's lesions with weights ``volume ** prl_size_bias``
        (0: size-blind). Chronic active lesions are larger than rimless ones on average
        (they expand slowly; Absinta et al. 2016, Dal-Bianco et al. 2017).
    prl_min_core_mm : float
        A paramagnetic rim surrounds a core (NAIMS: a rim *around* the lesion): the minor
        semi-axes of a PRL's main blob are widened to at least ``rim thickness +
        prl_min_core_mm`` (never beyond its long semi-axis, so its extent and spacing to
        neighbours are unchanged), and the rim is thinned if the long semi-axis itself is
        too short. Without this, 3-4 mm lesions get 2 mm "rims" that are the whole lesion
        and no reader could tell from a uniformly paramagnetic lesion.
    irregularity_min, irregularity_max : float
        Each lesion's boundary is its ellipsoid(s) displaced by smooth noise of a relative
        amplitude drawn uniformly from this range (0: smooth ovoids; 0.5: lobulated,
        irregular outlines).
    """

    location_probs: dict = field(default_factory=lambda: {
        "periventricular": 0.35, "juxtacortical": 0.25, "deep_wm": 0.30,
        "infratentorial": 0.10})
    long_axis_median_mm: float = 7.0
    long_axis_sigma: float = 0.45
    confluent_prob: float = 0.08
    central_vein_prob: float = 0.45
    vein_at_edge_prob: float = 0.15
    deposit_prob: float = 0.04
    near_deep_gm_prob: float = 0.05
    prl_size_bias: float = 1.0
    prl_min_core_mm: float = 1.5
    irregularity_min: float = 0.08
    irregularity_max: float = 0.22

    def validate(self, where: str) -> None:
        """Raise InputError naming a value out of its range (``where``: for the message)."""
        if not 0.0 <= self.irregularity_min <= self.irregularity_max <= 0.6:
            raise InputError(f"{where}: need 0 <= style.irregularity_min <= "
                             f"style.irregularity_max <= 0.6, got {self.irregularity_min}, "
                             f"{self.irregularity_max}")


def _random_rotation(rng, axis=None):
    """Rotation whose first column is ``axis`` (or random)."""
    a = rng.normal(size=3) if axis is None else np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = rng.normal(size=3)
    t -= (t @ a) * a
    t /= np.linalg.norm(t)
    return np.stack([a, t, np.cross(a, t)], axis=1)


def _candidates(base: Anatomy, location: str):
    """Voxel indices where a lesion centre of ``location`` may sit (cached per base)."""
    cache = _candidates.__dict__.setdefault("cache", {})
    key = (base.key, location)
    if key not in cache:
        maps = placement_maps(base.key)
        lab = base.labels
        x, y, z = np.meshgrid(*[base.affine[i, 3] + base.affine[i, i] * np.arange(n)
                                for i, n in enumerate(base.shape)], indexing="ij", sparse=True)
        infra = infratentorial(x, y, z)
        wm = lab == LABEL_IDS["wm"]
        dv, dc, dcsf = maps["dist_ventricle_mm"], maps["dist_cortex_mm"], maps["dist_csf_mm"]
        if location == "periventricular":
            m = wm & ~infra & (dv >= 1.0) & (dv <= 5.0)
        elif location == "juxtacortical":
            m = wm & ~infra & (dc >= 1.0) & (dc <= 2.5) & (dcsf >= 3.0)
        elif location == "deep_wm":
            m = wm & ~infra & (dv > 7.0) & (dc > 3.5)
        elif location == "near_deep_gm":
            m = wm & ~infra & (maps["dist_deep_gm_mm"] >= 1.0) & \
                (maps["dist_deep_gm_mm"] <= 3.0) & (dv > 2.0)
        elif location == "infratentorial":
            m = infra & (lab == LABEL_IDS["wm"]) & (dcsf >= 3.0)
        else:
            raise ValueError(location)
        idx = np.argwhere(m)
        if len(idx) == 0 and location != "deep_wm":  # tiny procedural grids
            idx = np.argwhere(wm & ~infra)
        cache[key] = idx
    return cache[key]


def place_lesion(base: Anatomy, rng: np.random.Generator, *, lesion_id: int, location: str,
                 style: LesionStyle, existing: list[Lesion], max_tries: int = 60,
                 scale: float = 1.0) -> Lesion | None:
    """Draw a lesion of ``location`` that does not touch ``existing`` lesions.

    Parameters
    ----------
    base : Anatomy
        Base anatomy (for the placement maps).
    rng : numpy Generator
    lesion_id : int
    location : str
        One of :data:`LOCATIONS`.
    style : LesionStyle
    existing : list of Lesion
        Lesions already placed (kept >= 2 mm apart).
    scale : float
        Size scale (procedural phantoms scale anatomy down).

    Returns
    -------
    Lesion or None
        None when no free place was found.
    """
    loc = location
    near = ""
    if loc == "deep_wm" and rng.random() < style.near_deep_gm_prob / 0.3:
        loc, near = "near_deep_gm", "deep_gm"
    cand = _candidates(base, loc)
    if len(cand) == 0:
        return None
    maps = placement_maps(base.key)
    aff = base.affine
    for _ in range(max_tries):
        i0 = cand[rng.integers(len(cand))]
        c = aff[:3, :3] @ i0 + aff[:3, 3] + rng.uniform(-0.5, 0.5, 3) * np.diag(aff)[:3]
        L = float(np.clip(np.exp(rng.normal(np.log(style.long_axis_median_mm),
                                            style.long_axis_sigma)), 3.0, 20.0)) * scale
        a = L / 2
        b = a * rng.uniform(0.55, 0.9)
        cc = max(b * rng.uniform(0.65, 1.0), 1.2)
        if loc == "periventricular":
            dv = maps["dist_ventricle_mm"]
            g = np.array([float(np.take(dv, np.ravel_multi_index(
                np.clip(i0 + e, 0, np.array(dv.shape) - 1), dv.shape)))
                - float(np.take(dv, np.ravel_multi_index(
                    np.clip(i0 - e, 0, np.array(dv.shape) - 1), dv.shape)))
                for e in np.eye(3, dtype=int)])
            axis = g if np.linalg.norm(g) > 0 else None
            rot = _random_rotation(rng, axis)
            # the long axis points away from the ventricle: shift so the lesion abuts it
            c = c + rot[:, 0] * max(a - float(dv[tuple(i0)]), 0.0) * 0.5
        else:
            rot = _random_rotation(rng)
        blobs = [(np.zeros(3), np.array([a, b, cc]))]
        confluent = False
        if loc != "infratentorial" and rng.random() < style.confluent_prob:
            confluent = True
            for _k in range(int(rng.integers(1, 3))):
                s = np.array([a, b, cc]) * rng.uniform(0.6, 0.95)
                off = rng.normal(size=3)
                off = off / np.linalg.norm(off) * a * rng.uniform(0.7, 1.1)
                blobs.append((off, s))
        les = Lesion(lesion_id=lesion_id, centre_mm=c, rotation=rot, blobs=blobs,
                     location="deep_wm" if loc == "near_deep_gm" else loc,
                     shape_seed=int(rng.integers(2**31)),
                     irregularity=float(rng.uniform(style.irregularity_min,
                                                   style.irregularity_max)),
                     confluent=confluent,
                     near=near if near else ("cortex" if loc == "juxtacortical" else ""))
        if all(np.linalg.norm(c - o.centre_mm) > les.extent_mm + o.extent_mm + 2.0
               for o in existing):
            return les
    return None


def assign_type(les: Lesion, rng: np.random.Generator, *, prl: bool, type_probs: dict,
                rim_chi_range_ppm=(0.01, 0.06), rim_thickness_range_mm=(1.0, 2.0),
                layered_prob: float = 0.12, style: LesionStyle | None = None,
                scale: float = 1.0) -> Lesion:
    """Give a placed lesion its QSM type, rim, FLAIR/R2* contrast and confounders.

    Parameters
    ----------
    les : Lesion
    rng : numpy Generator
    prl : bool
        Make it a paramagnetic rim lesion (complete or layered rim, coverage >= 2/3).
    type_probs : dict
        Probabilities of the non-PRL appearances: 'iso', 'hypo', 'hyper', 'hypo_rim',
        'incomplete_rim'.
    rim_chi_range_ppm : (float, float)
        Rim susceptibility above NAWM (ppm); drawn from a Beta(2, 2.5) over the range.
    rim_thickness_range_mm : (float, float)
    layered_prob : float
        Share of PRLs with a second, inner layer.
    """
    style = style or LesionStyle()
    lo, hi = rim_chi_range_ppm
    rim_chi = lo + (hi - lo) * rng.beta(2.0, 2.5)
    thick = rng.uniform(*rim_thickness_range_mm) * scale
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    ch = {}
    if prl and les.location != "infratentorial":
        les, thick = with_rim_core(les, thick, min_core_mm=style.prl_min_core_mm * scale,
                                   min_thickness_mm=0.5 * rim_thickness_range_mm[0] * scale)
        ch = dict(qsm_type="rim", rim_variant="layered" if rng.random() < layered_prob
                  else "complete", rim_chi_ppm=rim_chi, rim_thickness_mm=thick,
                  rim_coverage=float(min(1.0, rng.uniform(0.72, 1.25))),
                  core_chi_ppm=float(rng.uniform(-0.005, 0.012)))
    else:
        probs = dict(type_probs)
        if les.location == "infratentorial":  # no rims below the tentorium
            probs.pop("hypo_rim", None)
            probs.pop("incomplete_rim", None)
        names = list(probs)
        p = np.array([probs[n] for n in names], float)
        t = names[int(rng.choice(len(names), p=p / p.sum()))]
        if t == "iso":
            ch = dict(qsm_type="iso", core_chi_ppm=float(rng.normal(0.0, 0.003)))
        elif t == "hypo":
            ch = dict(qsm_type="hypo", core_chi_ppm=float(rng.uniform(-0.03, -0.01)))
        elif t == "hyper":
            ch = dict(qsm_type="hyper", core_chi_ppm=float(rng.uniform(0.01, 0.04)))
        elif t == "hypo_rim":
            ch = dict(qsm_type="hypo_rim", core_chi_ppm=float(rng.normal(0.0, 0.003)),
                      rim_chi_ppm=float(-rng.uniform(0.01, 0.03)), rim_thickness_mm=thick,
                      rim_coverage=float(rng.uniform(0.5, 1.0)))
        elif t == "incomplete_rim":
            ch = dict(qsm_type="rim", rim_variant="incomplete", rim_chi_ppm=rim_chi,
                      rim_thickness_mm=thick, rim_coverage=float(rng.uniform(0.2, 0.55)),
                      core_chi_ppm=float(rng.uniform(-0.005, 0.012)))
    les = les.evolve(rim_direction=direction, flair_ratio=float(rng.uniform(1.5, 2.2)),
                     r2star_core_delta_s=float(rng.uniform(-8.0, -3.0)), **ch)
    return add_confounders(les, rng, style=style, scale=scale)


def with_rim_core(les: Lesion, thickness_mm: float, *, min_core_mm: float,
                  min_thickness_mm: float) -> tuple[Lesion, float]:
    """Make room for a core inside a rim of ``thickness_mm``.

    The minor semi-axes of the main blob grow to ``thickness_mm + min_core_mm`` (capped at
    the long semi-axis, so the lesion's extent does not change); if the long semi-axis is
    shorter than that, the rim is thinned to ``long semi-axis - min_core_mm`` (not below
    ``min_thickness_mm``).

    Returns
    -------
    (Lesion, float)
        The lesion with its widened main blob, and the rim thickness (mm).
    """
    off, semi = les.blobs[0]
    semi = np.asarray(semi, float)
    a = float(semi.max())
    thick = float(max(min(thickness_mm, a - min_core_mm), min_thickness_mm))
    need = min(thick + min_core_mm, a)
    if np.all(semi >= need):
        return les, thick
    wider = np.maximum(semi, need)
    return les.evolve(blobs=[(off, wider)] + list(les.blobs[1:])), thick


def add_confounders(les: Lesion, rng, *, style: LesionStyle, scale: float = 1.0) -> Lesion:
    """Central vein, a vein passing the edge, a microbleed or calcification at the edge."""
    veins = []
    cv = rng.random() < style.central_vein_prob
    edge = rng.random() < style.vein_at_edge_prob
    a = max(max(s) + np.linalg.norm(o) for o, s in les.blobs)
    axis = les.rotation[:, 0]
    if cv:
        p0 = les.centre_mm - axis * (a + 5 * scale)
        p1 = les.centre_mm + axis * (a + 5 * scale)
        veins.append(Vein(np.linspace(p0, p1, 5), float(rng.uniform(0.3, 0.55)),
                          float(rng.uniform(0.3, 0.45)), "central"))
    if edge:
        k = 1 if rng.random() < 0.5 else 2
        n = les.rotation[:, k]
        semi = les.blobs[0][1][k]
        r = float(rng.uniform(0.4, 0.9))
        off = n * (semi + r * rng.uniform(0.0, 1.0)) * rng.choice([-1, 1])
        p0 = les.centre_mm + off - axis * (a + 6 * scale)
        p1 = les.centre_mm + off + axis * (a + 6 * scale)
        veins.append(Vein(np.linspace(p0, p1, 5), r, float(rng.uniform(0.3, 0.45)), "edge"))
    deposit = "none"
    off = np.zeros(3)
    if rng.random() < style.deposit_prob:
        deposit = "microbleed" if rng.random() < 0.6 else "calcification"
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        off = d * (les.blobs[0][1].min() + 1.5 * scale)
    return les.evolve(central_vein=cv, vein_at_edge=edge, veins=veins, deposit=deposit,
                      deposit_offset_mm=les.rotation @ off)


def lesion_veins(lesions: list[Lesion]) -> list[Vein]:
    """All lesion-specific veins (central veins, veins at the edge)."""
    return [v for les in lesions for v in les.veins]


def _smooth_noise(u, seed: int, wavelength_mm: float):
    """Grid-independent smooth noise (~unit variance): a sum of random plane waves."""
    rng = np.random.default_rng(seed)
    out = np.zeros(u.shape[:-1], np.float32)
    k = 8
    for _ in range(k):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        f = 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.4))
        out += np.cos(u @ (d * f) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return out * np.sqrt(2.0 / k)


def _lesion_box(anat_affine, shape, les: Lesion):
    d = np.abs(np.diag(anat_affine)[:3])
    r = les.extent_mm + 2 * float(d.max())
    ic = (les.centre_mm - anat_affine[:3, 3]) / np.diag(anat_affine)[:3]
    lo = np.maximum(np.floor(ic - r / d).astype(int), 0)
    hi = np.minimum(np.ceil(ic + r / d).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def rasterise(les: Lesion, affine, shape):
    """Lesion mask, rim weight and inner-layer weight in the lesion's voxel box.

    Returns
    -------
    box : tuple of slices or None
    inside : ndarray bool
    rim_w : ndarray float32 in [0, 1]
    boundary : ndarray bool (outermost voxel layer of the lesion)
    """
    box = _lesion_box(affine, shape, les)
    if box is None:
        return None, None, None, None
    axes = [affine[i, 3] + affine[i, i] * np.arange(box[i].start, box[i].stop)
            for i in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
    u = (grid - les.centre_mm.astype(np.float32)) @ les.rotation.astype(np.float32)
    rho = np.full(u.shape[:-1], np.inf, np.float32)
    for off, semi in les.blobs:
        r = np.sqrt((((u - off.astype(np.float32)) / semi.astype(np.float32)) ** 2).sum(-1))
        rho = np.minimum(rho, r)
    amin = min(float(s.min()) for _, s in les.blobs)
    noise = _smooth_noise(u, les.shape_seed, wavelength_mm=max(2.5 * amin, 3.0))
    inside = rho < 1.0 + les.irregularity * noise
    vox = np.abs(np.diag(affine)[:3])
    h = float(vox.min())
    depth = ndi.distance_transform_edt(inside, sampling=vox).astype(np.float32)
    boundary = inside & (depth <= h * 1.01)
    rim_w = np.zeros(inside.shape, np.float32)
    if les.rim_thickness_mm > 0 and les.rim_variant != "none" or les.qsm_type == "hypo_rim":
        band = np.clip((les.rim_thickness_mm - depth) / h + 1.0, 0.0, 1.0) * inside
        # angular coverage: a cap of the given solid-angle fraction, with ragged edges
        vec = u / (np.linalg.norm(u, axis=-1, keepdims=True) + 1e-6)
        cosang = vec @ (les.rotation.T @ les.rim_direction).astype(np.float32)
        if les.rim_coverage < 0.999:
            thr = 1.0 - 2.0 * les.rim_coverage
            ragged = 0.15 * _smooth_noise(u, les.shape_seed + 1, wavelength_mm=4.0)
            band = band * ((cosang + ragged) >= thr)
        rim_w = band.astype(np.float32)
        if les.rim_variant == "layered":
            d_in = les.rim_thickness_mm + 1.5
            inner = np.clip(1.0 - np.abs(depth - d_in - 0.5 * h) / h, 0, 1) * inside
            rim_w = np.maximum(rim_w, 0.6 * inner.astype(np.float32))
    return box, inside, rim_w, boundary


def render_lesions(anat: Anatomy, lesions: list[Lesion]):
    """Paint lesions into ``anat`` (in place) and return ground-truth maps.

    Lesions are clipped to parenchyma (never CSF or ventricles). Susceptibility, R2*, PD,
    FLAIR and T1w change inside each lesion; microbleeds/calcifications are painted outside
    the lesion masks.

    Returns
    -------
    dict
        ``lesion_labels`` (int32, lesion_id per voxel), ``rim_mask`` (uint8, rim weight >= 0.5),
        ``type_map`` (uint8, :data:`TYPE_CODES`; 6 microbleed, 7 calcification) and
        ``stats`` ({lesion_id: {'volume_mm3', 'centroid_mm', 'rim_coverage'}}).
    """
    shape = anat.shape
    aff = anat.affine
    vox_vol = float(np.prod(anat.voxel_size_mm))
    labels = np.zeros(shape, np.int32)
    rim_mask = np.zeros(shape, np.uint8)
    type_map = np.zeros(shape, np.uint8)
    paren = np.isin(anat.labels, PARENCHYMA) & (anat.brain_mask > 0)
    stats = {}
    for les in lesions:
        box, inside, rim_w, boundary = rasterise(les, aff, shape)
        if box is None:
            continue
        m = inside & paren[box] & (labels[box] == 0)
        if not m.any():
            continue
        rim_w = rim_w * m
        dchi = np.where(m, les.core_chi_ppm, 0.0).astype(np.float32)
        dchi = dchi + rim_w * (les.rim_chi_ppm - les.core_chi_ppm)
        anat.chi_ppm[box] += dchi
        r2 = np.where(m, les.r2star_core_delta_s, 0.0) + 100.0 * np.clip(dchi, 0, None)
        anat.r2star_s[box] = np.maximum(anat.r2star_s[box] + r2.astype(np.float32), 1.0)
        anat.pd[box] = np.where(m, anat.pd[box] * 1.08, anat.pd[box])
        nawm_flair = np.float32(0.48)
        flair_val = nawm_flair * les.flair_ratio * (0.92 + 0.08 * (rim_w == 0))
        anat.flair[box] = np.where(m, np.maximum(anat.flair[box], flair_val), anat.flair[box])
        anat.t1w[box] = np.where(m, anat.t1w[box] * 0.8, anat.t1w[box])
        labels[box][m] = les.lesion_id
        rim_mask[box][(rim_w >= 0.5) & m] = 1
        type_map[box][m] = TYPE_CODES[les.qsm_type]
        idx = np.argwhere(m) + np.array([s.start for s in box])
        cen = aff[:3, :3] @ idx.mean(0) + aff[:3, 3]
        bnd = boundary & m
        cov = float((rim_w[bnd] >= 0.5).mean()) if bnd.any() and les.rim_chi_ppm else 0.0
        stats[les.lesion_id] = {"volume_mm3": float(m.sum()) * vox_vol, "centroid_mm": cen,
                                "rim_coverage": cov}
        if les.deposit != "none":
            _paint_deposit(anat, les, type_map, labels)
    return {"lesion_labels": labels, "rim_mask": rim_mask, "type_map": type_map,
            "stats": stats}


def _paint_deposit(anat: Anatomy, les: Lesion, type_map, labels):
    """A 1.5-2.5 mm microbleed (+0.8 ppm) or calcification (-0.3 ppm) at the lesion edge.

    Sources: hemosiderin/ferritin in microbleeds (Liu T. et al. Radiology 2012, chi ~
    +0.5..+1 ppm at 1 mm); calcification diamagnetic (Chen W. et al. Radiology 2014).
    """
    c = les.centre_mm + les.deposit_offset_mm
    r = 1.0 if les.deposit == "microbleed" else 1.2
    aff = anat.affine
    d = np.abs(np.diag(aff)[:3])
    ic = (c - aff[:3, 3]) / np.diag(aff)[:3]
    lo = np.maximum(np.floor(ic - (r + 2) / d).astype(int), 0)
    hi = np.minimum(np.ceil(ic + (r + 2) / d).astype(int) + 1, anat.shape)
    if np.any(hi <= lo):
        return
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    axes = [aff[i, 3] + aff[i, i] * np.arange(lo[i], hi[i]) for i in range(3)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    dist = np.linalg.norm(g - c, axis=-1)
    f = np.clip((r - dist) / float(d.mean()) + 0.5, 0, 1).astype(np.float32)
    f[labels[sl] > 0] = 0.0
    f[anat.brain_mask[sl] == 0] = 0.0
    chi = 0.8 if les.deposit == "microbleed" else -0.3
    anat.chi_ppm[sl] += f * chi
    anat.r2star_s[sl] += f * (150.0 if les.deposit == "microbleed" else 80.0)
    anat.flair[sl] *= 1 - 0.5 * f
    type_map[sl][f >= 0.5] = 6 if les.deposit == "microbleed" else 7


def vein_touches(les: Lesion, veins: list[Vein], *, margin_mm: float = 1.0) -> bool:
    """Whether any of ``veins`` passes within ``margin_mm`` of the lesion's bounding sphere."""
    r = max(np.linalg.norm(o) + max(s) for o, s in les.blobs) + margin_mm
    for v in veins:
        for a, b in zip(v.points_mm[:-1], v.points_mm[1:]):
            if segment_distance_mm(les.centre_mm[None], a, b)[0] <= r + v.radius_mm:
                return True
    return False
