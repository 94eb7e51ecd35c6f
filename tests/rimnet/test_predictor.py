import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsm_core.errors import InputError
from qsm_core.io.nifti import save_nifti
from rimnet.predictor import (
    PREDICTION_COLUMNS,
    Predictor,
    find_lesion_maps,
    load_model,
    merge_outputs,
    parse_shard,
    resample_image_to,
    run_batch,
    select_shard,
)
from tests.rimnet.synthetic_scans import StubModel, make_dataset, scan_arrays, write_scan


def _one(tmp_path, rng, **kw):
    write_scan(tmp_path, "sub-01", rng, **kw)
    scans = find_lesion_maps(tmp_path / "les")
    pred = Predictor(StubModel(), bids_dir=tmp_path / "bids", qsm_dir=tmp_path / "qsm",
                     review=False)
    return scans[0], pred


def test_scores_rim_lesion_with_both_scorers(tmp_path, rng):
    scan, pred = _one(tmp_path, rng, n_lesions=3)
    res = pred.predict_scan(scan, tmp_path / "out")
    t = res.table
    assert list(t.columns) == PREDICTION_COLUMNS
    assert t["lesion_id"].tolist() == [1, 2, 3]
    # lesion 1 (first in C order, centre (10, 10, 16)) has the rim
    assert t["rule_call"].tolist() == [1, 0, 0]
    assert t["cnn_call"].tolist() == [1, 0, 0]
    assert t.loc[0, "centroid_i"] == pytest.approx(10) and t.loc[0, "centroid_k"] == 16
    assert t["volume_mm3"].tolist() == [123.0] * 3  # voxels of a radius-3 ball
    assert np.all(np.isfinite(t[["cnn_prob", "rule_score"]].to_numpy(float)))


def test_process_scan_writes_maps_and_marker(tmp_path, rng):
    scan, pred = _one(tmp_path, rng, n_lesions=2)
    pred.review = True
    summary = pred.process_scan(scan, tmp_path / "out")
    folder = tmp_path / "out" / "sub-01"
    prob = nib.load(folder / "sub-01_desc-rim_probseg.nii.gz").get_fdata()
    labels = nib.load(folder / "sub-01_desc-lesion_dseg.nii.gz").get_fdata().astype(int)
    t = pd.read_csv(folder / "sub-01_predictions.tsv", sep="\t")
    for lid, p in zip(t["lesion_id"], t["cnn_prob"]):
        assert np.allclose(prob[labels == lid], p, atol=1e-6)
    assert np.all(prob[labels == 0] == 0)
    assert summary["n_lesions"] == 2 and summary["n_prl_cnn"] == 1
    assert json.loads((folder / "sub-01_scan.json").read_text())["n_prl_rule"] == 1
    assert sorted(p.name for p in (folder / "review").iterdir()) == [
        "sub-01_lesion-1.png", "sub-01_lesion-2.png"]
    assert (folder / "review" / "sub-01_lesion-1.png").read_bytes()[:4] == b"\x89PNG"


def test_lesion_map_on_a_finer_grid_is_resampled(tmp_path, rng):
    chi, flair, lesions, _ = scan_arrays(rng, n_lesions=2)
    # lesion map at 0.5 mm covering the same field of view
    fine = np.repeat(np.repeat(np.repeat(lesions, 2, 0), 2, 1), 2, 2)
    faff = np.diag([0.5, 0.5, 0.5, 1.0])
    faff[:3, 3] = -0.25
    write_scan(tmp_path, "sub-01", rng, chi=chi, flair=flair, lesions=fine, lesion_affine=faff)
    scan = find_lesion_maps(tmp_path / "les")[0]
    pred = Predictor(None, bids_dir=tmp_path / "bids", qsm_dir=tmp_path / "qsm", review=False)
    res = pred.predict_scan(scan, tmp_path / "out")
    assert len(res.table) == 2
    np.testing.assert_array_equal(res.labels > 0, lesions > 0)
    assert res.table["cnn_prob"].isna().all()  # --no-cnn
    assert res.table["rule_call"].tolist() == [1, 0]


