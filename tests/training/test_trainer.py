import json

import numpy as np
import pandas as pd
import pytest
import torch

from qsm_core.errors import InputError
from rimnet.model import RimCNN
from rimnet.network import build_network
from tests.rimnet.synthetic_patches import make_synthetic_patches
from training import trainer as trainer_mod
from training.config import TrainConfig
from training.trainer import train_model

SMALL = {"patch_voxels": 16, "patch_mm": 16.0, "net_channels": [4, 8, 16, 16], "n_folds": 2,
         "epochs": 6, "min_epochs": 1, "patience": 6, "batch_size": 8, "lr": 1e-2,
         "label_column": "label", "progress": False, "tta": "flip", "affine_prob": 0.0,
         "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data():
    return make_synthetic_patches(96, patch_voxels=16, seed=7, n_patients=12, noise=0.1,
                                  prevalence=0.35)


def test_one_batch_overfit():
    x, t = make_synthetic_patches(8, patch_voxels=16, seed=3, prevalence=0.5)
    y = torch.tensor(t.label.to_numpy(), dtype=torch.float32)
    torch.manual_seed(0)
    net = build_network(in_channels=4, channels=(4, 8, 16, 16))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt = torch.as_tensor(x)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(net(xt)[:, 0], y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    net.eval()
    with torch.no_grad():
        pred = (net(xt)[:, 0] > 0).float()
    assert torch.equal(pred, y)


def test_train_writes_model_dir_and_resumes(tmp_path, data):
    x, t = data
    cfg = TrainConfig(**SMALL)
    out = tmp_path / "model"
    model = train_model(x, t, config=cfg, out_dir=out, command="qsmrim train test")
    for f in ["config.json", "versions.json", "data_fingerprint.json", "splits.json",
              "val_predictions.tsv", "temperature.json", "metrics.json", "model_card.md",
              "fold_0/model.pt", "fold_0/checkpoint_last.pt", "fold_0/log.jsonl",
              "fold_0/progress.png", "fold_1/model.pt"]:
        assert (out / f).is_file(), f
    assert isinstance(model, RimCNN) and len(model.networks) == 2
    # out-of-fold predictions: every lesion exactly once, in the fold of its patient
    oof = pd.read_csv(out / "val_predictions.tsv", sep="\t")
    assert sorted(oof.lesion_id) == sorted(t.lesion_id)
    splits = json.loads((out / "splits.json").read_text())
    for _, row in oof.iterrows():
        assert row.participant_id in splits[int(row.fold)]["val"]
    log = [json.loads(line) for line in (out / "fold_0/log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == list(range(1, 7))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pooled"]["n_lesions"] == len(t)
    assert metrics["pooled"]["roc_auc"] > 0.6
    calib = json.loads((out / "temperature.json").read_text())
    assert metrics["pooled"]["nll_calibrated"] <= metrics["pooled"]["nll_uncalibrated"] + 1e-9
    assert calib["temperature"] > 0 and 0 < calib["threshold"] < 1
    # probabilities are moved from the training share of rims to the deployment share
    share = t.label.mean()
    assert calib["train_prevalence"] == pytest.approx(share)
    assert calib["deploy_prevalence"] == cfg.deploy_prevalence == 0.11
    assert calib["prior_shift"] == pytest.approx(np.log(0.11 / 0.89) - np.log(share / (1 - share)))
    # the trained model reproduces its out-of-fold logits and probabilities fold by fold
    for k in (0, 1):
        sub = oof[oof.fold == k]
        idx = t.reset_index().set_index("lesion_id").loc[sub.lesion_id, "index"].to_numpy()
        m_k = RimCNN.load(out, folds=[k])
        np.testing.assert_allclose(m_k.raw_logits(x[idx]), sub.logit, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(m_k.predict_proba(x[idx])[:, 1], sub.prob, rtol=1e-3,
                                   atol=1e-4)
    # an existing model is not overwritten silently
    with pytest.raises(InputError, match="--resume"):
        train_model(x, t, config=cfg, out_dir=out)
    # resuming a finished run retrains nothing and gives the same model
    again = train_model(x, t, config=cfg, out_dir=out, resume=True)
    np.testing.assert_array_equal(again.predict_proba(x[:10]), model.predict_proba(x[:10]))
    with pytest.raises(InputError, match="differs"):
        train_model(x, t, config=cfg.replace(lr=5e-3), out_dir=out, resume=True)


def _train_interrupted_after_two_epochs(monkeypatch, x, t, cfg, out) -> None:
    """Train fold 0 into ``out`` and crash (KeyboardInterrupt) after its second epoch."""
    calls = {"n": 0}
    real = trainer_mod.barrier

    def crash_after_two_epochs(info):
        calls["n"] += 1
        if calls["n"] == 3:  # config barrier, epoch 1, epoch 2 -> crash
            raise KeyboardInterrupt
        real(info)

    monkeypatch.setattr(trainer_mod, "barrier", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train_model(x, t, config=cfg, out_dir=out, folds=[0])
    monkeypatch.setattr(trainer_mod, "barrier", real)


def test_interrupted_fold_resumes_exactly(tmp_path, data, monkeypatch):
    x, t = data
    cfg = TrainConfig(**{**SMALL, "epochs": 3})
    ref = tmp_path / "ref"
    train_model(x, t, config=cfg, out_dir=ref, folds=[0])
    assert not (ref / "metrics.json").exists()  # waits for fold 1

    out = tmp_path / "run"
    _train_interrupted_after_two_epochs(monkeypatch, x, t, cfg, out)
    ck = torch.load(out / "fold_0/checkpoint_last.pt", weights_only=True)
    assert ck["epoch"] == 2 and not ck["finished"]
    train_model(x, t, config=cfg, out_dir=out, folds=[0], resume=True)
    a = torch.load(ref / "fold_0/model.pt", weights_only=True)
    b = torch.load(out / "fold_0/model.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert (ref / "fold_0/log.jsonl").read_text().count("\n") == 3
    assert (out / "fold_0/log.jsonl").read_text().count("\n") == 3


def test_bad_training_data(tmp_path, data):
    x, t = data
    cfg = TrainConfig(**SMALL)
    with pytest.raises(InputError, match="no label column 'consensus2'"):
        train_model(x, t, config=cfg.replace(label_column="consensus2"), out_dir=tmp_path / "a")
    with pytest.raises(InputError, match="single class"):
        train_model(x, t.assign(label=0), config=cfg, out_dir=tmp_path / "b")
    with pytest.raises(InputError, match="missing or non-numeric"):
        train_model(x, t.assign(label=np.where(t.index == 3, np.nan, t.label)), config=cfg,
                    out_dir=tmp_path / "c")
    with pytest.raises(InputError, match="rows but there are"):
        train_model(x[:-1], t, config=cfg, out_dir=tmp_path / "d")
    with pytest.raises(InputError, match="shape"):
        train_model(x[:, :3], t, config=cfg, out_dir=tmp_path / "e")
    assert not (tmp_path / "a").exists()


def test_config_rejects_typos(tmp_path):
    with pytest.raises(InputError, match="unknown training setting"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(InputError, match="arch"):
        TrainConfig(arch="transformer")
    p = TrainConfig(epochs=7).save(tmp_path / "c.json")
    assert TrainConfig.load(p).epochs == 7


def test_type_head_from_type_names(tmp_path, data):
    x, t = data
    rng = np.random.default_rng(0)
    names = np.where(t.label == 1, "rim", rng.choice(["iso", "hypo", "hyper", "hypo_rim"],
                                                     size=len(t)))
    t = t.assign(truth_type=names)
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "n_types": 5, "type_column": "truth_type"})
    model = train_model(x, t, config=cfg, out_dir=tmp_path / "m")
    assert model.config["type_names"] == ["hyper", "hypo", "hypo_rim", "iso", "rim"]
    probs = model.predict_types(x[:5])
    assert probs.shape == (5, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    with pytest.raises(InputError, match="more than n_types"):
        train_model(x, t, config=cfg.replace(n_types=3), out_dir=tmp_path / "m3")


def test_weight_average_is_saved_validated_and_resumed(tmp_path, data, monkeypatch):
    x, t = data
    cfg = TrainConfig(**{**SMALL, "epochs": 3, "min_epochs": 3, "weight_ema": 0.9})
    ref = tmp_path / "ref"
    train_model(x, t, config=cfg, out_dir=ref, folds=[0])
    ck = torch.load(ref / "fold_0/checkpoint_last.pt", weights_only=True)
    saved = torch.load(ref / "fold_0/model.pt", weights_only=True)
    log = [json.loads(line) for line in (ref / "fold_0/log.jsonl").read_text().splitlines()]
    # (on this seeded data the last epoch is the best, so model.pt holds its weights)
    assert max(h["val_pr_auc"] for h in log) == log[-1]["val_pr_auc"]
    # the saved network is the running average, not the raw weights
    for key, value in saved.items():
        torch.testing.assert_close(value, ck["ema"][f"module.{key}"])
    assert any(not torch.equal(saved[k], ck["model"][k]) for k in saved
               if saved[k].is_floating_point())
    # an average over the steps: int(n_averaged) = optimiser steps taken
    steps = ck["ema"]["n_averaged"].item()
    assert steps >= 3
    # interrupted after two epochs and resumed: the same averaged network
    out = tmp_path / "run"
    _train_interrupted_after_two_epochs(monkeypatch, x, t, cfg, out)
    train_model(x, t, config=cfg, out_dir=out, folds=[0], resume=True)
    b = torch.load(out / "fold_0/model.pt", weights_only=True)
    for key in saved:
        torch.testing.assert_close(saved[key], b[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="weight_ema"):
        TrainConfig(**{**SMALL, "weight_ema": 1.0})


def _fold0_oof_auc(out):
    from sklearn.metrics import roc_auc_score

    oof = pd.read_csv(out / "fold_0/val_predictions.tsv", sep="\t")
    return roc_auc_score(oof["label"], oof["logit"])


def test_distillation_learns_the_teachers_soft_targets(tmp_path, data, monkeypatch):
    x, t = data
    y = t["label"].to_numpy(dtype=np.float32)
    # a teacher that says the opposite of the labels: with distill_weight=1 the network
    # learns the teacher, so it ranks the validation lesions backwards
    seen = {}

    def contrary_teacher(teacher_dir, patches, config, device="cpu"):
        seen["teacher"] = teacher_dir
        return np.where(y > 0.5, 0.05, 0.95).astype(np.float32)

    monkeypatch.setattr(trainer_mod, "teacher_probabilities", contrary_teacher)
    cfg = TrainConfig(**{**SMALL, "tta": "none"})
    train_model(x, t, config=cfg, out_dir=tmp_path / "labels", folds=[0])
    train_model(x, t, config=cfg.replace(teacher="T", distill_weight=1.0),
                out_dir=tmp_path / "teacher", folds=[0])
    assert seen["teacher"] == "T"
    assert _fold0_oof_auc(tmp_path / "labels") > 0.8
    assert _fold0_oof_auc(tmp_path / "teacher") < 0.2
    with pytest.raises(InputError, match="distill_weight"):
        TrainConfig(**{**SMALL, "distill_weight": 1.5})


def test_teacher_probabilities_are_the_ensembles_and_patches_must_match(tmp_path, data):
    from training.trainer import teacher_probabilities

    x, t = data
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "tta": "none"})
    teacher = train_model(x, t, config=cfg, out_dir=tmp_path / "teacher")
    p = teacher_probabilities(tmp_path / "teacher", x[:10], cfg)
    z = teacher.raw_logits(x[:10], tta="none")
    np.testing.assert_allclose(p, 1.0 / (1.0 + np.exp(-z)), rtol=1e-6)
    other = cfg.replace(patch_mm=24.0)
    with pytest.raises(InputError, match="teacher .* was trained on patches"):
        teacher_probabilities(tmp_path / "teacher", x[:10], other)
