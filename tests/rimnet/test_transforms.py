import numpy as np
import torch
from monai.data import set_track_meta

from rimnet.transforms import RandChannelIntensityd, build_train_transforms


def test_intensity_changes_only_image_channels(rng):
    x = rng.normal(size=(4, 8, 8, 8)).astype(np.float32)
    t = RandChannelIntensityd(keys="image", channels=(0, 1), gain=1.5, offset=0.1,
                              noise_std=0.1, prob=1.0)
    t.set_random_state(seed=3)
    out = t({"image": torch.as_tensor(x)})["image"].numpy()
    np.testing.assert_array_equal(out[2:], x[2:])
    assert not np.allclose(out[:2], x[:2])
    # gain within bounds: the fitted slope of out vs x lies in [1/1.5, 1.5]
    slope = np.polyfit(x[0].ravel(), out[0].ravel(), 1)[0]
    assert 1 / 1.5 - 0.1 < slope < 1.5 + 0.1


def test_train_transforms_seeded_and_shape_preserving(rng):
    set_track_meta(False)
    try:
        x = rng.normal(size=(4, 16, 16, 16)).astype(np.float32)
        x[2] = x[2] > 0
        a = build_train_transforms(channel_names=("qsm", "flair", "lesion", "others"), seed=5)
        b = build_train_transforms(channel_names=("qsm", "flair", "lesion", "others"), seed=5)
        outs_a = [a({"image": x})["image"] for _ in range(4)]
        outs_b = [b({"image": x})["image"] for _ in range(4)]
        for oa, ob in zip(outs_a, outs_b):
            assert oa.shape == (4, 16, 16, 16) and oa.dtype == torch.float32
            torch.testing.assert_close(oa, ob)
        # without the affine, flips/rotations permute the mask voxels: same count of ones
        c = build_train_transforms(channel_names=("qsm", "flair", "lesion", "others"),
                                   affine_prob=0.0, seed=1)
        for _ in range(4):
            out = c({"image": x})["image"]
            assert float(out[2].sum()) == float(x[2].sum())
    finally:
        set_track_meta(True)


def _symmetries(x: torch.Tensor) -> list[torch.Tensor]:
    """The 16 images MONAI's RandFlipd (axes 0-2) then RandRotate90d(spatial_axes=(0, 1))
    can produce: every subset of flipped axes, then 0-3 quarter turns in the slice plane."""
    from monai.transforms import Flip, Rotate90

    out = []
    for mask in range(8):
        y = x
        for a in range(3):
            if mask >> a & 1:
                y = Flip(spatial_axis=a)(y)
        out += [torch.as_tensor(Rotate90(k=k, spatial_axes=(0, 1))(y)) for k in range(4)]
    return out


def test_flip_rotate90_draws_monais_symmetries_uniformly(rng):
    from rimnet.transforms import RandFlipRotate90d

    set_track_meta(False)
    try:
        x = torch.as_tensor(rng.normal(size=(2, 4, 4, 3)).astype(np.float32))
        images = _symmetries(x)
        # the 32 (flips, turns) pairs give 16 distinct images, each from two pairs
        distinct = []
        for im in images:
            if not any(torch.equal(im, d) for d in distinct):
                distinct.append(im)
        assert len(distinct) == 16
        t = RandFlipRotate90d(keys="image", flip_prob=0.5, rot90_prob=0.75)
        t.set_random_state(seed=0)
        counts = np.zeros(16, int)
        n = 3200
        for _ in range(n):
            out = t({"image": x})["image"]
            assert out.is_contiguous()
            hits = [i for i, d in enumerate(distinct) if torch.equal(out, d)]
            assert len(hits) == 1  # always one of MONAI's images
            counts[hits[0]] += 1
        # uniform: each 1/16 of the draws (binomial sd ~ 14 for n=3200)
        assert np.all(np.abs(counts - n / 16) < 5 * np.sqrt(n / 16 * 15 / 16))
    finally:
        set_track_meta(True)


def test_slice_blur_matrix_is_a_replicate_padded_gaussian_blur(rng):
    from rimnet.transforms import slice_blur_matrix

    x = torch.as_tensor(rng.normal(size=(3, 5, 32)).astype(np.float32))
    for sigma in (0.3, 1.0, 2.5):
        r = int(np.ceil(3 * sigma))
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = (k / k.sum())[None, None]
        rows = x.reshape(-1, 1, 32)
        ref = torch.nn.functional.conv1d(torch.nn.functional.pad(rows, (r, r), mode="replicate"),
                                         k).reshape(x.shape)
        torch.testing.assert_close(x @ slice_blur_matrix(32, sigma), ref, rtol=1e-5, atol=1e-6)