def test_non_overlapping_lesion_map_is_a_clear_error(tmp_path, rng):
    far = np.eye(4)
    far[:3, 3] = 1000.0
    scan, pred = _one(tmp_path, rng, lesion_affine=far)
    with pytest.raises(InputError, match="does not overlap the QSM grid"):
        pred.predict_scan(scan, tmp_path / "out")


def test_empty_lesion_map_gives_zero_lesions_and_a_warning(tmp_path, rng, caplog):
    chi, flair, lesions, _ = scan_arrays(rng)
    write_scan(tmp_path, "sub-01", rng, chi=chi, flair=flair, lesions=np.zeros_like(lesions))
    scan = find_lesion_maps(tmp_path / "les")[0]
    pred = Predictor(StubModel(), bids_dir=tmp_path / "bids", qsm_dir=tmp_path / "qsm")
    with caplog.at_level(logging.WARNING):
        summary = pred.process_scan(scan, tmp_path / "out")
    assert summary["n_lesions"] == 0 and summary["n_prl_cnn"] == 0
    assert "no lesions" in caplog.text and "sub-01_desc-lesion_mask" in caplog.text
    merged = merge_outputs(tmp_path / "out")
    assert merged["subjects"]["n_lesions"].tolist() == [0]
    assert len(merged["predictions"]) == 0


def test_lesion_touching_the_volume_edge_is_scored(tmp_path, rng):
    scan, pred = _one(tmp_path, rng, n_lesions=2, edge_lesion=True)
    t = pred.predict_scan(scan, tmp_path / "out").table
    assert len(t) == 2
    assert t["touches_edge"].tolist() == [1, 0]
    assert np.all(np.isfinite(t[["cnn_prob", "rule_score"]].to_numpy(float)))


