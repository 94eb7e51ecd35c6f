import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from evaluation.harness import evaluate
from evaluation.inputs import detect_scorers, load_inputs
from qsm_core.errors import InputError
from qsm_core.io.tables import write_table
from tests.evaluation.synth import make_tables


def strict_load(path):
    def bad(c):
        raise AssertionError(f"non-finite constant {c} in report.json")
    return json.loads(path.read_text(), parse_constant=bad)


def test_full_report_numbers_and_files(rng, tmp_path):
    part, les, pred = make_tables(rng)
    res = evaluate(part, les, [pred], n_boot=100, out_dir=tmp_path, figures=False)
    rep = strict_load(tmp_path / "report.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json",
                                                          "report.md"]
    cnn = rep["lesion"]["consensus"]["scorers"]["cnn"]
    # the AUC in the report is the Mann-Whitney statistic of the merged table
    from sklearn.metrics import roc_auc_score
    assert cnn["roc_auc"]["estimate"] == pytest.approx(roc_auc_score(les.consensus,
                                                                     pred.cnn_prob))
    assert cnn["roc_auc"]["bootstrap"]["ci_low"] < cnn["roc_auc"]["estimate"]
    # the strong scorer beats the weak one (synthetic truth: cnn_shift 2 vs rule_shift 1)
    comp = rep["lesion"]["truth_prl"]["paired_delong"][0]
    assert comp["scorer_a"] == "cnn" and comp["estimate"] > 0 and comp["p_value"] < 0.05
    assert set(rep["lesion"]) == {"consensus", "truth_prl"}
    assert rep["agreement"]["fleiss_kappa_readers"]["n_raters"] == 3
    assert rep["patient"]["rules"][">=1"]["cnn"]["sensitivity"]["n"] == 20
    md = (tmp_path / "report.md").read_text()
    assert "Per-patient diagnosis: MS (n = 20)" in md and "nan" not in md.lower()
    assert res["lesion"]["consensus"]["n_lesions"] == len(les)


def test_scorer_with_nans_is_flagged_not_estimable(rng, tmp_path):
    part, les, pred = make_tables(rng)
    pred.loc[[3, 7], "cnn_prob"] = np.nan
    write_table(pred, tmp_path / "predictions.tsv", "predictions")
    res = evaluate(part, les, [tmp_path / "predictions.tsv"], n_boot=50)
    auc = res["lesion"]["consensus"]["scorers"]["cnn"]["roc_auc"]
    assert auc["estimate"] is None and "2 lesion(s) have no cnn_prob" in auc["not_estimable"]
    assert "sub-" in auc["not_estimable"]  # the rows are named
    assert res["lesion"]["consensus"]["scorers"]["rule"]["roc_auc"]["estimate"] > 0.5
    assert res["lesion"]["consensus"]["paired_delong"] == []
    json.dumps(res, allow_nan=False)


def test_single_class_outcome_is_not_estimable(rng, tmp_path):
    part, les, pred = make_tables(rng)
    les["consensus"] = 0
    res = evaluate(part, les, [pred], n_boot=50, out_dir=tmp_path, figures=False)
    s = res["lesion"]["consensus"]["scorers"]["cnn"]
    assert s["roc_auc"]["estimate"] is None and "one class" in s["roc_auc"]["not_estimable"]
    assert s["binary"]["sensitivity"]["estimate"] is None
    assert s["binary"]["specificity"]["estimate"] is not None
    paths = {e["path"] for e in res["not_estimable"]}
    assert "/lesion/consensus/scorers/cnn/roc_auc" in paths
    strict_load(tmp_path / "report.json")
    assert "n.e." in (tmp_path / "report.md").read_text()


def test_bad_inputs_raise_clear_errors(rng, tmp_path):
    part, les, pred = make_tables(rng)
    with pytest.raises(InputError, match="no reference column 'nope'"):
        evaluate(part, les, [pred], reference="nope")
    with pytest.raises(InputError, match="has no rows"):
        evaluate(part.iloc[:0], les, [pred])
    with pytest.raises(InputError, match="lesions table has no rows"):
        evaluate(part, les.iloc[:0], [pred])
    with pytest.raises(InputError, match=r"no prediction for 1 lesion\(s\).*sub-"):
        evaluate(part, les, [pred.iloc[1:]])
    extra = pd.concat([pred, pred.iloc[[0]].assign(lesion_id=999)])
    with pytest.raises(InputError, match="match no lesion.*lesion 999"):
        evaluate(part, les, [extra])
    dup = pd.concat([pred, pred.iloc[[0]]])
    with pytest.raises(InputError, match="duplicated keys"):
        evaluate(part, les, [dup])
    with pytest.raises(InputError, match="not in the participants table"):
        evaluate(part.iloc[1:], les, [pred])
    with pytest.raises(InputError, match="unknown scorer"):
        evaluate(part, les, [pred], scorers=["svm"])
    with pytest.raises(InputError, match="--group-column"):
        load_inputs(part, les, [pred], group_column="nope")
    with pytest.raises(InputError, match="'RRMS' not found.*--positive-group"):
        evaluate(part, les, [pred], positive_group="RRMS")
    bad = les.copy()
    bad.loc[0, "reader_1"] = 3
    with pytest.raises(InputError, match="reader_1.*0/1"):
        evaluate(part, bad, [pred])
    with pytest.raises(InputError, match="no scorer columns"):
        evaluate(part, les, [pred[["participant_id", "session_id", "lesion_id"]]])
    with pytest.raises(InputError, match="both"):
        detect_scorers(["a_prob", "a_score"])


def test_name_clash_prefixes_file_stem(rng, tmp_path):
    part, les, pred = make_tables(rng)
    write_table(pred, tmp_path / "model_a.tsv", "predictions")
    write_table(pred, tmp_path / "model_b.tsv", "predictions")
    data = load_inputs(part, les, [tmp_path / "model_a.tsv", tmp_path / "model_b.tsv"])
    assert [s.name for s in data.scorers] == ["cnn", "rule", "model_b_cnn", "model_b_rule"]
    assert any("renamed" in n for n in data.notes)


def test_threshold_rules(rng):
    part, les, pred = make_tables(rng)
    fixed = evaluate(part, les, [pred], threshold=0.5, n_boot=10)
    thr = fixed["lesion"]["consensus"]["scorers"]["cnn"]["threshold"]
    assert thr["source"] == "cnn_prob >= 0.5"
    # rule_score has its own calls and no probability scale: they are kept
    assert "own call column" in fixed["lesion"]["consensus"]["scorers"]["rule"]["threshold"][
        "source"]
    oof = evaluate(part, les, [pred], threshold="youden", n_boot=10)
    t = oof["lesion"]["consensus"]["scorers"]["rule"]["threshold"]
    assert "out-of-fold" in t["source"] and len(t["fold_thresholds"]) == 5
    with pytest.raises(InputError, match="threshold rule"):
        evaluate(part, les, [pred], threshold="best")


def test_evaluation_does_not_import_torch():
    code = ("import sys, evaluation.harness, evaluation.report, evaluation.figures, "
            "qsmrim.cli.evaluate; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not any(m.startswith(('rimnet', 'training')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
