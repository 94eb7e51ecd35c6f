"""File input/output: NIfTI, BIDS discovery, TSV tables, JSON; all writes are atomic."""

from qsm_core.io.atomic import atomic_path, write_json, write_text
from qsm_core.io.nifti import load_nifti, save_nifti

__all__ = ["atomic_path", "write_json", "write_text", "load_nifti", "save_nifti"]
