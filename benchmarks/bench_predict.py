"""Inference speed of qsmrim predict (issue 4 targets).

1. Lesion throughput excluding reconstruction: patch extraction + rule-based detector + CNN,
   on a synthetic 1 mm scan (160 x 192 x 160) holding ``--n-lesions`` ovoid lesions, with
   ``--threads`` CPU threads (target: >= 500 lesions/s on 2 cores). The CNN is ``--model`` or
   the packaged default model, else an untrained network with the training defaults
   (resnet, 5 folds, flip TTA): speed does not depend on the weights.
2. Optional (``--bids DIR --lesions DIR``): wall time of ``qsmrim predict`` for one scan
   reconstructed from raw GRE on the fly (target: <= 45 s).

Usage::

    python benchmarks/bench_predict.py [--threads 2] [--n-lesions 400] [--model DIR]
        [--tta none|flip|d4|d4z] [--folds K]
        [--bids sim/ --lesions sim/derivatives/lesions --participant-label 001]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_scan(n_lesions: int, rng, shape=(160, 192, 160)):
    g = [np.arange(s, dtype=np.float32) for s in shape]
    chi = rng.normal(-0.02, 0.01, shape).astype(np.float32)
    flair = rng.normal(100, 5, shape).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    for k in range(1, n_lesions + 1):
        c = [rng.uniform(12, s - 12) for s in shape]
        r = rng.uniform(1.8, 5.0, size=3)
        sl = tuple(slice(int(max(ci - ri - 1, 0)), int(min(ci + ri + 2, s)))
                   for ci, ri, s in zip(c, r, shape))
        x, y, z = np.meshgrid(*[g[a][sl[a]] for a in range(3)], indexing="ij")
        m = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
        sub = labels[sl]
        sub[m & (sub == 0)] = k
        flair[sl][m] += 100
        if k % 8 == 0:
            chi[sl][m] += 0.04
    return chi, flair, labels


def default_like_model(patch_voxels: int, *, tta=None, n_folds=None):
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
    return RimCNN(nets, config=config), f"untrained {cfg.arch} x{k} folds, tta={config['tta']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-lesions", type=int, default=400)
    ap.add_argument("--model", help="model directory (default: packaged, else untrained)")
    ap.add_argument("--tta", choices=("none", "flip", "d4", "d4z"),
                    help="test-time augmentation (default: the model's)")
    ap.add_argument("--folds", type=int, help="number of fold networks to use")
    ap.add_argument("--bids", help="BIDS dataset with raw MEGRE (for the end-to-end timing)")
    ap.add_argument("--lesions", help="lesion-map folder of --bids")
    ap.add_argument("--participant-label", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from rimnet.lesions import lesion_table
    from rimnet.patches import extract_patches
    from rimnet.predictor import default_model_dir, load_model
    from rimnet.rule_based import RuleBasedRimDetector

    rng = np.random.default_rng(0)
    chi, flair, labels = synthetic_scan(args.n_lesions, rng)
    aff = np.eye(4)
    table = lesion_table(labels, aff, participant_id="sub-01")
    n = len(table)
    model_dir = args.model or (default_model_dir() if default_model_dir().is_dir() else None)
    if model_dir is not None:
        folds = list(range(args.folds)) if args.folds else None
        model = load_model(model_dir, tta=args.tta, folds=folds)
        what = f"{model!r} from {model_dir}"
    else:
        model, what = default_like_model(32, tta=args.tta, n_folds=args.folds)
    ids = table["lesion_id"].to_numpy()
    cents = table[["centroid_i", "centroid_j", "centroid_k"]].to_numpy()

    t0 = time.perf_counter()
    patches = extract_patches({"qsm": chi, "flair": flair}, labels, ids, voxel_size_mm=(1, 1, 1),
                              patch_mm=model.patch_mm, patch_voxels=model.patch_voxels,
                              channels=model.channels, centroids_vox=cents)
    t_patch = time.perf_counter() - t0
    rule = RuleBasedRimDetector(channels=model.channels, patch_mm=model.patch_mm).fit(patches[:1])
    t0 = time.perf_counter()
    rule.score_and_call(patches)
    t_rule = time.perf_counter() - t0
    model.predict_proba(patches[:8])  # warm-up
    t0 = time.perf_counter()
    model.predict_proba(patches)
    t_cnn = time.perf_counter() - t0
    total = t_patch + t_rule + t_cnn
    print(f"threads={args.threads}  lesions={n}  CNN: {what}")
    for name, t in (("patch extraction", t_patch), ("rule-based", t_rule), ("CNN", t_cnn),
                    ("total (no recon)", total)):
        print(f"  {name:18s} {t:7.2f} s  {n / t:8.0f} lesions/s  {1e3 * t / n:6.2f} ms/lesion")
    print(f"  target >= 500 lesions/s: {'PASS' if n / total >= 500 else 'FAIL'}; "
          f"without the CNN {n / (t_patch + t_rule):.0f} lesions/s")

    if args.bids:
        from qsmrim.cli.main import main as cli

        out = Path(tempfile.mkdtemp(prefix="bench_predict_"))
        argv = ["predict", args.bids, str(out), "--lesions", args.lesions, "--no-review"]
        if args.participant_label:
            argv += ["--participant-label", args.participant_label]
        argv += ["--model", str(model_dir)] if model_dir else ["--no-cnn"]
        if model_dir and args.tta:
            argv += ["--tta", args.tta]
        t0 = time.perf_counter()
        rc = cli(argv)
        wall = time.perf_counter() - t0
        import json

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
