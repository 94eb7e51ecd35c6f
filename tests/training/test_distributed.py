"""DDP training: two gloo processes reach the quality of one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from tests.rimnet.synthetic_patches import make_synthetic_patches
from training.config import TrainConfig
from training.distributed import DistInfo, init_distributed

CFG = {"patch_voxels": 16, "patch_mm": 16.0, "net_channels": [4, 8, 16, 16], "n_folds": 2,
       "epochs": 6, "min_epochs": 1, "patience": 6, "batch_size": 8, "lr": 1e-2,
       "label_column": "label", "progress": False, "tta": "none", "affine_prob": 0.0,
       "dropout": 0.0, "threads": 1}


def _data():
    return make_synthetic_patches(96, patch_voxels=16, seed=7, n_patients=12, noise=0.1,
                                  prevalence=0.35)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    from training.trainer import train_model

    x, t = _data()
    train_model(x, t, config=TrainConfig(**CFG), out_dir=out_dir)


def test_one_process_info_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.distributed


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from training.trainer import train_model

        x, t = _data()
        train_model(x, t, config=TrainConfig(**CFG), out_dir=tmp_path / "one")
    finally:
        torch.set_num_threads(n)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # the same splits, every lesion predicted once
    assert (json.loads((tmp_path / "one" / "splits.json").read_text())
            == json.loads((tmp_path / "two" / "splits.json").read_text()))
    oof = pd.read_csv(tmp_path / "two" / "val_predictions.tsv", sep="\t")
    assert sorted(oof.lesion_id) == sorted(t.lesion_id)
    # each epoch saw the whole training set across both ranks (same number of log lines)
    for k in (0, 1):
        assert len((tmp_path / "two" / f"fold_{k}" / "log.jsonl").read_text().splitlines()) \
            == len((tmp_path / "one" / f"fold_{k}" / "log.jsonl").read_text().splitlines())
    a, b = one["mean_fold"]["roc_auc"], two["mean_fold"]["roc_auc"]
    assert a > 0.6 and b > 0.6
    assert abs(a - b) < 0.2  # within the noise of 48-lesion validation folds


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    from rimnet.patches import build_patch_cache

    x, t = _data()
    build_patch_cache(tmp_path / "cache", [(x, t)], patch_mm=16.0, patch_voxels=16)
    cfg = {k: v for k, v in CFG.items() if k not in ("label_column", "progress")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "qsmrim", "train", "--patches",
           str(tmp_path / "cache"), "--label-column", "label", "--config",
           str(tmp_path / "cfg.json"), "--out", str(tmp_path / "model"), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("out-of-fold ROC AUC") == 1  # rank 0 prints once
    m = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert m["mean_fold"]["roc_auc"] > 0.6
    assert np.isfinite(m["pooled"]["nll_calibrated"])
