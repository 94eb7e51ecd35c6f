"""Cohort presets: dataclasses of every cohort-level knob, with their literature sources.

``seed-study``
    Jang et al. (3 T QSM, MS vs NMOSD), Table 1 as summarised in design.md section 5: MS
    12.2 +- 8.6 T2 lesions per patient, 54 % of lesions with rims, 84 % of patients with at
    least one PRL; NMOSD 5.6 +- 7.9 lesions, 38 % of patients without brain lesions, 16 % of
    lesions with rims but 1 of 21 patients with a PRL; 32 MS + 21 NMOSD; follow-up MS 2.2 +-
    1.1 scans per patient.
``general-ms``
    MS cohorts outside the seed: ~10-12 % of lesions and ~40-50 % of patients with PRLs
    (Absinta et al. JAMA Neurol 2019; Maggi et al. Ann Neurol 2020; Meaton et al. 2022).
``nmosd-only``, ``ms-only``
    One group of the seed study each.

Custom values: :func:`get_preset` accepts ``overrides`` such as
``{"ms.lesion_prl_fraction": 0.3, "lesions_mean": 8}`` (a key without a group prefix
applies to every group).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qsm_core.errors import InputError
from training.simulate.lesions import LesionStyle

__all__ = ["GroupSpec", "CohortPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class GroupSpec:
    """One diagnostic group of a cohort.

    Attributes
    ----------
    diagnosis : str
        Written to participants.tsv (e.g. 'MS', 'NMOSD').
    share : float
        Share of the cohort's subjects.
    lesions_mean, lesions_sd : float
        T2/FLAIR lesions per patient with at least one lesion... see ``zero_lesion_fraction``;
        the mean and SD are over all patients (zeros included), as in Table 1.
    zero_lesion_fraction : float
        Share of patients without brain lesions.
    lesion_prl_fraction : float
        Share of (baseline) lesions that are paramagnetic rim lesions.
    patient_prl_fraction : float
        Share of patients with at least one PRL.
    type_probs : dict
        Appearance of the non-PRL lesions: iso / hypo / hyper / hypo_rim / incomplete_rim.
    sessions_mean : float
        Mean number of scans per patient (1 + Poisson).
    new_lesions_per_followup : float
        Poisson mean of new lesions at each follow-up scan.
    new_lesion_rim_prob : float
        Probability that a new lesion becomes a PRL.
    new_rim_after_enhancing_fraction : float
        Share of those new rims that follow an enhancing phase (seed: about half).
    enhancing_prob : float
        Probability that a baseline lesion enhances.
    age_mean, age_sd : float
    female_fraction : float
    style : LesionStyle
    """

    diagnosis: str
    share: float
    lesions_mean: float
    lesions_sd: float
    zero_lesion_fraction: float = 0.0
    lesion_prl_fraction: float = 0.12
    patient_prl_fraction: float = 0.45
    type_probs: dict = field(default_factory=lambda: {
        "iso": 0.42, "hyper": 0.30, "hypo": 0.08, "hypo_rim": 0.05, "incomplete_rim": 0.15})
    sessions_mean: float = 1.0
    new_lesions_per_followup: float = 1.0
    new_lesion_rim_prob: float = 0.3
    new_rim_after_enhancing_fraction: float = 0.5
    enhancing_prob: float = 0.04
    age_mean: float = 38.0
    age_sd: float = 10.0
    female_fraction: float = 0.7
    style: LesionStyle = field(default_factory=LesionStyle)

    def validate(self, where: str) -> None:
        """Raise InputError naming the bad value and its allowed range."""
        self.style.validate(where)
        def frac(name):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise InputError(f"{where}.{name} must be a fraction in [0, 1], got {v!r}")
        for n in ("share", "zero_lesion_fraction", "lesion_prl_fraction",
                  "patient_prl_fraction", "new_lesion_rim_prob",
                  "new_rim_after_enhancing_fraction", "enhancing_prob", "female_fraction"):
            frac(n)
        for n in ("lesions_mean", "lesions_sd", "new_lesions_per_followup", "age_sd"):
            v = getattr(self, n)
            if not (isinstance(v, int | float) and 0.0 <= v < 1000):
                raise InputError(f"{where}.{n} must be a non-negative number, got {v!r}")
        if not (isinstance(self.sessions_mean, int | float) and 1.0 <= self.sessions_mean <= 10):
            raise InputError(f"{where}.sessions_mean must be in [1, 10], got "
                             f"{self.sessions_mean!r}")
        if not 0 < self.age_mean < 120:
            raise InputError(f"{where}.age_mean must be in (0, 120), got {self.age_mean!r}")
        if self.lesion_prl_fraction > 0 and self.patient_prl_fraction == 0:
            raise InputError(f"{where}: lesion_prl_fraction > 0 needs patient_prl_fraction > 0")
        if self.patient_prl_fraction > 1 - self.zero_lesion_fraction + 1e-9:
            raise InputError(f"{where}: patient_prl_fraction ({self.patient_prl_fraction}) "
                             f"cannot exceed the share of patients with lesions "
                             f"({1 - self.zero_lesion_fraction:.2f})")
        if not self.type_probs or any((not isinstance(v, int | float)) or v < 0
                                      for v in self.type_probs.values()) \
                or sum(self.type_probs.values()) <= 0:
            raise InputError(f"{where}.type_probs must be non-negative weights, got "
                             f"{self.type_probs!r}")
        bad = set(self.type_probs) - {"iso", "hypo", "hyper", "hypo_rim", "incomplete_rim"}
        if bad:
            raise InputError(f"{where}.type_probs has unknown types {sorted(bad)}")


@dataclass(frozen=True)
class CohortPreset:
    """A cohort: its groups, rim physics ranges and readers.

    Attributes
    ----------
    name : str
    groups : tuple of GroupSpec
    rim_chi_range_ppm : (float, float)
        Rim susceptibility above NAWM (design.md: +0.01..+0.06 ppm).
    rim_thickness_range_mm : (float, float)
        1-2 mm (NAIMS; Dal-Bianco 2017).
    layered_prob : float
        Share of PRLs with a layered (double) rim.
    n_readers : int
        Simulated readers (odd numbers give a strict majority).
    description : str
    """

    name: str
    groups: tuple
    rim_chi_range_ppm: tuple = (0.01, 0.06)
    rim_thickness_range_mm: tuple = (1.0, 2.0)
    layered_prob: float = 0.12
    n_readers: int = 3
    description: str = ""

    def validate(self) -> CohortPreset:
        """Check every value; returns self."""
        if not self.groups:
            raise InputError(f"preset {self.name!r} has no groups")
        for g in self.groups:
            g.validate(f"preset {self.name!r} group {g.diagnosis!r}")
        if abs(sum(g.share for g in self.groups) - 1.0) > 1e-6:
            raise InputError(f"preset {self.name!r}: group shares must sum to 1")
        lo, hi = self.rim_chi_range_ppm
        if not 0 < lo <= hi <= 0.2:
            raise InputError(f"rim_chi_range_ppm must satisfy 0 < lo <= hi <= 0.2 ppm, got "
                             f"{self.rim_chi_range_ppm}")
        lo, hi = self.rim_thickness_range_mm
        if not 0.3 <= lo <= hi <= 4.0:
            raise InputError(f"rim_thickness_range_mm must be within [0.3, 4] mm, got "
                             f"{self.rim_thickness_range_mm}")
        if not (isinstance(self.n_readers, int) and 1 <= self.n_readers <= 9):
            raise InputError(f"n_readers must be an integer in [1, 9], got {self.n_readers!r}")
        return self


_NMOSD_STYLE = LesionStyle(location_probs={"periventricular": 0.25, "juxtacortical": 0.10,
                                           "deep_wm": 0.45, "infratentorial": 0.20},
                           long_axis_median_mm=5.5, confluent_prob=0.04,
                           central_vein_prob=0.15)

PRESETS: dict[str, CohortPreset] = {
    "seed-study": CohortPreset(
        name="seed-study",
        groups=(
            GroupSpec("MS", 32 / 53, 12.2, 8.6, lesion_prl_fraction=0.54,
                      patient_prl_fraction=0.84, sessions_mean=2.2, age_mean=36.0,
                      age_sd=10.0, female_fraction=0.72, enhancing_prob=0.04),
            GroupSpec("NMOSD", 21 / 53, 5.6, 7.9, zero_lesion_fraction=0.38,
                      lesion_prl_fraction=0.16, patient_prl_fraction=1 / 21,
                      sessions_mean=1.5, new_lesions_per_followup=0.3,
                      new_lesion_rim_prob=0.05, age_mean=45.0, age_sd=12.0,
                      female_fraction=0.86, enhancing_prob=0.02, style=_NMOSD_STYLE),
        ),
        description="Jang et al. seed study: 32 MS vs 21 NMOSD (design.md section 5)"),
    "general-ms": CohortPreset(
        name="general-ms",
        groups=(GroupSpec("MS", 1.0, 12.2, 8.6, lesion_prl_fraction=0.12,
                          patient_prl_fraction=0.45, sessions_mean=2.2,
                          new_lesion_rim_prob=0.15),),
        description="General MS cohort: ~12 % of lesions and ~45 % of patients with PRLs"),
}
PRESETS["ms-only"] = dataclasses.replace(PRESETS["seed-study"], name="ms-only",
                                         groups=(dataclasses.replace(
                                             PRESETS["seed-study"].groups[0], share=1.0),))
PRESETS["nmosd-only"] = dataclasses.replace(PRESETS["seed-study"], name="nmosd-only",
                                            groups=(dataclasses.replace(
                                                PRESETS["seed-study"].groups[1], share=1.0),))

_PRESET_KEYS = {"rim_chi_range_ppm", "rim_thickness_range_mm", "layered_prob", "n_readers"}


def _coerce(value, like):
    if isinstance(value, str):
        try:
            if isinstance(like, tuple):
                return tuple(float(v) for v in value.replace(",", " ").split())
            if isinstance(like, bool):
                return value.lower() in ("1", "true", "yes")
            if isinstance(like, int) and not isinstance(like, bool):
                return int(value)
            if isinstance(like, float):
                return float(value)
        except ValueError:
            raise InputError(f"cannot read {value!r} as a {type(like).__name__}") from None
    return value


def get_preset(name: str | CohortPreset, overrides: dict | None = None) -> CohortPreset:
    """A validated preset, optionally with some values changed.

    Parameters
    ----------
    name : str or CohortPreset
        A key of :data:`PRESETS` or a preset object.
    overrides : dict, optional
        ``{"key": value}`` for preset-level keys (e.g. ``n_readers``) or group keys applied
        to every group, ``{"MS.key": value}`` for one group (diagnosis, case-insensitive).
        String values are converted to the field's type.

    Raises
    ------
    InputError
        Unknown preset or key, or a value out of range.
    """
    if isinstance(name, CohortPreset):
        preset = name
    else:
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[name]
    for key, value in (overrides or {}).items():
        if key in _PRESET_KEYS:
            preset = dataclasses.replace(preset, **{key: _coerce(value, getattr(preset, key))})
            continue
        group, _, gkey = key.rpartition(".")
        in_style = group.lower() == "style" or group.lower().endswith(".style")
        if in_style:  # "[GROUP.]style.FIELD": a field of the group's LesionStyle
            group = group[:-len("style")].rstrip(".")
            fields = {f.name for f in dataclasses.fields(LesionStyle)} - {"location_probs"}
        else:
            fields = {f.name for f in dataclasses.fields(GroupSpec)} - {"style", "type_probs"}
        if gkey not in fields:
            if in_style:
                raise InputError(f"unknown lesion-style key {key!r}; style keys: "
                                 f"{sorted(fields)}")
            raise InputError(f"unknown preset key {key!r}; preset keys: {sorted(_PRESET_KEYS)}, "
                             f"group keys: {sorted(fields)}, lesion-style keys: style.KEY")
        groups = []
        hit = False
        for g in preset.groups:
            if not group or g.diagnosis.lower() == group.lower():
                hit = True
                if in_style:
                    style = dataclasses.replace(
                        g.style, **{gkey: _coerce(value, getattr(g.style, gkey))})
                    g = dataclasses.replace(g, style=style)
                else:
                    g = dataclasses.replace(g, **{gkey: _coerce(value, getattr(g, gkey))})
            groups.append(g)
        if not hit:
            raise InputError(f"preset {preset.name!r} has no group {group!r}; groups: "
                             f"{[g.diagnosis for g in preset.groups]}")
        preset = dataclasses.replace(preset, groups=tuple(groups))
    return preset.validate()
