"""Follow-up analysis: new lesions and new rims per patient across sessions.

Sessions of a participant are ordered by ``session_id`` (``ses-01`` < ``ses-02`` ...). A
lesion is *new* at a session when its ``lesion_id`` did not occur at any earlier session of
that participant (lesion labels are tracked across sessions, as the simulator writes them);
a ``new_lesion`` 0/1 column, when present, is used instead. A *new rim* is a lesion called
a rim at a follow-up session that was not called a rim at any earlier session (a new lesion
with a rim, or an old lesion that turned rim-positive). A new rim *follows an enhancing
phase* when the lesion was enhancing at an earlier session or at its first appearance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation._common import not_estimable
from evaluation.binary import sens_spec
from evaluation.cohort import _cont_row, _prop_row
from qsm_core.errors import QSMRimError

__all__ = ["new_events", "followup_analysis"]


def new_events(lesions: pd.DataFrame, rim_columns: list[str]) -> pd.DataFrame:
    """Per (participant, follow-up session): new lesions and new rims per rim column.

    Returns
    -------
    DataFrame
        Columns participant_id, session_id, ``n_new_lesions``, and for each rim column ``c``:
        ``new_rims_<c>`` and ``new_rims_enh_<c>`` (new rims following enhancement).
    """
    rows = []
    has_enh = "enhancing" in lesions.columns
    for pid, les in lesions.groupby("participant_id", sort=True):
        sessions = sorted(s for s in les["session_id"].unique() if s != "n/a")
        if len(sessions) < 2:
            continue
        seen: set = set()
        rim_seen = {c: set() for c in rim_columns}
        enh_seen: set = set()
        for i, ses in enumerate(sessions):
            cur = les[les["session_id"] == ses]
            ids = cur["lesion_id"].to_numpy()
            if "new_lesion" in cur.columns and i > 0:
                is_new = cur["new_lesion"].fillna(0).to_numpy().astype(bool)
            else:
                is_new = np.array([lid not in seen for lid in ids])
            enh_now = (cur["enhancing"].fillna(0).to_numpy().astype(bool) if has_enh
                       else np.zeros(len(cur), bool))
            if i > 0:
                row = {"participant_id": pid, "session_id": ses,
                       "n_new_lesions": int(is_new.sum())}
                for c in rim_columns:
                    rim = cur[c].to_numpy(dtype=float)
                    new_rim = (rim == 1) & np.array([lid not in rim_seen[c] for lid in ids])
                    after_enh = np.array([lid in enh_seen for lid in ids]) | (enh_now & is_new)
                    row[f"new_rims_{c}"] = (int(new_rim.sum()) if np.isfinite(rim).all()
                                            else np.nan)
                    row[f"new_rims_enh_{c}"] = int((new_rim & after_enh).sum())
                rows.append(row)
            seen.update(ids.tolist())
            enh_seen.update(ids[enh_now].tolist())
            for c in rim_columns:
                rim_seen[c].update(ids[cur[c].to_numpy(dtype=float) == 1].tolist())
    cols = ["participant_id", "session_id", "n_new_lesions"]
    for c in rim_columns:
        cols += [f"new_rims_{c}", f"new_rims_enh_{c}"]
    return pd.DataFrame(rows, columns=cols)


def followup_analysis(participants: pd.DataFrame, lesions: pd.DataFrame, *,
                      group_column: str, labels: pd.Series | None, rim_columns,
                      alpha: float = 0.05) -> dict:
    """New lesions/rims per patient and the diagnostic value of "a new rim at follow-up".

    Parameters
    ----------
    labels : Series or None
        1/0/NaN positive-group labels by participant_id (see ``patient.group_labels``).
    rim_columns : list of str, or dict
        0/1 rim columns (reference first, then readers and scorer calls); a dict maps the
        display name of each rater to its column.

    Returns
    -------
    dict, or a not-estimable entry for single-session data.
    """
    names = dict(rim_columns) if isinstance(rim_columns, dict) else {c: c for c in rim_columns}
    ev = new_events(lesions, list(names.values()))
    if ev.empty:
        return not_estimable("no participant has two or more sessions (no follow-up data)")
    per = ev.groupby("participant_id").sum(numeric_only=True, min_count=1)
    n_sessions = lesions.groupby("participant_id")["session_id"].nunique()
    per.insert(0, "n_sessions", n_sessions.reindex(per.index))
    part = participants.set_index("participant_id")
    groups = sorted(part.loc[per.index, group_column].astype(str).unique().tolist())
    by = {g: [p for p in per.index if str(part.loc[p, group_column]) == g] for g in groups}
    rows = [_cont_row("scans per patient", {g: per.loc[idx, "n_sessions"] for g, idx in
                                            by.items()}),
            _cont_row("new lesions per patient", {g: per.loc[idx, "n_new_lesions"]
                                                  for g, idx in by.items()})]
    diagnostic = {}
    for label, c in names.items():
        col = f"new_rims_{c}"
        rows.append(_prop_row(f"patients with ≥1 new rim ({label})",
                              {g: (int((per.loc[idx, col] >= 1).sum()), len(idx))
                               for g, idx in by.items()}, "patients"))
        tot = float(per[col].sum())
        enh = float(per[f"new_rims_enh_{c}"].sum())
        rows.append({"characteristic": f"new rims after an enhancing phase ({label})",
                     "kind": "count", "overall": {"count": int(enh), "n": int(tot),
                                                  "percent": 100 * enh / tot if tot else None},
                     "format": "n/N (%)"})
        if labels is None:
            continue
        lab = labels.reindex(per.index)
        keep = lab.notna() & per[col].notna()
        try:
            diagnostic[label] = sens_spec(lab[keep].to_numpy(),
                                      (per.loc[keep, col] >= 1).astype(int).to_numpy(),
                                      alpha=alpha)
        except QSMRimError as exc:
            diagnostic[label] = not_estimable(str(exc))
    records = per.reset_index().to_dict("records")
    return {"n_patients_with_followup": int(len(per)), "groups": {g: len(v) for g, v in
                                                                 by.items()},
            "rows": rows, "new_rim_rule": diagnostic, "per_patient": records,
            "definition": __doc__.split("\n\n", 1)[1].strip().replace("\n", " ")
            .replace("``", "").replace("*", "")}
