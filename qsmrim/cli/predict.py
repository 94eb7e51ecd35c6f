"""``qsmrim predict``: score every FLAIR lesion of new scans for a paramagnetic rim.

::

    qsmrim predict BIDS_DIR OUT_DIR --lesions DERIV_DIR [--model DIR | --no-cnn]
                   [--participant-label L ...] [--qsm DERIV_DIR] [--shard I/N]
                   [--jobs N] [--device cpu|cuda] [--no-review] [--overwrite]
    qsmrim predict BIDS_DIR OUT_DIR --merge      # merge the shards of a job array

Scans come from the lesion maps ``*_desc-lesion_mask.nii.gz`` of ``--lesions``; QSM from
existing Chimaps (``--qsm``, then ``OUT_DIR``) or reconstructed from the raw GRE on the fly.
Finished scans are skipped on a rerun; a failing scan is recorded in ``failures.tsv`` and
the others finish (exit status 1 if any scan failed). See :mod:`rimnet.predictor`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from qsm_core.errors import InputError
from qsmrim.cli import add_no_progress, picklable_options

log = logging.getLogger(__name__)


def add_parser(parser: argparse.ArgumentParser, name: str = "predict") -> None:
    """Fill the ``predict`` parser."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  qsmrim predict bids/ out/ --lesions bids/derivatives/lesions\n"
        "  qsmrim predict bids/ out/ --lesions les/ --qsm bids/derivatives/qsmrim --no-cnn\n"
        "  qsmrim predict bids/ out/ --lesions les/ --shard $SLURM_ARRAY_TASK_ID/8\n"
        "  qsmrim predict bids/ out/ --lesions les/ --qsm qsm/ --jobs 2  # 2 scans at once\n"
        "outputs: OUT_DIR/{predictions,subjects,failures}.tsv, index.html, predict.json and\n"
        "  per scan sub-L/[ses-S/]<name>_{predictions.tsv,desc-lesion_dseg.nii.gz,\n"
        "  desc-rim_probseg.nii.gz,scan.json}, review/<name>_lesion-<id>.png")
    parser.add_argument("bids_dir", metavar="BIDS_DIR",
                        help="BIDS dataset (FLAIR; MEGRE echoes for on-the-fly QSM)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder")
    parser.add_argument("--lesions", metavar="DERIV_DIR",
                        help="folder with lesion maps sub-L/[ses-S/]anat/<name>_desc-lesion_"
                             "mask.nii.gz (binary or labelled)")
    parser.add_argument("--model", metavar="DIR",
                        help="CNN model directory (default: the packaged model)")
    parser.add_argument("--no-cnn", action="store_true",
                        help="run the rule-based detector only (no model needed)")
    parser.add_argument("--participant-label", nargs="+", metavar="L",
                        help="participants to process ('01' or 'sub-01')")
    parser.add_argument("--qsm", metavar="DERIV_DIR",
                        help="derivatives with existing Chimaps (from `qsmrim recon`)")
    parser.add_argument("--shard", metavar="I/N",
                        help="process shard I (0-based) of N, for job arrays; merge with "
                             "--merge afterwards")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="score N scans side by side in N processes, each pinned to its "
                             "share of the CPU cores (default 1; CPU only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device for the CNN and the reconstruction (default: cpu)")
    parser.add_argument("--tta", choices=("none", "flip", "d4", "d4z"),
                        help="override the model's test-time augmentation (none: fastest)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="CNN arithmetic (default: fp32); on CPUs with AMX units (Intel "
                             "Sapphire Rapids and later) bf16 runs the CNN 1.2-1.3x faster "
                             "and moved held-out probabilities by at most 0.005")
    parser.add_argument("--folds", nargs="+", type=int, metavar="K",
                        help="use only these fold networks of the model (faster)")
    parser.add_argument("--cnn-threshold", type=float, metavar="P",
                        help="cnn_call = cnn_prob >= P (default: the model's threshold or 0.5)")
    parser.add_argument("--min-long-axis-mm", type=float, default=3.0, metavar="MM",
                        help="drop lesions whose long axis is shorter (default: 3)")
    parser.add_argument("--no-review", action="store_true",
                        help="skip the PNG montages")
    parser.add_argument("--merge", action="store_true",
                        help="only merge the finished scans in OUT_DIR into the batch tables")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute scans that are already done")
    add_no_progress(parser)


def _predictor(args):
    """The predictor ``args`` ask for (also built in each worker of ``--jobs``)."""
    from rimnet.predictor import Predictor, default_model_dir, load_model

    model = None if args.no_cnn else load_model(args.model, device=args.device, tta=args.tta,
                                                folds=args.folds, precision=args.precision)
    return Predictor(model, cnn_threshold=args.cnn_threshold,
                     min_long_axis_mm=args.min_long_axis_mm, bids_dir=Path(args.bids_dir),
                     qsm_dir=args.qsm, device=args.device, review=not args.no_review,
                     model_dir=None if model is None else (args.model or default_model_dir()))


def run(args) -> int:
    """Run ``qsmrim predict``; returns the exit status."""
    from rimnet.predictor import (
        find_lesion_maps,
        merge_outputs,
        parse_shard,
        run_batch,
        select_shard,
    )

    out_dir = Path(args.out_dir)
    if args.merge:
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: no such output folder to merge")
        merged = merge_outputs(out_dir)
        print(f"qsmrim predict: merged {len(merged['subjects'])} scan(s), "
              f"{len(merged['predictions'])} lesion(s), {len(merged['failures'])} failure(s) "
              f"into {out_dir}", file=sys.stderr)
        return 1 if merged["failures"] else 0
    if args.lesions is None:
        raise InputError("--lesions DERIV_DIR is required (the folder of *_desc-lesion_mask "
                         "maps)")
    bids_dir = Path(args.bids_dir)
    if not bids_dir.is_dir():
        raise InputError(f"{bids_dir}: no such BIDS folder; check BIDS_DIR")
    if args.qsm is not None and not Path(args.qsm).is_dir():
        raise InputError(f"{args.qsm}: no such folder; check --qsm")
    if out_dir.resolve() == bids_dir.resolve():
        raise InputError(f"{out_dir}: OUT_DIR must not be the BIDS folder itself")
    if args.no_cnn and args.model is not None:
        raise InputError("give --model or --no-cnn, not both")
    if args.cnn_threshold is not None and not 0 <= args.cnn_threshold <= 1:
        raise InputError(f"--cnn-threshold {args.cnn_threshold}: must lie in [0, 1]")
    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and args.device != "cpu":
        raise InputError(f"--jobs {args.jobs} runs scans side by side on the CPU; on a GPU "
                         "give --jobs 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device here; use --device cpu")
    shard_i, shard_n = parse_shard(args.shard)
    scans = find_lesion_maps(args.lesions, participant_labels=args.participant_label)
    mine = select_shard(scans, shard_i, shard_n)
    if args.no_cnn and (args.tta or args.folds or args.precision != "fp32"):
        raise InputError("--tta/--folds/--precision need the CNN; drop --no-cnn")
    predictor = _predictor(args)
    summary = run_batch(mine, out_dir, predictor=predictor, overwrite=args.overwrite,
                        progress=not args.no_progress, jobs=args.jobs,
                        worker_predictor=functools.partial(_predictor,
                                                           picklable_options(args)))
    merged = merge_outputs(out_dir)
    n_fail = len(summary["failures"])
    shard_txt = f" (shard {shard_i}/{shard_n}: {len(mine)} of {len(scans)} scans)" \
        if shard_n > 1 else ""
    print(f"qsmrim predict: {len(summary['done'])} scan(s) scored, {len(summary['skipped'])} "
          f"skipped (already done), {n_fail} failed{shard_txt}; "
          f"{len(merged['predictions'])} lesion(s) in {out_dir / 'predictions.tsv'}",
          file=sys.stderr)
    if n_fail:
        print(f"qsmrim predict: error: {n_fail} scan(s) failed; see "
              f"{out_dir / 'failures.tsv'}", file=sys.stderr)
        return 1
    return 0