def test_missing_flair_when_the_model_needs_it(tmp_path, rng):
    scan, pred = _one(tmp_path, rng)
    (tmp_path / "bids" / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz").unlink()
    with pytest.raises(InputError, match="needs FLAIR"):
        pred.predict_scan(scan, tmp_path / "out")
    pred.model = None  # the rule-based detector does not need FLAIR
    assert len(pred.predict_scan(scan, tmp_path / "out").table) == 3


def test_missing_qsm_and_no_raw_gre(tmp_path, rng):
    scan, pred = _one(tmp_path, rng)
    (tmp_path / "qsm" / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").unlink()
    with pytest.raises(InputError, match="no Chimap"):
        pred.predict_scan(scan, tmp_path / "out")


def test_model_directory_errors(tmp_path):
    with pytest.raises(InputError, match="--no-cnn"):
        load_model(tmp_path / "nope")
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "fold-0.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="model") as exc:
        load_model(bad)
    assert "--no-cnn" in str(exc.value)


def test_batch_isolates_failures_and_resumes(tmp_path, rng):
    subs = make_dataset(tmp_path, rng, n_scans=10)
    broken = tmp_path / "les" / "sub-05" / "anat" / "sub-05_desc-lesion_mask.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    scans = find_lesion_maps(tmp_path / "les")
    assert [s.participant_id for s in scans] == subs
    model = StubModel()
    pred = Predictor(model, bids_dir=tmp_path / "bids", qsm_dir=tmp_path / "qsm", review=False)
    out = tmp_path / "out"
    s1 = run_batch(scans, out, predictor=pred, progress=False)
    assert len(s1["done"]) == 9 and s1["skipped"] == []
    assert [f["scan"] for f in s1["failures"]] == ["sub-05"]
    assert "not a readable NIfTI" in s1["failures"][0]["message"]
    merged = merge_outputs(out)
    assert len(merged["subjects"]) == 9
    assert "sub-05" not in set(merged["predictions"]["participant_id"])
    fails = pd.read_csv(out / "failures.tsv", sep="\t")
    assert fails["scan"].tolist() == ["sub-05"]
    # expected lesion counts: 1 + i % 4 for the 9 good scans
    expect = {s: 1 + i % 4 for i, s in enumerate(subs) if s != "sub-05"}
    got = dict(zip(merged["subjects"]["participant_id"], merged["subjects"]["n_lesions"]))
    assert got == expect
    # rerun: finished scans are skipped, the fixed one runs, failures.tsv empties
    calls = model.calls
    write_scan(tmp_path, "sub-05", rng)
    s2 = run_batch(scans, out, predictor=pred, progress=False)
    assert s2["done"] == ["sub-05"] and len(s2["skipped"]) == 9
    assert model.calls == calls + 1
    merged = merge_outputs(out)
    assert len(merged["subjects"]) == 10 and merged["failures"] == []
    assert len(pd.read_csv(out / "failures.tsv", sep="\t")) == 0
    html = (out / "index.html").read_text()
    assert "http" not in html.lower().replace("http-equiv", "")


def test_batch_prefetch_reads_the_next_scan_in_the_background(tmp_path, rng, monkeypatch):
    import threading

    import rimnet.predictor as predictor_module

    make_dataset(tmp_path, rng, n_scans=4)
    scans = find_lesion_maps(tmp_path / "les")
    reads = []
    real_load = predictor_module.load_nifti

    def spy(path, **kw):
        reads.append((Path(path).name, threading.current_thread().name))
        return real_load(path, **kw)

    monkeypatch.setattr(predictor_module, "load_nifti", spy)
    tables = {}
    for prefetch in (False, True):
        reads.clear()
        pred = Predictor(StubModel(), bids_dir=tmp_path / "bids", qsm_dir=tmp_path / "qsm",
                         review=False)
        out = tmp_path / f"out_{prefetch}"
        s = run_batch(scans, out, predictor=pred, progress=False, prefetch=prefetch)
        assert len(s["done"]) == 4
        tables[prefetch] = merge_outputs(out)["predictions"]
        in_background = {name.split("_")[0] for name, thread in reads
                         if thread.startswith("qsmrim-prefetch")}
        # each file is read once; with prefetch, every scan but the first in the background
        assert len(reads) == len(set(reads)) == 4 * 3  # Chimap, lesion map, FLAIR
        assert in_background == ({"sub-02", "sub-03", "sub-04"} if prefetch else set())
    pd.testing.assert_frame_equal(tables[False], tables[True])


def test_shards_partition_the_scans(tmp_path, rng):
    make_dataset(tmp_path, rng, n_scans=10)
    scans = find_lesion_maps(tmp_path / "les")
    parts = [select_shard(scans, i, 3) for i in range(3)]
    names = [s.name for p in parts for s in p]
    assert sorted(names) == sorted(s.name for s in scans) and len(set(names)) == 10
    assert [s.name for s in select_shard(scans, 1, 3)] == [s.name for s in parts[1]]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


def test_find_lesion_maps_errors(tmp_path):
    with pytest.raises(InputError, match="no such lesion-map folder"):
        find_lesion_maps(tmp_path / "nothing")
    (tmp_path / "les").mkdir()
    with pytest.raises(InputError, match="no lesion maps"):
        find_lesion_maps(tmp_path / "les")
    save_nifti(tmp_path / "les" / "sub-01" / "ses-02" / "anat"
               / "sub-01_ses-02_acq-x_desc-lesion_mask.nii.gz", np.zeros((4, 4, 4)), np.eye(4))
    (s,) = find_lesion_maps(tmp_path / "les")
    assert (s.participant_id, s.session_id, s.entities, s.name) == (
        "sub-01", "ses-02", {"acq": "x"}, "sub-01_ses-02_acq-x")
    with pytest.raises(InputError, match="participant"):
        find_lesion_maps(tmp_path / "les", participant_labels=["02"])


def test_resample_image_to_is_trilinear():
    img = np.arange(8, dtype=np.float32).reshape(2, 2, 2) * 0 + np.arange(2)[:, None, None]
    src = np.diag([2.0, 2.0, 2.0, 1.0])
    out = resample_image_to(img, src, (3, 3, 3), np.eye(4))
    np.testing.assert_allclose(out[:, 0, 0], [0, 0.5, 1.0])


def test_review_index_is_offline_sorted_and_linked(tmp_path, rng):
    from rimnet.review import write_review_index

    pred = pd.DataFrame({"participant_id": ["sub-01", "sub-01", "sub-02"],
                         "session_id": ["n/a", "n/a", "ses-1"], "lesion_id": [1, 2, 5],
                         "volume_mm3": [50.0, 70.0, 90.0], "cnn_prob": [0.2, 0.9, 0.5],
                         "cnn_call": [0, 1, 1], "rule_score": [0.1, 0.6, 0.4],
                         "rule_call": [0, 1, 0]})
    subj = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "session_id": ["n/a", "ses-1"],
                         "n_lesions": [2, 1], "n_prl_cnn": [1, 1], "n_prl_rule": [1, 0]})
    png = tmp_path / "sub-02" / "ses-1" / "review" / "sub-02_ses-1_lesion-5.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG")
    fails = pd.DataFrame({"scan": ["sub-03"], "error_type": ["InputError"],
                          "message": ["bad <file> & co"]})
    html = write_review_index(tmp_path, pred, subj, fails).read_text()
    # sorted by CNN probability: lesion 2 (0.9), then 5 (0.5), then 1 (0.2)
    lesions = html.split("<h2>Lesions")[1]
    order = [lesions.index(f"</td><td>{i}</td>") for i in (2, 5, 1)]
    assert order == sorted(order)
    assert 'src="sub-02/ses-1/review/sub-02_ses-1_lesion-5.png"' in html
    assert "bad &lt;file&gt; &amp; co" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_resume_refuses_other_settings(tmp_path, rng):
    make_dataset(tmp_path, rng, n_scans=2)
    scans = find_lesion_maps(tmp_path / "les")
    kw = {"bids_dir": tmp_path / "bids", "qsm_dir": tmp_path / "qsm", "review": False}
    run_batch(scans, tmp_path / "out", predictor=Predictor(None, **kw), progress=False)
    other = Predictor(None, min_long_axis_mm=5.0, **kw)
    with pytest.raises(InputError, match="other settings"):
        run_batch(scans, tmp_path / "out", predictor=other, progress=False)
    s = run_batch(scans, tmp_path / "out", predictor=other, overwrite=True, progress=False)
    assert len(s["done"]) == 2


