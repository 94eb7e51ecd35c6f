"""A small procedural head phantom and accuracy metrics for the inversion tests.

Ellipsoids in normalised coordinates (so any grid size works): brain mask, cortical
grey matter shell, white matter, ventricles, deep grey nuclei, two veins (cylinders), a
strong spherical source, and MS-like lesions with and without a paramagnetic rim.
Susceptibilities (ppm, relative to CSF) follow design.md section 5.
"""

from __future__ import annotations

import numpy as np

from qsm_core.dipole import forward_field_ppm


def _coords(shape, voxel_size_mm):
    axes = [(np.arange(n) - (n - 1) / 2.0) * h for n, h in zip(shape, voxel_size_mm)]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(x, y, z, centre, semi):
    return (((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
            + ((z - centre[2]) / semi[2]) ** 2) <= 1.0


def head_phantom(shape=(64, 64, 64), voxel_size_mm=(1.0, 1.0, 1.0)) -> dict:
    """Procedural head: chi (ppm), brain mask and named regions.

    Parameters
    ----------
    shape : tuple of 3 ints
    voxel_size_mm : sequence of 3 floats

    Returns
    -------
    dict
        ``chi_ppm`` (float32), ``mask`` (bool), ``regions`` (dict name -> bool array),
        ``source_centre_mm`` and ``source_radius_mm`` and ``source_chi_ppm`` of the
        strong sphere, ``coords_mm`` (x, y, z).
    """
    x, y, z = _coords(shape, voxel_size_mm)
    ext = np.array(shape) * np.array(voxel_size_mm) / 2.0  # half extents (mm)
    s = ext * 0.78  # brain semi-axes
    brain = _ellipsoid(x, y, z, (0, 0, 0), s)
    inner = _ellipsoid(x, y, z, (0, 0, 0), s - 3.0)
    chi = np.zeros(shape, np.float32)
    regions = {}
    chi[brain] = 0.02  # cortical GM
    chi[inner] = -0.025  # WM
    regions["wm"] = inner.copy()
    vent = (_ellipsoid(x, y, z, (-0.15 * s[0], 0.05 * s[1], 0.1 * s[2]),
                       (0.08 * s[0], 0.3 * s[1], 0.12 * s[2]))
            | _ellipsoid(x, y, z, (0.15 * s[0], 0.05 * s[1], 0.1 * s[2]),
                         (0.08 * s[0], 0.3 * s[1], 0.12 * s[2])))
    chi[vent] = 0.0
    regions["ventricles"] = vent
    nuclei = {
        "globus_pallidus": ((0.3, -0.05, -0.05), (0.07, 0.12, 0.1), 0.18),
        "putamen": ((0.42, 0.0, -0.05), (0.06, 0.2, 0.14), 0.07),
        "caudate": ((-0.3, 0.2, 0.05), (0.06, 0.14, 0.1), 0.06),
        "substantia_nigra": ((0.12, -0.2, -0.35), (0.08, 0.05, 0.06), 0.13),
    }
    for name, (c, ax, val) in nuclei.items():
        reg = _ellipsoid(x, y, z, np.array(c) * s, np.array(ax) * s)
        chi[reg] = val
        regions[name] = reg
        for part in (x,):  # mirror left-right for realism
            del part
        mirror = _ellipsoid(x, y, z, np.array((-c[0], c[1], c[2])) * s, np.array(ax) * s)
        if name != "caudate":
            chi[mirror] = val
            regions[name] = reg | mirror
    # Veins: a cylinder along y (like the internal cerebral vein) and an oblique one.
    vein_r = max(1.2, 1.5 * min(voxel_size_mm))
    v1 = ((x - 0.0) ** 2 + (z - 0.3 * s[2]) ** 2 <= vein_r ** 2) & (np.abs(y) < 0.5 * s[1])
    d = np.array([0.0, 0.6, 0.8])
    px, py, pz = x + 0.45 * s[0], y, z
    t = px * d[0] + py * d[1] + pz * d[2]
    dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
    v2 = (dist2 <= vein_r ** 2) & (np.abs(t) < 0.4 * s[1])
    veins = (v1 | v2) & inner
    chi[veins] = 0.4
    regions["veins"] = veins
    # Lesions: one with a paramagnetic rim (1.5 mm, +0.04 above the core), one without.
    les_c = np.array([-0.45, -0.35, 0.2]) * s
    les_r = max(4.0, 0.1 * s.min())
    r_les = np.sqrt((x - les_c[0]) ** 2 + (y - les_c[1]) ** 2 + (z - les_c[2]) ** 2)
    core = r_les <= les_r - 1.5
    rim = (r_les <= les_r) & ~core
    chi[core] = -0.01
    chi[rim] = 0.03
    regions["lesion_core"], regions["lesion_rim"] = core, rim
    les2_c = np.array([0.45, 0.35, 0.25]) * s
    les2 = _ellipsoid(x, y, z, les2_c, (les_r, les_r * 0.8, les_r * 1.2))
    chi[les2] = -0.005
    regions["lesion_norim"] = les2
    # Strong source (haemorrhage-like sphere) for the streaking metric.
    src_c = np.array([0.0, -0.45, -0.05]) * s
    src_r = max(3.0, 0.07 * s.min())
    r_src = np.sqrt((x - src_c[0]) ** 2 + (y - src_c[1]) ** 2 + (z - src_c[2]) ** 2)
    src_chi = 0.6
    chi[r_src <= src_r] = src_chi
    regions["source"] = r_src <= src_r
    chi[~brain] = 0.0
    return {"chi_ppm": chi, "mask": brain, "regions": regions,
            "source_centre_mm": src_c, "source_radius_mm": src_r,
            "source_chi_ppm": src_chi, "coords_mm": (x, y, z)}


def local_field(chi_ppm, mask, *, voxel_size_mm, b0_dir) -> np.ndarray:
    """True local field: forward field of chi inside the mask, demeaned inside the mask."""
    f = forward_field_ppm(np.where(mask, chi_ppm, 0).astype(np.float32),
                          voxel_size_mm=voxel_size_mm, b0_dir=b0_dir)
    f = np.where(mask, f - f[mask].mean(), 0.0)
    return f.astype(np.float32)


def nrmse(chi, truth, mask) -> float:
    """Normalised RMSE inside the mask, both demeaned there (the reference is arbitrary)."""
    a = chi[mask] - chi[mask].mean()
    b = truth[mask] - truth[mask].mean()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def streak_metric(chi, truth, mask, phantom) -> float:
    """Error std in a shell (1.5-3 radii) around the strong source, over its chi.

    The error is demeaned within the shell, so a constant offset does not count.
    """
    x, y, z = phantom["coords_mm"]
    c = phantom["source_centre_mm"]
    r = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    a = phantom["source_radius_mm"]
    shell = (r >= 1.5 * a) & (r <= 3.0 * a) & mask
    err = (chi - truth)[shell]
    return float(np.std(err) / phantom["source_chi_ppm"])


def sphere_fraction(affine, shape, centre_mm, radius_mm, *, supersample: int = 5) -> np.ndarray:
    """Partial-volume fraction of a world-space sphere in each voxel of a grid.

    Voxels near the surface are supersampled ``supersample**3`` times in voxel space and
    mapped through the affine, so rotated and anisotropic grids are exact to the
    subsampling.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Voxel -> world (mm).
    shape : tuple of 3 ints
    centre_mm : sequence of 3 floats
        Sphere centre in world mm.
    radius_mm : float
    supersample : int

    Returns
    -------
    ndarray, shape ``shape``, float32 in [0, 1]
    """
    aff = np.asarray(affine, float)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    r = np.linalg.norm(world - np.asarray(centre_mm, float), axis=-1)
    half_diag = 0.5 * np.linalg.norm(aff[:3, :3], axis=0).sum()
    frac = (r <= radius_mm).astype(np.float32)
    edge = np.abs(r - radius_mm) <= half_diag
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    sub = np.stack(np.meshgrid(offs, offs, offs, indexing="ij"), -1).reshape(-1, 3)
    pts = ijk[edge][:, None, :] + sub[None]
    wpts = pts @ aff[:3, :3].T + aff[:3, 3]
    inside = np.linalg.norm(wpts - np.asarray(centre_mm, float), axis=-1) <= radius_mm
    frac[edge] = inside.mean(axis=1)
    return frac


def analytic_sphere_field(affine, shape, centre_mm, radius_mm, delta_chi_ppm,
                          b0_world=(0.0, 0.0, 1.0)):
    """Analytic relative field (ppm) of a uniformly magnetised sphere at voxel centres.

    ``delta_chi / 3 (a / r)^3 (3 cos^2 theta - 1)`` outside, 0 inside (Lorentz corrected);
    ``theta`` is the angle to B0 in world coordinates.

    Returns
    -------
    field_ppm : ndarray, shape ``shape``
    r_mm : ndarray, shape ``shape``
        Distance of each voxel centre from the centre.
    """
    aff = np.asarray(affine, float)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    d = ijk @ aff[:3, :3].T + aff[:3, 3] - np.asarray(centre_mm, float)
    r = np.linalg.norm(d, axis=-1)
    b = np.asarray(b0_world, float) / np.linalg.norm(b0_world)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (d @ b) / r
        f = delta_chi_ppm / 3.0 * (radius_mm / r) ** 3 * (3.0 * cos ** 2 - 1.0)
    f = np.where(r > radius_mm, f, 0.0)
    return f, r
