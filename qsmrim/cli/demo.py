"""``qsmrim demo [OUT_DIR] [--quick]``: the whole product on simulated data, in one command.

The demo runs exactly the commands a user would type, in order, and prints each of them:

1. ``qsmrim simulate`` a training cohort and a separate, differently seeded test cohort;
2. ``qsmrim recon`` both (multi-echo GRE -> iLSQR QSM);
3. ``qsmrim train`` the rim CNN on the training cohort (patient-grouped cross-validation);
4. ``qsmrim predict`` on the test cohort with the CNN just trained (and the rule-based
   detector), and again with the packaged default model when it is installed;
5. ``qsmrim evaluate`` against readers, consensus and the simulation's ground truth.

The demo's cohorts are small so that it runs in minutes on a laptop: its freshly trained
CNN sees a few hundred lesions and is a demonstration of the workflow, not a good model.
The packaged default model (trained by ``scripts/make_default_model.sh`` on a larger
simulated cohort) is scored beside it.

Every step resumes: rerunning the demo in the same folder skips finished work.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qsm_core.errors import InputError


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run.

    ``workers`` is the number of simulator processes, and of scans that ``recon``
    reconstructs at once on the CPU (``--jobs``).
    """

    train_subjects: int
    test_subjects: int
    voxel_size_mm: float
    sessions_mean: float
    folds: int
    epochs: int
    n_boot: int
    workers: int


FULL = DemoPlan(train_subjects=16, test_subjects=16, voxel_size_mm=1.5, sessions_mean=1.0,
                folds=3, epochs=20, n_boot=1000, workers=2)
QUICK = DemoPlan(train_subjects=6, test_subjects=6, voxel_size_mm=2.0, sessions_mean=1.0,
                 folds=2, epochs=6, n_boot=200, workers=2)


def add_parser(parser: argparse.ArgumentParser, name: str) -> None:
    """Fill the subcommand's parser."""
    parser.add_argument("out_dir", nargs="?", default="qsmrim-demo", metavar="OUT_DIR",
                        help="working folder (default: ./qsmrim-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller cohorts and a shorter training (a few minutes)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the training cohort; the test cohort uses seed + 1000")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="device for reconstruction and training (default: cpu)")


def _steps(out: Path, plan: DemoPlan, *, seed: int, device: str) -> list[tuple[str, list[str]]]:
    vox = [str(plan.voxel_size_mm)] * 3
    train, test = out / "train", out / "test"
    # the simulation grid equals the output grid (fast); one scan per patient
    common_sim = ["--preset", "seed-study", "--voxel-size", *vox, "--anatomy-voxel-size", *vox,
                  "--set", f"MS.sessions_mean={plan.sessions_mean}",
                  "--set", f"NMOSD.sessions_mean={plan.sessions_mean}",
                  "--workers", str(plan.workers), "--no-progress"]
    # on the CPU, scans side by side (the pipeline's preprocessing is mostly one thread)
    recon_jobs = ["--jobs", str(plan.workers)] if device == "cpu" else []
    predictions = [str(test / "predictions" / "predictions.tsv")]
    scorers = ["cnn", "rule"]
    default_step = []
    if _default_model_installed():
        # its table's scorers are renamed after its folder: default_model_cnn
        predictions.append(str(test / "default_model" / "predictions.tsv"))
        scorers.append("default_model_cnn")
        default_step = [
            ("score the test cohort with the packaged default model",
             ["predict", str(test / "bids"), str(test / "default_model"),
              "--lesions", str(test / "bids" / "derivatives" / "lesions"),
              "--qsm", str(test / "qsm"), "--device", device, "--no-review"])]
    return [
        ("simulate the training cohort",
         ["simulate", str(train / "bids"), "--subjects", str(plan.train_subjects),
          "--seed", str(seed), *common_sim]),
        ("simulate the held-out test cohort",
         ["simulate", str(test / "bids"), "--subjects", str(plan.test_subjects),
          "--seed", str(seed + 1000), *common_sim]),
        ("reconstruct QSM (training cohort)",
         ["recon", str(train / "bids"), str(train / "qsm"), "--device", device, *recon_jobs]),
        ("reconstruct QSM (test cohort)",
         ["recon", str(test / "bids"), str(test / "qsm"), "--device", device, *recon_jobs]),
        ("train the rim CNN",
         ["train", str(train / "bids"), "--qsm", str(train / "qsm"),
          "--lesions", str(train / "bids" / "derivatives" / "lesions"),
          "--labels", str(train / "bids" / "derivatives" / "lesions" / "lesions.tsv"),
          "--label-column", "consensus", "--folds", str(plan.folds),
          "--epochs", str(plan.epochs), "--seed", str(seed), "--device", device,
          "--out", str(out / "model"), "--resume", "--no-progress"]),
        ("score the test cohort's lesions",
         ["predict", str(test / "bids"), str(test / "predictions"),
          "--lesions", str(test / "bids" / "derivatives" / "lesions"),
          "--qsm", str(test / "qsm"), "--model", str(out / "model"), "--device", device]),
        *default_step,
        ("evaluate against readers, consensus and ground truth",
         ["evaluate", "--participants", str(test / "bids" / "participants.tsv"),
          "--lesions", str(test / "bids" / "derivatives" / "lesions" / "lesions.tsv"),
          "--predictions", *predictions,
          "--scorers", *scorers, "--scored-only", "--n-boot", str(plan.n_boot),
          "--title", "qsmrim demo: held-out simulated cohort",
          "--out", str(out / "report")]),
    ]


def _default_model_installed() -> bool:
    from rimnet.predictor import default_model_dir

    return (default_model_dir() / "config.json").is_file()


def _marker(out: Path, argv: list[str]) -> Path:
    """The file that records a finished step (named by the step's command)."""
    digest = hashlib.sha1(shlex.join(argv).encode()).hexdigest()[:12]
    return out / ".demo" / f"{argv[0]}-{digest}.done"


def run(args: argparse.Namespace) -> int:
    """Run every step, print the commands and where the report is."""
    from qsmrim.cli.main import main

    plan = QUICK if args.quick else FULL
    out = Path(args.out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another OUT_DIR")
    steps = _steps(out, plan, seed=args.seed, device=args.device)
    t0 = time.perf_counter()
    print(f"qsmrim demo ({'quick' if args.quick else 'full'}) in {out}", flush=True)
    for i, (title, argv) in enumerate(steps, start=1):
        head = f"[{i}/{len(steps)}] {title}"
        marker = _marker(out, argv)
        if marker.exists():
            print(f"{head}: done in an earlier run, skipped", flush=True)
            continue
        print(f"{head}\n      $ qsmrim {shlex.join(argv)}", flush=True)
        t = time.perf_counter()
        status = main(argv)
        if status != 0:
            print(f"qsmrim demo: step {i} ({title}) failed with status {status}; fix the "
                  "error above and rerun the demo to resume from this step", file=sys.stderr)
            return status
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(shlex.join(argv) + "\n")
        print(f"      finished in {time.perf_counter() - t:.0f} s", flush=True)
    report = out / "report" / "report.html"
    print(f"demo finished in {time.perf_counter() - t0:.0f} s\nreport: {report}")
    return 0
