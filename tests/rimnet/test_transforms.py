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
