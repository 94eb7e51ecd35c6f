"""Lesion-edge shell features (rimnet.shells) and their fusion into the network."""

import numpy as np
import pytest
import torch

from rimnet.model import ensemble_logits, network_kwargs_from_config, tta_views
from rimnet.network import build_network
from rimnet.patches import QSM_SCALE
from rimnet.shells import SHELL_FEATURE_NAMES, ShellFeatures

P = 32
IDX = {name: i for i, name in enumerate(SHELL_FEATURE_NAMES)}


def _sphere_patch(radius=6.0, rim_ppm=0.04, offset_ppm=0.0):
    """Patch (1, 4, P, P, P): qsm, flair, lesion, others; a rim in the lesion's outer layer."""
    g = np.indices((P, P, P)).astype(float) - (P - 1) / 2
    r = np.sqrt((g ** 2).sum(0))
    les = r <= radius
    x = np.zeros((1, 4, P, P, P), np.float32)
    x[0, 2] = les
    # the outer layer of a cube-eroded mask: lesion voxels with a neighbour outside
    inner = les & ~torch.nn.functional.max_pool3d(
        torch.as_tensor(~les, dtype=torch.float32)[None, None], 3, 1, 1)[0, 0].numpy().astype(bool)
    x[0, 0] = (offset_ppm + rim_ppm * (les & ~inner)) * QSM_SCALE
    return x, les, inner


def _features(x, **kw):
    sf = ShellFeatures(qsm_channel=0, lesion_channel=2, others_channel=3, **kw)
    with torch.no_grad():
        f, ref = sf(torch.as_tensor(x))
    return f[0].numpy(), float(ref[0])


def test_rim_in_the_outer_layer_is_measured_exactly():
    x, les, inner = _sphere_patch(rim_ppm=0.04)
    f, ref = _features(x)
    assert ref == pytest.approx(0.0, abs=1e-7)
    assert f[IDX["in1"]] == pytest.approx(0.04 * QSM_SCALE, rel=1e-5)
    assert f[IDX["in2"]] == pytest.approx(0.0, abs=1e-6)
    assert f[IDX["core"]] == pytest.approx(0.0, abs=1e-6)
    assert f[IDX["rim_minus_core"]] == pytest.approx(0.04 * QSM_SCALE, rel=1e-5)
    # positive edge voxels: the whole inner layer, none of the outer one
    n_in1 = (les & ~inner).sum()
    dil = torch.nn.functional.max_pool3d(torch.as_tensor(les, dtype=torch.float32)[None, None],
                                         3, 1, 1)[0, 0].numpy().astype(bool)
    n_out1 = (dil & ~les).sum()
    assert f[IDX["edge_positive_fraction"]] == pytest.approx(n_in1 / (n_in1 + n_out1), rel=1e-5)
    assert f[IDX["noise"]] == pytest.approx(0.0, abs=1e-6)


def test_features_ignore_a_global_offset_and_report_it_as_reference():
    a, _, _ = _sphere_patch(offset_ppm=0.0)
    b, _, _ = _sphere_patch(offset_ppm=-0.03)
    fa, _ = _features(a)
    fb, ref = _features(b)
    np.testing.assert_allclose(fa, fb, atol=1e-5)
    assert ref == pytest.approx(-0.03 * QSM_SCALE, rel=1e-5)


def test_a_vein_through_the_ring_is_clipped_and_other_lesions_are_left_out():
    x, les, _ = _sphere_patch(rim_ppm=0.03)
    base, _ = _features(x)
    vein = x.copy()
    vein[0, 0, :, 15:17, 2:5] += 0.4 * QSM_SCALE  # a +0.4 ppm vessel in the ring
    fv, ref_v = _features(vein)
    assert abs(ref_v) < 0.1 * QSM_SCALE * 0.2  # the ring mean moves, but clipped values bound it
    other = x.copy()
    other[0, 3, 2:8, 2:8, 2:8] = 1.0  # another lesion, bright, in the ring
    other[0, 0, 2:8, 2:8, 2:8] += 0.05 * QSM_SCALE
    fo, ref_o = _features(other)
    assert ref_o == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(fo, base, atol=1e-5)


