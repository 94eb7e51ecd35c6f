"""``qsmrim lesions`` and ``qsmrim extract``: label FLAIR lesions; cache per-lesion patches.

::

    qsmrim lesions LESIONS_DIR OUT_DIR [--qsm DERIV_DIR] [--participant-label L ...]
                   [--min-long-axis-mm 3]
    qsmrim extract BIDS_DIR CACHE_DIR --lesions LESIONS_DIR [--qsm DERIV_DIR]
                   [--labels lesions.tsv] [--channels qsm flair lesion others]
                   [--patch-mm 32] [--patch-voxels 24] [--dtype float32|float16]
                   [--participant-label L ...] [--overwrite]

``lesions`` writes, per scan, ``OUT_DIR/sub-L/[ses-S/]anat/<name>_desc-lesion_dseg.nii.gz``
(labels after the size filter; on the QSM grid when ``--qsm`` holds the scan's Chimap) and
one ``OUT_DIR/lesions.tsv`` with every lesion's geometry. ``extract`` writes a patch cache
(:func:`rimnet.patches.build_patch_cache`) for training: ``patches.npy``, ``table.tsv`` (keys,
geometry and, with ``--labels``, every column of that table such as ``consensus``,
``reader_*`` and ``truth_prl``) and ``cache.json``; a scan without a Chimap in ``--qsm`` is
reconstructed from the raw GRE into ``CACHE_DIR/_qsm``. Both isolate failing scans
(``failures.tsv``, exit status 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from qsm_core.errors import InputError, QSMRimError
from qsmrim.cli import add_no_progress
from rimnet.patches import PATCH_MM, PATCH_VOXELS

log = logging.getLogger(__name__)


def add_parser(parser: argparse.ArgumentParser, name: str = "lesions") -> None:
    """Fill the ``lesions`` or the ``extract`` parser."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if name == "extract":
        parser.add_argument("bids_dir", metavar="BIDS_DIR", help="BIDS dataset (FLAIR)")
        parser.add_argument("out_dir", metavar="CACHE_DIR", help="patch cache folder")
        parser.add_argument("--lesions", required=True, metavar="DIR",
                            help="folder of *_desc-lesion_mask.nii.gz lesion maps")
        parser.add_argument("--labels", metavar="TSV",
                            help="lesions.tsv whose columns (consensus, reader_*, truth_*) are "
                                 "joined on participant_id/session_id/lesion_id")
        parser.add_argument("--channels", nargs="+", metavar="NAME",
                            default=["qsm", "flair", "lesion", "others"],
                            help="patch channels (default: qsm flair lesion others)")
        parser.add_argument("--patch-mm", type=float, default=PATCH_MM, metavar="MM",
                            help=f"patch side in mm (default: {PATCH_MM:g})")
        parser.add_argument("--patch-voxels", type=int, default=PATCH_VOXELS, metavar="P",
                            help=f"samples per side (default: {PATCH_VOXELS}, as the CNN's)")
        parser.add_argument("--no-snap", action="store_true",
                            help="sample patches centred exactly on each lesion centroid "
                                 "(trilinear) instead of on the nearest voxel-grid position "
                                 "(a crop; the default, as the packaged model was trained)")
        parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                            help="storage type of patches.npy (default: float32)")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing cache")
        parser.epilog = ("example:\n  qsmrim extract bids/ cache/ --lesions bids/derivatives/"
                         "lesions --qsm bids/derivatives/qsmrim --labels bids/lesions.tsv")
    else:
        parser.add_argument("lesions_dir", metavar="LESIONS_DIR",
                            help="folder of *_desc-lesion_mask.nii.gz lesion maps")
        parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder")
        parser.epilog = ("example:\n  qsmrim lesions bids/derivatives/lesions out/ --qsm "
                         "bids/derivatives/qsmrim")
    parser.add_argument("--qsm", metavar="DERIV_DIR",
                        help="derivatives with the Chimaps (lesions are moved onto their grid)")
    parser.add_argument("--participant-label", nargs="+", metavar="L",
                        help="participants to process ('01' or 'sub-01')")
    parser.add_argument("--min-long-axis-mm", type=float, default=3.0, metavar="MM",
                        help="drop lesions whose long axis is shorter (default: 3)")
    add_no_progress(parser)


def _write_failures(out_dir: Path, failures: list[dict]) -> None:
    from qsm_core.io.atomic import atomic_path

    cols = ["scan", "participant_id", "session_id", "error_type", "message"]
    with atomic_path(out_dir / "failures.tsv") as tmp:
        pd.DataFrame(failures, columns=cols).to_csv(tmp, sep="\t", index=False)


def _failure(scan, exc) -> dict:
    if not isinstance(exc, QSMRimError):
        log.exception("%s failed", scan.name)
    msg = " ".join(str(exc).split())
    print(f"qsmrim: {scan.name} failed: {msg}", file=sys.stderr)
    return {"scan": scan.name, "participant_id": scan.participant_id,
            "session_id": scan.session_id, "error_type": type(exc).__name__, "message": msg}


