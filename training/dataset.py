"""Training patches from a BIDS dataset, QSM derivatives, lesion maps and ``lesions.tsv``.

:func:`iter_scan_patches` walks the lesion maps (``*_desc-lesion_mask.nii[.gz]`` under the
lesion derivatives, as :mod:`rimnet.predictor` does for inference, so training and inference
see identical patches), loads each scan's Chimap (from the QSM derivatives) and FLAIR (from the
BIDS folder, resampled to the QSM grid), labels the lesions with the same size filter, and cuts
the patches of the lesions that ``lesions.tsv`` annotates. :func:`build_training_cache`
streams them into a patch cache (:func:`rimnet.patches.build_patch_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from qsm_core.errors import InputError
from qsm_core.geometry import voxel_sizes_mm
from qsm_core.io.nifti import load_nifti
from qsm_core.io.tables import NA
from rimnet.lesions import label_lesions, resample_labels_to
from rimnet.patches import DEFAULT_CHANNELS, build_patch_cache, extract_patches, flair_reference

__all__ = ["iter_scan_patches", "build_training_cache"]

log = logging.getLogger(__name__)


def iter_scan_patches(bids_dir, *, qsm_dir, lesions_dir, labels: pd.DataFrame,
                      channels: Sequence[str] = DEFAULT_CHANNELS, patch_mm: float = 32.0,
                      patch_voxels: int = 32, min_long_axis_mm: float = 3.0,
                      snap_to_voxels: bool = True, progress: bool = True
                      ) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Yield ``(patches, rows)`` per scan for the annotated lesions.

    Parameters
    ----------
    bids_dir : str or Path
        Raw BIDS dataset (for the FLAIR images).
    qsm_dir : str or Path
        QSM derivatives with ``*_Chimap.nii.gz`` (from ``qsmrim recon``).
    lesions_dir : str or Path
        Lesion derivatives with ``*_desc-lesion_mask.nii.gz``.
    labels : DataFrame
        ``lesions.tsv``: participant_id, session_id, lesion_id and label columns.
    channels, patch_mm, patch_voxels, snap_to_voxels
        Patch settings (see :func:`rimnet.patches.extract_patches`).
    min_long_axis_mm : float
        Lesion size filter, as in ``qsmrim predict``.
    progress : bool
        Show a progress bar over scans.

    Yields
    ------
    patches : ndarray, shape (n, C, P, P, P), float32
    rows : DataFrame
        The rows of ``labels`` for those lesions, in patch order.
    """
    from qsm_core.io.derivatives import find_derivative
    from rimnet.predictor import find_flair, find_lesion_maps, resample_image_to

    scans = find_lesion_maps(lesions_dir)
    labels = labels.copy()
    labels["session_id"] = labels["session_id"].fillna(NA).astype(str)
    by_scan = {k: g for k, g in labels.groupby(["participant_id", "session_id"], sort=False)}
    it = scans
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(scans, desc="patches", unit="scan")
    n_missing = 0
    for scan in it:
        rows = by_scan.get((scan.participant_id, scan.session_id))
        if rows is None or rows.empty:
            log.info("%s: no annotated lesions in the labels table; skipped", scan.name)
            continue
        ses = None if scan.session_id == NA else scan.session_id
        chimap = find_derivative(qsm_dir, scan.participant_id, ses, "Chimap",
                                 entities=scan.entities or None)
        chi, aff = load_nifti(chimap)
        lmap, laff = load_nifti(scan.lesion_path)
        lab = label_lesions(lmap, voxel_size_mm=voxel_sizes_mm(laff),
                            min_long_axis_mm=min_long_axis_mm, name=str(scan.lesion_path))
        if lab.shape != chi.shape or not np.allclose(laff, aff, atol=1e-4):
            lab = resample_labels_to(lab, laff, chi.shape, aff, name=str(scan.lesion_path))
        images = {"qsm": chi}
        brain = chi != 0
        if "flair" in channels:
            fpath = find_flair(bids_dir, scan)
            if fpath is None:
                raise InputError(f"{scan.name}: no FLAIR image in {bids_dir}; training with a "
                                 "'flair' channel needs sub-*/anat/*_FLAIR.nii.gz")
            fl, faff = load_nifti(fpath)
            images["flair"] = resample_image_to(fl, faff, chi.shape, aff, name=str(fpath))
        present = set(np.unique(lab).tolist()) - {0}
        keep = rows[rows["lesion_id"].astype(int).isin(present)]
        n_missing += len(rows) - len(keep)
        if keep.empty:
            continue
        ref = (flair_reference(images["flair"], lesion_labels=lab,
                               brain_mask=brain if brain.any() else None)
               if "flair" in images else None)
        patches = extract_patches(images, lab, keep["lesion_id"].astype(int).tolist(),
                                  voxel_size_mm=voxel_sizes_mm(aff), patch_mm=patch_mm,
                                  patch_voxels=patch_voxels, channels=channels, flair_ref=ref,
                                  snap_to_voxels=snap_to_voxels, affine=aff)
        yield patches, keep.reset_index(drop=True)
    if n_missing:
        log.warning("%d annotated lesions are absent from their lesion maps (or below the "
                    "%.1f mm size filter) and were left out", n_missing, min_long_axis_mm)


def build_training_cache(cache_dir, bids_dir, *, qsm_dir, lesions_dir, labels: pd.DataFrame,
                         channels: Sequence[str] = DEFAULT_CHANNELS, patch_mm: float = 32.0,
                         patch_voxels: int = 32, min_long_axis_mm: float = 3.0,
                         snap_to_voxels: bool = True, overwrite: bool = False,
                         progress: bool = True) -> Path:
    """Build a patch cache of the annotated lesions (see :func:`iter_scan_patches`)."""
    chunks = iter_scan_patches(bids_dir, qsm_dir=qsm_dir, lesions_dir=lesions_dir,
                               labels=labels, channels=channels, patch_mm=patch_mm,
                               patch_voxels=patch_voxels, min_long_axis_mm=min_long_axis_mm,
                               snap_to_voxels=snap_to_voxels, progress=progress)
    meta = {"bids_dir": str(bids_dir), "qsm_dir": str(qsm_dir),
            "lesions_dir": str(lesions_dir), "min_long_axis_mm": min_long_axis_mm}
    path = build_patch_cache(cache_dir, chunks, channels=channels, patch_mm=patch_mm,
                             patch_voxels=patch_voxels, metadata=meta,
                             snap_to_voxels=snap_to_voxels, overwrite=overwrite)
    if not (Path(path) / "table.tsv").stat().st_size or not len(
            pd.read_csv(Path(path) / "table.tsv", sep="\t")):
        raise InputError(f"no annotated lesion of the labels table was found in "
                         f"{lesions_dir}; check participant/session ids and lesion ids")
    return Path(path)
