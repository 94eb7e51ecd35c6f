import json
import time

import numpy as np
import pandas as pd
import pytest

from qsm_core import ppm_to_hz
from qsm_core.dipole import forward_field_ppm
from qsmrim.cli.main import main
from tests.rimnet.synthetic_scans import make_dataset, scan_arrays, write_scan


def _tiny_model(path):
    from rimnet.model import RimCNN
    from rimnet.network import build_network

    config = {"channels": ["qsm", "flair", "lesion", "others"], "patch_mm": 32.0,
              "patch_voxels": 16, "arch": "convnet", "net_channels": [4, 8], "n_types": 0,
              "tta": "flip"}
    import torch

    torch.manual_seed(0)
    net = build_network(in_channels=4, arch="convnet", channels=(4, 8))
    RimCNN([net], config=config, threshold=0.5).save(path)
    return path


def test_predict_with_model_writes_every_output(tmp_path, rng):
    make_dataset(tmp_path, rng, n_scans=2)
    model = _tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "bids"), str(out), "--lesions", str(tmp_path / "les"),
               "--qsm", str(tmp_path / "qsm"), "--model", str(model), "--tta", "none"])
    assert rc == 0
    pred = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(pred) == 1 + 2
    assert pred["cnn_prob"].between(0, 1).all()
    assert set(pred["cnn_call"]) <= {0, 1}
    assert pred["rule_call"].tolist() == [1, 0, 0]   # sub-01's lesion has the rim
    subj = pd.read_csv(out / "subjects.tsv", sep="\t")
    assert subj["n_lesions"].tolist() == [1, 2]
    assert subj["n_prl_rule"].tolist() == [1, 0]
    html = (out / "index.html").read_text()
    assert 'src="sub-01/review/sub-01_lesion-1.png"' in html
    assert (out / "sub-01" / "review" / "sub-01_lesion-1.png").is_file()
    assert json.loads((out / "predict.json").read_text())["patch_voxels"] == 16


