"""Per-patient analyses: PRL counts, "at least k PRLs" rules for a diagnosis, count agreement.

Counts come from each participant's **baseline** session (the earliest ``session_id`` of that
participant in the lesions table); participants without any lesion count 0 (in NMOSD many
patients have no brain lesion at all, so they must stay in the denominator).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation._common import not_estimable
from evaluation.agreement import icc, spearman
from evaluation.binary import sens_spec
from qsm_core.errors import InputError, QSMRimError

__all__ = ["baseline_lesions", "patient_counts", "group_labels", "patient_rules",
           "count_agreement"]


def baseline_lesions(lesions: pd.DataFrame) -> pd.DataFrame:
    """Lesions of each participant's earliest session."""
    if len(lesions) == 0:
        return lesions
    first = lesions.groupby("participant_id")["session_id"].transform("min")
    return lesions.loc[lesions["session_id"] == first]


def patient_counts(participants: pd.DataFrame, lesions: pd.DataFrame,
                   columns: dict[str, str]) -> pd.DataFrame:
    """Baseline lesion and PRL counts per participant.

    Parameters
    ----------
    participants : DataFrame
        One row per participant (all of them are kept).
    lesions : DataFrame
        Lesion table with 0/1 call columns.
    columns : dict
        ``{rater name: 0/1 column}``.

    Returns
    -------
    DataFrame
        Indexed by participant_id: ``n_lesions`` and one count column per rater (float; NaN
        when one of that participant's baseline calls is missing).
    """
    base = baseline_lesions(lesions)
    ids = participants["participant_id"].tolist()
    out = pd.DataFrame(index=pd.Index(ids, name="participant_id"))
    out["n_lesions"] = base.groupby("participant_id").size().reindex(ids).fillna(0).astype(int)
    for name, col in columns.items():
        grp = base.groupby("participant_id")[col]
        cnt = grp.sum(min_count=1).reindex(ids)
        has_missing = grp.apply(lambda s: bool(s.isna().any())).reindex(ids).fillna(False)
        cnt = cnt.where(~has_missing.astype(bool), np.nan)
        cnt[out["n_lesions"] == 0] = 0.0
        out[name] = cnt.astype(float)
    return out


def group_labels(participants: pd.DataFrame, *, group_column: str, positive_group: str,
                 negative_group: str | None = None) -> pd.Series:
    """1 for the positive group, 0 for the negative one(s), NaN for participants left out.

    Raises
    ------
    InputError
        The positive (or negative) group does not occur in ``group_column``.
    """
    g = participants.set_index("participant_id")[group_column].astype(str)
    values = sorted(g.unique().tolist())
    if positive_group not in values:
        raise InputError(f"participants: group {positive_group!r} not found in column "
                         f"{group_column!r} (values: {values}); pass --positive-group "
                         f"with one of them")
    if negative_group is not None and negative_group not in values:
        raise InputError(f"participants: group {negative_group!r} not found in column "
                         f"{group_column!r} (values: {values})")
    lab = pd.Series(np.where(g == positive_group, 1.0, 0.0), index=g.index)
    if negative_group is not None:
        lab[(g != positive_group) & (g != negative_group)] = np.nan
    return lab


def patient_rules(counts: pd.DataFrame, labels: pd.Series, raters: list[str], *,
                  min_counts=(1, 4), alpha: float = 0.05) -> dict:
    """Sensitivity and specificity of "at least k PRLs" for the positive group.

    Returns
    -------
    dict
        ``{f">={k}": {rater: sens_spec entry or not-estimable}}``.
    """
    lab = labels.reindex(counts.index)
    keep = lab.notna()
    out: dict = {}
    for k in min_counts:
        rule = {}
        for r in raters:
            c = counts.loc[keep, r]
            if c.isna().any():
                rule[r] = not_estimable(f"{int(c.isna().sum())} participant(s) have missing "
                                        f"{r} calls at baseline")
                continue
            try:
                rule[r] = sens_spec(lab[keep].to_numpy(), (c >= k).astype(int).to_numpy(),
                                    alpha=alpha)
            except QSMRimError as exc:
                rule[r] = not_estimable(str(exc))
        out[f">={k}"] = rule
    return out


def count_agreement(counts: pd.DataFrame, reference: str, raters: list[str], *,
                    icc_kind: str = "2,1") -> dict:
    """Agreement of each rater's per-patient PRL count with the reference count.

    Returns
    -------
    dict
        ``{rater: {"icc": ..., "spearman": ..., "mean_difference": ...}}``.
    """
    out = {}
    for r in raters:
        if r == reference:
            continue
        pair = counts[[reference, r]]
        if pair.isna().any().any():
            out[r] = {"icc": not_estimable("missing counts"),
                      "spearman": not_estimable("missing counts")}
            continue
        entry = {}
        try:
            entry["icc"] = icc(pair.to_numpy(), kind=icc_kind)
        except QSMRimError as exc:
            entry["icc"] = not_estimable(str(exc))
        try:
            entry["spearman"] = spearman(pair[reference].to_numpy(), pair[r].to_numpy())
        except QSMRimError as exc:
            entry["spearman"] = not_estimable(str(exc))
        d = (pair[r] - pair[reference]).to_numpy()
        entry["mean_difference"] = {"estimate": float(d.mean()) if d.size else None,
                                    "sd": float(d.std(ddof=1)) if d.size > 1 else None,
                                    "n": int(d.size), "method": f"mean of {r} - {reference}"}
        out[r] = entry
    return out