def _run_lesions(args) -> int:
    from tqdm.auto import tqdm

    from qsm_core.geometry import voxel_sizes_mm
    from qsm_core.io.nifti import load_nifti, save_nifti
    from qsm_core.io.tables import write_table
    from rimnet.lesions import LESION_COLUMNS, label_lesions, lesion_table, resample_labels_to
    from rimnet.predictor import Predictor, find_lesion_maps

    out_dir = Path(args.out_dir)
    scans = find_lesion_maps(args.lesions_dir, participant_labels=args.participant_label)
    finder = Predictor(None, qsm_dir=args.qsm)
    tables, failures = [], []
    for scan in tqdm(scans, desc="qsmrim lesions", unit="scan", file=sys.stderr,
                     disable=args.no_progress):
        try:
            lmap, laff = load_nifti(scan.lesion_path)
            labels = label_lesions(lmap, voxel_size_mm=voxel_sizes_mm(laff),
                                   min_long_axis_mm=args.min_long_axis_mm,
                                   name=str(scan.lesion_path))
            aff = laff
            chimap = finder._find_chimap(scan, out_dir) if args.qsm else None
            if args.qsm and chimap is None:
                raise InputError(f"{scan.name}: no Chimap in --qsm {args.qsm}")
            if chimap is not None:
                chi, aff = load_nifti(chimap)
                labels = resample_labels_to(labels, laff, chi.shape, aff,
                                            name=str(scan.lesion_path))
            folder = out_dir / scan.folder / "anat"
            save_nifti(folder / f"{scan.name}_desc-lesion_dseg.nii.gz",
                       labels.astype(np.int32), aff, description="qsmrim lesion labels")
            tables.append(lesion_table(labels, aff, participant_id=scan.participant_id,
                                       session_id=scan.session_id))
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            failures.append(_failure(scan, exc))
    table = (pd.concat([t for t in tables if len(t)], ignore_index=True)
             if any(len(t) for t in tables) else pd.DataFrame(columns=LESION_COLUMNS))
    write_table(table, out_dir / "lesions.tsv", "lesions")
    _write_failures(out_dir, failures)
    print(f"qsmrim lesions: {len(table)} lesion(s) in {len(tables)} scan(s) -> "
          f"{out_dir / 'lesions.tsv'}; {len(failures)} failed", file=sys.stderr)
    return 1 if failures else 0


def _run_extract(args) -> int:
    from qsm_core.io.tables import KEYS, read_table
    from rimnet.patches import build_patch_cache
    from rimnet.predictor import Predictor, find_lesion_maps

    out_dir = Path(args.out_dir)
    if (out_dir / "cache.json").exists() and not args.overwrite:
        raise InputError(f"{out_dir}: a patch cache already exists; use --overwrite or "
                         "another folder")
    if args.patch_voxels < 4 or args.patch_mm <= 0:
        raise InputError("--patch-voxels must be >= 4 and --patch-mm > 0")
    labels_df = read_table(args.labels, "lesions") if args.labels else None
    scans = find_lesion_maps(args.lesions, participant_labels=args.participant_label)
    prep = Predictor(None, bids_dir=args.bids_dir, qsm_dir=args.qsm,
                     min_long_axis_mm=args.min_long_axis_mm, channels=args.channels,
                     patch_mm=args.patch_mm, patch_voxels=args.patch_voxels,
                     snap_to_voxels=not args.no_snap, review=False)
    failures: list[dict] = []
    counts = {"lesions": 0, "scans": 0, "unlabelled": 0}
    keys = KEYS["lesions"]

    def chunks():
        from tqdm.auto import tqdm

        for scan in tqdm(scans, desc="qsmrim extract", unit="scan", file=sys.stderr,
                         disable=args.no_progress):
            try:
                res, patches = prep.prepare_scan(scan, out_dir / "_qsm")
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:
                failures.append(_failure(scan, exc))
                continue
            table = res.table
            if labels_df is not None and len(table):
                extra = labels_df.drop(columns=[c for c in labels_df.columns
                                                if c in table.columns and c not in keys])
                table = table.merge(extra, on=keys, how="left", validate="one_to_one")
                first = [c for c in extra.columns if c not in keys]
                if first:
                    counts["unlabelled"] += int(table[first[0]].isna().sum())
            counts["lesions"] += len(table)
            counts["scans"] += 1
            yield patches, table

    build_patch_cache(out_dir, chunks(), channels=tuple(args.channels), patch_mm=args.patch_mm,
                      patch_voxels=args.patch_voxels, dtype=np.dtype(args.dtype),
                      snap_to_voxels=not args.no_snap,
                      metadata={"lesions_dir": str(Path(args.lesions).resolve()),
                                "labels": str(Path(args.labels).resolve()) if args.labels
                                else None, "min_long_axis_mm": args.min_long_axis_mm},
                      overwrite=args.overwrite)
    _write_failures(out_dir, failures)
    if counts["unlabelled"]:
        log.warning("%d lesion(s) have no row in %s (labels left n/a)", counts["unlabelled"],
                    args.labels)
    print(f"qsmrim extract: {counts['lesions']} patch(es) from {counts['scans']} scan(s) -> "
          f"{out_dir}; {len(failures)} failed", file=sys.stderr)
    return 1 if failures else 0


def run(args) -> int:
    """Run ``qsmrim lesions`` or ``qsmrim extract``; returns the exit status."""
    if args.command == "extract":
        return _run_extract(args)
    return _run_lesions(args)
