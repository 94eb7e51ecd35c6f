import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qsm_core.io.nifti import save_nifti
from qsm_core.io.tables import write_table
from qsmrim.cli.main import main
from rimnet.model import RimCNN
from rimnet.patches import build_patch_cache
from tests.rimnet.synthetic_patches import make_synthetic_patches

CFG = {"net_channels": [4, 8, 16, 16], "epochs": 2, "min_epochs": 1, "batch_size": 8,
       "lr": 1e-2, "tta": "none", "affine_prob": 0.0, "threads": 1}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _write_config(tmp_path, **extra):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**CFG, **extra}))
    return path


def test_train_from_patch_cache_and_bundle(tmp_path, capsys):
    x, t = make_synthetic_patches(48, patch_voxels=16, seed=2, n_patients=8, prevalence=0.4)
    build_patch_cache(tmp_path / "cache", [(x, t.drop(columns=["consensus"]))], patch_mm=16.0,
                      patch_voxels=16)
    labels = t.assign(centroid_x_mm=0.0, centroid_y_mm=0.0, centroid_z_mm=0.0, volume_mm3=1.0)
    write_table(labels, tmp_path / "lesions.tsv", "lesions")
    cfg = _write_config(tmp_path, patch_mm=16.0, patch_voxels=16)
    out = tmp_path / "model"
    rc = main(["train", "--patches", str(tmp_path / "cache"), "--labels",
               str(tmp_path / "lesions.tsv"), "--config", str(cfg), "--folds", "2",
               "--out", str(out), "--no-progress", "--bundle", str(tmp_path / "bundle")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "out-of-fold ROC AUC" in captured.out
    model = RimCNN.load(out)
    assert len(model.networks) == 2 and model.config["label_column"] == "consensus"
    # the cache was cut without snapping; predict must cut this model's patches the same way
    assert model.snap_to_voxels is False
    card = (out / "model_card.md").read_text()
    assert "qsmrim train" in card and "--patches" in card
    # the MONAI bundle loads with MONAI's parser and reproduces the model (no TTA)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(tmp_path / "bundle" / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(tmp_path / "bundle" / "models" / "model.pt",
                                   weights_only=True))
    net.eval()
    with torch.no_grad():
        z = net(torch.as_tensor(np.asarray(x[:6])))[:, 0].numpy()
    np.testing.assert_allclose(z, model.decision_function(x[:6]), rtol=1e-4, atol=1e-5)
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 4


