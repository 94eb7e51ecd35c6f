r"""``qsmrim train``: train the rim CNN with patient-grouped cross-validation.

Two sources of training patches:

* a patch cache (``--patches CACHE``, from ``qsmrim extract`` or an earlier run), whose
  ``table.tsv`` holds the labels (or ``--labels lesions.tsv`` supplies them, joined on
  participant_id, session_id, lesion_id);
* a BIDS dataset with QSM derivatives and lesion maps::

    qsmrim train BIDS_DIR --qsm QSM_DERIV --lesions LESION_DERIV --labels lesions.tsv \
        --label-column consensus --out MODEL_DIR [--folds 5] [--epochs 30] [--device cpu]

  which first builds a patch cache (``--cache``, default ``MODEL_DIR_patches``; reused when
  present).

Runs unchanged under ``torchrun --nproc_per_node N -m qsmrim train ...`` (DDP).
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from qsm_core.errors import InputError
from qsmrim.cli import add_no_progress

__all__ = ["add_parser", "run"]

log = logging.getLogger(__name__)

_OVERRIDES = {  # CLI option -> TrainConfig field
    "folds": "n_folds", "epochs": "epochs", "device": "device", "seed": "seed",
    "arch": "arch", "batch_size": "batch_size", "lr": "lr", "tta": "tta",
    "threads": "threads", "patience": "patience", "label_column": "label_column",
    "patch_mm": "patch_mm", "patch_voxels": "patch_voxels", "n_types": "n_types",
    "shell_features": "shell_features", "deploy_prevalence": "deploy_prevalence",
    "type_column": "type_column", "imbalance": "imbalance", "num_workers": "num_workers",
    "weight_ema": "weight_ema", "teacher": "teacher", "distill_weight": "distill_weight",
}


def add_parser(parser: argparse.ArgumentParser, name: str = "train") -> None:
    """Fill the ``train`` subcommand's parser."""
    parser.add_argument("bids_dir", nargs="?", type=Path, metavar="BIDS_DIR",
                        help="raw BIDS dataset (FLAIR images); not needed with --patches")
    parser.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR",
                        help="model directory to write")
    src = parser.add_argument_group("training data")
    src.add_argument("--patches", type=Path, metavar="CACHE", nargs="+",
                     help="patch cache folder(s) (patches.npy, table.tsv, cache.json); several "
                          "caches with the same settings are trained on together")
    src.add_argument("--qsm", type=Path, metavar="DIR", help="QSM derivatives (Chimaps)")
    src.add_argument("--lesions", type=Path, metavar="DIR",
                     help="lesion derivatives (*_desc-lesion_mask.nii.gz)")
    src.add_argument("--labels", type=Path, metavar="TSV",
                     help="lesions.tsv with the annotations (reader_*, consensus, ...)")
    src.add_argument("--label-column", default=None,
                     help="0/1 label column to learn (default: consensus)")
    src.add_argument("--cache", type=Path, metavar="DIR",
                     help="where to build the patch cache from BIDS (default: "
                          "MODEL_DIR_patches; reused if it exists)")
    src.add_argument("--min-long-axis-mm", type=float, default=3.0,
                     help="lesion size filter when building patches (default 3.0)")
    cfg = parser.add_argument_group("training settings (override --config)")
    cfg.add_argument("--config", type=Path, metavar="JSON",
                     help="TrainConfig JSON (fields in docs/training.md)")
    cfg.add_argument("--folds", type=int, help="cross-validation folds (default 5)")
    cfg.add_argument("--fold", type=int, nargs="+", metavar="K",
                     help="train only these folds (job arrays); calibration runs when all "
                          "folds exist")
    cfg.add_argument("--epochs", type=int, help="maximum epochs per fold (default 30)")
    cfg.add_argument("--patience", type=int, help="early-stopping patience (default 10)")
    cfg.add_argument("--batch-size", type=int, help="global batch size (default 64)")
    cfg.add_argument("--lr", type=float, help="learning rate (default 2e-3)")
    cfg.add_argument("--arch", help="network: resnet (default), fastresnet, convnet, densenet")
    cfg.add_argument("--tta", help="test-time augmentation: none (default), flip, d4, d4z")
    cfg.add_argument("--imbalance", help="pos_weight (default), sampler or none")
    cfg.add_argument("--weight-ema", type=float, metavar="DECAY",
                     help="validate, early-stop and save an exponential moving average of the "
                          "weights with this decay per step, e.g. 0.995 (default 0: off)")
    cfg.add_argument("--teacher", metavar="MODEL_DIR",
                     help="distil this trained ensemble: each network also learns the "
                          "teacher's probabilities (knowledge distillation)")
    cfg.add_argument("--distill-weight", type=float, metavar="W",
                     help="weight of the teacher's soft target in the loss (default 0.7)")
    cfg.add_argument("--patch-mm", type=float, help="patch side in mm (default 32)")
    cfg.add_argument("--patch-voxels", type=int, help="patch samples per side (default 32)")
    cfg.add_argument("--no-shell-features", dest="shell_features", action="store_false",
                     default=None, help="image features only (no lesion-edge shell features "
                     "fused into the head)")
    cfg.add_argument("--n-types", type=int, help="outputs of the lesion-type head (0: none)")
    cfg.add_argument("--type-column", help="table column with the lesion type")
    cfg.add_argument("--deploy-prevalence", type=float, metavar="FRACTION",
                     help="share of rim lesions in the cohorts the model will score; "
                          "probabilities and the call threshold are set for it "
                          "(default 0.11, general MS cohorts)")
    cfg.add_argument("--seed", type=int, help="random seed (default 0)")
    cfg.add_argument("--device", help="cpu (default), cuda, cuda:N")
    cfg.add_argument("--threads", type=int, help="torch threads per process (0: default)")
    cfg.add_argument("--num-workers", type=int, help="data-loader workers (default 0)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="train the folds in N processes at once, each with --threads "
                             "threads (default 1 when N > 1); on a CPU machine, N = the "
                             "number of cores is fastest (default 1)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in MODEL_DIR")
    add_no_progress(parser)
    parser.add_argument("--bundle", type=Path, metavar="DIR",
                        help="also export the model as a MONAI bundle into DIR")


