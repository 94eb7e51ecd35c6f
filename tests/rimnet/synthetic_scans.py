"""Tiny synthetic scans (Chimap, FLAIR, lesion map) for predictor and CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from qsm_core.io.nifti import save_nifti

SHAPE = (32, 32, 32)


def scan_arrays(rng, *, shape=SHAPE, n_lesions=3, rim_first=True, edge_lesion=False):
    """chi (ppm), FLAIR, binary lesion map and the lesion centres (voxels) of one scan."""
    g = np.indices(shape, dtype=float)
    c = (np.array(shape) - 1) / 2
    brain = np.sum((g - c[:, None, None, None]) ** 2, axis=0) <= (min(shape) / 2 - 1) ** 2
    chi = np.where(brain, -0.02, 0.0) + brain * rng.normal(0, 0.005, shape)
    flair = np.where(brain, 100.0, 5.0) + rng.normal(0, 2, shape)
    lesions = np.zeros(shape, np.uint8)
    centres = [(10, 10, 16), (21, 21, 16), (16, 22, 9), (10, 21, 22)][:n_lesions]
    if edge_lesion:
        centres = [(2, 16, 16)] + centres[1:]
    for n, ctr in enumerate(centres):
        r = np.sqrt(np.sum((g - np.array(ctr, float)[:, None, None, None]) ** 2, axis=0))
        les = r <= 3.0
        lesions[les] = 1
        flair[les] += 120
        if n == 0 and rim_first:
            chi[(r > 2.0) & (r <= 4.5) & brain] += 0.05
    chi = ndimage.gaussian_filter(chi, 0.5) * brain
    return chi.astype(np.float32), flair.astype(np.float32), lesions, centres


def write_scan(root: Path, sub: str, rng, *, affine=None, lesion_affine=None, chi=None,
               flair=None, lesions=None, **kw):
    """Write the FLAIR (bids/), Chimap (qsm/) and lesion map (les/) of one participant."""
    if chi is None:
        chi, flair, lesions, _ = scan_arrays(rng, **kw)
    aff = np.eye(4) if affine is None else affine
    laff = aff if lesion_affine is None else lesion_affine
    save_nifti(root / "bids" / sub / "anat" / f"{sub}_FLAIR.nii.gz", flair, aff)
    save_nifti(root / "qsm" / sub / "anat" / f"{sub}_Chimap.nii.gz", chi, aff)
    save_nifti(root / "les" / sub / "anat" / f"{sub}_desc-lesion_mask.nii.gz", lesions, laff,
               dtype=np.uint8)
    return chi, flair, lesions


def make_dataset(root: Path, rng, n_scans: int = 10) -> list[str]:
    """``n_scans`` participants sub-01...; returns their ids."""
    subs = [f"sub-{i + 1:02d}" for i in range(n_scans)]
    for i, sub in enumerate(subs):
        write_scan(root, sub, rng, n_lesions=1 + i % 4, rim_first=i % 2 == 0)
    return subs


class StubModel:
    """Duck-typed stand-in for rimnet.model.RimCNN: probability = mean QSM in the lesion."""

    channels = ("qsm", "flair", "lesion", "others")
    patch_mm = 32.0
    patch_voxels = 32
    threshold = 0.5

    def __init__(self):
        self.calls = 0

    def predict_proba(self, patches):
        self.calls += 1
        les = patches[:, 2] > 0.5
        ring = patches[:, 0] * les
        score = ring.sum(axis=(1, 2, 3)) / np.maximum(les.sum(axis=(1, 2, 3)), 1)
        p1 = 1 / (1 + np.exp(-(score + 0.1) * 20))
        return np.stack([1 - p1, p1], axis=1).astype(np.float32)