def _sphere(shape, centre, radius):
    g = np.indices(shape).astype(float)
    return ((g - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2


def _tiny_bids(root, rng, n_subjects=4, shape=(40, 40, 24)):
    bids, qsm, les = root / "bids", root / "qsm", root / "lesions"
    aff = np.diag([1.0, 1.0, 1.5, 1.0])
    rows = []
    for s in range(n_subjects):
        sub = f"sub-{s + 1:02d}"
        labels = np.zeros(shape, np.int16)
        chi = rng.normal(-0.02, 0.005, shape).astype(np.float32)
        flair = rng.normal(100, 5, shape).astype(np.float32)
        for k, c in enumerate([(10, 10, 6), (28, 10, 12), (10, 28, 18), (28, 28, 8)]):
            inner = _sphere(shape, c, 3)
            labels[inner] = k + 1
            flair[inner] += 120
            rim = (k + s) % 2
            if rim:
                chi[_sphere(shape, c, 4.5) & ~inner] += 0.05
            rows.append({"participant_id": sub, "session_id": "n/a", "lesion_id": k + 1,
                         "centroid_x_mm": c[0], "centroid_y_mm": c[1],
                         "centroid_z_mm": c[2] * 1.5, "volume_mm3": float(inner.sum() * 1.5),
                         "consensus": rim, "truth_prl": rim})
        save_nifti(qsm / sub / "anat" / f"{sub}_Chimap.nii.gz", chi, aff)
        save_nifti(les / sub / "anat" / f"{sub}_desc-lesion_mask.nii.gz", labels, aff)
        save_nifti(bids / sub / "anat" / f"{sub}_FLAIR.nii.gz", flair, aff)
    (bids / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    write_table(pd.DataFrame(rows), les / "lesions.tsv", "lesions")
    return bids, qsm, les


def test_train_from_bids(tmp_path, rng, capsys):
    bids, qsm, les = _tiny_bids(tmp_path, rng)
    cfg = _write_config(tmp_path, patch_mm=16.0, patch_voxels=16)
    out = tmp_path / "model"
    argv = ["train", str(bids), "--qsm", str(qsm), "--lesions", str(les), "--labels",
            str(les / "lesions.tsv"), "--label-column", "truth_prl", "--config", str(cfg),
            "--folds", "2", "--out", str(out), "--no-progress"]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    cache = tmp_path / "model_patches"
    table = pd.read_csv(cache / "table.tsv", sep="\t")
    assert len(table) == 16 and table.truth_prl.sum() == 8
    patches = np.load(cache / "patches.npy")
    assert patches.shape == (16, 4, 16, 16, 16)
    # the lesion channel of each patch is its own lesion, centred
    assert np.all(patches[:, 2, 8, 8, 8] == 1)
    fp = json.loads((out / "data_fingerprint.json").read_text())
    assert fp["n_lesions"] == 16 and fp["label_column"] == "truth_prl"
    # rerunning without --resume refuses to overwrite; with it, nothing is retrained
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0


def test_train_bad_input(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "m")]) == 2
    assert "needs BIDS_DIR, --qsm, --lesions, --labels" in capsys.readouterr().err
    assert main(["train", "--patches", str(tmp_path / "none"), "--out",
                 str(tmp_path / "m")]) == 2
    assert "not a patch cache" in capsys.readouterr().err
    x, t = make_synthetic_patches(6, patch_voxels=16, seed=2)
    build_patch_cache(tmp_path / "cache", [(x, t)], patch_mm=16.0, patch_voxels=16)
    assert main(["train", "--patches", str(tmp_path / "cache"), "--out",
                 str(tmp_path / "m")]) == 2
    assert "16.0 mm / 16 voxels but the config asks for 32.0 mm / 32" in capsys.readouterr().err
    assert main(["train", "--patches", str(tmp_path / "cache"), "--out", str(tmp_path / "m"),
                 "--patch-mm", "16", "--patch-voxels", "16", "--label-column", "grade"]) == 2
    assert "no 'grade' column" in capsys.readouterr().err
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"epochz": 1}')
    assert main(["train", "--patches", str(tmp_path / "cache"), "--out", str(tmp_path / "m"),
                 "--config", str(cfg)]) == 2
    assert "unknown training setting" in capsys.readouterr().err


