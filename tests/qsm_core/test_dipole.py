"""Physics of the forward model: dipole kernel and the field of a magnetised sphere."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from qsm_core.dipole import dipole_kernel, forward_field_ppm
from qsm_core.geometry import affine_from_rotation, b0_dir_from_affine, voxel_sizes_mm
from tests.qsm_core.phantoms import analytic_sphere_field, sphere_fraction

DCHI = 0.5  # ppm
RADIUS = 12.0  # mm


def _sphere_case(rotation, voxel_size_mm, shape, radius=RADIUS):
    """Forward and analytic field of a centred sphere on a (possibly rotated) grid."""
    aff = affine_from_rotation(rotation, voxel_size_mm)
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2.0) + np.array([0.3, -0.2, 0.1])
    chi = DCHI * sphere_fraction(aff, shape, centre, radius)
    field = forward_field_ppm(chi, voxel_size_mm=voxel_sizes_mm(aff),
                              b0_dir=b0_dir_from_affine(aff))
    analytic, r = analytic_sphere_field(aff, shape, centre, radius, DCHI)
    return field, analytic, r


def _errors(field, analytic, r, radius=RADIUS):
    """Relative RMS error for 1.5 a <= r <= 3 a and max |field| inside (over dchi).

    D(0) = 0 fixes the field's mean over the periodic box, which differs from the
    infinite-space field by a constant (the box's demagnetisation); it is removed.
    """
    shell = (r >= 1.5 * radius) & (r <= 3.0 * radius)
    offset = (field - analytic)[shell].mean()
    err = field - offset - analytic
    rel = np.linalg.norm(err[shell]) / np.linalg.norm(analytic[shell])
    inside = r <= radius - 2.0
    return rel, np.abs(field[inside] - offset).max() / DCHI, offset / DCHI


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("voxel_size_mm", [(1.0, 1.0, 1.0), (0.9, 0.9, 2.0)])
def test_sphere_field_b0_along_each_voxel_axis(axis, voxel_size_mm):
    # Permute the grid so that world z (B0) lies along array axis `axis`.
    perm = np.roll(np.eye(3), axis - 2, axis=1)  # column `axis` is world z
    vox = np.roll(np.asarray(voxel_size_mm), axis - 2)
    shape = tuple(int(round(96 / v)) // 2 * 2 for v in vox)
    aff = affine_from_rotation(perm, vox)
    assert np.allclose(b0_dir_from_affine(aff), np.eye(3)[axis])
    field, analytic, r = _sphere_case(perm, vox, shape)
    rel, inside, offset = _errors(field, analytic, r)
    assert rel < 0.02, rel
    assert inside < 0.03, inside
    assert abs(offset) < 0.01


@pytest.mark.parametrize("voxel_size_mm", [(1.0, 1.0, 1.0), (0.9, 0.9, 2.0)])
def test_sphere_field_oblique_affine(voxel_size_mm):
    # Oblique sampling of 2 mm voxels aliases more of the sphere's edge: the discretisation
    # error falls like voxel/radius (12 mm: 2.3 %, 16 mm: 1.7 %, 20 mm: 1.4 %).
    rot = Rotation.from_euler("xyz", [25.0, -15.0, 40.0], degrees=True).as_matrix()
    shape = tuple(int(round(112 / v)) // 2 * 2 for v in voxel_size_mm)
    field, analytic, r = _sphere_case(rot, voxel_size_mm, shape, radius=16.0)
    rel, inside, _ = _errors(field, analytic, r, radius=16.0)
    assert rel < 0.02, rel
    assert inside < 0.06, inside


def test_wrong_b0_direction_is_detected():
    """The test above has teeth: a B0 off by 20 degrees misses by far more than 2 %."""
    rot = Rotation.from_euler("x", 20.0, degrees=True).as_matrix()
    aff = affine_from_rotation(rot, (1.0, 1.0, 1.0))
    shape = (64, 64, 64)
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    chi = DCHI * sphere_fraction(aff, shape, centre, RADIUS)
    wrong = forward_field_ppm(chi, voxel_size_mm=(1, 1, 1), b0_dir=(0, 0, 1))
    analytic, r = analytic_sphere_field(aff, shape, centre, RADIUS, DCHI)
    rel, _, _ = _errors(wrong, analytic, r)
    assert rel > 0.2


def test_dipole_kernel_properties():
    d = dipole_kernel((32, 24, 20), voxel_size_mm=(0.9, 0.9, 2.0), b0_dir=(0.2, 0.1, 1.0))
    assert d.dtype == np.float32 and d.shape == (32, 24, 11)
    assert d[0, 0, 0] == 0.0
    assert d.min() >= -2 / 3 - 1e-6 and d.max() <= 1 / 3 + 1e-6
    full = dipole_kernel((16, 16, 16), voxel_size_mm=(1, 1, 1), b0_dir=(0, 0, 1), real_fft=False)
    # Isotropic cube: the kernel averages to zero over directions (trace of (I/3 - bb^T)).
    assert abs(full.mean()) < 0.02
    # Real kernel of a real, even function: symmetric under k -> -k.
    assert np.allclose(full, np.roll(full[::-1, ::-1, ::-1], 1, axis=(0, 1, 2)))


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_oblique_kernel_is_hermitian_and_free_of_the_storage_order(kind):
    """The Nyquist sample of an even axis is +k and -k at once: no sign may be picked there.

    Before 2026-11-22 numpy's -k (rfftfreq's +k on the last axis) entered the cross terms
    of (k . b)^2, so an oblique B0 gave a kernel that was not Hermitian (0.59 apart at
    some Nyquist samples) and a field, and an inversion, that changed with the axis order
    the volume was stored in (about 10 % of the result).
    """
    b = np.array([0.1, -0.3, 0.95])
    full = dipole_kernel((8, 10, 6), voxel_size_mm=(1, 1, 1), b0_dir=b, real_fft=False,
                         kind=kind)
    np.testing.assert_array_equal(full, np.roll(full[::-1, ::-1, ::-1], 1, axis=(0, 1, 2)))
    x = np.random.default_rng(0).standard_normal((20, 24, 18)).astype(np.float32)
    f = forward_field_ppm(x, voxel_size_mm=(1, 1, 1), b0_dir=b, pad_voxels=4, kernel=kind)
    for perm in ((2, 0, 1), (1, 2, 0), (0, 2, 1)):
        g = forward_field_ppm(np.ascontiguousarray(x.transpose(perm)), voxel_size_mm=(1, 1, 1),
                              b0_dir=b[list(perm)], pad_voxels=4, kernel=kind)
        g = g.transpose(np.argsort(perm))
        assert np.abs(g - f).max() < 1e-5 * np.abs(f).max()


def test_kernel_uses_physical_k_for_anisotropic_voxels():
    # Along the diagonal of a 1 x 1 x 2 mm grid the angle to z depends on the voxel size.
    d = dipole_kernel((8, 8, 8), voxel_size_mm=(1.0, 1.0, 2.0), b0_dir=(0, 0, 1),
                      real_fft=False)
    kx, kz = 1 / 8 / 1.0, 1 / 8 / 2.0
    assert d[1, 0, 1] == pytest.approx(1 / 3 - kz**2 / (kx**2 + kz**2), abs=1e-6)


def _periodic_second_difference(u, axis, step):
    return (np.roll(u, -1, axis) - 2 * u + np.roll(u, 1, axis)) / step**2


def test_discrete_kernel_solves_the_finite_difference_equation():
    # With the discrete kernel (B0 along z, periodic grid) the field obeys the 7-point form of
    # Laplace(f) = Laplace(chi) / 3 - d^2 chi / dz^2 exactly.
    shape, vox = (16, 18, 20), (1.0, 1.2, 0.8)
    rng = np.random.default_rng(0)
    chi = rng.normal(size=shape)
    chi -= chi.mean()  # D(0) = 0: the mean carries no field
    d = dipole_kernel(shape, voxel_size_mm=vox, b0_dir=(0, 0, 1), real_fft=False,
                      dtype=np.float64, kind="discrete")
    f = np.fft.ifftn(d * np.fft.fftn(chi)).real
    lap = sum(_periodic_second_difference(f, a, vox[a]) for a in range(3))
    rhs = (sum(_periodic_second_difference(chi, a, vox[a]) for a in range(3)) / 3
           - _periodic_second_difference(chi, 2, vox[2]))
    np.testing.assert_allclose(lap, rhs, atol=1e-10)
    # the continuous kernel does not satisfy it (so the check above can fail)
    c = dipole_kernel(shape, voxel_size_mm=vox, b0_dir=(0, 0, 1), real_fft=False,
                      dtype=np.float64)
    fc = np.fft.ifftn(c * np.fft.fftn(chi)).real
    lap_c = sum(_periodic_second_difference(fc, a, vox[a]) for a in range(3))
    assert np.abs(lap_c - rhs).max() > 0.1 * np.abs(rhs).max()


def test_discrete_and_continuous_kernels_agree_at_low_frequencies_only():
    shape, vox, b0 = (64, 64, 64), (1.0, 1.0, 1.0), (0.3, 0.2, 1.0)
    c = dipole_kernel(shape, voxel_size_mm=vox, b0_dir=b0, kind="continuous")
    d = dipole_kernel(shape, voxel_size_mm=vox, b0_dir=b0, kind="discrete")
    assert np.abs(c[:3, :3, :3] - d[:3, :3, :3]).max() < 2e-3
    assert np.abs(c - d).max() > 0.1  # near Nyquist (fine detail) they differ
    with pytest.raises(Exception, match="kind"):
        dipole_kernel(shape, voxel_size_mm=vox, b0_dir=b0, kind="spatial")