def test_batch_of_ten_with_one_broken_scan_then_resume(tmp_path, rng, capsys):
    make_dataset(tmp_path, rng, n_scans=10)
    (tmp_path / "qsm" / "sub-07" / "anat" / "sub-07_Chimap.nii.gz").write_bytes(b"corrupt")
    args = ["predict", str(tmp_path / "bids"), str(tmp_path / "out"), "--lesions",
            str(tmp_path / "les"), "--qsm", str(tmp_path / "qsm"), "--no-cnn", "--no-review"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "9 scan(s) scored" in err and "1 failed" in err
    fails = pd.read_csv(tmp_path / "out" / "failures.tsv", sep="\t")
    assert fails["scan"].tolist() == ["sub-07"]
    assert "sub-07_Chimap.nii.gz" in fails.loc[0, "message"]
    subj = pd.read_csv(tmp_path / "out" / "subjects.tsv", sep="\t")
    assert len(subj) == 9 and subj["n_prl_cnn"].isna().all()
    # fix it and rerun: 9 skipped, 1 scored, exit 0
    write_scan(tmp_path, "sub-07", rng)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 scan(s) scored, 9 skipped" in err
    assert len(pd.read_csv(tmp_path / "out" / "subjects.tsv", sep="\t")) == 10
    assert len(pd.read_csv(tmp_path / "out" / "failures.tsv", sep="\t")) == 0


def test_shards_then_merge_equal_a_single_run(tmp_path, rng, capsys):
    make_dataset(tmp_path, rng, n_scans=6)
    base = [str(tmp_path / "bids")]
    common = ["--lesions", str(tmp_path / "les"), "--qsm", str(tmp_path / "qsm"), "--no-cnn",
              "--no-review"]
    for i in range(3):
        assert main(["predict", *base, str(tmp_path / "sharded"), *common,
                     "--shard", f"{i}/3"]) == 0
    assert main(["predict", *base, str(tmp_path / "sharded"), "--merge"]) == 0
    assert main(["predict", *base, str(tmp_path / "single"), *common]) == 0
    a = pd.read_csv(tmp_path / "sharded" / "predictions.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "single" / "predictions.tsv", sep="\t")
    pd.testing.assert_frame_equal(a, b)


def test_jobs_score_like_one_process_and_isolate_failures(tmp_path, rng, capsys):
    """--jobs 2 (two pinned worker processes) writes the same tables as one process,
    records a broken scan and skips finished scans on the rerun."""
    make_dataset(tmp_path, rng, n_scans=5)
    model = _tiny_model(tmp_path / "model")
    common = ["--lesions", str(tmp_path / "les"), "--qsm", str(tmp_path / "qsm"), "--model",
              str(model), "--tta", "none", "--no-review", "--no-progress"]
    bids = str(tmp_path / "bids")
    assert main(["predict", bids, str(tmp_path / "one"), *common]) == 0
    (tmp_path / "qsm" / "sub-03" / "anat" / "sub-03_Chimap.nii.gz").write_bytes(b"corrupt")
    assert main(["predict", bids, str(tmp_path / "two"), *common, "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "4 scan(s) scored, 0 skipped (already done), 1 failed" in err
    fails = pd.read_csv(tmp_path / "two" / "failures.tsv", sep="\t")
    assert fails["scan"].tolist() == ["sub-03"]
    assert "sub-03_Chimap.nii.gz" in fails.loc[0, "message"]
    marker = tmp_path / "two" / "sub-03" / "sub-03_failed.json"
    assert json.loads(marker.read_text())["scan"] == "sub-03"
    one = pd.read_csv(tmp_path / "one" / "predictions.tsv", sep="\t")
    two = pd.read_csv(tmp_path / "two" / "predictions.tsv", sep="\t")
    pd.testing.assert_frame_equal(two, one[one["participant_id"] != "sub-03"]
                                  .reset_index(drop=True), atol=1e-6)
    write_scan(tmp_path, "sub-03", rng)
    assert main(["predict", bids, str(tmp_path / "two"), *common, "--jobs", "2"]) == 0
    assert "1 scan(s) scored, 4 skipped" in capsys.readouterr().err
    assert not marker.exists()
    assert main(["predict", bids, str(tmp_path / "x"), *common, "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_model_errors_are_clear(tmp_path, rng, capsys):
    make_dataset(tmp_path, rng, n_scans=1)
    base = ["predict", str(tmp_path / "bids"), str(tmp_path / "out"), "--lesions",
            str(tmp_path / "les"), "--qsm", str(tmp_path / "qsm")]
    assert main(base + ["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "qsmrim predict: error: no CNN model" in err and "--no-cnn" in err
    bad = _tiny_model(tmp_path / "bad")
    (bad / "fold_0" / "model.pt").write_bytes(b"\x00garbage")
    assert main(base + ["--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "predictions.tsv").exists()


def test_bad_arguments(tmp_path, rng, capsys):
    make_dataset(tmp_path, rng, n_scans=1)
    base = ["predict", str(tmp_path / "bids"), str(tmp_path / "out")]
    assert main(base) == 2
    assert "--lesions" in capsys.readouterr().err
    assert main(base + ["--lesions", str(tmp_path / "les"), "--no-cnn", "--shard", "5/2"]) == 2
    assert "--shard" in capsys.readouterr().err
    assert main(base + ["--lesions", str(tmp_path / "nope"), "--no-cnn"]) == 2
    assert "no such lesion-map folder" in capsys.readouterr().err


def test_bf16_precision_scores_like_fp32_and_is_recorded(tmp_path, rng, capsys):
    make_dataset(tmp_path, rng, n_scans=2)
    model = _tiny_model(tmp_path / "model")
    common = ["--lesions", str(tmp_path / "les"), "--qsm", str(tmp_path / "qsm"), "--model",
              str(model), "--no-review"]
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["predict", str(tmp_path / "bids"), str(out), *common,
                     "--precision", precision]) == 0
        runs[precision] = pd.read_csv(out / "predictions.tsv", sep="\t")
        assert json.loads((out / "predict.json").read_text())["precision"] == precision
    a, b = runs["fp32"], runs["bf16"]
    assert a["lesion_id"].tolist() == b["lesion_id"].tolist()
    assert a["rule_score"].tolist() == b["rule_score"].tolist()  # the rule is untouched
    np.testing.assert_allclose(b["cnn_prob"], a["cnn_prob"], atol=0.02)
    # resuming a folder with the other precision is refused, not mixed
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "bids"), str(tmp_path / "fp32"), *common,
                 "--precision", "bf16"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "bids"), str(tmp_path / "x"), "--lesions",
                 str(tmp_path / "les"), "--no-cnn", "--precision", "bf16"]) == 2
    assert "drop --no-cnn" in capsys.readouterr().err


def _write_raw_gre(root, sub, chi, affine, rng):
    from qsm_core.io.bids import write_megre

    te = np.array([0.006, 0.012, 0.018, 0.024])
    head = np.sum((np.indices(chi.shape) - (np.array(chi.shape)[:, None, None, None] - 1) / 2)
                  ** 2, axis=0) <= (min(chi.shape) / 2 - 0.5) ** 2
    field_hz = ppm_to_hz(3.0) * forward_field_ppm(chi, voxel_size_mm=(1, 1, 1), b0_dir=(0, 0, 1))
    mag = np.where(head, 1000.0, 20.0)[..., None] * np.exp(-te * 20)[None, None, None, :]
    mag = mag + rng.normal(0, 5, mag.shape)
    phase = 2 * np.pi * field_hz[..., None] * te[None, None, None, :] + 0.3
    write_megre(root / "bids", sub, None, np.abs(mag), phase, te, affine, field_strength_t=3.0)


@pytest.mark.slow
def test_predict_reconstructs_from_raw_gre(tmp_path, rng):
    chi, flair, lesions, _ = scan_arrays(rng, shape=(48, 48, 48), n_lesions=2)
    write_scan(tmp_path, "sub-01", rng, chi=chi, flair=flair, lesions=lesions)
    (tmp_path / "qsm" / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").unlink()
    _write_raw_gre(tmp_path, "sub-01", chi, np.eye(4), rng)
    t0 = time.perf_counter()
    rc = main(["predict", str(tmp_path / "bids"), str(tmp_path / "out"), "--lesions",
               str(tmp_path / "les"), "--no-cnn"])
    assert rc == 0, time.perf_counter() - t0
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").is_file()
    pred = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert len(pred) == 2


def test_no_progress_hides_the_bar(tmp_path, rng, capsys):
    make_dataset(tmp_path, rng, n_scans=2)
    common = [str(tmp_path / "bids"), None, "--lesions", str(tmp_path / "les"), "--qsm",
              str(tmp_path / "qsm"), "--no-cnn", "--no-review"]
    for out, extra, bar in (("a", [], True), ("b", ["--no-progress"], False)):
        common[1] = str(tmp_path / out)
        assert main(["predict", *common, *extra]) == 0
        assert ("qsmrim predict: 100%" in capsys.readouterr().err) is bar
    a, b = (pd.read_csv(tmp_path / o / "predictions.tsv", sep="\t") for o in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)