def test_thick_slices_warn_once_that_patches_are_interpolated(tmp_path, rng, caplog):
    chi, flair, lesions, _ = scan_arrays(rng, n_lesions=2)
    write_scan(tmp_path, "sub-01", rng, chi=chi, flair=flair, lesions=lesions,
               affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    write_scan(tmp_path, "sub-02", rng, chi=chi, flair=flair, lesions=lesions,
               affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    model = StubModel()
    model.snap_to_voxels = True  # trained on voxel-grid crops
    pred = Predictor(model, bids_dir=tmp_path / "bids", qsm_dir=tmp_path / "qsm", review=False)
    with caplog.at_level(logging.WARNING, logger="rimnet.predictor"):
        for scan in find_lesion_maps(tmp_path / "les"):
            pred.predict_scan(scan, tmp_path / "out")
    warned = [r.getMessage() for r in caplog.records if "interpolated" in r.getMessage()]
    assert len(warned) == 1 and "1x1x2 mm" in warned[0]
    # a 1 mm scan, or a model trained on interpolated patches, gives no warning
    caplog.clear()
    write_scan(tmp_path / "iso", "sub-01", rng, chi=chi, flair=flair, lesions=lesions)
    pred = Predictor(model, bids_dir=tmp_path / "iso" / "bids", qsm_dir=tmp_path / "iso" / "qsm",
                     review=False)
    pred.predict_scan(find_lesion_maps(tmp_path / "iso" / "les")[0], tmp_path / "out2")
    assert not [r for r in caplog.records if "interpolated" in r.getMessage()]
