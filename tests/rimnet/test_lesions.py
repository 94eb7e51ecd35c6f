import numpy as np
import pytest

from qsm_core.errors import InputError
from qsm_core.io.tables import validate_table
from rimnet.lesions import (
    LESION_COLUMNS,
    label_lesions,
    lesion_boxes,
    lesion_table,
    long_axis_mm,
    resample_labels_to,
)


def test_binary_map_is_split_with_26_connectivity_and_size_filtered():
    m = np.zeros((20, 20, 20), np.uint8)
    m[2:6, 2:6, 2:6] = 1          # 4x4x4 block: long axis = sqrt(27) + ... > 3 mm
    m[6, 6, 6] = 1                # corner-touching the block -> same lesion (26-connectivity)
    m[12:17, 12, 12] = 1          # a 5-voxel line: 5 mm long
    m[18, 2, 2] = 1               # single voxel: 1 mm, dropped
    lab = label_lesions(m, voxel_size_mm=(1, 1, 1), min_long_axis_mm=3.0)
    assert lab.dtype == np.int32
    assert lab[6, 6, 6] == lab[2, 2, 2] == 1
    assert lab[12, 12, 12] == 2
    assert lab[18, 2, 2] == 0
    assert set(np.unique(lab)) == {0, 1, 2}
    # no filter keeps the single voxel
    assert label_lesions(m, voxel_size_mm=(1, 1, 1), min_long_axis_mm=0).max() == 3


def test_labelled_map_keeps_its_labels():
    m = np.zeros((10, 10, 10), np.int16)
    m[1:5, 1:5, 1:5] = 7
    m[5:9, 1:5, 1:5] = 3   # touching 7: must stay separate
    m[8, 8, 8] = 9         # too small
    lab = label_lesions(m, voxel_size_mm=(1, 1, 1))
    assert set(np.unique(lab)) == {0, 3, 7}
    assert lab[1, 1, 1] == 7 and lab[6, 1, 1] == 3


def test_label_lesions_rejects_probability_and_negative_maps():
    with pytest.raises(InputError, match="threshold"):
        label_lesions(np.full((4, 4, 4), 0.3), voxel_size_mm=(1, 1, 1))
    with pytest.raises(InputError, match="negative"):
        label_lesions(-np.ones((4, 4, 4)), voxel_size_mm=(1, 1, 1))
    with pytest.raises(InputError, match="3D"):
        label_lesions(np.ones((4, 4)), voxel_size_mm=(1, 1, 1))


def test_long_axis_is_feret_diameter():
    # a 10-voxel line along z at 2 mm slices: centres 18 mm apart + 2 mm voxel = 20 mm
    coords = np.stack([np.zeros(10), np.zeros(10), np.arange(10)], axis=1)
    assert long_axis_mm(coords, (0.9, 0.9, 2.0)) == pytest.approx(20.0)
    # a ball of radius 5 voxels: diameter ~ 11 mm
    g = np.argwhere(np.sum((np.indices((11, 11, 11)) - 5.0) ** 2, axis=0) <= 25)
    assert long_axis_mm(g, (1, 1, 1)) == pytest.approx(11.0, abs=0.5)
    # large lesion goes through the convex hull path and gives the same answer
    big = np.argwhere(np.ones((14, 14, 14), bool))
    exact = np.sqrt(3 * 13 ** 2)
    assert long_axis_mm(big, (1, 1, 1)) == pytest.approx(exact + np.sqrt(3), rel=1e-6)


def test_resample_labels_between_grids():
    # FLAIR at 0.5 mm, QSM at 1 mm, same field of view (corner-aligned)
    src_aff = np.diag([0.5, 0.5, 0.5, 1.0])
    src_aff[:3, 3] = -0.25
    dst_aff = np.eye(4)
    lab = np.zeros((40, 40, 40), np.int32)
    lab[10:20, 10:20, 10:20] = 4       # 5..10 mm
    lab[30:34, 30:34, 30:34] = 2
    out = resample_labels_to(lab, src_aff, (20, 20, 20), dst_aff)
    assert out.dtype == np.int32
    assert set(np.unique(out)) == {0, 2, 4}
    assert np.count_nonzero(out == 4) == 125
    assert np.all(out[5:10, 5:10, 5:10] == 4)
    # same grid -> identity copy
    same = resample_labels_to(lab, src_aff, lab.shape, src_aff)
    np.testing.assert_array_equal(same, lab)


def test_resample_refuses_non_overlapping_grids():
    lab = np.ones((10, 10, 10), np.int32)
    far = np.eye(4)
    far[:3, 3] = 500.0
    with pytest.raises(InputError, match="does not overlap"):
        resample_labels_to(lab, np.eye(4), (10, 10, 10), far)


def test_lesion_table_geometry():
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[:3, 3] = [-10, -20, -30]
    lab = np.zeros((30, 30, 15), np.int32)
    lab[4:8, 4:8, 4:6] = 1        # 4x4x2 voxels of 2 mm^3
    lab[8:10, 4:8, 4:6] = 2       # touching lesion 1 -> confluent
    lab[20:23, 20:23, 0:2] = 5    # touches the edge (k = 0), far from others
    t = lesion_table(lab, aff, participant_id="sub-01", session_id="ses-01")
    assert list(t.columns) == LESION_COLUMNS
    assert t["lesion_id"].tolist() == [1, 2, 5]
    r = t.set_index("lesion_id")
    assert r.loc[1, "volume_mm3"] == pytest.approx(32 * 2.0)
    assert r.loc[1, "centroid_i"] == pytest.approx(5.5)
    assert r.loc[1, "centroid_z_mm"] == pytest.approx(-30 + 4.5 * 2)
    assert r.loc[1, "confluent"] == 1 and r.loc[2, "confluent"] == 1
    assert r.loc[5, "confluent"] == 0 and r.loc[5, "n_neighbours"] == 0
    assert r.loc[1, "n_neighbours"] == 1
    assert r.loc[5, "touches_edge"] == 1 and r.loc[1, "touches_edge"] == 0
    validate_table(t, "lesions")
    empty = lesion_table(np.zeros((5, 5, 5), np.int32), np.eye(4), participant_id="sub-01")
    assert len(empty) == 0 and list(empty.columns) == LESION_COLUMNS


def test_lesion_boxes_equal_find_objects(rng):
    from scipy import ndimage

    labels = np.zeros((30, 34, 28), np.int32)
    for k in (3, 9, 4, 12):  # unordered, with gaps; 9 in two pieces
        for _ in range(2 if k == 9 else 1):
            c = rng.integers(3, 25, 3)
            labels[c[0]:c[0] + rng.integers(1, 5), c[1]:c[1] + 3, c[2]:c[2] + 2] = k
    labels[0, 0, 0] = 12  # a corner voxel
    want = [(i + 1, sl) for i, sl in enumerate(ndimage.find_objects(labels)) if sl is not None]
    assert lesion_boxes(labels) == want
    assert lesion_boxes(np.asfortranarray(labels)) == want  # NIfTI arrays are F-ordered
    assert lesion_boxes(labels[:, ::-1][:, ::-1]) == want  # a strided view
    assert lesion_boxes(np.zeros((4, 4, 4), np.int16)) == []
