import json

import numpy as np

from qsm_core.io.tables import write_table
from qsmrim.cli.main import main
from tests.evaluation.synth import make_tables


def _write_inputs(tmp_path, **kw):
    part, les, pred = make_tables(np.random.default_rng(5), **kw)
    write_table(part, tmp_path / "participants.tsv", "participants")
    write_table(les, tmp_path / "lesions.tsv", "lesions")
    write_table(pred, tmp_path / "predictions.tsv", "predictions")
    return part, les, pred


def test_evaluate_cli_writes_report(tmp_path, capsys):
    _, les, _ = _write_inputs(tmp_path)
    out = tmp_path / "out"
    rc = main(["evaluate", "--participants", str(tmp_path / "participants.tsv"),
               "--lesions", str(tmp_path / "lesions.tsv"),
               "--predictions", str(tmp_path / "predictions.tsv"), "--out", str(out),
               "--n-boot", "50", "--no-figures", "--group-column", "diagnosis",
               "--positive-group", "MS", "--threshold", "0.5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed and "cnn: lesion ROC AUC" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["inputs"]["n_lesions"] == len(les)
    assert rep["parameters"]["threshold"] == "0.5"
    assert rep["provenance"]["inputs"][1]["sha256"]
    assert (out / "report.md").exists() and (out / "report.html").exists()


def test_evaluate_cli_bad_reference_exits_2_without_output(tmp_path, capsys):
    _write_inputs(tmp_path)
    out = tmp_path / "out"
    rc = main(["evaluate", "--participants", str(tmp_path / "participants.tsv"),
               "--lesions", str(tmp_path / "lesions.tsv"),
               "--predictions", str(tmp_path / "predictions.tsv"), "--out", str(out),
               "--reference", "nope"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "qsmrim evaluate: error:" in err and "--reference" in err
    assert not out.exists()
