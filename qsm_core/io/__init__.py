"""File input/output: NIfTI, BIDS discovery, TSV tables, JSON; all writes are atomic."""

from qsm_core.io.atomic import atomic_path, write_json, write_text
from qsm_core.io.bids import Scan, discover_scans, load_mask, scan_from_files, write_megre
from qsm_core.io.derivatives import (
    OUTPUTS,
    derivative_path,
    find_derivative,
    find_derivatives,
    write_dataset_description,
    write_recon_outputs,
)
from qsm_core.io.nifti import load_nifti, save_nifti
from qsm_core.io.phase import phase_to_rad

__all__ = ["atomic_path", "write_json", "write_text", "load_nifti", "save_nifti",
           "Scan", "discover_scans", "scan_from_files", "load_mask", "write_megre", "phase_to_rad",
           "OUTPUTS", "derivative_path", "find_derivative", "find_derivatives",
           "write_dataset_description", "write_recon_outputs"]
