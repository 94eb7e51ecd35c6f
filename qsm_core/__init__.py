"""Classical quantitative susceptibility mapping (QSM).

Arrays in, arrays out: every algorithm is a plain function over numpy arrays with
keyword-only options and units in the names (``_ppm``, ``_hz``, ``_rad``, ``_mm``, ``te_s``).
Only :mod:`qsm_core.io` touches files.
"""

__version__ = "0.1.0"

GAMMA_BAR_HZ_PER_T = 42.577478e6
"""Proton gyromagnetic ratio over 2 pi, in Hz/T."""


def ppm_to_hz(field_strength_t: float) -> float:
    """Hz per ppm of B0 at a field strength.

    Examples
    --------
    >>> round(ppm_to_hz(3.0), 1)
    127.7
    """
    return GAMMA_BAR_HZ_PER_T * field_strength_t * 1e-6
