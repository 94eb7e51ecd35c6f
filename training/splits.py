"""Patient-grouped, label-stratified K-fold splits, saved as an editable ``splits.json``.

Every lesion of a patient falls in the same fold (lesions of one brain are not independent),
and folds are balanced for the rim label as far as the grouping allows
(:class:`sklearn.model_selection.StratifiedGroupKFold`, shuffled with a seed).

``splits.json`` (nnU-Net style) is a list with one entry per fold::

    [{"train": ["sub-001", ...], "val": ["sub-004", ...]}, ...]

Entries are participant ids. Edit it to pin patients to folds; the trainer validates it
(every patient in exactly one validation fold, train and val disjoint) and uses it as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from qsm_core.errors import InputError
from qsm_core.io.atomic import write_json

__all__ = ["make_splits", "validate_splits", "save_splits", "load_splits", "fold_indices"]


def make_splits(table: pd.DataFrame, *, n_folds: int = 5, seed: int = 0,
                label_column: str = "label",
                group_column: str = "participant_id") -> list[dict[str, list[str]]]:
    """Patient-grouped stratified K-fold split of a lesion table.

    Parameters
    ----------
    table : DataFrame
        One row per lesion with ``group_column`` and ``label_column`` (0/1).
    n_folds : int
        Number of folds (>= 2, <= number of patients).
    seed : int
        Shuffling seed (same seed, same table -> same splits).
    label_column, group_column : str

    Returns
    -------
    list of dict
        ``[{"train": [ids], "val": [ids]}, ...]``, ids sorted within each list.

    Raises
    ------
    InputError
        Missing columns, fewer patients than folds.
    """
    for col in (label_column, group_column):
        if col not in table.columns:
            raise InputError(f"lesion table has no {col!r} column (columns: "
                             f"{list(table.columns)})")
    groups = table[group_column].astype(str).to_numpy()
    labels = np.asarray(table[label_column], dtype=int)
    patients = np.unique(groups)
    if n_folds < 2:
        raise InputError(f"n_folds must be >= 2, got {n_folds}")
    if patients.size < n_folds:
        raise InputError(f"{patients.size} patients cannot fill {n_folds} folds; use "
                         f"--folds {max(2, patients.size)} or more data")
    skf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = []
    for _, val_idx in skf.split(np.zeros(len(labels)), labels, groups):
        val = sorted(set(groups[val_idx]))
        train = sorted(set(patients) - set(val))
        splits.append({"train": train, "val": val})
    return splits


def validate_splits(splits, patients, *, source: str = "splits") -> list[dict[str, list[str]]]:
    """Check that splits cover ``patients`` exactly, each once as validation.

    Raises
    ------
    InputError
        Naming the offending patients and the fix.
    """
    if not isinstance(splits, list) or not splits or not all(
            isinstance(s, dict) and "train" in s and "val" in s for s in splits):
        raise InputError(f"{source}: must be a non-empty list of {{'train': [...], "
                         "'val': [...]}} objects")
    patients = {str(p) for p in patients}
    seen: dict[str, int] = {}
    out = []
    for k, s in enumerate(splits):
        train, val = [str(p) for p in s["train"]], [str(p) for p in s["val"]]
        both = set(train) & set(val)
        if both:
            raise InputError(f"{source}: fold {k} has patients in both train and val: "
                             f"{sorted(both)[:10]}")
        if not val:
            raise InputError(f"{source}: fold {k} has an empty validation set")
        for p in val:
            if p in seen:
                raise InputError(f"{source}: patient {p} is in the validation sets of folds "
                                 f"{seen[p]} and {k}; each patient belongs to one fold")
            seen[p] = k
        out.append({"train": sorted(train), "val": sorted(val)})
    unknown = set(seen) | {p for s in out for p in s["train"]}
    unknown -= patients
    if unknown:
        raise InputError(f"{source}: patients not in the training data: {sorted(unknown)[:10]}"
                         "; delete splits.json to regenerate it")
    missing = patients - set(seen)
    if missing:
        raise InputError(f"{source}: patients in no validation fold: {sorted(missing)[:10]}; "
                         "delete splits.json to regenerate it")
    for k, s in enumerate(out):
        absent = patients - set(s["train"]) - set(s["val"])
        if absent:
            raise InputError(f"{source}: fold {k} uses patients {sorted(absent)[:10]} neither "
                             "for training nor validation")
    return out


def save_splits(splits, path) -> Path:
    """Write ``splits.json`` atomically."""
    return write_json(path, splits)


def load_splits(path, patients) -> list[dict[str, list[str]]]:
    """Read and validate ``splits.json`` against the training patients."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable splits file ({exc}); fix or delete it") from None
    return validate_splits(splits, patients, source=str(path))


def fold_indices(table: pd.DataFrame, split: dict, *,
                 group_column: str = "participant_id") -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val) of ``table`` for one fold's split."""
    groups = table[group_column].astype(str).to_numpy()
    train = np.flatnonzero(np.isin(groups, split["train"]))
    val = np.flatnonzero(np.isin(groups, split["val"]))
    return train, val
