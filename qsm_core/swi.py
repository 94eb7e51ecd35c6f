"""Susceptibility-weighted imaging (SWI) and minimum-intensity projection (mIP).

SWI (Haacke et al., MRM 2004) multiplies the magnitude by a phase mask raised to a power
(4 by default) built from the high-pass phase. The mask here suppresses *paramagnetic*
phase (veins, iron): with ``psi`` the high-pass phase in the right-handed sense
(positive = paramagnetic field shift, :mod:`qsm_core.echo_fit`),

    mask = 1 for psi <= 0,   1 - psi / pi for 0 < psi < pi,   0 for psi >= pi.

This is Haacke's "negative phase mask" written for our sign convention (in the
left-handed convention of that paper paramagnetic phase is negative). Veins darken.

The high-pass phase comes either from a wrapped phase image by homodyne filtering
(complex division by a Gaussian low-pass of the complex image, ``highpass='homodyne'``),
or is given directly (``highpass=None``), e.g. ``2 pi * local_field_hz * TE`` from
background removal, which :func:`qsm_core.pipeline.reconstruct` uses.

The mIP is a sliding minimum over slabs of ``mip_slab_mm`` along one axis.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy import ndimage

from qsm_core.backend import resolve_workers
from qsm_core.dipole import _check_voxel_size
from qsm_core.errors import InputError

__all__ = ["swi", "homodyne_highpass", "phase_mask", "min_intensity_projection"]


def homodyne_highpass(phase_rad, magnitude, *, voxel_size_mm, sigma_mm: float = 6.0,
                      workers: int = -1) -> np.ndarray:
    """High-pass phase by homodyne filtering: ``arg(z / lowpass(z))``, ``z = m exp(i phi)``.

    Parameters
    ----------
    phase_rad, magnitude : ndarray, shape (X, Y, Z)
    voxel_size_mm : sequence of 3 floats
    sigma_mm : float
        Std (mm) of the Gaussian low-pass in image space (applied in k-space).

    Returns
    -------
    ndarray, shape (X, Y, Z), float32
        High-pass phase (rad) in (-pi, pi].
    """
    v = _check_voxel_size(voxel_size_mm)
    z = np.asarray(magnitude, np.float32) * np.exp(1j * np.asarray(phase_rad, np.float32))
    spec = scipy.fft.fftn(z.astype(np.complex64), workers=resolve_workers(workers))
    for axis, n in enumerate(z.shape):
        k = np.fft.fftfreq(n, d=v[axis])
        g = np.exp(-2.0 * (np.pi * sigma_mm * k) ** 2).astype(np.float32)
        sh = [1, 1, 1]
        sh[axis] = n
        spec *= g.reshape(sh)
    low = scipy.fft.ifftn(spec, workers=resolve_workers(workers))
    return np.angle(z * np.conj(low)).astype(np.float32)


def phase_mask(highpass_phase_rad: np.ndarray) -> np.ndarray:
    """Paramagnetic-suppressing phase mask in [0, 1] (see the module docstring).

    Examples
    --------
    >>> phase_mask(np.array([-1.0, 0.0, np.pi / 2, 4.0])).tolist()
    [1.0, 1.0, 0.5, 0.0]
    """
    psi = np.asarray(highpass_phase_rad, np.float32)
    return np.clip(1.0 - psi / np.float32(np.pi), 0.0, 1.0).astype(np.float32)


def min_intensity_projection(image: np.ndarray, *, voxel_size_mm, slab_mm: float = 8.0,
                             axis: int = 2) -> np.ndarray:
    """Sliding minimum-intensity projection over slabs of ``slab_mm`` along ``axis``.

    Returns an array of the input's shape: voxel ``i`` holds the minimum over the slab
    centred on slice ``i`` (``round(slab_mm / voxel)`` slices, at least 1).
    """
    v = _check_voxel_size(voxel_size_mm)
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2, got {axis!r}")
    n = max(1, int(round(slab_mm / v[axis])))
    return ndimage.minimum_filter1d(np.asarray(image, np.float32), size=n, axis=axis,
                                    mode="nearest")


def swi(magnitude, phase_rad, *, voxel_size_mm, highpass: str | None = "homodyne",
        phase_sign: int = +1, sigma_mm: float = 6.0, power: int = 4, mask=None,
        mip_slab_mm: float = 8.0, mip_axis: int = 2, workers: int = -1):
    """SWI and its minimum-intensity projection.

    Parameters
    ----------
    magnitude : ndarray, shape (X, Y, Z)
        Magnitude of one echo (or an echo combination).
    phase_rad : ndarray, shape (X, Y, Z)
        Wrapped phase of that echo (``highpass='homodyne'``), or an already high-pass phase
        such as ``2 pi * local_field_hz * TE`` (``highpass=None``).
    voxel_size_mm : sequence of 3 floats
    highpass : {'homodyne', None}
    phase_sign : {+1, -1}
        Convention of ``phase_rad`` (:mod:`qsm_core.echo_fit`); -1 flips it to right-handed.
    sigma_mm : float
        Homodyne low-pass width (mm).
    power : int
        Number of times the phase mask multiplies the magnitude (4 is customary).
    mask : ndarray, shape (X, Y, Z), optional
        Where to apply the phase mask (outside it the SWI is the magnitude).
    mip_slab_mm : float
        mIP slab thickness (mm).
    mip_axis : int
        Array axis of the projection (the slice axis; the one most parallel to B0 for
        axial scans).

    Returns
    -------
    swi_img : ndarray, shape (X, Y, Z), float32
    mip_img : ndarray, shape (X, Y, Z), float32
    """
    mag = np.asarray(magnitude)
    ph = np.asarray(phase_rad)
    if mag.ndim != 3 or mag.shape != ph.shape:
        raise InputError(f"swi needs 3D magnitude and phase of the same shape, got "
                         f"{mag.shape} and {ph.shape}")
    if not (np.all(np.isfinite(mag)) and np.all(np.isfinite(ph))):
        raise InputError("magnitude or phase contains NaN or Inf")
    if phase_sign not in (1, -1):
        raise InputError(f"phase_sign must be +1 or -1, got {phase_sign!r}")
    if highpass not in ("homodyne", None):
        raise InputError(f"highpass must be 'homodyne' or None, got {highpass!r}")
    if int(power) != power or power < 1:
        raise InputError(f"power must be a positive integer, got {power!r}")
    if highpass == "homodyne":
        psi = homodyne_highpass(ph, mag, voxel_size_mm=voxel_size_mm, sigma_mm=sigma_mm,
                                workers=workers)
    else:
        psi = ph.astype(np.float32)
    psi = psi * np.float32(phase_sign)
    pm = phase_mask(psi)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != mag.shape:
            raise InputError(f"mask shape {m.shape} does not match magnitude {mag.shape}")
        pm = np.where(m, pm, np.float32(1.0))
    swi_img = (mag.astype(np.float32) * pm ** int(power)).astype(np.float32)
    mip_img = min_intensity_projection(swi_img, voxel_size_mm=voxel_size_mm,
                                       slab_mm=mip_slab_mm, axis=mip_axis)
    return swi_img, mip_img
