import numpy as np
import pandas as pd

from qsmrim.cli.main import main
from rimnet.patches import load_patch_cache
from tests.rimnet.synthetic_scans import make_dataset


def test_lesions_command_writes_labels_and_table(tmp_path, rng):
    make_dataset(tmp_path, rng, n_scans=3)
    out = tmp_path / "out"
    assert main(["lesions", str(tmp_path / "les"), str(out), "--qsm", str(tmp_path / "qsm")]) == 0
    t = pd.read_csv(out / "lesions.tsv", sep="\t")
    assert t.groupby("participant_id").size().to_dict() == {"sub-01": 1, "sub-02": 2,
                                                            "sub-03": 3}
    assert (t["volume_mm3"] == 123).all() and (t["long_axis_mm"] == 7).all()
    assert (out / "sub-02" / "anat" / "sub-02_desc-lesion_dseg.nii.gz").is_file()
    assert len(pd.read_csv(out / "failures.tsv", sep="\t")) == 0


def test_extract_builds_a_labelled_cache(tmp_path, rng):
    make_dataset(tmp_path, rng, n_scans=3)
    labels = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-02", "sub-03", "sub-03",
                                              "sub-03"],
                           "session_id": ["n/a"] * 6, "lesion_id": [1, 1, 2, 1, 2, 3],
                           "centroid_x_mm": 0.0, "centroid_y_mm": 0.0, "centroid_z_mm": 0.0,
                           "volume_mm3": 1.0, "consensus": [1, 0, 0, 1, 0, 0]})
    labels.to_csv(tmp_path / "lesions.tsv", sep="\t", index=False)
    cache = tmp_path / "cache"
    rc = main(["extract", str(tmp_path / "bids"), str(cache), "--lesions", str(tmp_path / "les"),
               "--qsm", str(tmp_path / "qsm"), "--labels", str(tmp_path / "lesions.tsv"),
               "--patch-voxels", "16", "--dtype", "float16"])
    assert rc == 0
    patches, table = load_patch_cache(cache)
    assert patches.shape == (6, 4, 16, 16, 16) and patches.dtype == np.float16
    assert table["consensus"].tolist() == [1, 0, 0, 1, 0, 0]
    assert table["volume_mm3"].tolist() == [123.0] * 6  # geometry from the image, not the TSV
    # lesion channel: a radius-3 ball at 2 mm sampling -> some voxels, centred
    assert np.all(patches[:, 2].astype(float).sum(axis=(1, 2, 3)) > 5)
    assert main(["extract", str(tmp_path / "bids"), str(cache), "--lesions",
                 str(tmp_path / "les"), "--qsm", str(tmp_path / "qsm")]) == 2
    # snapped to the voxel grid by default (recorded for training), centroid-centred on request
    assert table.attrs["snap_to_voxels"] is True
    assert main(["extract", str(tmp_path / "bids"), str(tmp_path / "plain"), "--lesions",
                 str(tmp_path / "les"), "--qsm", str(tmp_path / "qsm"), "--patch-voxels", "16",
                 "--no-snap"]) == 0
    plain, plain_table = load_patch_cache(tmp_path / "plain")
    assert plain_table.attrs["snap_to_voxels"] is False
    assert plain.shape == patches.shape


def test_no_progress_hides_the_bar_and_keeps_the_outputs(tmp_path, rng, capsys):
    make_dataset(tmp_path, rng, n_scans=2)
    args = [str(tmp_path / "les"), "--qsm", str(tmp_path / "qsm")]
    assert main(["lesions", *args[:1], str(tmp_path / "a"), *args[1:]]) == 0
    assert "qsmrim lesions: 100%" in capsys.readouterr().err
    assert main(["lesions", *args[:1], str(tmp_path / "b"), *args[1:], "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "3 lesion(s) in 2 scan(s)" in err  # the summary stays
    assert ((tmp_path / "a" / "lesions.tsv").read_text()
            == (tmp_path / "b" / "lesions.tsv").read_text())
