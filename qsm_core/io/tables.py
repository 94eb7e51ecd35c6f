"""BIDS-style TSV tables with one schema each, validated on read and write.

Keys are ``participant_id`` (``sub-XXX``), ``session_id`` (``ses-YY`` or ``n/a`` for
single-session data) and ``lesion_id`` (the integer label in the lesion map). Missing
values are written ``n/a`` as BIDS asks.

Schemas (required columns; any other column is kept):

``participants``
    participant_id, diagnosis
``lesions``
    participant_id, session_id, lesion_id, centroid_x_mm, centroid_y_mm, centroid_z_mm,
    volume_mm3; plus optional reader_* calls (0/1), consensus (0/1), truth_prl (0/1),
    truth_type, location, enhancing, ...
``predictions``
    participant_id, session_id, lesion_id, and score columns such as cnn_prob, cnn_call,
    rule_score, rule_call
``subjects``
    participant_id, session_id, n_lesions, and n_prl_<scorer> counts
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qsm_core.errors import InputError
from qsm_core.io.atomic import atomic_path

__all__ = ["SCHEMAS", "KEYS", "read_table", "write_table", "validate_table", "NA"]

NA = "n/a"
KEYS = {
    "participants": ["participant_id"],
    "lesions": ["participant_id", "session_id", "lesion_id"],
    "predictions": ["participant_id", "session_id", "lesion_id"],
    "subjects": ["participant_id", "session_id"],
}
SCHEMAS = {
    "participants": ["participant_id", "diagnosis"],
    "lesions": ["participant_id", "session_id", "lesion_id", "centroid_x_mm", "centroid_y_mm",
                "centroid_z_mm", "volume_mm3"],
    "predictions": ["participant_id", "session_id", "lesion_id"],
    "subjects": ["participant_id", "session_id", "n_lesions"],
}


def validate_table(df: pd.DataFrame, kind: str, *, source: str = "<table>") -> pd.DataFrame:
    """Check required columns, key types and key uniqueness; return a normalised copy.

    Parameters
    ----------
    df : DataFrame
    kind : {'participants', 'lesions', 'predictions', 'subjects'}
    source : str
        File name used in error messages.

    Raises
    ------
    InputError
        Naming the file, the missing columns or the duplicated rows, and the fix.
    """
    if kind not in SCHEMAS:
        raise InputError(f"unknown table kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    missing = [c for c in SCHEMAS[kind] if c not in df.columns]
    if missing:
        raise InputError(f"{source}: missing required column(s) {missing} for a {kind} table; "
                         f"columns present: {list(df.columns)}")
    df = df.copy()
    keys = KEYS[kind]
    for k in keys:
        if k == "lesion_id":
            ids = pd.to_numeric(df[k], errors="coerce")
            bad = df.index[ids.isna() | (ids != ids.round())]
            if len(bad):
                raise InputError(f"{source}: lesion_id must be an integer label; bad rows "
                                 f"{[int(i) + 2 for i in bad[:10]]} (line numbers)")
            df[k] = ids.astype(int)
        else:
            df[k] = df[k].astype(str)
            if (df[k].str.strip() == "").any() or df[k].isin(["nan", "None"]).any():
                raise InputError(f"{source}: empty {k} in some rows")
    dup = df.duplicated(subset=keys, keep=False)
    if dup.any():
        rows = df.loc[dup, keys].head(10).to_dict("records")
        raise InputError(f"{source}: duplicated keys {keys} in rows {rows}; each must be unique")
    return df


def read_table(path, kind: str) -> pd.DataFrame:
    """Read and validate a TSV table (``n/a`` and empty cells are missing values)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give the path of a {kind}.tsv table")
    try:
        df = pd.read_csv(path, sep="\t", na_values=[NA, ""], keep_default_na=False,
                         dtype={"participant_id": str, "session_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable tab-separated table ({exc})") from None
    if "session_id" in df.columns:
        df["session_id"] = df["session_id"].fillna(NA)
    return validate_table(df, kind, source=str(path))


def write_table(df: pd.DataFrame, path, kind: str) -> Path:
    """Validate and write a TSV table atomically (missing values as ``n/a``)."""
    df = validate_table(df, kind, source=str(path))
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, na_rep=NA, float_format="%.6g")
    return Path(path)
