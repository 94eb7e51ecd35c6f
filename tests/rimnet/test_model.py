import json

import numpy as np
import pytest
import torch

from qsm_core.errors import InputError
from rimnet.model import RimCNN, ensemble_logits, n_tta_views, tta_views
from rimnet.network import build_network

CONFIG = {"channels": ["qsm", "flair", "lesion", "others"], "patch_mm": 16.0,
          "patch_voxels": 16, "arch": "resnet", "net_channels": [4, 8, 8, 16], "n_types": 0,
          "dropout": 0.0, "norm": "batch", "tta": "flip"}


def _model(n_folds=2, seed=0, **kw):
    torch.manual_seed(seed)
    nets = []
    for _ in range(n_folds):
        net = build_network(in_channels=4, channels=(4, 8, 8, 16))
        # non-trivial batch-norm statistics, as after training
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.randn(8, 4, 16, 16, 16) * 2 + 0.5)
        nets.append(net.eval())
    return RimCNN(nets, config=CONFIG, temperature=1.7, offset=-0.3, threshold=0.4, **kw)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def patches(rng):
    return rng.normal(size=(7, 4, 16, 16, 16)).astype(np.float32)


def test_predict_proba_contract(patches):
    m = _model()
    p = m.predict_proba(patches)
    assert p.shape == (7, 2)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert np.all((p >= 0) & (p <= 1))
    assert list(m.classes_) == [0, 1]
    np.testing.assert_array_equal(m.predict(patches), (p[:, 1] >= 0.4).astype(int))
    # calibration: p = sigmoid((raw + offset) / T)
    raw = m.raw_logits(patches)
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-(raw - 0.3) / 1.7)), rtol=1e-6)
    # batch size does not change results
    m.batch_size = 3
    np.testing.assert_allclose(m.predict_proba(patches), p, rtol=1e-5, atol=1e-6)
    assert m.predict_proba(patches[:0]).shape == (0, 2)


def test_read_only_patches_are_scored_without_warning_and_left_intact(tmp_path, patches):
    # a patch cache is memory-mapped read-only; torch warns on non-writable arrays
    import warnings

    m = _model()
    np.save(tmp_path / "p.npy", patches)
    mapped = np.load(tmp_path / "p.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = m.predict_proba(mapped)
    np.testing.assert_array_equal(p, m.predict_proba(patches.copy()))
    np.testing.assert_array_equal(np.asarray(mapped), patches)


def test_save_load_round_trip_identical(tmp_path, patches):
    m = _model()
    p = m.predict_proba(patches)
    m.save(tmp_path / "model")
    m2 = RimCNN.load(tmp_path / "model")
    np.testing.assert_array_equal(m2.predict_proba(patches), p)
    assert (m2.channels, m2.patch_mm, m2.patch_voxels, m2.threshold) == (
        m.channels, m.patch_mm, m.patch_voxels, m.threshold)
    # weights are plain state dicts
    sd = torch.load(tmp_path / "model" / "fold_0" / "model.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in sd.values())
    one = RimCNN.load(tmp_path / "model", folds=[1])
    assert len(one.networks) == 1


def test_tta_views_are_the_symmetries():
    x = torch.arange(2 * 1 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 4, 3)
    for tta, v in [("none", 1), ("flip", 4), ("d4", 8), ("d4z", 16)]:
        views = tta_views(x, tta)
        assert views.shape == (v * 2, 1, 4, 4, 3) and n_tta_views(tta) == v
        # all views of one patch are distinct arrangements of the same values
        flat = views.reshape(v, 2, -1)
        assert len({tuple(flat[i, 0].tolist()) for i in range(v)}) == v
        torch.testing.assert_close(flat[:, 0].sort(1).values, flat[:1, 0].sort(1).values
                                   .expand(v, -1))


def test_d4_tta_makes_predictions_rotation_invariant(patches):
    m = _model(tta="d4")
    p = m.predict_proba(patches)
    for k in (1, 2, 3):
        rot = np.ascontiguousarray(np.rot90(patches, k, axes=(2, 3)))
        np.testing.assert_allclose(m.predict_proba(rot), p, rtol=1e-4, atol=1e-5)
    flipped = np.ascontiguousarray(patches[:, :, ::-1])
    np.testing.assert_allclose(m.predict_proba(flipped), p, rtol=1e-4, atol=1e-5)
    # without TTA a rotation changes the output (the test above is not vacuous)
    m.tta = "none"
    rot = np.ascontiguousarray(np.rot90(patches, 1, axes=(2, 3)))
    assert np.abs(m.predict_proba(rot) - m.predict_proba(patches)).max() > 1e-4


def test_ensemble_logits_average_nets(patches):
    m = _model(n_folds=3)
    each = [ensemble_logits([n], patches, tta="flip") for n in m.networks]
    np.testing.assert_allclose(ensemble_logits(m.networks, patches, tta="flip"),
                               np.mean(each, axis=0), rtol=1e-5, atol=1e-6)


def test_bad_patches(patches):
    m = _model()
    with pytest.raises(InputError, match="shape"):
        m.predict_proba(patches[:, :3])
    with pytest.raises(InputError, match="shape"):
        m.predict_proba(patches[0])
    bad = patches.copy()
    bad[2, 0, 3, 3, 3] = np.nan
    with pytest.raises(InputError, match="patch 2"):
        m.predict_proba(bad)


def test_missing_or_corrupted_model_dir(tmp_path, patches):
    with pytest.raises(InputError, match="does not exist"):
        RimCNN.load(tmp_path / "nope")
    d = tmp_path / "model"
    _model().save(d)
    (d / "fold_1" / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="corrupted"):
        RimCNN.load(d)
    (d / "fold_1" / "model.pt").unlink()
    (d / "fold_0" / "model.pt").unlink()
    with pytest.raises(InputError, match="no fold_K"):
        RimCNN.load(d)
    _model().save(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config"):
        RimCNN.load(d)
    cfg = dict(CONFIG, net_channels=[8, 8, 8, 8])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="do not match"):
        RimCNN.load(d)
    (d / "config.json").unlink()
    with pytest.raises(InputError, match="missing model config"):
        RimCNN.load(d)


def test_type_head(patches):
    torch.manual_seed(1)
    cfg = dict(CONFIG, n_types=5)
    net = build_network(in_channels=4, n_types=5, channels=(4, 8, 8, 16)).eval()
    m = RimCNN([net], config=cfg)
    t = m.predict_types(patches)
    assert t.shape == (7, 5)
    np.testing.assert_allclose(t.sum(1), 1.0)
    with pytest.raises(InputError, match="type head"):
        _model().predict_types(patches)
