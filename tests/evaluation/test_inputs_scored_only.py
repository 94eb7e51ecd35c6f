import pandas as pd
import pytest

from evaluation.inputs import load_inputs
from qsm_core.errors import InputError


def _tables():
    part = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "diagnosis": ["MS", "NMOSD"]})
    les = pd.DataFrame({"participant_id": ["sub-01", "sub-01", "sub-02"],
                        "session_id": ["ses-01"] * 3, "lesion_id": [1, 2, 1],
                        "centroid_x_mm": 0.0, "centroid_y_mm": 0.0, "centroid_z_mm": 0.0,
                        "volume_mm3": 10.0, "consensus": [1, 0, 0]})
    pred = les[["participant_id", "session_id", "lesion_id"]].iloc[[0, 2]].assign(
        cnn_prob=[0.9, 0.1], cnn_call=[1, 0])
    return part, les, pred


def test_missing_prediction_is_an_error_by_default():
    part, les, pred = _tables()
    with pytest.raises(InputError, match="no prediction for 1 lesion"):
        load_inputs(part, les, [pred])


def test_scored_only_drops_and_notes_unscored_lesions():
    part, les, pred = _tables()
    data = load_inputs(part, les, [pred], scored_only=True)
    assert data.lesions["lesion_id"].tolist() == [1, 1]
    assert data.lesions["cnn_prob"].tolist() == [0.9, 0.1]
    assert any("1 lesion(s)" in n and "excluded" in n for n in data.notes)