def test_features_are_invariant_to_tta_views_and_batch_composition(rng):
    x = rng.normal(0, 0.2, size=(3, 4, P, P, P)).astype(np.float32)
    x[:, 2:] = 0
    x[0, 2, 10:20, 12:18, 14:19] = 1
    x[1, 2, 14:17, 14:17, 14:17] = 1
    x[2, 2, 5:27, 8:22, 12:20] = 1
    x[2, 3, 2:5, 2:5, 2:5] = 1
    sf = ShellFeatures(qsm_channel=0, lesion_channel=2, others_channel=3)
    t = torch.as_tensor(x)
    with torch.no_grad():
        f, _ = sf(t)
        views = tta_views(t, "d4")
        fv, _ = sf(views)
        single = torch.cat([sf(t[i:i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(fv.reshape(-1, 3, f.shape[1]).numpy(),
                               np.broadcast_to(f.numpy(), (len(views) // 3, 3, f.shape[1])),
                               atol=1e-5)
    np.testing.assert_allclose(single.numpy(), f.numpy(), atol=1e-5)


def test_ensemble_shares_shell_features_with_the_same_scores(rng):
    torch.manual_seed(0)
    nets = [build_network(in_channels=4, shell_channels={"qsm": 0, "lesion": 2, "others": 3},
                          channels=(4, 4, 8, 8)).eval() for _ in range(2)]
    x = rng.normal(0, 0.2, size=(10, 4, P, P, P)).astype(np.float32)
    x[:, 2:] = 0
    for i in range(10):
        x[i, 2, 14 - i // 2:17 + i // 2, 14:18, 13:19] = 1
    z = ensemble_logits(nets, x, tta="none", batch_size=4)
    with torch.no_grad():
        ref = np.mean([[float(n(torch.as_tensor(x[i:i + 1]))[0, 0]) for n in nets]
                       for i in range(10)], axis=1)
    np.testing.assert_allclose(z, ref, atol=1e-5)


def test_models_without_the_setting_load_as_image_only():
    cfg = {"channels": ["qsm", "flair", "lesion", "others"], "arch": "resnet",
           "net_channels": [8, 16, 32, 64]}
    assert network_kwargs_from_config(cfg)["shell_channels"] is None
    kw = network_kwargs_from_config({**cfg, "shell_features": True, "centre_qsm": True})
    assert kw["shell_channels"] == {"qsm": 0, "lesion": 2, "others": 3} and kw["centre_qsm"]


def test_slice_blur_acts_on_image_channels_along_axis_2_only(rng):
    from rimnet.transforms import RandSliceBlurd

    img = np.zeros((4, 8, 8, 16), np.float32)
    img[0, :, :, 8] = 1.0  # a one-slice-thick sheet of QSM
    img[2, 2:6, 2:6, 6:10] = 1.0  # lesion mask
    t = RandSliceBlurd(keys="image", channels=(0, 1), prob=1.0, max_sigma=0.8)
    t.set_random_state(seed=3)
    out = t({"image": torch.as_tensor(img)})["image"].numpy()
    np.testing.assert_allclose(out[0].sum(axis=2), img[0].sum(axis=2), rtol=1e-5)  # mass kept
    assert out[0, 0, 0, 8] < 1.0 and out[0, 0, 0, 7] > 0.0  # spread across slices
    np.testing.assert_allclose(out[0][:, :, 8], out[0][0, 0, 8])  # not in-plane
    np.testing.assert_array_equal(out[2], img[2])  # masks untouched


def test_fast_shell_features_equal_the_module_and_fall_back_when_they_must(rng):
    import torch

    from rimnet.shells import ShellFeatures, fast_shell_features

    x = torch.zeros(3, 4, 24, 24, 24)
    x[:, 0] = torch.as_tensor(rng.normal(0, 0.3, (3, 24, 24, 24)), dtype=torch.float32)
    x[:, 2, 9:15, 8:16, 10:14] = 1.0
    x[1, 3, 2:5, 2:5, 2:5] = 1.0
    sh = ShellFeatures(qsm_channel=0, lesion_channel=2, others_channel=3)
    want = sh(x)
    got = fast_shell_features(sh, x)  # the compiled kernel
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # a tensor that needs a gradient, or float64, goes through the module itself
    for y in (x.clone().requires_grad_(True), x.double()):
        for g, w in zip(fast_shell_features(sh, y), sh(y)):
            assert torch.equal(g, w)
