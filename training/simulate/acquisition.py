"""Acquisition: multi-echo GRE magnitude/phase and FLAIR from an anatomy.

Physics (design.md section 4): the total field is :func:`qsm_core.dipole.forward_field_ppm`
of the whole head's susceptibility (air included, so the background field and the phase
wraps near the sinuses are real); then per echo

    S(TE) = PD * exp(-R2* TE) * sinc-dephasing(grad B, TE) * exp(i (phi0 + s 2 pi gbar B0 f TE))

with ``s`` the phase sign (+1, right-handed), ``phi0`` a smooth offset, complex Gaussian noise
at a stated SNR (white-matter signal at TE = 0 over the noise standard deviation per
channel). Images are simulated on the anatomy grid and brought to the output voxel size by
k-space cropping/zero-filling of the complex signal (partial volume and intravoxel dephasing
as in a real acquisition).

Everything outside the brain (CSF around it, skull, scalp, air, air cavities) enters the
forward model blurred by a Gaussian of one voxel (:func:`blur_outside_brain`). A
point-sampled +9.4 ppm air/tissue edge rings (Gibbs) through the k-space dipole kernel: with
B0 tilted against the grid the ringing reaches deep into the brain as a field that is not
harmonic there, about 1 Hz rms at 3 T for a 9 degree tilt, as large as the local field
itself. No background removal can take it away, and a real acquisition, which averages the
field over each voxel, does not have it. The brain keeps its sharp susceptibility, which is
the ground truth of QSM.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import nibabel.orientations as nio
import numpy as np
import scipy.fft
import scipy.ndimage as ndi

from qsm_core import ppm_to_hz
from qsm_core.dipole import forward_field_ppm
from qsm_core.errors import InputError
from qsm_core.geometry import b0_dir_from_affine
from training.simulate.anatomy import AIR_CHI_PPM, TISSUES, Anatomy

__all__ = ["ScannerPreset", "SCANNERS", "get_scanner", "at_field_strength", "ORIENTATIONS",
           "store_as", "tilt_rotation", "grid_for",
           "fourier_resample", "linear_resample", "nearest_resample",
           "blur_outside_brain", "total_field", "acquire_gre", "acquire_flair",
           "BACKGROUND_BLUR_VOXELS"]

#: Gaussian sigma (voxels of the simulation grid) of the partial-volume blur applied to the
#: susceptibility outside the brain (the background field's sources).
BACKGROUND_BLUR_VOXELS = 1.0


@dataclass(frozen=True)
class ScannerPreset:
    """A GRE protocol.

    Attributes
    ----------
    name : str
    manufacturer : str
    field_strength_t : float
    echo_times_s : tuple of float
    snr : float
        White-matter magnitude at TE = 0 over the noise SD (per real/imaginary channel).
    phase_sign : int
        +1: phase = +2 pi gbar B0 f TE (right-handed); -1 for the opposite vendor convention.
    repetition_time_s, flip_angle_deg : float
        Written to the sidecars.
    """

    name: str
    manufacturer: str
    field_strength_t: float
    echo_times_s: tuple
    snr: float = 40.0
    phase_sign: int = 1
    repetition_time_s: float = 0.03
    flip_angle_deg: float = 15.0


# Seed study protocols (design.md section 5).
SCANNERS: dict[str, ScannerPreset] = {
    "siemens": ScannerPreset("siemens", "Siemens", 3.0, (0.0072, 0.0134, 0.0196, 0.0258),
                             snr=40.0, repetition_time_s=0.031),
    "philips": ScannerPreset("philips", "Philips", 3.0,
                             (0.0058, 0.0120, 0.0182, 0.0244, 0.0306, 0.0368), snr=35.0,
                             repetition_time_s=0.041),
    "single-echo": ScannerPreset("single-echo", "Siemens", 3.0, (0.020,), snr=45.0,
                                 repetition_time_s=0.028),
}


def get_scanner(name: str | ScannerPreset) -> ScannerPreset:
    """Look up a scanner preset by name (clear error for unknown names)."""
    if isinstance(name, ScannerPreset):
        return name
    if name not in SCANNERS:
        raise InputError(f"unknown scanner {name!r}; choose one of {sorted(SCANNERS)}")
    return SCANNERS[name]


def at_field_strength(scanner: ScannerPreset, field_strength_t: float | None) -> ScannerPreset:
    """The same protocol on a magnet of another strength (``None``: unchanged).

    Phase accrues at ``gbar * B0`` per ppm, so fields wrap more often at 7 T; R2* is taken
    as proportional to B0 (:func:`acquire_gre`). Echo times and SNR stay the protocol's.

    Examples
    --------
    >>> at_field_strength(get_scanner("siemens"), 7.0).field_strength_t
    7.0
    """
    if field_strength_t is None:
        return scanner
    b0 = float(field_strength_t)
    if not 0.5 <= b0 <= 11.7:
        raise InputError(f"field strength must be in [0.5, 11.7] T, got {field_strength_t!r}")
    return replace(scanner, field_strength_t=b0)


#: Storage orientations of the simulated images: the world direction (RAS+, nibabel axis
#: codes) each voxel axis points to. ``axial`` is how the simulator has always written;
#: ``sagittal`` (P, I, R: rows along anterior-posterior, slices left-right) and ``coronal``
#: (R, S, A, a left-handed voxel frame, det < 0) store the same scan with permuted and
#: flipped axes, as scanners write other slab orientations. The physics does not change;
#: B0 in voxel axes has to be read from the affine.
ORIENTATIONS: dict[str, tuple[str, str, str]] = {
    "axial": ("R", "A", "S"), "sagittal": ("P", "I", "R"), "coronal": ("R", "S", "A")}


def store_as(arr: np.ndarray, affine: np.ndarray, orientation: str):
    """Permute and flip the voxel axes of an image to a storage orientation.

    Parameters
    ----------
    arr : ndarray, shape (X, Y, Z, ...)
        Image on an axial (near-RAS) grid; axes after the third (echoes) are kept.
    affine : ndarray, shape (4, 4)
        Its voxel-to-world affine (mm).
    orientation : str
        A key of :data:`ORIENTATIONS`.

    Returns
    -------
    arr : ndarray
        The same voxels in the new axis order (a copy, C-contiguous).
    affine : ndarray, shape (4, 4)
        The affine that puts every voxel at its old world position.

    Examples
    --------
    >>> a = np.arange(24.0).reshape(2, 3, 4)
    >>> b, aff = store_as(a, np.eye(4), "sagittal")
    >>> b.shape, nio.aff2axcodes(aff)
    ((3, 4, 2), ('P', 'I', 'R'))
    """
    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {sorted(ORIENTATIONS)}, got "
                         f"{orientation!r}")
    now = nio.io_orientation(affine)
    change = nio.ornt_transform(now, nio.axcodes2ornt(ORIENTATIONS[orientation]))
    if np.array_equal(change, [[0, 1], [1, 1], [2, 1]]):
        return arr, affine
    out = np.ascontiguousarray(nio.apply_orientation(arr, change))
    return out, affine @ nio.inv_ornt_aff(change, arr.shape[:3])


def tilt_rotation(tilt_deg: float, azimuth_deg: float) -> np.ndarray:
    """Rotation of the head by ``tilt_deg`` about an in-plane axis at ``azimuth_deg``.

    The head frame's z axis ends up ``tilt_deg`` away from the scanner's z (B0).
    """
    t = np.deg2rad(tilt_deg)
    a = np.deg2rad(azimuth_deg)
    k = np.array([np.cos(a), np.sin(a), 0.0])
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def _ratios(src_mm, tgt_mm):
    out = []
    for s, t in zip(src_mm, tgt_mm):
        fr = Fraction(float(t) / float(s)).limit_denominator(12)
        if abs(float(fr) - t / s) > 1e-3:
            raise InputError(f"voxel size {t} mm is not a simple ratio of the simulation "
                             f"grid's {s} mm; use e.g. 0.9, 1, 1.2, 1.5 or 2 mm")
        out.append(fr)
    return out


def grid_for(shape, src_vox_mm, tgt_vox_mm):
    """Output shape and voxel-scale factors of :func:`fourier_resample`."""
    fr = _ratios(src_vox_mm, tgt_vox_mm)
    new = []
    for n, f in zip(shape, fr):
        npad = int(np.ceil(n / f.numerator) * f.numerator)
        new.append(npad * f.denominator // f.numerator)
    return tuple(new), np.array([float(f) for f in fr])


def fourier_resample(arr: np.ndarray, src_vox_mm, tgt_vox_mm, *, workers: int = 1):
    """Resample by cropping / zero-filling k-space (what a scanner's resolution does).

    The first voxel keeps its position; the field of view grows (air padding) to a whole
    number of output voxels. Complex input stays complex; real input returns real.

    Returns
    -------
    ndarray
        Resampled array on the grid of :func:`grid_for`.
    """
    out_shape, _ = grid_for(arr.shape, src_vox_mm, tgt_vox_mm)
    if out_shape == arr.shape:
        return arr
    fr = _ratios(src_vox_mm, tgt_vox_mm)
    real = not np.iscomplexobj(arr)
    npad = [int(np.ceil(n / f.numerator) * f.numerator) for n, f in zip(arr.shape, fr)]
    a = np.zeros(npad, np.complex64)
    a[tuple(slice(0, n) for n in arr.shape)] = arr
    spec = scipy.fft.fftn(a, workers=workers)
    for ax, (n, m) in enumerate(zip(npad, out_shape)):
        spec = np.fft.fftshift(spec, axes=ax)
        if m < n:
            start = n // 2 - m // 2
            spec = np.take(spec, np.arange(start, start + m), axis=ax)
        elif m > n:
            pad = [(0, 0)] * 3
            pad[ax] = (m // 2 - n // 2, m - n - (m // 2 - n // 2))
            spec = np.pad(spec, pad)
        spec = np.fft.ifftshift(spec, axes=ax)
    out = scipy.fft.ifftn(spec, workers=workers) * (np.prod(out_shape) / np.prod(npad))
    return out.real.astype(np.float32) if real else out.astype(np.complex64)


def linear_resample(arr, src_vox_mm, tgt_vox_mm, out_shape, *, order: int = 1):
    """Resample onto the output grid by interpolation (with anti-alias smoothing)."""
    scale = np.asarray(tgt_vox_mm, float) / np.asarray(src_vox_mm, float)
    if tuple(out_shape) == arr.shape and np.allclose(scale, 1):
        return arr
    a = arr
    if order > 0:
        sig = np.maximum(scale - 1.0, 0.0) / 2.355
        if np.any(sig > 0):
            a = ndi.gaussian_filter(arr.astype(np.float32), sig)
    return ndi.affine_transform(a, np.diag(scale), output_shape=tuple(out_shape), order=order,
                                mode="constant", cval=0.0).astype(arr.dtype)


def nearest_resample(arr, src_vox_mm, tgt_vox_mm, out_shape):
    """Nearest-neighbour resampling of a label map onto the output grid."""
    scale = np.asarray(tgt_vox_mm, float) / np.asarray(src_vox_mm, float)
    idx = [np.clip(np.round(np.arange(n) * s).astype(int), 0, m - 1)
           for n, s, m in zip(out_shape, scale, arr.shape)]
    valid = [np.round(np.arange(n) * s) < m for n, s, m in zip(out_shape, scale, arr.shape)]
    out = arr[np.ix_(*idx)]
    keep = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    return np.where(keep, out, 0).astype(arr.dtype)


def world_affine(anat: Anatomy, rotation: np.ndarray, scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Scanner-world affine of a grid derived from the anatomy grid (rotation = head tilt)."""
    t = np.eye(4)
    t[:3, :3] = rotation
    return t @ anat.affine @ np.diag([*np.asarray(scale, float), 1.0])


def blur_outside_brain(chi_ppm: np.ndarray, brain_mask: np.ndarray, *,
                       sigma_voxels: float = BACKGROUND_BLUR_VOXELS) -> np.ndarray:
    """Susceptibility with everything outside the brain blurred (partial volume).

    Parameters
    ----------
    chi_ppm : ndarray, shape (X, Y, Z)
        Susceptibility on the anatomy's scale (relative to CSF; air +9.4 ppm).
    brain_mask : ndarray, shape (X, Y, Z)
        Brain voxels: their susceptibility, the ground truth of QSM, is never changed.
    sigma_voxels : float
        Gaussian sigma in voxels of the grid; 0 returns ``chi_ppm`` unchanged.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        ``chi_ppm`` inside the brain; outside it, the Gaussian average of the outside's
        susceptibility with the brain counted at the CSF level 0 (so the blur adds no edge
        where CSF meets the brain mask).

    Examples
    --------
    >>> chi = np.zeros((9, 1, 1), np.float32); chi[5:] = 9.4  # tissue | air
    >>> brain = np.zeros_like(chi, bool); brain[:2] = True; chi[:2] = 0.1
    >>> [round(float(v), 2) for v in blur_outside_brain(chi, brain, sigma_voxels=1.0).ravel()]
    [0.1, 0.1, 0.04, 0.55, 2.82, 6.58, 8.85, 9.36, 9.4]
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    if not sigma_voxels >= 0:
        raise InputError(f"the background blur must be >= 0 voxels, got {sigma_voxels!r}")
    if sigma_voxels == 0:
        return chi
    brain = np.asarray(brain_mask, dtype=bool)
    outside = np.where(brain, np.float32(0), chi)
    return np.where(brain, chi, ndi.gaussian_filter(outside, sigma_voxels, mode="nearest"))


def total_field(anat: Anatomy, affine_world: np.ndarray, *, brain_only: bool = False,
                workers: int = 1, kernel: str = "continuous",
                background_blur_voxels: float = BACKGROUND_BLUR_VOXELS) -> np.ndarray:
    """Relative field (ppm) of the head's susceptibility through the one forward model.

    ``kernel``: the dipole kernel's discretisation (:func:`qsm_core.dipole.dipole_kernel`);
    ``discrete`` simulates with a forward model the inversion does not share.
    ``background_blur_voxels``: the partial-volume blur of the sources outside the brain
    (:func:`blur_outside_brain`; 0 = point-sampled air edges, which ring into the brain
    when B0 is tilted); not used with ``brain_only``, whose sources are the brain's own.

    Susceptibility is referenced to air (air = 0) so the zero padding is air too; when the
    brain touches the bottom of the grid (the neck continues) the bottom slices are
    extended by edge replication so that no artificial tissue/air face appears there.
    """
    b0 = b0_dir_from_affine(affine_world)
    vox = anat.voxel_size_mm
    if brain_only:
        # sources inside the brain only: compute on the brain's bounding box
        idx = np.argwhere(anat.brain_mask > 0)
        out = np.zeros(anat.shape, np.float32)
        if len(idx) == 0:
            return out
        lo, hi = idx.min(0), idx.max(0) + 1
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        chi = np.where(anat.brain_mask[sl] > 0, anat.chi_ppm[sl], 0.0).astype(np.float32)
        out[sl] = forward_field_ppm(chi, voxel_size_mm=vox, b0_dir=b0,
                                    pad_voxels=[max(8, int(24 / v)) for v in vox],
                                    workers=workers, kernel=kernel)
        return out
    chi = blur_outside_brain(anat.chi_ppm, anat.brain_mask, sigma_voxels=background_blur_voxels)
    chi = (chi - np.float32(AIR_CHI_PPM)).astype(np.float32)
    ext = 0
    if anat.brain_mask[:, :, 0].any():
        ext = int(np.ceil(40.0 / vox[2]))
        chi = np.pad(chi, ((0, 0), (0, 0), (ext, 0)), mode="edge")
    f = forward_field_ppm(chi, voxel_size_mm=vox, b0_dir=b0,
                          pad_voxels=[max(8, int(16 / v)) for v in vox], workers=workers,
                          kernel=kernel)
    return f[:, :, ext:]


def smooth_phase_offset(shape, rng, *, amplitude_rad: float = np.pi) -> np.ndarray:
    """A smooth (second-order polynomial) phase offset phi0 (rad)."""
    c = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*c, indexing="ij", sparse=True)
    terms = [x, y, z, x * y, y * z, x * z, x * x, y * y, z * z]
    coef = rng.normal(0, amplitude_rad / 3, size=len(terms) + 1)
    out = np.full(shape, coef[0], np.float32)
    for k, t in zip(coef[1:], terms):
        out = out + np.float32(k) * t
    return out.astype(np.float32)


def acquire_gre(anat: Anatomy, field_ppm: np.ndarray, *, scanner: ScannerPreset,
                voxel_size_mm, rng: np.random.Generator, snr: float | None = None,
                workers: int = 1):
    """Multi-echo GRE magnitude and wrapped phase on the output grid.

    Parameters
    ----------
    anat : Anatomy
        Head on the simulation grid (with lesions painted).
    field_ppm : ndarray (X, Y, Z)
        Total relative field on the simulation grid (:func:`total_field`).
    scanner : ScannerPreset
    voxel_size_mm : sequence of 3 floats
        Output voxel size (a simple ratio of the simulation grid's).
    rng : numpy Generator
    snr : float, optional
        Overrides ``scanner.snr``.

    Returns
    -------
    magnitude : ndarray (X', Y', Z', E), float32
    phase_rad : ndarray (X', Y', Z', E), float32 in [-pi, pi)
    """
    vox = anat.voxel_size_mm
    hz_per_ppm = ppm_to_hz(scanner.field_strength_t)
    snr = scanner.snr if snr is None else float(snr)
    if not snr > 0:
        raise InputError(f"snr must be positive, got {snr}")
    phi0 = smooth_phase_offset(anat.shape, rng)
    # intravoxel dephasing from the field gradient across one simulation voxel: a sinc per
    # axis, evaluated only where it matters (near air/tissue interfaces)
    grads = np.gradient(field_ppm, *vox)
    dw = np.stack([np.abs(g) * np.float32(v * 2 * np.pi * hz_per_ppm)
                   for g, v in zip(grads, vox)])
    del grads
    te_max = float(max(scanner.echo_times_s))
    # signal is computed on head voxels only (PD > 0); air is pure noise
    head = np.flatnonzero(anat.pd.ravel() > 0)
    strong = np.flatnonzero(dw.max(axis=0).ravel()[head] * te_max / 2 > 0.05)
    dw_strong = dw.reshape(3, -1)[:, head[strong]]
    del dw
    out_shape, _ = grid_for(anat.shape, vox, voxel_size_mm)
    n_e = len(scanner.echo_times_s)
    mag = np.empty((*out_shape, n_e), np.float32)
    pha = np.empty((*out_shape, n_e), np.float32)
    sigma = np.float32(TISSUES["wm"].pd / snr)
    pd_h = anat.pd.ravel()[head]
    # R2* of the anatomy is at 3 T; its field-dependent part (R2') dominates in the brain,
    # so it is scaled with B0 (an approximation: R2* at 7 T is about twice that at 3 T)
    r2_h = anat.r2star_s.ravel()[head]
    if scanner.field_strength_t != 3.0:
        r2_h = r2_h * np.float32(scanner.field_strength_t / 3.0)
    w_h = np.float32(scanner.phase_sign * 2 * np.pi * hz_per_ppm) * field_ppm.ravel()[head]
    ph0_h = phi0.ravel()[head]
    tes = np.asarray(scanner.echo_times_s, float)
    uniform = n_e > 1 and np.allclose(np.diff(tes), tes[1] - tes[0], rtol=1e-6, atol=1e-9)
    full = np.zeros(anat.shape, np.complex64)
    base = step = None
    for e, te in enumerate(tes):
        te32 = np.float32(te)
        if base is None or not uniform:
            amp = pd_h * np.exp(-r2_h * te32)
            ph = ph0_h + w_h * te32
            base = (amp * np.cos(ph) + 1j * (amp * np.sin(ph))).astype(np.complex64)
            if uniform and step is None:
                dte = np.float32(tes[1] - tes[0])
                decay = np.exp(-r2_h * dte)
                step = (decay * np.cos(w_h * dte) + 1j * (decay * np.sin(w_h * dte))
                        ).astype(np.complex64)
                del decay
            del amp, ph
        else:
            base *= step  # S(TE + dTE) = S(TE) exp((-R2* + i w) dTE)
        sig = base.copy()
        if strong.size:
            sig[strong] *= np.prod(np.sinc(dw_strong * (te32 / np.float32(2 * np.pi))),
                                   axis=0).astype(np.float32)
        full.ravel()[head] = sig
        del sig
        r = fourier_resample(full, vox, voxel_size_mm, workers=workers)
        if r is full:
            r = full.copy()
        r.real += sigma * rng.standard_normal(out_shape, dtype=np.float32)
        r.imag += sigma * rng.standard_normal(out_shape, dtype=np.float32)
        mag[..., e] = np.abs(r)
        pha[..., e] = np.angle(r)
    pha[pha >= np.pi] -= np.float32(2 * np.pi)
    return mag, pha


def acquire_flair(anat: Anatomy, *, voxel_size_mm, rng: np.random.Generator,
                  snr: float = 30.0, workers: int = 1) -> np.ndarray:
    """FLAIR magnitude on its own grid (Rician noise at ``snr`` relative to white matter)."""
    vox = anat.voxel_size_mm
    img = fourier_resample(anat.flair.astype(np.float32), vox, voxel_size_mm, workers=workers)
    sigma = np.float32(TISSUES["wm"].flair / snr)
    re = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im).astype(np.float32)
