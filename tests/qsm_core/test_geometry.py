"""B0 direction from NIfTI affines: axial, sagittal, coronal, oblique, reflections."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from qsm_core.dipole import forward_field_ppm
from qsm_core.geometry import (
    affine_from_rotation,
    b0_dir_from_affine,
    rotation_from_affine,
    voxel_sizes_mm,
)
from tests.qsm_core.phantoms import analytic_sphere_field, sphere_fraction

# Canonical slice orientations as stored by scanners (columns: array axes in RAS world).
AXIAL = np.eye(3)
SAGITTAL = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)  # (A, S, R) -> z is axis 1
CORONAL = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], float)  # (R, S, A) -> z is axis 1
CORONAL_FLIP = np.array([[1, 0, 0], [0, 0, -1], [0, -1, 0]], float)  # S stored inferior-first


@pytest.mark.parametrize(("rotation", "expected"), [
    (AXIAL, [0, 0, 1]),
    (SAGITTAL, [0, 1, 0]),
    (CORONAL, [0, 1, 0]),
    (CORONAL_FLIP, [0, -1, 0]),
])
def test_canonical_orientations(rotation, expected):
    aff = affine_from_rotation(rotation, (0.9, 2.0, 0.9), origin_mm=(10, -20, 5))
    assert np.allclose(b0_dir_from_affine(aff), expected)
    assert np.allclose(voxel_sizes_mm(aff), (0.9, 2.0, 0.9))


def test_oblique_about_x():
    theta = np.deg2rad(17.0)
    rot = Rotation.from_euler("x", 17.0, degrees=True).as_matrix()
    aff = affine_from_rotation(rot, (1.0, 1.0, 2.0))
    assert np.allclose(b0_dir_from_affine(aff), [0.0, np.sin(theta), np.cos(theta)])


@pytest.mark.parametrize("seed", range(5))
def test_random_rotations_give_rotation_transpose_z(seed):
    rot = Rotation.random(random_state=seed).as_matrix()
    if seed % 2:
        rot = rot @ np.diag([-1.0, 1.0, 1.0])  # radiological (flipped) storage
    vox = np.array([0.7, 1.1, 2.5])
    aff = affine_from_rotation(rot, vox, origin_mm=(1, 2, 3))
    assert np.allclose(voxel_sizes_mm(aff), vox)
    assert np.allclose(rotation_from_affine(aff), rot, atol=1e-10)
    assert np.allclose(b0_dir_from_affine(aff), rot.T @ [0, 0, 1])
    assert np.linalg.norm(b0_dir_from_affine(aff)) == pytest.approx(1.0)


def test_tilted_b0_world():
    aff = affine_from_rotation(SAGITTAL, (1, 1, 1))
    b = np.array([0.0, 0.1, 1.0])
    assert np.allclose(b0_dir_from_affine(aff, b0_world=b), SAGITTAL.T @ (b / np.linalg.norm(b)))


def test_rotated_grid_sphere_matches_world_analytic_field():
    """End to end: a sphere sampled on an oblique, anisotropic grid, forward-modelled with
    the B0 direction from the affine, gives the analytic field in world coordinates."""
    rot = Rotation.from_euler("zyx", [30.0, 20.0, -35.0], degrees=True).as_matrix()
    vox = (1.0, 1.2, 1.6)
    shape = (96, 80, 64)
    aff = affine_from_rotation(rot, vox, origin_mm=(-40, 12, 7))
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2.0) + aff[:3, 3]
    radius, dchi = 12.0, 0.3
    chi = dchi * sphere_fraction(aff, shape, centre, radius)
    field = forward_field_ppm(chi, voxel_size_mm=voxel_sizes_mm(aff),
                              b0_dir=b0_dir_from_affine(aff))
    analytic, r = analytic_sphere_field(aff, shape, centre, radius, dchi)
    shell = (r >= 1.5 * radius) & (r <= 3.0 * radius)
    err = field - analytic
    err -= err[shell].mean()
    rel = np.linalg.norm(err[shell]) / np.linalg.norm(analytic[shell])
    assert rel < 0.02, rel
    # The same data with the axial assumption (B0 along array z) is badly wrong.
    naive = forward_field_ppm(chi, voxel_size_mm=voxel_sizes_mm(aff), b0_dir=(0, 0, 1))
    err = naive - analytic
    assert np.linalg.norm(err[shell]) / np.linalg.norm(analytic[shell]) > 0.3
