"""Load and validate the evaluation tables and merge them on their keys.

Tables (design.md §3): ``participants.tsv`` (participant_id, diagnosis or another grouping
column, ...), ``lesions.tsv`` (keys, ``reader_*`` 0/1 calls, ``consensus``, optional
``truth_prl`` and ``enhancing``) and one or more ``predictions.tsv``. A scorer ``NAME`` is
found in a predictions table from its columns: ``NAME_prob`` (a probability in [0, 1]) or
``NAME_score`` (any continuous score), and/or ``NAME_call`` (0/1). Keys are
``participant_id``, ``session_id`` and ``lesion_id``; every lesion must have exactly one
prediction row in every predictions table, and every lesion's participant must be listed in
the participants table. Violations raise :class:`InputError` naming the rows.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qsm_core.errors import InputError
from qsm_core.io.tables import KEYS, read_table, validate_table

__all__ = ["EvalData", "Scorer", "load_inputs", "detect_scorers", "row_names", "BINARY_SUFFIX"]

LESION_KEYS = KEYS["lesions"]
SCORE_SUFFIXES = ("_prob", "_score")
BINARY_SUFFIX = "_call"
_SCORER_RE = re.compile(r"^(?P<name>.+)_(?P<kind>prob|score|call)$")


@dataclass(frozen=True)
class Scorer:
    """Columns of one scorer in the merged lesion table."""

    name: str
    score_column: str | None
    call_column: str | None
    kind: str | None  # 'prob', 'score' or None (calls only)
    source: str

    def as_dict(self) -> dict:
        """JSON-ready description."""
        return {"name": self.name, "score_column": self.score_column,
                "call_column": self.call_column, "kind": self.kind, "source": self.source}


@dataclass
class EvalData:
    """Validated, merged inputs of the harness."""

    participants: pd.DataFrame
    lesions: pd.DataFrame          # lesions merged with every scorer column
    readers: list[str]
    scorers: list[Scorer]
    sources: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def row_names(df: pd.DataFrame, mask=None, *, limit: int = 8) -> str:
    """Human-readable ``sub-X/ses-Y/lesion N`` list of (masked) rows, truncated."""
    sub = df if mask is None else df.loc[np.asarray(mask, bool)]
    names = []
    for r in sub.head(limit).itertuples(index=False):
        d = r._asdict()
        parts = [str(d.get("participant_id", "?"))]
        if "session_id" in d:
            parts.append(str(d["session_id"]))
        if "lesion_id" in d:
            parts.append(f"lesion {d['lesion_id']}")
        names.append("/".join(parts))
    more = len(sub) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load(obj, kind: str, label: str) -> tuple[pd.DataFrame, dict]:
    if isinstance(obj, pd.DataFrame):
        df = obj.copy()
        if "session_id" in df.columns:
            df["session_id"] = df["session_id"].fillna("n/a")
        df = validate_table(df, kind, source=label)
        src = {"kind": kind, "source": label, "rows": int(len(df))}
    else:
        path = Path(obj)
        df = read_table(path, kind)
        src = {"kind": kind, "source": str(path), "rows": int(len(df)),
               "sha256": _sha256(path)}
    if len(df) == 0:
        raise InputError(f"{src['source']}: the {kind} table has no rows; give a table with "
                         f"at least one {kind[:-1]}")
    return df, src


def _check_binary(df: pd.DataFrame, col: str, source: str, *, allow_missing: bool) -> None:
    v = pd.to_numeric(df[col], errors="coerce")
    bad = ~(v.isin([0, 1]) | (v.isna() & df[col].isna()))
    if bad.any():
        raise InputError(f"{source}: column {col!r} must hold 0/1 calls; bad values "
                         f"{sorted(map(str, set(df.loc[bad, col].tolist())))[:5]} in rows "
                         f"{row_names(df, bad)}")
    if not allow_missing and v.isna().any():
        raise InputError(f"{source}: column {col!r} is missing in rows "
                         f"{row_names(df, v.isna())}; fill it or drop those lesions")
    df[col] = v.astype("Float64").astype(float)


def detect_scorers(columns, *, source: str = "<predictions>") -> dict[str, dict[str, str]]:
    """Scorer names and their columns from ``*_prob``, ``*_score`` and ``*_call`` columns.

    Returns
    -------
    dict
        ``{name: {"prob"|"score"|"call": column}}``.

    Raises
    ------
    InputError
        A scorer with both ``NAME_prob`` and ``NAME_score`` (ambiguous).

    Examples
    --------
    >>> detect_scorers(["participant_id", "cnn_prob", "cnn_call", "rule_score"])
    {'cnn': {'prob': 'cnn_prob', 'call': 'cnn_call'}, 'rule': {'score': 'rule_score'}}
    """
    out: dict[str, dict[str, str]] = {}
    for c in columns:
        m = _SCORER_RE.match(str(c))
        if m and str(c) not in LESION_KEYS:
            out.setdefault(m["name"], {})[m["kind"]] = str(c)
    for name, cols in out.items():
        if "prob" in cols and "score" in cols:
            raise InputError(f"{source}: scorer {name!r} has both {name}_prob and {name}_score; "
                             f"keep one continuous column per scorer (rename the other)")
    return out


def load_inputs(participants, lesions, predictions_list, *, group_column: str = "diagnosis",
                reference_columns=("consensus",), optional_reference_columns=(),
                scored_only: bool = False) -> EvalData:
    """Read, validate and merge participants, lesions and predictions.

    Parameters
    ----------
    participants, lesions : path or DataFrame
    predictions_list : sequence of path or DataFrame
        Each holds the lesion keys and scorer columns; may be empty (readers only).
    group_column : str
        Grouping column of the participants table (e.g. ``diagnosis``).
    reference_columns : sequence of str
        0/1 lesion columns used as a reference; each must exist and have no missing values.
    optional_reference_columns : sequence of str
        Like ``reference_columns`` but only checked when present (e.g. ``truth_prl``).
    scored_only : bool
        Keep only the lesions that every predictions table scores (e.g. when the predictor's
        size filter dropped the smallest ones); the excluded lesions are listed in the
        notes. By default a lesion without a prediction is an error.

    Returns
    -------
    EvalData
    """
    if isinstance(predictions_list, (str, Path, pd.DataFrame)):
        predictions_list = [predictions_list]
    part, psrc = _load(participants, "participants", "participants table")
    les, lsrc = _load(lesions, "lesions", "lesions table")
    sources = [psrc, lsrc]
    notes: list[str] = []
    if group_column not in part.columns:
        raise InputError(f"{psrc['source']}: no grouping column {group_column!r}; columns are "
                         f"{list(part.columns)}; pass --group-column with one of them")
    if part[group_column].isna().any():
        raise InputError(f"{psrc['source']}: {group_column!r} is missing for participants "
                         f"{part.loc[part[group_column].isna(), 'participant_id'].tolist()[:8]}")
    part[group_column] = part[group_column].astype(str)
    unknown = ~les["participant_id"].isin(part["participant_id"])
    if unknown.any():
        raise InputError(f"{lsrc['source']}: lesions of participants not in the participants "
                         f"table: rows {row_names(les, unknown)}; add them to participants.tsv")
    readers = sorted(c for c in les.columns if str(c).startswith("reader_"))
    for col in reference_columns:
        if col not in les.columns:
            calls = [c for c in les.columns if c in ("consensus", "truth_prl")
                     or str(c).startswith(("reader_", "truth"))]
            raise InputError(f"{lsrc['source']}: no reference column {col!r}; 0/1 call columns "
                             f"present: {calls}; pass --reference with one of them")
        _check_binary(les, col, lsrc["source"], allow_missing=False)
    for col in optional_reference_columns:
        if col in les.columns:
            _check_binary(les, col, lsrc["source"], allow_missing=False)
    for col in readers + (["enhancing"] if "enhancing" in les.columns else []):
        _check_binary(les, col, lsrc["source"], allow_missing=True)

    merged = les.copy()
    scorers: list[Scorer] = []
    key_index = pd.MultiIndex.from_frame(les[LESION_KEYS])
    for i, pred in enumerate(predictions_list):
        label = f"predictions table {i + 1}"
        pdf, src = _load(pred, "predictions", label)
        sources.append(src)
        source = src["source"]
        found = detect_scorers(pdf.columns, source=source)
        if not found:
            raise InputError(f"{source}: no scorer columns; name them NAME_prob or NAME_score "
                             f"(continuous) and NAME_call (0/1), e.g. cnn_prob, cnn_call")
        pidx = pd.MultiIndex.from_frame(pdf[LESION_KEYS])
        missing = ~key_index.isin(pidx)
        if missing.any() and scored_only:
            notes.append(f"{int(missing.sum())} lesion(s) of the lesions table have no "
                         f"prediction in {source} and are excluded (scored_only): "
                         f"{row_names(les, missing)}")
            keep = ~missing
            les = les[keep].reset_index(drop=True)
            merged = merged[np.asarray(keep)].reset_index(drop=True)
            key_index = pd.MultiIndex.from_frame(les[LESION_KEYS])
            if les.empty:
                raise InputError(f"{source}: no lesion of the lesions table is scored")
        elif missing.any():
            raise InputError(f"{source}: no prediction for {int(missing.sum())} lesion(s) of "
                             f"the lesions table: {row_names(les, missing)}; predict every "
                             f"lesion or drop it from lesions.tsv")
        extra = ~pidx.isin(key_index)
        if extra.any():
            raise InputError(f"{source}: {int(extra.sum())} prediction row(s) match no lesion "
                             f"of the lesions table: {row_names(pdf, extra)}; check "
                             f"participant_id/session_id/lesion_id")
        stem = Path(source).stem if not isinstance(pred, pd.DataFrame) else f"pred{i + 1}"
        if stem == "predictions" and not isinstance(pred, pd.DataFrame):
            stem = Path(source).parent.name or stem
        rename = {}
        for name, cols in found.items():
            new = name
            taken = {s.name for s in scorers}
            if new in taken or any(c in merged.columns for c in cols.values()):
                new = re.sub(r"\W+", "_", f"{stem}_{name}")
                if new in taken or any(f"{new}_{k}" in merged.columns for k in cols):
                    raise InputError(f"{source}: scorer {name!r} clashes with a scorer or "
                                     f"column already loaded; rename its columns")
                notes.append(f"scorer {name!r} of {source} renamed {new!r} (name clash)")
            for k, c in cols.items():
                rename[c] = f"{new}_{k}"
            if "call" in cols:
                _check_binary(pdf, cols["call"], source, allow_missing=True)
            for k in ("prob", "score"):
                if k in cols:
                    v = pd.to_numeric(pdf[cols[k]], errors="coerce")
                    bad = v.isna() & pdf[cols[k]].notna()
                    if bad.any():
                        raise InputError(f"{source}: column {cols[k]!r} must be numeric; "
                                         f"bad rows {row_names(pdf, bad)}")
                    pdf[cols[k]] = v.astype(float)
            kind = "prob" if "prob" in cols else ("score" if "score" in cols else None)
            scorers.append(Scorer(name=new, kind=kind, source=source,
                                  score_column=f"{new}_{kind}" if kind else None,
                                  call_column=f"{new}_call" if "call" in cols else None))
        sub = pdf[LESION_KEYS + list(rename)].rename(columns=rename)
        merged = merged.merge(sub, on=LESION_KEYS, how="left", validate="one_to_one")
    return EvalData(participants=part.reset_index(drop=True),
                    lesions=merged.reset_index(drop=True), readers=readers, scorers=scorers,
                    sources=sources, notes=notes)
