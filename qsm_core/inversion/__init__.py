"""Dipole inversion: field (ppm) -> susceptibility (ppm).

All methods share one signature::

    chi_ppm = METHOD(local_field_ppm, mask, *, voxel_size_mm, b0_dir, ..., device="cpu")

and return a float32 (X, Y, Z) map, zero outside the mask, referenced to the mask mean.
"""

from qsm_core.inversion.ilsqr import ilsqr
from qsm_core.inversion.tikhonov import tikhonov
from qsm_core.inversion.tkd import tkd

__all__ = ["ilsqr", "tkd", "tikhonov", "METHODS"]

METHODS = {"ilsqr": ilsqr, "tkd": tkd, "tikhonov": tikhonov}
