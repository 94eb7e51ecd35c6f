"""Calibration report of a simulated cohort against its preset.

Per group (baseline sessions, as in the seed study's Table 1): patients, lesions per patient,
per-lesion and per-patient PRL prevalence (truth and reader consensus) next to the preset's
targets; pairwise Cohen's kappa between readers; consensus-vs-truth accuracy, sensitivity
and specificity; follow-up counts (new lesions, new rims, share of new rims after an
enhancing phase).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from qsm_core.io import write_json, write_text

__all__ = ["cohen_kappa", "calibration_report", "write_report"]


def cohen_kappa(a, b) -> float:
    """Cohen's kappa of two binary raters.

    Examples
    --------
    >>> round(cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]), 3)
    0.5
    """
    a = np.asarray(a, int)
    b = np.asarray(b, int)
    po = float(np.mean(a == b))
    pe = float(np.mean(a) * np.mean(b) + (1 - np.mean(a)) * (1 - np.mean(b)))
    return float("nan") if pe == 1 else (po - pe) / (1 - pe)


def _group_stats(g, part, les, base_les):
    ids = part.participant_id
    counts = base_les.groupby("participant_id").size().reindex(ids, fill_value=0)
    prl_pat = base_les.groupby("participant_id")["truth_prl"].max().reindex(ids, fill_value=0)
    cons_pat = base_les.groupby("participant_id")["consensus"].max().reindex(ids, fill_value=0)
    n_l = len(base_les)
    return {
        "n_patients": int(len(part)),
        "lesions_per_patient_mean": float(counts.mean()),
        "lesions_per_patient_sd": float(counts.std(ddof=1)) if len(part) > 1 else 0.0,
        "lesions_per_patient_target": [g.lesions_mean, g.lesions_sd],
        "patients_without_lesions": float((counts == 0).mean()),
        "patients_without_lesions_target": g.zero_lesion_fraction,
        "lesion_prl_fraction_truth": float(base_les["truth_prl"].mean()) if n_l else 0.0,
        "lesion_prl_fraction_consensus": float(base_les["consensus"].mean()) if n_l else 0.0,
        "lesion_prl_fraction_target": g.lesion_prl_fraction,
        "patient_prl_fraction_truth": float(prl_pat.mean()),
        "patient_prl_fraction_consensus": float(cons_pat.mean()),
        "patient_prl_fraction_target": g.patient_prl_fraction,
        "n_lesions_baseline": int(n_l),
        "n_lesions_all_sessions": int(len(les)),
        "scans_per_patient_mean": float(part["n_sessions"].mean()),
        "scans_per_patient_target_mean": g.sessions_mean,
    }


def calibration_report(plan, lesions: pd.DataFrame | None = None) -> dict:
    """Numbers that check a cohort against its preset (see the module docstring)."""
    les = plan.lesions if lesions is None else lesions
    part = plan.participants
    first = part.assign(first=[f"ses-{1:02d}"] * len(part))
    base = les[les.session_id == "ses-01"]
    groups = {}
    for g in plan.preset.groups:
        p = first[first.diagnosis == g.diagnosis]
        groups[g.diagnosis] = _group_stats(g, p, les[les.diagnosis == g.diagnosis],
                                           base[base.diagnosis == g.diagnosis])
    readers = sorted(c for c in les.columns if c.startswith("reader_"))
    kappas = {f"{a}~{b}": cohen_kappa(les[a], les[b])
              for a, b in itertools.combinations(readers, 2)}
    t, c = les["truth_prl"].to_numpy(int), les["consensus"].to_numpy(int)
    fu = les[les.session_id != "ses-01"]
    new_rims = fu[fu.new_rim == 1]
    rep = {
        "settings": plan.settings,
        "groups": groups,
        "pairwise_kappa": kappas,
        "mean_pairwise_kappa": float(np.mean(list(kappas.values()))) if kappas else None,
        "reader_vs_truth_kappa": {r: cohen_kappa(les[r], t) for r in readers},
        "consensus_vs_truth": {
            "accuracy": float(np.mean(t == c)),
            "sensitivity": float(c[t == 1].mean()) if (t == 1).any() else None,
            "specificity": float(1 - c[t == 0].mean()) if (t == 0).any() else None,
            "kappa": cohen_kappa(t, c),
        },
        "followup": {
            "n_followup_scans": int(fu[["participant_id", "session_id"]].drop_duplicates()
                                    .shape[0]),
            "new_lesions": int(fu["new_lesion"].sum()) if len(fu) else 0,
            "new_rims": int(len(new_rims)),
            "new_rims_after_enhancing_fraction": float(new_rims["prior_enhancing"].mean())
            if len(new_rims) else None,
        },
        "n_lesions_total": int(len(les)),
    }
    return rep


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return " ± ".join(_fmt(x) for x in v)
    return str(v)


def write_report(rep: dict, folder) -> tuple[Path, Path]:
    """Write ``calibration.json`` and ``calibration.md`` into ``folder``."""
    folder = Path(folder)
    j = write_json(folder / "calibration.json", rep)
    lines = ["# Simulated cohort: calibration against the preset", "",
             f"Settings: `{rep['settings']}`", ""]
    for name, g in rep["groups"].items():
        lines += [f"## {name}", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in g.items()]
        lines.append("")
    lines += ["## Readers", "", "| pair | Cohen's kappa |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in rep["pairwise_kappa"].items()]
    lines += ["", f"Consensus vs truth: {rep['consensus_vs_truth']}", "",
              f"Follow-up: {rep['followup']}", ""]
    m = write_text(folder / "calibration.md", "\n".join(lines))
    return j, m
