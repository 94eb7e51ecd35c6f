"""Phase units: radians, degrees, and vendor integer scalings, detected and rescaled.

Scanners store phase in several ways. BIDS asks the phase sidecar for ``Units``
(``rad`` or ``arbitrary``). This module turns any of them into radians in [-pi, pi):

==================  ===============================================  =========================
``Units``           values seen                                      treatment
==================  ===============================================  =========================
``rad``             within [-pi, pi] (+ a small tolerance)           kept
``rad``             within [0, 2 pi]                                 wrapped to [-pi, pi)
``rad``             anything wider                                   InputError: fix ``Units``
``deg``             within [-180, 360]                               times pi/180, wrapped
``arbitrary``/auto  within [-pi, pi]                                 kept (already radians)
``arbitrary``/auto  integers in [-4096, 4095] (Siemens, dcm2niix)    times pi/4096
``arbitrary``/auto  integers in [0, 4095] (12-bit unsigned)          times 2 pi/4096, minus pi
``arbitrary``/auto  any other range wider than +-pi                  (x - lo)/(hi - lo) 2 pi - pi
other               --                                               InputError: unknown units
==================  ===============================================  =========================

Every rescaling is logged at WARNING level (vendor scaling is a classic silent error) and
described in the returned note, which ends up in the provenance sidecars. A constant
phase offset is harmless for QSM (it is removed with the background field); a wrong
*scale* is not, which is why only the nominal vendor ranges are used when they fit.
"""

from __future__ import annotations

import logging

import numpy as np

from qsm_core.errors import InputError

__all__ = ["PHASE_UNITS", "normalise_units", "phase_to_rad", "wrap_rad"]

logger = logging.getLogger(__name__)

#: Accepted spellings of phase units, mapped to their canonical name.
PHASE_UNITS = {
    "rad": "rad", "radian": "rad", "radians": "rad",
    "deg": "deg", "degree": "deg", "degrees": "deg",
    "arbitrary": "arbitrary", "a.u.": "arbitrary", "au": "arbitrary", "arb": "arbitrary",
    "auto": "auto",
}

_TOL_RAD = 0.01


def normalise_units(units, *, source: str = "phase") -> str:
    """Canonical phase units: 'rad', 'deg', 'arbitrary' or 'auto'.

    Parameters
    ----------
    units : str or None
        A ``Units`` value from a sidecar or the command line; None means 'auto'.
    source : str
        File (or option) named in the error message.

    Raises
    ------
    InputError
        For an unknown unit, naming the file and the accepted values.

    Examples
    --------
    >>> normalise_units("Radians"), normalise_units(None)
    ('rad', 'auto')
    """
    if units is None:
        return "auto"
    key = str(units).strip().lower()
    if key not in PHASE_UNITS:
        raise InputError(f"{source}: unknown phase Units {units!r}; set the sidecar's Units to "
                         "'rad' (radians) or 'arbitrary' (vendor scaling, detected and rescaled)")
    return PHASE_UNITS[key]


def wrap_rad(phase_rad: np.ndarray) -> np.ndarray:
    """Wrap angles to [-pi, pi).

    Examples
    --------
    >>> wrap_rad(np.array([0.0, 3 * np.pi / 2, -np.pi])).round(4).tolist()
    [0.0, -1.5708, -3.1416]
    """
    return (np.mod(np.asarray(phase_rad) + np.pi, 2 * np.pi) - np.pi).astype(np.float32)


def _is_integer_valued(x: np.ndarray) -> bool:
    return bool(np.all(x == np.round(x)))


def phase_to_rad(phase, *, units=None, source: str = "phase") -> tuple[np.ndarray, str]:
    """Convert a phase image to float32 radians, detecting vendor integer scaling.

    Parameters
    ----------
    phase : ndarray, shape (X, Y, Z[, E])
        Phase values as stored (scaling slopes of the NIfTI already applied).
    units : str, optional
        The sidecar's ``Units`` ('rad', 'deg', 'arbitrary'), or None / 'auto' to detect.
    source : str
        File name used in messages.

    Returns
    -------
    phase_rad : ndarray of float32, same shape
        Phase in radians, within [-pi, pi] (+ a rounding tolerance).
    note : str
        What was done, for the log and the provenance sidecar.

    Raises
    ------
    InputError
        ``Units`` says radians (or degrees) but the values do not fit, or the units are
        unknown, or the image is constant (no phase information).

    Examples
    --------
    >>> rad, note = phase_to_rad(np.array([-4096.0, 0.0, 2048.0]), units="arbitrary")
    >>> (rad / np.pi).tolist()
    [-1.0, 0.0, 0.5]
    """
    kind = normalise_units(units, source=source)
    x = np.asarray(phase, dtype=np.float64)
    if x.size == 0:
        raise InputError(f"{source}: empty phase image")
    lo, hi = float(x.min()), float(x.max())
    span = f"[{lo:g}, {hi:g}]"
    pi = np.pi
    if kind == "rad":
        if lo >= -pi - _TOL_RAD and hi <= pi + _TOL_RAD:
            return x.astype(np.float32), "phase in radians (Units 'rad')"
        if lo >= -_TOL_RAD and hi <= 2 * pi + _TOL_RAD:
            logger.info("%s: phase in [0, 2pi] radians; wrapped to [-pi, pi)", source)
            return wrap_rad(x), "phase in radians within [0, 2pi], wrapped to [-pi, pi)"
        raise InputError(f"{source}: sidecar Units is 'rad' but the values span {span}, wider "
                         "than [-pi, pi]; if this is vendor-scaled phase, set Units to "
                         "'arbitrary' in the JSON sidecar (it is then detected and rescaled)")
    if kind == "deg":
        if lo >= -180.5 and hi <= 360.5:
            return wrap_rad(np.deg2rad(x)), "phase in degrees, converted to radians"
        raise InputError(f"{source}: Units is degrees but the values span {span}; fix Units")
    # 'arbitrary' or 'auto': detect
    if hi - lo <= 0:
        raise InputError(f"{source}: the phase image is constant ({lo:g}); it holds no phase "
                         "information; check that the right file was given as phase")
    if lo >= -pi - _TOL_RAD and hi <= pi + _TOL_RAD:
        note = "phase values already within [-pi, pi]; taken as radians"
        if kind == "arbitrary":
            logger.info("%s: Units 'arbitrary' but %s", source, note)
        return x.astype(np.float32), note
    integer = _is_integer_valued(x)
    if integer and lo >= -4096 and hi <= 4095 and lo < 0:
        out = x * (pi / 4096.0)
        note = f"vendor phase scaling detected: integers in {span} within [-4096, 4095] " \
               "(Siemens 12-bit); rescaled by pi/4096 to radians"
    elif integer and lo >= 0 and hi <= 4095:
        out = x * (2 * pi / 4096.0) - pi
        note = f"vendor phase scaling detected: integers in {span} within [0, 4095] " \
               "(12-bit unsigned); rescaled by 2pi/4096 and shifted by -pi to radians"
    else:
        width = (hi - lo + 1.0) if integer else (hi - lo)
        out = (x - lo) * (2 * pi / width) - pi
        note = f"phase values span {span}, wider than [-pi, pi] and not a known vendor range; " \
               "rescaled linearly so that the range covers one 2pi cycle"
    logger.warning("%s: %s", source, note)
    return out.astype(np.float32), note
