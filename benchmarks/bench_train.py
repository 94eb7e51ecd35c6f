"""Timing of rim-CNN training (K-fold CV) and inference on synthetic 32^3 patches.

Usage (the acceptance figures: 5-fold CV on 2,000 lesions <= 15 min on 2 cores;
inference >= 500 lesions/s on 2 cores)::

    python benchmarks/bench_train.py --n 2000 --folds 5 --threads 2
    python benchmarks/bench_train.py --n 2000 --folds 5 --jobs 2   # folds side by side
    python benchmarks/bench_train.py --inference-only --threads 2
    python benchmarks/bench_train.py --n 2000 --jobs 2 --patches COHORT/patches
    python benchmarks/bench_train.py --augment   # CPU ms per sample: augmentation, step

Prints one line per measurement. Patches come from tests/rimnet/synthetic_patches.py
(spheres with or without a paramagnetic rim, veins, partial rims, noise), or with
``--patches`` from a patch cache written by ``qsmrim extract`` (whole patients, drawn at
random, until there are at least ``--n`` lesions; labels from ``--label-column``). The
synthetic patches are easy, so folds stop early; simulated cohorts are the realistic case.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rimnet.model import RimCNN, network_kwargs_from_config  # noqa: E402
from rimnet.network import build_network, count_parameters  # noqa: E402
from tests.rimnet.synthetic_patches import make_synthetic_patches  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import train_model, train_transforms  # noqa: E402


def bench_inference(model_dir=None, *, n=2000, threads=2, folds=5, patch_voxels=None):
    torch.set_num_threads(threads)
    if model_dir is not None:
        patch_voxels = RimCNN.load(model_dir).patch_voxels
    patch_voxels = patch_voxels or TrainConfig().patch_voxels
    x, _ = make_synthetic_patches(256, patch_voxels=patch_voxels, seed=5)
    x = np.concatenate([x] * int(np.ceil(n / len(x))))[:n]
    if model_dir is None:
        cfg = TrainConfig(patch_voxels=patch_voxels)
        nets = [build_network(in_channels=4, arch=cfg.arch, channels=cfg.net_channels).eval()
                for _ in range(folds)]
        model = RimCNN(nets, config=cfg.to_dict())
    else:
        model = RimCNN.load(model_dir)
    print(f"network: {model.config['arch']} {model.config['net_channels']}, "
          f"{patch_voxels}^3 patches, "
          f"{count_parameters(model.networks[0]):,} parameters per fold, "
          f"{len(model.networks)} folds", flush=True)
    all_nets = model.networks
    for k, tta in [(1, "none"), (len(all_nets), "none"), (len(all_nets), "flip"),
                   (len(all_nets), "d4")]:
        model.networks = all_nets[:k]
        model.tta = tta
        model.predict_proba(x[:64])
        t0 = time.perf_counter()
        model.predict_proba(x)
        dt = time.perf_counter() - t0
        print(f"inference: {k} fold(s), tta={tta}: {n / dt:.0f} lesions/s "
              f"({threads} threads)", flush=True)
    model.networks = all_nets


def cohort_subset(cache_dirs, *, n, label_column, seed):
    """Whole patients of the patch cache(s), in a seeded random order, until >= n lesions.

    Returns
    -------
    patches : ndarray, shape (M, C, P, P, P), float32
    table : DataFrame
        M rows; the label column is copied into ``label``.
    """
    from rimnet.patches import load_patch_caches

    x, t = load_patch_caches(cache_dirs)
    if label_column not in t.columns:
        raise SystemExit(f"{cache_dirs}: no column {label_column!r} in the patch table")
    patients = t.participant_id.drop_duplicates().to_numpy()
    np.random.default_rng(seed).shuffle(patients)
    counts = t.participant_id.value_counts()
    keep = patients[:np.searchsorted(np.cumsum(counts[patients].to_numpy()), n) + 1]
    rows = np.flatnonzero(t.participant_id.isin(keep).to_numpy())
    sub = t.iloc[rows].drop(columns="patch_index").reset_index(drop=True)
    sub["label"] = sub[label_column].astype(int)
    return np.ascontiguousarray(x[rows], dtype=np.float32), sub


def bench_augment(*, n=512, batch=64, repeats=3, seed=0):
    """CPU ms per training sample of the default augmentation and of a forward+backward pass.

    One thread, the default :class:`TrainConfig`; the best of ``repeats`` passes over ``n``
    synthetic patches (process CPU time, so other jobs on the machine inflate it less than
    wall time).
    """
    torch.set_num_threads(1)
    cfg = TrainConfig()
    x, t = make_synthetic_patches(n, patch_voxels=cfg.patch_voxels, seed=seed)
    transform = train_transforms(cfg, seed=seed)
    aug = []
    for _ in range(repeats):
        t0 = time.process_time()
        for i in range(n):
            transform({"image": x[i], "label": 0})
        aug.append((time.process_time() - t0) / n * 1e3)
    net = build_network(**network_kwargs_from_config(cfg.to_dict()))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    xb = torch.as_tensor(x[:batch])
    yb = torch.as_tensor(t.label.to_numpy()[:batch], dtype=torch.float32)
    step = []
    for r in range(repeats + 1):
        t0 = time.process_time()
        for _ in range(4):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xb)[:, 0], yb)
            loss.backward()
            opt.step()
        if r:  # the first pass warms up
            step.append((time.process_time() - t0) / (4 * batch) * 1e3)
    print(f"augment: {min(aug):.2f} CPU ms/sample (passes {[round(a, 2) for a in aug]}); "
          f"forward+backward+step: {min(step):.2f} CPU ms/sample (batch {batch}); 1 thread",
          flush=True)


def _cv_in_processes(x, t, out, *, folds, epochs, jobs, only):
    """Wall time of ``qsmrim train --jobs`` (or of ``only`` folds, one process each)."""
    import subprocess

    from rimnet.patches import build_patch_cache

    cache = Path(out).parent / "cache"
    build_patch_cache(cache, [(x, t)], patch_mm=32.0, patch_voxels=x.shape[-1])
    cmd = [sys.executable, "-m", "qsmrim", "train", "--patches", str(cache), "--label-column",
           "label", "--folds", str(folds), "--threads", "1", "--out", str(out), "--no-progress",
           *(["--epochs", str(epochs)] if epochs else [])]
    t0 = time.perf_counter()
    if only:  # the first folds side by side, as --jobs runs them
        procs = [subprocess.Popen(cmd + ["--fold", str(k)]) for k in only]
        if any(p.wait() for p in procs):
            raise SystemExit("a fold failed")
        dt = time.perf_counter() - t0
        rounds = -(-folds // jobs)
        print(f"cv: folds {only} side by side, 1 thread each: {dt:.0f} s; {folds} folds in "
              f"{jobs} processes take {rounds} such rounds", flush=True)
        return dt * rounds * len(only) / folds  # bench_cv scales by folds / len(only)
    subprocess.run(cmd + ["--jobs", str(jobs)], check=True)
    return time.perf_counter() - t0


def bench_cv(*, n, folds, epochs, threads, seed, out, only=None, jobs=1, patches=None,
             label_column="truth_prl"):
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if patches:
        x, t = cohort_subset(patches, n=n, label_column=label_column, seed=seed)
        source = f"lesions of {len(patches)} patch cache(s)"
    else:  # rendered at 1 mm (32^3) and resampled to the configured patch size, as patches are
        x, t = make_synthetic_patches(n, patch_voxels=32, seed=seed, prevalence=0.15,
                                      n_patients=max(folds * 4, n // 12))
        source = "synthetic lesions"
    pv = TrainConfig().patch_voxels
    if pv != x.shape[-1]:
        import torch.nn.functional as F

        x = np.concatenate([F.interpolate(torch.as_tensor(x[i:i + 200]), size=(pv,) * 3,
                                          mode="trilinear", align_corners=True).numpy()
                            for i in range(0, len(x), 200)])
    print(f"data: {len(x)} {source} ({int(t.label.sum())} rims, "
          f"{t.participant_id.nunique()} patients) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    cfg = TrainConfig(n_folds=folds, label_column="label", threads=threads,
                      **({"epochs": epochs} if epochs else {}))
    t0 = time.perf_counter()
    todo = list(range(only)) if only else None
    if jobs > 1:
        dt = _cv_in_processes(x, t, out, folds=folds, epochs=epochs, jobs=jobs, only=todo)
    else:
        train_model(x, t, config=cfg, out_dir=out, command="benchmarks/bench_train.py",
                    folds=todo)
        dt = time.perf_counter() - t0
    if only:
        logs = [(Path(out) / f"fold_{k}" / "log.jsonl").read_text().splitlines()
                for k in range(only)]
        last = [json.loads(lg[-1]) for lg in logs]
        print(f"cv: {only} of {folds} folds on {n} lesions: {dt:.0f} s -> about "
              f"{dt * folds / only / 60:.1f} min for all {folds}; epochs run "
              f"{[len(lg) for lg in logs]}; last val ROC AUC "
              f"{[round(h['val_roc_auc'], 3) for h in last]}, PR AUC "
              f"{[round(h['val_pr_auc'], 3) for h in last]}", flush=True)
        return out
    m = json.loads((Path(out) / "metrics.json").read_text())
    eps = m["best_epochs"]
    n_epochs = [len((Path(out) / f"fold_{k}" / "log.jsonl").read_text().splitlines())
                for k in range(folds)]
    how = f"{jobs} processes x 1 thread" if jobs > 1 else f"{threads} threads"
    print(f"cv: {folds}-fold on {n} lesions: {dt:.0f} s ({dt / 60:.1f} min) on {how}; "
          f"epochs run {n_epochs}, best {eps}", flush=True)
    p = m["pooled"]
    print(f"cv: pooled out-of-fold ROC AUC {p['roc_auc']:.3f}, PR AUC {p['pr_auc']:.3f}, "
          f"NLL {p['nll_uncalibrated']:.3f} -> {p['nll_calibrated']:.3f} after temperature, "
          f"kappa {p['kappa']:.3f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inference-only", action="store_true")
    ap.add_argument("--augment", action="store_true",
                    help="only the CPU cost per sample of augmentation and of a training step")
    ap.add_argument("--patch-voxels", type=int, default=None,
                    help="inference-only: patch size (default: TrainConfig's)")
    ap.add_argument("--only-folds", type=int, default=None,
                    help="train only the first K folds and extrapolate the CV time")
    ap.add_argument("--keep", type=Path, default=None, help="keep the model dir here")
    ap.add_argument("--patches", type=Path, nargs="+", default=None,
                    help="patch cache(s) from qsmrim extract instead of synthetic patches")
    ap.add_argument("--label-column", default="truth_prl",
                    help="with --patches: the 0/1 label column (default truth_prl)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train folds in this many single-threaded processes (qsmrim train "
                         "--jobs)")
    args = ap.parse_args()
    if args.augment:
        bench_augment(seed=args.seed)
        return
    if args.inference_only:
        bench_inference(threads=args.threads, folds=args.folds, patch_voxels=args.patch_voxels)
        return
    out = args.keep or Path(tempfile.mkdtemp()) / "model"
    try:
        bench_cv(n=args.n, folds=args.folds, epochs=args.epochs, threads=args.threads,
                 seed=args.seed, out=out, only=args.only_folds, jobs=args.jobs,
                 patches=args.patches, label_column=args.label_column)
        if not args.only_folds:
            bench_inference(out, threads=args.threads)
    finally:
        if args.keep is None:
            shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
