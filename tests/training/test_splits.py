import json

import numpy as np
import pandas as pd
import pytest

from qsm_core.errors import InputError
from training.splits import fold_indices, load_splits, make_splits, save_splits, validate_splits


def _table(rng, n_patients=40):
    rows = []
    for p in range(n_patients):
        n = int(rng.integers(1, 15))
        rate = rng.choice([0.0, 0.1, 0.5])
        for k in range(n):
            rows.append({"participant_id": f"sub-{p:03d}", "lesion_id": k + 1,
                         "label": int(rng.random() < rate)})
    t = pd.DataFrame(rows)
    t.loc[0, "label"] = 1
    return t


def test_patients_never_in_two_folds(rng):
    t = _table(rng)
    splits = make_splits(t, n_folds=5, seed=3)
    assert len(splits) == 5
    vals = [set(s["val"]) for s in splits]
    for i in range(5):
        assert not set(splits[i]["train"]) & vals[i]
        assert set(splits[i]["train"]) | vals[i] == set(t.participant_id)
        for j in range(i + 1, 5):
            assert not vals[i] & vals[j]
    assert set().union(*vals) == set(t.participant_id)
    # lesion indices partition the table, and a patient's lesions stay together
    seen = np.concatenate([fold_indices(t, s)[1] for s in splits])
    assert np.array_equal(np.sort(seen), np.arange(len(t)))


def test_stratified_and_seeded(rng):
    t = _table(rng, n_patients=60)
    splits = make_splits(t, n_folds=4, seed=1)
    assert splits == make_splits(t, n_folds=4, seed=1)
    assert splits != make_splits(t, n_folds=4, seed=2)
    overall = t.label.mean()
    for s in splits:
        _, va = fold_indices(t, s)
        assert abs(t.label.iloc[va].mean() - overall) < 0.12


def test_round_trip_and_validation(tmp_path, rng):
    t = _table(rng, n_patients=10)
    splits = make_splits(t, n_folds=2, seed=0)
    path = save_splits(splits, tmp_path / "splits.json")
    assert load_splits(path, t.participant_id.unique()) == splits
    edited = json.loads(path.read_text())
    moved = edited[0]["val"].pop()
    edited[1]["val"].append(moved)
    edited[1]["train"].remove(moved)
    edited[0]["train"].append(moved)
    validate_splits(edited, t.participant_id.unique())  # a valid hand edit
    edited[0]["val"].append(moved)
    with pytest.raises(InputError, match="both train and val"):
        validate_splits(edited, t.participant_id.unique())
    edited[0]["train"].remove(moved)
    with pytest.raises(InputError, match="validation sets of folds"):
        validate_splits(edited, t.participant_id.unique())
    with pytest.raises(InputError, match="not in the training data"):
        validate_splits(splits, ["sub-000"])
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(InputError, match="unreadable"):
        load_splits(tmp_path / "bad.json", ["sub-000"])


def test_too_few_patients(rng):
    t = _table(rng, n_patients=3)
    with pytest.raises(InputError, match="3 patients cannot fill 5 folds"):
        make_splits(t, n_folds=5)
    with pytest.raises(InputError, match="no 'grade' column"):
        make_splits(t, label_column="grade")
