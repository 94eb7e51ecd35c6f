"""Cohorts: plan (tables only, fast) and render (images) MS/NMOSD subjects and sessions.

Planning happens once, in the calling process, from the cohort seed: subjects, diagnoses,
ages, lesion counts, every lesion's parameters, veins, follow-up changes and reader calls.
Rendering a session then only needs that session's plan and its own seed
(``[seed, 2, subject, session]``), so results do not depend on the number of workers.

Prevalences are hit by design rather than by luck (``docs/simulator.md``): lesion counts
are drawn by stratified (Latin-hypercube) sampling of the group's count distribution; the
number of patients with PRLs and of baseline PRLs per group are quotas (with stochastic
rounding); PRL-prone patients are drawn with probability proportional to their lesion
count, and the PRLs are spread over them with a per-patient propensity
(Gamma-distributed), so that per-lesion and per-patient prevalences both match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import scipy.stats as st

from qsm_core.dipole import DIPOLE_KERNELS
from qsm_core.errors import InputError
from training.simulate import acquisition as acq
from training.simulate.anatomy import base_anatomy, build_anatomy
from training.simulate.lesions import (
    Lesion,
    assign_type,
    lesion_veins,
    place_lesion,
    render_lesions,
)
from training.simulate.presets import CohortPreset, GroupSpec, get_preset
from training.simulate.readers import default_readers, qsm_noise_ppm, read_lesions
from training.simulate.veins import plan_veins, render_veins

__all__ = ["SessionPlan", "SubjectPlan", "CohortPlan", "plan_cohort", "simulate_scan",
           "simulate_cohort", "ScanResult"]

log = logging.getLogger(__name__)


@dataclass
class SessionPlan:
    """One scan of a subject: its lesions (with follow-up flags) and head position."""

    session_id: str
    index: int
    lesions: list
    tilt_deg: float
    azimuth_deg: float

    @property
    def rotation(self) -> np.ndarray:
        """Head-to-scanner rotation (B0 tilt)."""
        return acq.tilt_rotation(self.tilt_deg, self.azimuth_deg)


@dataclass
class SubjectPlan:
    """One participant: demographics, veins and sessions."""

    participant_id: str
    index: int
    diagnosis: str
    age: int
    sex: str
    veins: list
    sessions: list = field(default_factory=list)


@dataclass
class CohortPlan:
    """A planned cohort: subjects plus its tables (participants, lesions)."""

    preset: CohortPreset
    seed: int
    subjects: list
    participants: pd.DataFrame
    lesions: pd.DataFrame
    settings: dict


def _stratified_counts(g: GroupSpec, n: int, rng) -> np.ndarray:
    """Lesion counts by stratified sampling of a zero-inflated, shifted negative binomial."""
    if n == 0:
        return np.zeros(0, int)
    u = (rng.permutation(n) + rng.uniform(size=n)) / n
    z = g.zero_lesion_fraction
    counts = np.zeros(n, int)
    nz = u >= z
    if g.lesions_mean <= 0:
        return counts
    m_all, v_all = g.lesions_mean, g.lesions_sd**2
    m1 = m_all / max(1 - z, 1e-9)                       # mean among patients with lesions
    v1 = (v_all + m_all**2) / max(1 - z, 1e-9) - m1**2  # variance among them
    mu = max(m1 - 1.0, 1e-6)                            # shifted by one lesion
    uu = np.clip((u[nz] - z) / max(1 - z, 1e-9), 1e-9, 1 - 1e-9)
    if v1 > mu * 1.01:
        r = mu**2 / (v1 - mu)
        p = r / (r + mu)
        counts[nz] = 1 + st.nbinom.ppf(uu, r, p).astype(int)
    else:
        counts[nz] = 1 + st.poisson.ppf(uu, mu).astype(int)
    return np.minimum(counts, 80)


def _stochastic_round(x: float, rng) -> int:
    f = int(np.floor(x))
    return f + int(rng.random() < x - f)


def _assign_prl_quota(g: GroupSpec, per_subject: list[list[Lesion]], rng) -> list[set]:
    """Choose which baseline lesions are PRLs (sets of lesion_ids per subject)."""
    n = len(per_subject)
    elig = [[les.lesion_id for les in ls if les.location != "infratentorial"]
            for ls in per_subject]
    n_elig = np.array([len(e) for e in elig])
    total = sum(len(ls) for ls in per_subject)
    out = [set() for _ in range(n)]
    n_pat = min(_stochastic_round(g.patient_prl_fraction * n, rng), int((n_elig > 0).sum()))
    if n_pat == 0 or total == 0:
        return out
    n_les = _stochastic_round(g.lesion_prl_fraction * total, rng)
    # size-biased choice of PRL-prone patients (PRL counts grow with lesion load); if they
    # cannot hold the lesion quota, swap the smallest for the largest remaining patients
    w = n_elig.astype(float) ** 2
    prone = list(rng.choice(n, size=n_pat, replace=False, p=w / w.sum()))
    rest = sorted(set(range(n)) - set(prone), key=lambda i: -n_elig[i])
    while rest and n_elig[prone].sum() < n_les and n_elig[rest[0]] > min(n_elig[prone]):
        j = int(np.argmin(n_elig[prone]))
        prone[j] = rest.pop(0)
    propensity = rng.gamma(2.0, 1.0, size=n)
    # within a patient, larger lesions are likelier to be chronic active (size bias)
    size_w = [{les.lesion_id: les.nominal_volume_mm3 ** g.style.prl_size_bias for les in ls}
              for ls in per_subject]
    pool, pool_w = [], []
    for i in prone:
        ids = np.asarray(elig[i])
        w_i = np.array([size_w[i][lid] for lid in ids], float)
        ids = list(ids[rng.choice(len(ids), size=len(ids), replace=False, p=w_i / w_i.sum())])
        out[i].add(int(ids[0]))
        for lid in ids[1:]:
            pool.append((i, int(lid)))
            pool_w.append(propensity[i] * size_w[i][int(lid)])
    k = int(np.clip(n_les - n_pat, 0, len(pool)))
    if k < n_les - n_pat:
        log.warning("group %s: only %d lesions can carry rims, %d asked", g.diagnosis,
                    len(pool) + n_pat, n_les)
    if k:
        pw = np.asarray(pool_w)
        pick = rng.choice(len(pool), size=k, replace=False, p=pw / pw.sum())
        for j in pick:
            i, lid = pool[j]
            out[i].add(lid)
    return out


def _place_many(base, rng, g: GroupSpec, n: int, first_id: int, existing: list,
                scale: float) -> list[Lesion]:
    names = list(g.style.location_probs)
    p = np.array([g.style.location_probs[k] for k in names], float)
    out = []
    lid = first_id
    for _ in range(n):
        les = None
        for _try in range(4):
            loc = names[int(rng.choice(len(names), p=p / p.sum()))]
            les = place_lesion(base, rng, lesion_id=lid, location=loc, style=g.style,
                               existing=existing + out, scale=scale)
            if les is not None:
                break
        if les is None:
            log.warning("no room for lesion %d; the subject gets fewer lesions", lid)
            continue
        out.append(les)
        lid += 1
    return out


def _typed(les, rng, preset, g, prl, scale):
    return assign_type(les, rng, prl=prl, type_probs=g.type_probs,
                       rim_chi_range_ppm=preset.rim_chi_range_ppm,
                       rim_thickness_range_mm=preset.rim_thickness_range_mm,
                       layered_prob=preset.layered_prob, style=g.style, scale=scale)


def _follow_up(previous: list, next_id: int, base, rng, preset, g: GroupSpec, scale):
    """Lesions at the next scan: enhancement resolves, new lesions and new rims appear.

    New rims per follow-up: on average ``lam = new_lesions_per_followup x
    new_lesion_rim_prob``, a share ``f = new_rim_after_enhancing_fraction`` of them in
    lesions that enhanced at the previous scan (each turns into a PRL with probability
    ``lam f / E[enhancing lesions per scan]``), the others (Poisson ``lam (1 - f)``) in new,
    non-enhancing lesions. Other new lesions enhance
    with probability 0.5 (gadolinium enhancement lasts weeks; Cotton et al. 2003).
    """
    cur = [les.evolve(enhancing=False, new=False, new_rim=False,
                      prior_enhancing=les.enhancing) for les in previous]
    lam = g.new_lesions_per_followup * g.new_lesion_rim_prob  # new rims per follow-up
    f = g.new_rim_after_enhancing_fraction
    # each lesion that enhanced at the previous scan turns into a PRL with probability q,
    # q chosen so that the expected after-enhancement rims are f * lam per follow-up
    expected_enhancing = max(0.5 * g.new_lesions_per_followup, 1e-9)
    q = min(1.0, lam * f / expected_enhancing)
    for k, les in enumerate(cur):
        if les.prior_enhancing and not les.truth_prl and les.location != "infratentorial" \
                and rng.random() < q:
            rim = _typed(les, rng, preset, g, True, scale)
            cur[k] = les.evolve(qsm_type=rim.qsm_type, rim_variant=rim.rim_variant,
                                rim_chi_ppm=rim.rim_chi_ppm, core_chi_ppm=rim.core_chi_ppm,
                                rim_thickness_mm=rim.rim_thickness_mm,
                                rim_coverage=rim.rim_coverage, new_rim=True)
    n_direct = int(rng.poisson(lam * (1 - f)))
    n_new = max(int(rng.poisson(g.new_lesions_per_followup)), n_direct)
    new = _place_many(base_anatomy(*base.key), rng, g, n_new, next_id, cur, scale)
    for j, les in enumerate(new):
        if j < n_direct and les.location != "infratentorial":
            les = _typed(les, rng, preset, g, True, scale).evolve(new=True, new_rim=True)
        else:
            les = _typed(les, rng, preset, g, False, scale)
            if les.qsm_type == "rim":  # a new lesion has no incomplete rim yet
                les = les.evolve(qsm_type="iso", rim_variant="none", rim_chi_ppm=0.0,
                                 rim_coverage=0.0, rim_thickness_mm=0.0)
            les = les.evolve(new=True, enhancing=bool(rng.random() < 0.5))
        cur.append(les)
    return cur, next_id + len(new) + 1


def plan_cohort(preset: str | CohortPreset = "seed-study", *, n_subjects: int, seed: int = 0,
                scanner: str = "siemens", voxel_size_mm=(1.0, 1.0, 1.0),
                source: str = "mni", anatomy_voxel_mm=None, anatomy_shape=None,
                snr: float | None = None, max_tilt_deg: float = 5.0,
                forward_kernel: str = "continuous",
                background_blur_voxels: float = acq.BACKGROUND_BLUR_VOXELS,
                field_strength_t: float | None = None, orientation: str = "axial",
                overrides: dict | None = None) -> CohortPlan:
    """Plan a cohort: subjects, sessions, lesions with ground truth and reader calls.

    No image is rendered; this is the fast "tables only" path (seconds for 53 subjects
    once the template is loaded).

    Parameters
    ----------
    preset : str or CohortPreset
        See :data:`training.simulate.presets.PRESETS`.
    n_subjects : int
    seed : int
    scanner : str
        'siemens', 'philips' or 'single-echo' (sets echo times and SNR, used by readers).
    voxel_size_mm : sequence of 3 floats
        Output GRE voxel size (enters rim conspicuity).
    source : {'mni', 'procedural'}
    anatomy_voxel_mm : sequence of 3 floats, optional
        Simulation grid (default 1 mm for 'mni'; the output voxel size for 'procedural').
    anatomy_shape : tuple, optional
        Procedural grid shape.
    snr : float, optional
        Overrides the scanner's SNR.
    max_tilt_deg : float
        Head tilt relative to B0 is uniform in [0, max_tilt_deg].
    forward_kernel : {'continuous', 'discrete'}
        Dipole kernel of the simulated fields (:func:`qsm_core.dipole.dipole_kernel`).
        ``continuous`` is the kernel qsmrim's inversion uses; ``discrete`` gives data whose
        forward model the inversion does not share (no "inverse crime").
    background_blur_voxels : float
        Partial-volume blur (Gaussian sigma, voxels) of the susceptibility outside the brain
        in the forward model (:func:`training.simulate.acquisition.blur_outside_brain`);
        0 = point-sampled air edges, as before 2026-11-22, whose Gibbs ringing reaches into
        the brain when B0 is tilted.
    field_strength_t : float, optional
        B0 in tesla (default: the scanner preset's, 3 T); see
        :func:`~training.simulate.acquisition.at_field_strength`.
    orientation : {'axial', 'sagittal', 'coronal'}
        Storage orientation of every image (:data:`~training.simulate.acquisition.ORIENTATIONS`);
        ``voxel_size_mm`` stays along the world axes x, y, z.
    overrides : dict, optional
        Preset overrides (:func:`~training.simulate.presets.get_preset`).

    Returns
    -------
    CohortPlan
    """
    preset = get_preset(preset, overrides)
    if not (isinstance(n_subjects, int | np.integer) and 1 <= n_subjects <= 10000):
        raise InputError(f"n_subjects must be an integer in [1, 10000], got {n_subjects!r}")
    if not 0 <= max_tilt_deg <= 30:
        raise InputError(f"max_tilt_deg must be in [0, 30], got {max_tilt_deg}")
    if forward_kernel not in DIPOLE_KERNELS:
        raise InputError(f"forward_kernel must be one of {list(DIPOLE_KERNELS)}, got "
                         f"{forward_kernel!r}")
    if not 0 <= background_blur_voxels <= 4:
        raise InputError(f"background_blur_voxels must be in [0, 4] voxels, got "
                         f"{background_blur_voxels!r}")
    scan = acq.at_field_strength(acq.get_scanner(scanner), field_strength_t)
    if orientation not in acq.ORIENTATIONS:
        raise InputError(f"orientation must be one of {sorted(acq.ORIENTATIONS)}, got "
                         f"{orientation!r}")
    vox = tuple(float(v) for v in np.asarray(voxel_size_mm, float).reshape(-1))
    if len(vox) != 3 or min(vox) <= 0 or max(vox) > 4:
        raise InputError(f"voxel_size_mm must be three sizes in (0, 4] mm, got "
                         f"{voxel_size_mm!r}")
    if anatomy_voxel_mm is None:
        anatomy_voxel_mm = (1.0, 1.0, 1.0) if source == "mni" else vox
    avox = tuple(float(v) for v in anatomy_voxel_mm)
    acq.grid_for((8, 8, 8), avox, vox)  # validates the voxel ratio early
    base = base_anatomy(source, avox, None if anatomy_shape is None else tuple(anatomy_shape))
    scale = 1.0
    if source == "procedural":
        fov = np.array(base.shape) * np.array(avox)
        scale = min(1.0, float(fov.min()) / 200.0)

    crng = np.random.default_rng([seed, 0])
    shares = np.array([g.share for g in preset.groups])
    raw = shares * n_subjects
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n_subjects - counts.sum()]:
        counts[i] += 1
    group_of = np.repeat(np.arange(len(preset.groups)), counts)
    group_of = group_of[crng.permutation(n_subjects)]

    subjects: list[SubjectPlan] = []
    baseline: dict[int, list] = {}
    lesion_counts = {gi: _stratified_counts(g, int(counts[gi]), crng)
                     for gi, g in enumerate(preset.groups)}
    used = {gi: 0 for gi in range(len(preset.groups))}
    for i in range(n_subjects):
        gi = int(group_of[i])
        g = preset.groups[gi]
        srng = np.random.default_rng([seed, 1, i])
        n_les = int(lesion_counts[gi][used[gi]])
        used[gi] += 1
        age = int(np.clip(round(srng.normal(g.age_mean, g.age_sd)), 18, 80))
        sex = "F" if srng.random() < g.female_fraction else "M"
        veins = plan_veins(base, srng)
        subj = SubjectPlan(f"sub-{i + 1:03d}", i, g.diagnosis, age, sex, veins)
        baseline[i] = _place_many(base, srng, g, n_les, 1, [], scale)
        subjects.append(subj)

    # PRL quotas per group, then lesion types
    for gi, g in enumerate(preset.groups):
        idx = [s.index for s in subjects if group_of[s.index] == gi]
        prl_sets = _assign_prl_quota(g, [baseline[i] for i in idx], crng)
        for i, prl in zip(idx, prl_sets):
            srng = np.random.default_rng([seed, 4, i])
            typed = []
            for les in baseline[i]:
                les = _typed(les, srng, preset, g, les.lesion_id in prl, scale)
                enh_p = g.enhancing_prob * (0.5 if les.truth_prl else 1.0)
                typed.append(les.evolve(enhancing=bool(srng.random() < enh_p)))
            baseline[i] = typed

    # sessions: stratified counts per group, then follow-up evolution
    n_sessions = {}
    for gi, g in enumerate(preset.groups):
        idx = [sp.index for sp in subjects if group_of[sp.index] == gi]
        u = (crng.permutation(len(idx)) + crng.uniform(size=len(idx))) / max(len(idx), 1)
        lam = max(g.sessions_mean - 1.0, 0.0)
        extra = st.poisson.ppf(u, lam).astype(int) if lam > 0 else np.zeros(len(idx), int)
        for i, e in zip(idx, extra):
            n_sessions[i] = int(min(1 + e, 6))
    for subj in subjects:
        g = preset.groups[int(group_of[subj.index])]
        srng = np.random.default_rng([seed, 5, subj.index])
        current = list(baseline[subj.index])
        next_id = max([les.lesion_id for les in current], default=0) + 1
        for s in range(n_sessions[subj.index]):
            if s > 0:
                current, next_id = _follow_up(current, next_id, base, srng, preset, g, scale)
            tilt = float(crng.uniform(0, max_tilt_deg))
            az = float(crng.uniform(0, 360))
            subj.sessions.append(SessionPlan(f"ses-{s + 1:02d}", s, list(current), tilt, az))

    participants = pd.DataFrame({
        "participant_id": [s.participant_id for s in subjects],
        "diagnosis": [s.diagnosis for s in subjects],
        "age": [s.age for s in subjects],
        "sex": [s.sex for s in subjects],
        "n_sessions": [len(s.sessions) for s in subjects],
    })
    rows = [_lesion_row(subj, ses, les) for subj in subjects for ses in subj.sessions
            for les in ses.lesions]
    lesions = pd.DataFrame(rows, columns=_LESION_COLUMNS)
    sigma = qsm_noise_ppm(scan.echo_times_s, scan.snr if snr is None else snr, vox,
                          field_strength_t=scan.field_strength_t)
    lesions = read_lesions(lesions, np.random.default_rng([seed, 3]),
                           readers=default_readers(preset.n_readers), sigma_ppm=sigma,
                           voxel_size_mm=vox)
    settings = {"preset": preset.name, "n_subjects": int(n_subjects), "seed": int(seed),
                "scanner": scan.name, "voxel_size_mm": list(vox), "source": source,
                "anatomy_voxel_mm": list(avox),
                "anatomy_shape": None if anatomy_shape is None else list(anatomy_shape),
                "snr": float(scan.snr if snr is None else snr),
                "max_tilt_deg": float(max_tilt_deg), "qsm_noise_ppm": sigma,
                "forward_kernel": forward_kernel,
                "background_blur_voxels": float(background_blur_voxels),
                "field_strength_t": float(scan.field_strength_t), "orientation": orientation,
                "overrides": dict(overrides or {})}
    return CohortPlan(preset, int(seed), subjects, participants, lesions, settings)


_LESION_COLUMNS = [
    "participant_id", "session_id", "lesion_id", "centroid_x_mm", "centroid_y_mm",
    "centroid_z_mm", "volume_mm3", "long_axis_mm", "diagnosis", "location", "truth_prl",
    "truth_type", "truth_rim_variant", "truth_rim_chi_ppm", "truth_rim_thickness_mm",
    "truth_rim_coverage", "truth_core_chi_ppm", "enhancing", "central_vein", "vein_at_edge",
    "deposit", "confluent", "near", "new_lesion", "new_rim", "prior_enhancing"]


def _lesion_row(subj: SubjectPlan, ses: SessionPlan, les: Lesion) -> list:
    c = ses.rotation @ les.centre_mm
    return [subj.participant_id, ses.session_id, les.lesion_id, *np.round(c, 3),
            round(les.nominal_volume_mm3, 3), round(les.long_axis_mm, 3), subj.diagnosis,
            les.location, int(les.truth_prl), les.qsm_type, les.rim_variant,
            round(les.rim_chi_ppm, 5), round(les.rim_thickness_mm, 3),
            round(les.rim_coverage, 3), round(les.core_chi_ppm, 5), int(les.enhancing),
            int(les.central_vein), int(les.vein_at_edge), les.deposit, int(les.confluent),
            les.near or "none", int(les.new), int(les.new_rim),
            int(les.prior_enhancing)]


@dataclass
class ScanResult:
    """One rendered session (arrays on their output grids)."""

    magnitude: np.ndarray        # (X, Y, Z, E) float32
    phase_rad: np.ndarray        # (X, Y, Z, E) float32
    echo_times_s: tuple
    gre_affine: np.ndarray
    flair: np.ndarray
    flair_affine: np.ndarray
    lesion_labels: np.ndarray    # FLAIR grid, int32
    chi_ppm: np.ndarray          # GRE grid, truth, brain-masked
    local_field_ppm: np.ndarray  # GRE grid, field of brain sources (truth)
    brain_mask: np.ndarray       # GRE grid uint8
    rim_mask: np.ndarray         # GRE grid uint8
    type_map: np.ndarray         # GRE grid uint8
    stats: dict  # lesion_id -> volume_mm3, centroid_mm (world, of the FLAIR-grid label),
    #              rim_coverage (on the simulation grid)
    scanner: acq.ScannerPreset


def simulate_scan(plan: CohortPlan, subject: SubjectPlan | int, session: int = 0, *,
                  flair_voxel_size_mm=None, workers: int = 1) -> ScanResult:
    """Render one planned session in memory.

    Parameters
    ----------
    plan : CohortPlan
    subject : SubjectPlan or int
        The subject (or its index in ``plan.subjects``).
    session : int
        Session index.
    flair_voxel_size_mm : sequence of 3 floats, optional
        FLAIR grid (default: the GRE voxel size).
    workers : int
        FFT threads.

    Returns
    -------
    ScanResult
    """
    if isinstance(subject, int | np.integer):
        subject = plan.subjects[int(subject)]
    ses = subject.sessions[session]
    cfg = plan.settings
    scan = acq.at_field_strength(acq.get_scanner(cfg["scanner"]), cfg.get("field_strength_t"))
    rng = np.random.default_rng([plan.seed, 2, subject.index, ses.index])
    shape = None if cfg["anatomy_shape"] is None else tuple(cfg["anatomy_shape"])
    anat = build_anatomy(source=cfg["source"], voxel_size_mm=tuple(cfg["anatomy_voxel_mm"]),
                         shape=shape, veins=False)
    render_veins(anat, subject.veins + lesion_veins(ses.lesions))
    maps = render_lesions(anat, ses.lesions)
    rot = ses.rotation
    avox = anat.voxel_size_mm
    vox = tuple(cfg["voxel_size_mm"])
    fvox = vox if flair_voxel_size_mm is None else tuple(float(v) for v in flair_voxel_size_mm)
    sim_world = acq.world_affine(anat, rot)
    kernel = cfg.get("forward_kernel", "continuous")
    field = acq.total_field(anat, sim_world, workers=workers, kernel=kernel,
                            background_blur_voxels=cfg.get("background_blur_voxels",
                                                           acq.BACKGROUND_BLUR_VOXELS))
    local = acq.total_field(anat, sim_world, brain_only=True, workers=workers, kernel=kernel)
    mag, pha = acq.acquire_gre(anat, field, scanner=scan, voxel_size_mm=vox, rng=rng,
                               snr=cfg["snr"], workers=workers)
    out_shape, scale = acq.grid_for(anat.shape, avox, vox)
    f_shape, f_scale = acq.grid_for(anat.shape, avox, fvox)
    flair = acq.acquire_flair(anat, voxel_size_mm=fvox, rng=rng, workers=workers)
    brain = acq.nearest_resample(anat.brain_mask, avox, vox, out_shape)
    chi = acq.linear_resample(np.where(anat.brain_mask > 0, anat.chi_ppm, 0).astype(np.float32),
                              avox, vox, out_shape) * brain
    local = acq.linear_resample(local, avox, vox, out_shape) * brain
    # table geometry from the label map as written (FLAIR grid, world mm)
    lab_f = acq.nearest_resample(maps["lesion_labels"], avox, fvox, f_shape)
    f_aff = acq.world_affine(anat, rot, f_scale)
    ids = np.array(sorted(set(np.unique(lab_f).tolist()) - {0}), int)
    stats = {}
    if len(ids):
        counts = ndi.sum_labels(np.ones(f_shape, np.float32), lab_f, index=ids)
        coms = ndi.center_of_mass(np.ones(f_shape, np.float32), lab_f, index=ids)
        vvol = float(np.prod(fvox))
        for lid, n, com in zip(ids, counts, coms):
            stats[int(lid)] = {"volume_mm3": float(n) * vvol,
                               "centroid_mm": f_aff[:3, :3] @ np.asarray(com) + f_aff[:3, 3],
                               "rim_coverage": maps["stats"][int(lid)]["rim_coverage"]}
    orientation = cfg.get("orientation", "axial")
    g_aff = acq.world_affine(anat, rot, scale)
    gre = {"magnitude": mag, "phase_rad": pha, "chi_ppm": chi.astype(np.float32),
           "local_field_ppm": local.astype(np.float32), "brain_mask": brain.astype(np.uint8),
           "rim_mask": acq.nearest_resample(maps["rim_mask"], avox, vox, out_shape),
           "type_map": acq.nearest_resample(maps["type_map"], avox, vox, out_shape)}
    for k, v in gre.items():
        gre[k], gre_affine = acq.store_as(v, g_aff, orientation)
    flair, flair_affine = acq.store_as(flair, f_aff, orientation)
    lab_f, _ = acq.store_as(lab_f, f_aff, orientation)
    return ScanResult(**gre, echo_times_s=tuple(scan.echo_times_s), gre_affine=gre_affine,
                      flair=flair, flair_affine=flair_affine, lesion_labels=lab_f,
                      stats=stats, scanner=scan)


def simulate_cohort(out_dir, *, preset="seed-study", n_subjects: int, seed: int = 0,
                    scanner: str = "siemens", voxel_size_mm=(1.0, 1.0, 1.0),
                    flair_voxel_size_mm=None, workers: int = 1, overwrite: bool = False,
                    progress: bool = True, tables_only: bool = False, report: bool = False,
                    source: str = "mni", anatomy_voxel_mm=None, anatomy_shape=None,
                    snr: float | None = None, max_tilt_deg: float = 5.0,
                    forward_kernel: str = "continuous",
                    background_blur_voxels: float = acq.BACKGROUND_BLUR_VOXELS,
                    field_strength_t: float | None = None, orientation: str = "axial",
                    overrides: dict | None = None):
    """Simulate a cohort and write it as a BIDS dataset (see :mod:`bids_writer`).

    Parameters
    ----------
    out_dir : str or Path
        Dataset root; must not exist or be empty unless ``overwrite``.
    preset, n_subjects, seed, scanner, voxel_size_mm, source, anatomy_voxel_mm, snr,
    max_tilt_deg, forward_kernel, background_blur_voxels, field_strength_t, orientation,
    overrides
        See :func:`plan_cohort`.
    flair_voxel_size_mm : sequence of 3 floats, optional
        FLAIR grid (default: the GRE grid).
    workers : int
        Parallel processes (results do not depend on it).
    overwrite : bool
        Replace a non-empty ``out_dir``.
    progress : bool
        tqdm progress bar.
    tables_only : bool
        Write participants.tsv and lesions.tsv (and the report) without images.
    report : bool
        Write the calibration report (``derivatives/simulation/calibration.{json,md}``).

    Returns
    -------
    Path
        ``out_dir``.
    """
    from training.simulate.bids_writer import write_dataset

    plan = plan_cohort(preset, n_subjects=n_subjects, seed=seed, scanner=scanner,
                       voxel_size_mm=voxel_size_mm, source=source,
                       anatomy_voxel_mm=anatomy_voxel_mm, anatomy_shape=anatomy_shape,
                       snr=snr, max_tilt_deg=max_tilt_deg, forward_kernel=forward_kernel,
                       background_blur_voxels=background_blur_voxels,
                       field_strength_t=field_strength_t, orientation=orientation,
                       overrides=overrides)
    return write_dataset(out_dir, plan, flair_voxel_size_mm=flair_voxel_size_mm,
                         workers=workers, overwrite=overwrite, progress=progress,
                         tables_only=tables_only, report=report)
