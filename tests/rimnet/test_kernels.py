"""The compiled kernels (rimnet._kernels) reproduce the readable torch/numpy references."""

import numpy as np
import pytest
import torch

from rimnet import _kernels
from rimnet.shells import ShellFeatures
from tests.rimnet.synthetic_patches import make_synthetic_patches


def _edge_cases(p: int) -> np.ndarray:
    """Patches whose lesions touch the patch faces, are empty, or are one voxel."""
    rng = np.random.default_rng(3)
    x = np.zeros((5, 4, p, p, p), np.float32)
    x[:, 0] = rng.normal(0.0, 0.3, (5, p, p, p))
    x[0, 2, :5, :6, :7] = 1  # in a corner
    x[1, 2, p - 4:, 10:20, p - 6:] = 1  # on three far faces, with a neighbour
    x[1, 3, p - 10:p - 5, 10:20, 20:] = 1
    x[2, 2, 5, 6, 7] = 1  # one voxel
    x[3, 2] = rng.random((p, p, p)) > 0.6  # scattered
    x[3, 3] = (rng.random((p, p, p)) > 0.8) & (x[3, 2] == 0)
    # x[4]: no lesion at all
    return x


@pytest.mark.parametrize("p", [32, 20, 64])
@pytest.mark.parametrize("others", [3, None])
def test_shell_features_match_the_module(p, others):
    x, _ = make_synthetic_patches(12, patch_voxels=p, seed=p)
    x = np.concatenate([x, _edge_cases(p)])
    mod = ShellFeatures(qsm_channel=0, lesion_channel=2, others_channel=others)
    with torch.inference_mode():
        ref_f, ref_r = mod(torch.from_numpy(x))
    f, r = _kernels.shell_features(x, qsm_channel=0, lesion_channel=2, others_channel=others,
                                   clip=mod.clip, positive=mod.positive)
    assert f.dtype == np.float32 and f.shape == tuple(ref_f.shape)
    np.testing.assert_allclose(f, ref_f.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(r, ref_r.numpy(), rtol=0, atol=2e-6)
    assert np.all(f[-1] == 0) and r[-1] == 0  # no lesion: every feature 0
    assert np.abs(f).max() > 0.1  # the comparison is not vacuous


@pytest.mark.parametrize("shape", [(40, 36, 30), (132, 130, 124)])  # below / above 2 M voxels
@pytest.mark.parametrize("layouts", ["CCC", "FFC", "FCF"])
def test_flair_reference_in_qsm_mask_equals_the_masked_median(rng, shape, layouts):
    from rimnet.patches import flair_reference, flair_reference_in_qsm_mask

    flair = rng.gamma(4.0, 25.0, shape).astype(np.float32)
    qsm = rng.normal(0, 0.05, shape).astype(np.float32)
    qsm[: shape[0] // 3] = 0  # outside the brain
    labels = np.zeros(shape, np.int32)
    labels[10:20, 5:25, 8:22] = 7
    flair, qsm, labels = (np.asarray(a, order=o) for a, o in zip((flair, qsm, labels), layouts))
    ref = flair_reference(flair, lesion_labels=labels, brain_mask=qsm != 0)
    assert flair_reference_in_qsm_mask(flair, qsm=qsm, lesion_labels=labels) == ref
    # an all-zero QSM: no mask, as before
    zero = np.zeros_like(qsm)
    assert (flair_reference_in_qsm_mask(flair, qsm=zero, lesion_labels=labels)
            == flair_reference(flair, lesion_labels=labels))


@pytest.mark.parametrize("kw", [{}, {"spacing_mm": 4 / 3},
                                {"spacing_mm": 0.5, "rim_inner_mm": 1.0, "nawm_outer_mm": 4.0},
                                {"n_sectors": 8, "min_slices": 3, "vein_min_ppm": 0.05}])
def test_compiled_rule_features_equal_the_numpy_path(rng, monkeypatch, kw):
    import rimnet.rule_based as rb
    from rimnet.patches import QSM_SCALE
    from tests.rimnet.test_rule_based_fast import random_patches

    X = np.concatenate([random_patches(rng, n=14), make_synthetic_patches(10, seed=5)[0]])
    X[4, 2:] = 0  # an empty lesion channel
    chi = X[:, 0] / QSM_SCALE
    calls = []
    compiled = rb._rim_features_compiled
    monkeypatch.setattr(rb, "_rim_features_compiled",
                        lambda *a, **k: calls.append(1) or compiled(*a, **k))
    for others in (X[:, 3], None):
        fast = rb.rim_features_batch(chi, X[:, 2], others, **kw)
        monkeypatch.setattr(rb, "_COMPILED", False)
        ref = rb.rim_features_batch(chi, X[:, 2], others, **kw)
        monkeypatch.setattr(rb, "_COMPILED", True)
        assert fast == ref  # every feature, bit for bit
    assert len(calls) == 2
    assert sum(f["rule_call"] for f in ref) > 0 and sum(f["n_vein_voxels"] for f in ref) > 0


def test_pairwise_sum_is_numpys(rng):
    for n in (0, 1, 5, 8, 9, 17, 127, 128, 129, 300, 1000, 4099):
        a = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4, n)
        assert _kernels._pairwise_sum(a, 0, n) == np.add.reduce(a)


def test_kernels_keep_torchs_thread_count():
    # numba's OpenMP layer would otherwise leave torch on numba's thread count
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _kernels.set_threads(2)
        assert torch.get_num_threads() == 1
        _kernels.set_threads(1)
        assert torch.get_num_threads() == 1
        x, _ = make_synthetic_patches(4, patch_voxels=16)
        _kernels.shell_features(x, qsm_channel=0, lesion_channel=2, others_channel=3,
                                clip=1.0, positive=0.1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


def test_concurrent_launches_from_threads_are_safe():
    # the workqueue layer aborts the process on concurrent launches; _launch serialises them
    from concurrent.futures import ThreadPoolExecutor

    x, _ = make_synthetic_patches(6, patch_voxels=16)
    kw = dict(qsm_channel=0, lesion_channel=2, others_channel=3, clip=1.0, positive=0.1)
    ref = _kernels.shell_features(x, **kw)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: _kernels.shell_features(x, **kw), range(8)))
    assert all(np.array_equal(f, ref[0]) and np.array_equal(r, ref[1]) for f, r in outs)