def test_train_on_two_caches_keeps_their_patients_apart(tmp_path, capsys):
    x, t = make_synthetic_patches(48, patch_voxels=16, seed=4, n_patients=8, prevalence=0.4)
    half = t["participant_id"].isin(sorted(t["participant_id"].unique())[:4]).to_numpy()
    # the second cohort reuses the first one's participant ids, as two simulations would
    renamed = dict(zip(sorted(t.loc[~half, "participant_id"].unique()),
                       sorted(t.loc[half, "participant_id"].unique())))
    build_patch_cache(tmp_path / "siteA", [(x[half], t[half])], patch_mm=16.0, patch_voxels=16,
                      snap_to_voxels=True)
    build_patch_cache(tmp_path / "siteB",
                      [(x[~half], t[~half].replace({"participant_id": renamed}))],
                      patch_mm=16.0, patch_voxels=16, snap_to_voxels=True)
    out = tmp_path / "model"
    rc = main(["train", "--patches", str(tmp_path / "siteA"), str(tmp_path / "siteB"),
               "--config", str(_write_config(tmp_path, patch_mm=16.0, patch_voxels=16)),
               "--folds", "2", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    splits = json.loads((out / "splits.json").read_text())
    val = sorted(p for s in splits for p in s["val"])
    assert len(val) == 8 and all(p.split("/")[0] in ("siteA", "siteB") for p in val)
    oof = pd.read_csv(out / "val_predictions.tsv", sep="\t")
    assert len(oof) == len(t) and oof["participant_id"].nunique() == 8
    assert RimCNN.load(out).snap_to_voxels is True
    card = (out / "model_card.md").read_text()
    assert f"--patches {tmp_path / 'siteA'} {tmp_path / 'siteB'}" in card


def test_folds_in_parallel_processes_give_the_same_model(tmp_path, capsys):
    x, t = make_synthetic_patches(40, patch_voxels=16, seed=5, n_patients=6, prevalence=0.4)
    build_patch_cache(tmp_path / "cache", [(x, t)], patch_mm=16.0, patch_voxels=16)
    cfg = str(_write_config(tmp_path, patch_mm=16.0, patch_voxels=16))
    common = ["train", "--patches", str(tmp_path / "cache"), "--config", cfg, "--folds", "3",
              "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "serial")]) == 0
    assert main(common + ["--out", str(tmp_path / "jobs"), "--jobs", "2"]) == 0, \
        capsys.readouterr().err
    a = pd.read_csv(tmp_path / "serial" / "val_predictions.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "jobs" / "val_predictions.tsv", sep="\t")
    # each fold is seeded and single-threaded, so where it runs does not matter
    np.testing.assert_allclose(b["logit"], a["logit"], rtol=1e-5, atol=1e-6)
    assert main(common + ["--out", str(tmp_path / "jobs"), "--jobs", "2"]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "x"), "--jobs", "2", "--fold", "0"]) == 2
    assert "drop --fold" in capsys.readouterr().err
    # job arrays: sibling fold jobs share config.json; a fold that has run is not redone
    assert main(common + ["--out", str(tmp_path / "jobs"), "--fold", "1"]) == 2
    assert "already holds a model" in capsys.readouterr().err


def test_jobs_worker_exits_when_its_parent_is_killed(tmp_path):
    # the parent starts a spawned worker (as --jobs does) that watches it, then is SIGKILLed
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, sys, time\n"
        "def work(path):\n"
        "    from qsmrim.cli.train import _exit_with_parent\n"
        "    import os\n"
        "    _exit_with_parent(poll_s=0.05)\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    ctx.Process(target=work, args=(sys.argv[1],)).start()\n"
        "    time.sleep(120)\n")
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)],
                              cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()):
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        os.kill(worker, 0)  # alive
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                os.kill(worker, 0)
                status = Path(f"/proc/{worker}/status")
                if status.is_file() and "\nState:\tZ" in status.read_text():
                    break  # exited; its new parent has not reaped it yet
            except (ProcessLookupError, FileNotFoundError):
                break  # gone
            assert time.monotonic() < deadline, "orphaned worker kept running"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_train_with_a_teacher_records_it(tmp_path, capsys):
    x, t = make_synthetic_patches(40, patch_voxels=16, seed=5, n_patients=6, prevalence=0.4)
    build_patch_cache(tmp_path / "cache", [(x, t)], patch_mm=16.0, patch_voxels=16)
    cfg = str(_write_config(tmp_path, patch_mm=16.0, patch_voxels=16, epochs=1))
    common = ["train", "--patches", str(tmp_path / "cache"), "--config", cfg, "--folds", "2",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "teacher")]) == 0
    rc = main([*common, "--out", str(tmp_path / "student"), "--teacher",
               str(tmp_path / "teacher"), "--distill-weight", "0.5"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["teacher"] == str(tmp_path / "teacher") and saved["distill_weight"] == 0.5
    card = (tmp_path / "student" / "model_card.md").read_text()
    assert f"Distilled from `{tmp_path / 'teacher'}` (soft-target weight 0.5)" in card
    # a teacher of other patches is refused before any training
    rc = main(["train", "--patches", str(tmp_path / "cache"), "--config",
               str(_write_config(tmp_path, patch_mm=16.0, patch_voxels=16, channels=["qsm",
                                 "flair", "lesion", "others"], epochs=1, tta="flip")),
               "--folds", "2", "--no-progress", "--out", str(tmp_path / "s2"),
               "--teacher", str(tmp_path / "nowhere")])
    assert rc != 0 and "nowhere" in capsys.readouterr().err