def _command(args: argparse.Namespace) -> str:
    parts = ["qsmrim", "train"]
    if args.bids_dir:
        parts.append(str(args.bids_dir))
    for key, val in vars(args).items():
        if key.startswith("_") or key in ("bids_dir", "command", "verbose") or val in (
                None, False):
            continue
        opt = "--" + key.replace("_", "-")
        if val is True:
            parts.append(opt)
        elif isinstance(val, list):
            parts += [opt, *map(str, val)]
        else:
            parts += [opt, str(val)]
    return shlex.join(parts)


def _load_config(args):
    from training.config import TrainConfig

    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    changes = {field: getattr(args, opt) for opt, field in _OVERRIDES.items()}
    if args.no_progress:
        changes["progress"] = False
    return cfg.replace(**changes).validate()


def _training_data(args, config):
    import pandas as pd

    from qsm_core.io.tables import read_table
    from rimnet.patches import load_patch_caches

    if args.patches is not None:
        if args.bids_dir or args.qsm or args.lesions:
            raise InputError("give either --patches CACHE or BIDS_DIR --qsm --lesions, not both")
        if args.labels is not None and len(args.patches) > 1:
            raise InputError("--labels relabels a single patch cache; with several caches, "
                             "rebuild each with `qsmrim extract --labels`")
        caches = list(args.patches)
    else:
        missing = [o for o, v in (("BIDS_DIR", args.bids_dir), ("--qsm", args.qsm),
                                  ("--lesions", args.lesions), ("--labels", args.labels))
                   if v is None]
        if missing:
            raise InputError(f"training from BIDS needs {', '.join(missing)} (or use "
                             "--patches CACHE)")
        if not args.bids_dir.is_dir():
            raise InputError(f"BIDS_DIR {args.bids_dir}: no such folder")
        cache = args.cache or args.out.with_name(args.out.name + "_patches")
        if not (cache / "cache.json").exists():
            from training.dataset import build_training_cache

            labels = read_table(args.labels, "lesions")
            log.info("building the patch cache in %s", cache)
            build_training_cache(cache, args.bids_dir, qsm_dir=args.qsm,
                                 lesions_dir=args.lesions, labels=labels,
                                 channels=config.channels, patch_mm=config.patch_mm,
                                 patch_voxels=config.patch_voxels,
                                 snap_to_voxels=config.snap_to_voxels,
                                 min_long_axis_mm=args.min_long_axis_mm,
                                 progress=config.progress)
        else:
            log.info("reusing the patch cache in %s", cache)
        caches = [cache]
    patches, table = load_patch_caches(caches)
    cache = caches[0] if len(caches) == 1 else " + ".join(map(str, caches))
    meta = dict(table.attrs)
    if args.labels is not None and args.patches is not None:
        labels = read_table(args.labels, "lesions")
        keys = ["participant_id", "session_id", "lesion_id"]
        extra = [c for c in labels.columns if c not in keys]
        table = table.drop(columns=[c for c in extra if c in table.columns])
        table = table.merge(labels[keys + extra], on=keys, how="left", validate="one_to_one")
        table.attrs.update(meta)
    if config.label_column not in table.columns:
        raise InputError(f"no {config.label_column!r} column in the training labels "
                         f"(table.tsv of {cache}{' or ' + str(args.labels) if args.labels else ''}"
                         "); choose another --label-column or give --labels lesions.tsv")
    if meta.get("channels") and list(meta["channels"]) != list(config.channels):
        raise InputError(f"{cache}: cache channels {meta['channels']} differ from the config "
                         f"channels {config.channels}; rebuild the cache or set channels")
    if meta.get("patch_voxels") and int(meta["patch_voxels"]) != config.patch_voxels or (
            meta.get("patch_mm") and float(meta["patch_mm"]) != config.patch_mm):
        raise InputError(f"{cache}: cache patches are {meta.get('patch_mm')} mm / "
                         f"{meta.get('patch_voxels')} voxels but the config asks for "
                         f"{config.patch_mm} mm / {config.patch_voxels}; pass --patch-mm and "
                         "--patch-voxels to match")
    n_before = len(table)
    labelled = pd.to_numeric(table[config.label_column], errors="coerce").notna().to_numpy()
    if not labelled.all():
        log.warning("%d of %d lesions have no %r label and are left out", n_before
                    - labelled.sum(), n_before, config.label_column)
        import numpy as np

        idx = np.flatnonzero(labelled)
        patches = patches[idx]
        table = table.iloc[idx].reset_index(drop=True)
        table.attrs.update(meta)
    return patches, table


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this worker process soon after its parent dies (started as a daemon thread).

    A ``--jobs`` worker whose parent was killed (``kill PID``, a scheduler's time limit) would
    otherwise go on training, orphaned, holding its cores. An orphan is re-parented, so its
    parent process id changes; the thread polls for that and exits the process (the fold
    resumes from its last checkpoint with ``--resume``).
    """
    import os
    import threading
    import time

    if any(t.name == "qsmrim-parent-watch" for t in threading.enumerate()):
        return  # a pool process runs several folds: one watcher is enough
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(3)

    threading.Thread(target=watch, name="qsmrim-parent-watch", daemon=True).start()


def _fold_job(args: argparse.Namespace, config, folds: list[int], log_level: int) -> None:
    """One process of ``--jobs``: train ``folds`` (resuming what exists)."""
    from training.trainer import train_model

    _exit_with_parent()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    patches, table = _training_data(args, config)
    train_model(patches, table, config=config, out_dir=args.out, resume=True, folds=folds,
                command=_command(args))


def _train_folds_in_parallel(args: argparse.Namespace, config) -> None:
    """Train every fold, spread round-robin over ``args.jobs`` single-machine processes.

    Data-parallel training (``torchrun``) splits each batch over processes, which pays off on
    GPUs; on a few CPU cores, independent folds in single-threaded processes keep every core
    busy without synchronisation (timings in docs/benchmarks.md).
    """
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    if args.fold:
        raise InputError("--jobs trains every fold; drop --fold (or run one --fold job per "
                         "process yourself)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("--jobs does not combine with torchrun; use one or the other")
    if (args.out / "config.json").exists() and not args.resume:
        raise InputError(f"{args.out} already holds a model; pass --resume to continue it or "
                         "choose another --out folder")
    n_jobs = min(args.jobs, config.n_folds)
    job_config = config.replace(threads=config.threads or 1, progress=False)
    log.info("training %d folds in %d processes (%d thread(s) each)", config.n_folds, n_jobs,
             job_config.threads)
    ctx = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx) as pool:
        # one task per fold: a process that finishes early takes the next fold
        futures = [pool.submit(_fold_job, args, job_config, [k], level)
                   for k in range(config.n_folds)]
        for fut in futures:
            fut.result()  # a failed fold raises here, after the others finish


def run(args: argparse.Namespace) -> int:
    """Train and print where the model is and its cross-validation figures."""
    import os

    from training.trainer import train_model

    config = _load_config(args)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a folder")
    resume = args.resume
    if args.jobs != 1:
        _train_folds_in_parallel(args, config)
        resume = True  # every fold is done: load them and calibrate
    patches, table = _training_data(args, config)
    model = train_model(patches, table, config=config, out_dir=args.out, resume=resume,
                        folds=args.fold, command=_command(args))
    rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK
    if model is None:
        if rank0:
            print(f"trained fold(s) {args.fold} in {args.out}; run the remaining folds, then "
                  "any of them again with --resume to calibrate")
        return 0
    if rank0:
        import json

        m = json.loads((args.out / "metrics.json").read_text())["pooled"]
        print(f"model: {args.out} ({len(model.networks)} folds); out-of-fold ROC AUC "
              f"{m['roc_auc']:.3f}, PR AUC {m['pr_auc']:.3f}, kappa {m['kappa']:.3f} at "
              f"threshold {model.threshold:.3f}")
        if args.bundle is not None:
            from training.bundle import export_bundle

            export_bundle(args.out, args.bundle)
            print(f"MONAI bundle: {args.bundle}")
    return 0
