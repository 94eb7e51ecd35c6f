"""Inference speed of qsmrim predict (issue 4 targets).

1. **Per-lesion throughput excluding reconstruction** (target: >= 500 lesions/s on 2 CPU
   cores). ``--scans`` synthetic 1 mm scans (176 x 208 x 176, an ellipsoidal brain, 20-40
   ovoid lesions each, some with paramagnetic rims, some crossed by veins) are written as
   Chimap/FLAIR/lesion-map files, then scored one by one by the production code,
   :meth:`rimnet.predictor.Predictor.predict_scan`, in this single process with
   ``--threads`` threads. The figure that counts is the **end-to-end per-lesion path once the
   volumes are loaded**: the predictor's own ``patches`` (per-scan FLAIR reference + patch
   extraction), ``cnn`` and ``rule`` stage timings, summed over every scan; the per-stage
   figures are printed too, and so is the untimed rest (loading, labelling, lesion table). The
   whole pass is repeated ``--repeats`` times (the machine load is printed with each).
   With ``--jobs N`` the synthetic scans are shared among N processes that run at once,
   each pinned to its share of the cores (as ``qsmrim predict --jobs N`` runs them); the
   figure is then the sum of the processes' per-lesion-path throughputs.
   With ``--bids DIR --lesions DIR --qsm DIR`` the same is measured on existing scans
   (e.g. a simulated, reconstructed cohort) in addition.
   The CNN is ``--model`` or the packaged default model, else an untrained network with the
   training defaults (speed does not depend on the weights).
2. Optional (``--bids DIR --lesions DIR`` without ``--qsm``): wall time of ``qsmrim predict``
   for one scan reconstructed from raw GRE on the fly (target: <= 45 s).

Usage::

    python benchmarks/bench_predict.py [--threads 2] [--scans 8] [--repeats 3]
        [--model DIR] [--tta none|flip|d4|d4z] [--folds K] [--precision fp32|bf16]
        [--no-cnn] [--patch-voxels P] [--jobs N]
        [--bids DIR --lesions DIR [--qsm DIR [--batch]]] [--participant-label 001]

3. Optional (``--batch`` with ``--qsm``): the whole batch (:func:`rimnet.predictor.run_batch`:
   loading, scoring, writing the maps; no review montages) without and with prefetching the
   next scan's files in a background thread, interleaved, as a wall-time ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (176, 208, 176)
STAGES = ("patches", "rule", "cnn")


def synthetic_scan(rng, *, shape=SHAPE, n_lesions: int = 30):
    """chi (ppm, 0 outside the brain), FLAIR and a binary lesion map of one 1 mm scan."""
    c = (np.array(shape) - 1) / 2.0
    radii = np.array(shape) * np.array([0.42, 0.43, 0.40])
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    brain = sum(((g[a] - c[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
    chi = np.where(brain, rng.normal(-0.02, 0.01, shape), 0.0).astype(np.float32)
    flair = np.where(brain, rng.normal(100.0, 5.0, shape), rng.normal(5.0, 1.0, shape))
    flair = flair.astype(np.float32)
    lesions = np.zeros(shape, np.uint8)
    inner = np.argwhere(brain[8:-8:4, 8:-8:4, 8:-8:4]) * 4 + 8
    for k in range(n_lesions):
        ctr = inner[rng.integers(len(inner))] + rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(1.5, 6.0, 3)
        lo = np.maximum(np.floor(ctr - r - 3).astype(int), 0)
        hi = np.minimum(np.ceil(ctr + r + 4).astype(int), shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        x, y, z = np.ogrid[sl]
        rho = np.sqrt(((x - ctr[0]) / r[0]) ** 2 + ((y - ctr[1]) / r[1]) ** 2
                      + ((z - ctr[2]) / r[2]) ** 2)
        les = rho <= 1.0
        lesions[sl][les] = 1
        flair[sl][les] += 100.0
        if k % 4 == 0:  # paramagnetic rim
            chi[sl][(rho > 0.7) & (rho <= 1.3)] += 0.04
        if k % 7 == 3:  # a vein along the slice axis through the lesion, 10 mm beyond it
            i, j = int(round(ctr[0])), int(round(ctr[1]))
            z0, z1 = max(int(ctr[2] - r[2] - 10), 0), int(ctr[2] + r[2] + 10)
            chi[i:i + 2, j:j + 2, z0:z1] += 0.35
    chi *= brain
    return chi, flair, lesions


def write_synthetic_dataset(root: Path, rng, *, n_scans: int) -> tuple[Path, Path, Path, int]:
    """Write ``n_scans`` scans as uncompressed NIfTI; returns (bids, lesions, qsm, n_lesions)."""
    from qsm_core.io.nifti import save_nifti

    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = -np.array(SHAPE) / 2.0
    total = 0
    for s in range(n_scans):
        sub = f"sub-{s + 1:02d}"
        n = int(rng.integers(20, 41))
        total += n
        chi, flair, les = synthetic_scan(rng, n_lesions=n)
        save_nifti(root / "bids" / sub / "anat" / f"{sub}_FLAIR.nii", flair, aff)
        save_nifti(root / "qsm" / sub / "anat" / f"{sub}_Chimap.nii", chi, aff)
        save_nifti(root / "les" / sub / "anat" / f"{sub}_desc-lesion_mask.nii", les, aff,
                   dtype=np.uint8)
    return root / "bids", root / "les", root / "qsm", total


def default_like_model(patch_voxels: int, *, tta=None, n_folds=None, precision="fp32"):
    from rimnet.model import RimCNN
    from rimnet.network import build_network
    from training.config import TrainConfig

    cfg = TrainConfig()
    config = {"channels": list(cfg.channels), "patch_mm": cfg.patch_mm,
              "patch_voxels": patch_voxels, "arch": cfg.arch,
              "net_channels": list(cfg.net_channels), "n_types": 0, "tta": tta or cfg.tta}
    k = n_folds or cfg.n_folds
    nets = [build_network(in_channels=len(cfg.channels), arch=cfg.arch,
                          channels=tuple(cfg.net_channels)) for _ in range(k)]
    what = f"untrained {cfg.arch} x{k} folds, tta={config['tta']}"
    return RimCNN(nets, config=config, precision=precision), what


def make_model(*, model_dir, no_cnn, tta, folds, precision, patch_voxels):
    """The CNN the options ask for, and a line saying what it is."""
    from rimnet.predictor import load_model

    if no_cnn:
        return None, "none (rule-based only)"
    if model_dir is None:
        return default_like_model(patch_voxels or 32, tta=tta, n_folds=folds,
                                  precision=precision)
    model = load_model(model_dir, tta=tta, folds=list(range(folds)) if folds else None,
                       precision=precision)
    what = f"{model!r} from {model_dir}"
    if patch_voxels:  # the networks pool globally, so they take any patch size
        p = int(patch_voxels)
        model.config = {**model.config, "patch_voxels": p, "patch_mm": float(p)}
        model.patch_voxels, model.patch_mm = p, float(p)
        what += f", run on {p} mm / {p}-sample patches (speed only)"
    return model, what


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@contextlib.contextmanager
def cpu_meter(predictor):
    """Accumulate the process CPU time of each per-lesion stage of ``predictor``.

    Wraps the functions the predictor calls for them (FLAIR reference + patch extraction,
    the model's ``predict_proba``, the rule's ``score_and_call``). CPU seconds count every
    thread of the process, so on a busy machine they say what the stages cost where wall
    times say how long they waited.
    """
    import rimnet.predictor as rp
    from rimnet.rule_based import RuleBasedRimDetector

    cpu = dict.fromkeys(STAGES, 0.0)

    def timed(fn, stage):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                cpu[stage] += time.process_time() - t0
        return wrapper

    # the per-scan FLAIR reference goes by either name (older code: flair_reference)
    names = [n for n in ("extract_patches", "flair_reference", "flair_reference_in_qsm_mask")
             if hasattr(rp, n)]
    saved = {n: getattr(rp, n) for n in names}
    saved_rule = RuleBasedRimDetector.score_and_call
    model = predictor.model
    for n in names:
        setattr(rp, n, timed(saved[n], "patches"))
    RuleBasedRimDetector.score_and_call = timed(saved_rule, "rule")
    if model is not None:
        model.predict_proba = timed(model.predict_proba, "cnn")
    try:
        yield cpu
    finally:
        for n in names:
            setattr(rp, n, saved[n])
        RuleBasedRimDetector.score_and_call = saved_rule
        if model is not None:
            del model.predict_proba


def throughput(predictor, scans, out_dir: Path, *, repeats: int, label: str) -> list[float]:
    """Score every scan ``repeats`` times; print per-stage and end-to-end lesions/s."""
    predictor.predict_scan(scans[0], out_dir)  # warm-up (lazy imports, first-call costs)
    figures = []
    for rep in range(repeats):
        load0 = load_avg()
        tot = dict.fromkeys(STAGES + ("other",), 0.0)
        n = 0
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        with cpu_meter(predictor) as cpu:
            for scan in scans:
                t0 = time.perf_counter()
                res = predictor.predict_scan(scan, out_dir)
                wall = time.perf_counter() - t0
                t = res.timings_s
                for k in STAGES:
                    tot[k] += t.get(k, 0.0)
                tot["other"] += wall - sum(t.get(k, 0.0) for k in STAGES)
                n += len(res.table)
        wall_all = time.perf_counter() - wall0
        cpu_all = time.process_time() - cpu0
        path = sum(tot[k] for k in STAGES)
        figures.append(n / path)
        print(f"[{label}] pass {rep + 1}/{repeats}: {len(scans)} scans, {n} lesions "
              f"({n / len(scans):.1f}/scan); load average {load0} -> {load_avg()}")
        print(f"  {'stage':24s} {'wall':>9s} {'lesions/s':>9s} {'ms/lesion':>9s} "
              f"{'CPU ms/lesion':>13s}")
        for k, name in (("patches", "patches (+FLAIR ref)"), ("rule", "rule-based"),
                        ("cnn", "CNN")):
            print(f"  {name:24s} {tot[k]:7.3f} s {n / max(tot[k], 1e-12):9.0f} "
                  f"{1e3 * tot[k] / n:9.2f} {1e3 * cpu[k] / n:13.2f}")
        cpu_path = sum(cpu.values())
        print(f"  {'END-TO-END per lesion':24s} {path:7.3f} s {n / path:9.0f} "
              f"{1e3 * path / n:9.2f} {1e3 * cpu_path / n:13.2f}   (target >= 500 lesions/s: "
              f"{'PASS' if n / path >= 500 else 'FAIL'})")
        print(f"  not counted (load, labelling, lesion table): {tot['other']:.3f} s; whole "
              f"predict_scan {wall_all:.2f} s wall, {cpu_all:.2f} CPU-s")
    print(f"[{label}] end-to-end lesions/s over {repeats} passes: "
          f"{', '.join(f'{f:.0f}' for f in figures)} (best {max(figures):.0f}, "
          f"median {float(np.median(figures)):.0f})")
    return figures


def _score_share(index: int, jobs: int, cpus: list, model_kw: dict, dirs: tuple,
                 out_dir: str, repeats: int, barrier, queue) -> None:
    """One of ``--jobs`` processes: pinned to ``cpus``, scores scans index, index + jobs, ...

    Puts ``(index, [(lesions, per-lesion path s, whole pass s, {stage: s}), ...])`` on
    ``queue``; every
    pass starts at the same moment in all processes (``barrier``).
    """
    if cpus:
        os.sched_setaffinity(0, cpus)
    os.environ["OMP_NUM_THREADS"] = str(max(len(cpus), 1))
    import torch

    torch.set_num_threads(max(len(cpus), 1))
    from rimnet.predictor import Predictor, collect_scans

    model, _ = make_model(**model_kw)
    bids, les, qsm = dirs
    pred = Predictor(model, bids_dir=bids, qsm_dir=qsm, review=False)
    scans = collect_scans(les)[index::jobs]
    pred.predict_scan(scans[0], Path(out_dir))  # warm-up
    passes = []
    for _ in range(repeats):
        barrier.wait()
        n, stages = 0, dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        for scan in scans:
            res = pred.predict_scan(scan, Path(out_dir))
            for k in STAGES:
                stages[k] += res.timings_s.get(k, 0.0)
            n += len(res.table)
        passes.append((n, sum(stages.values()), time.perf_counter() - t0, stages))
    queue.put((index, passes))


def throughput_in_processes(model_kw: dict, dirs: tuple, out_dir: Path, *, jobs: int,
                            repeats: int) -> list[float]:
    """The per-lesion path in ``jobs`` pinned processes at once (``qsmrim predict --jobs``).

    Each process scores its share of the scans on its own cores; a pass starts in all of
    them together. Prints, per pass, each process's lesions, per-lesion path seconds and
    ms per lesion of each stage (patches / rule / CNN), the summed per-lesion-path
    throughput of the processes (sum of lesions / path seconds) and the all-in rate (all
    lesions over the slowest process's whole pass, loading and labelling included).
    """
    import multiprocessing

    from qsm_core.workers import cpu_groups

    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_score_share, args=(i, jobs, g, model_kw, dirs, str(out_dir),
                                                     repeats, barrier, queue))
             for i, g in enumerate(cpu_groups(jobs))]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    figures = []
    for rep in range(repeats):
        rows = [results[i][rep] for i in range(jobs)]
        n = sum(r[0] for r in rows)
        path_rate = sum(r[0] / r[1] for r in rows)
        all_in = n / max(r[2] for r in rows)
        figures.append(path_rate)
        shares = ", ".join(f"{r[0]} lesions in {r[1]:.2f} s (" + " / ".join(
            f"{1e3 * r[3][k] / r[0]:.2f}" for k in STAGES) + ")" for r in rows)
        print(f"[{jobs} processes] pass {rep + 1}/{repeats}: {shares}; per-lesion path "
              f"{path_rate:.0f} lesions/s (target >= 500: "
              f"{'PASS' if path_rate >= 500 else 'FAIL'}); all-in {all_in:.0f} lesions/s; "
              f"load average {load_avg()}")
    return figures


def batch_prefetch(predictor, scans, out_dir: Path, *, repeats: int) -> list[float]:
    """Whole ``run_batch`` wall (load, score, write) without and with prefetch, interleaved.

    Returns the ratios wall(no prefetch) / wall(prefetch), one per pass.
    """
    from rimnet.predictor import run_batch

    run_batch(scans[:1], out_dir / "warm", predictor=predictor, progress=False)
    ratios = []
    for rep in range(repeats):
        walls = {}
        for prefetch in (False, True):
            load0 = load_avg()
            t0 = time.perf_counter()
            s = run_batch(scans, out_dir / f"{prefetch}", predictor=predictor, progress=False,
                          overwrite=True, prefetch=prefetch)
            walls[prefetch] = time.perf_counter() - t0
            n = sum(json.loads(f.read_text())["n_lesions"]
                    for f in (out_dir / f"{prefetch}").glob("sub-*/**/*_scan.json"))
            print(f"[batch] pass {rep + 1}/{repeats} prefetch={'on ' if prefetch else 'off'}: "
                  f"{len(s['done'])} scans, {n} lesions in {walls[prefetch]:.2f} s "
                  f"({walls[prefetch] / len(scans):.2f} s/scan, {n / walls[prefetch]:.0f} "
                  f"lesions/s incl. loading and writing); load average {load0} -> {load_avg()}")
        ratios.append(walls[False] / walls[True])
        print(f"[batch] pass {rep + 1}: wall without / with prefetch = {ratios[-1]:.2f}")
    return ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scans", type=int, default=8, help="synthetic scans (20-40 lesions each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="model directory (default: packaged, else untrained)")
    ap.add_argument("--no-cnn", action="store_true", help="rule-based detector only")
    ap.add_argument("--tta", choices=("none", "flip", "d4", "d4z"),
                    help="test-time augmentation (default: the model's)")
    ap.add_argument("--folds", type=int, help="number of fold networks to use")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="CNN arithmetic (qsmrim predict --precision)")
    ap.add_argument("--patch-voxels", type=int,
                    help="speed only: cut P-sample patches of P mm (1 mm sampling) and run the "
                         "model's networks on them, as a model trained on that size would run "
                         "(the scores are meaningless)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="score the synthetic scans in this many processes at once, each "
                         "pinned to its share of the cores (qsmrim predict --jobs); "
                         "--threads is then ignored")
    ap.add_argument("--bids", help="BIDS dataset (FLAIR; raw MEGRE for the recon timing)")
    ap.add_argument("--lesions", help="lesion-map folder of --bids")
    ap.add_argument("--qsm", help="Chimaps of --bids: measure the throughput on these scans")
    ap.add_argument("--participant-label", nargs="*", default=None)
    ap.add_argument("--batch", action="store_true",
                    help="with --qsm: also time whole batches (run_batch) without and with "
                         "prefetching the next scan's files")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from rimnet.predictor import Predictor, collect_scans, default_model_dir

    model_dir = args.model or (default_model_dir() if default_model_dir().is_dir() else None)
    model_kw = dict(model_dir=None if model_dir is None else str(model_dir),
                    no_cnn=args.no_cnn, tta=args.tta, folds=args.folds,
                    precision=args.precision, patch_voxels=args.patch_voxels)
    model, what = make_model(**model_kw)
    print(f"threads={args.threads} (torch {torch.get_num_threads()})  CNN: {what}")

    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        t0 = time.perf_counter()
        bids, les, qsm, n = write_synthetic_dataset(tmp / "data", np.random.default_rng(
            args.seed), n_scans=args.scans)
        print(f"synthetic: {args.scans} scans {SHAPE} at 1 mm, {n} lesion blobs written in "
              f"{time.perf_counter() - t0:.1f} s")
        if args.jobs > 1:
            throughput_in_processes(model_kw, (bids, les, qsm), tmp / "out_jobs",
                                    jobs=args.jobs, repeats=args.repeats)
        else:
            pred = Predictor(model, bids_dir=bids, qsm_dir=qsm, review=False)
            throughput(pred, collect_scans(les), tmp / "out", repeats=args.repeats,
                       label="synthetic")
        if args.bids and args.lesions and args.qsm:
            pred = Predictor(model, bids_dir=args.bids, qsm_dir=args.qsm, review=False)
            scans = collect_scans(args.lesions, participant_labels=args.participant_label)
            throughput(pred, scans, tmp / "out2", repeats=args.repeats,
                       label=f"{Path(args.qsm).name} ({len(scans)} scans)")
            if args.batch:
                batch_prefetch(pred, scans, tmp / "out3", repeats=args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.bids and args.lesions and not args.qsm:
        from qsmrim.cli.main import main as cli

        out = Path(tempfile.mkdtemp(prefix="bench_predict_"))
        argv = ["predict", args.bids, str(out), "--lesions", args.lesions, "--no-review"]
        if args.participant_label:
            argv += ["--participant-label", *args.participant_label]
        argv += ["--model", str(model_dir)] if model_dir and not args.no_cnn else ["--no-cnn"]
        if model_dir and args.tta:
            argv += ["--tta", args.tta]
        t0 = time.perf_counter()
        rc = cli(argv)
        wall = time.perf_counter() - t0
        for f in sorted(out.glob("sub-*/**/*_scan.json")):
            d = json.loads(f.read_text())
            print(f"  {d['scan']}: {d['n_lesions']} lesions, stages {d['timings_s']}")
        n_scans = len(list(out.glob("sub-*/**/*_scan.json")))
        print(f"predict from raw GRE: {n_scans} scan(s) in {wall:.1f} s (exit {rc}); "
              f"{wall / max(n_scans, 1):.1f} s per scan; target <= 45 s: "
              f"{'PASS' if wall / max(n_scans, 1) <= 45 else 'FAIL'}")
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
