"""Simulator benchmarks: calibration of a 53-patient seed-study cohort, and cohort speed.

    python benchmarks/bench_simulate.py calibration [--subjects 53] [--seed 0]
    python benchmarks/bench_simulate.py speed [--subjects 10] [--workers 2] [--voxel-size 1 1 1]

``calibration`` plans the cohort (tables only, no images) and prints per-group lesion counts,
per-lesion and per-patient PRL prevalence (truth and consensus) against the preset, pairwise
reader kappa and consensus-vs-truth accuracy. ``speed`` renders a whole cohort to a temporary
folder and prints the wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def calibration(args) -> dict:
    from training.simulate.cohort import plan_cohort
    from training.simulate.report import calibration_report

    t0 = time.perf_counter()
    plan = plan_cohort(args.preset, n_subjects=args.subjects, seed=args.seed,
                       scanner=args.scanner, voxel_size_mm=tuple(args.voxel_size))
    rep = calibration_report(plan)
    dt = time.perf_counter() - t0
    print(f"planned {args.subjects} subjects ({rep['n_lesions_total']} lesion rows) in "
          f"{dt:.1f} s (tables only; includes loading the template)")
    for name, g in rep["groups"].items():
        print(f"[{name}] patients {g['n_patients']}, lesions/patient "
              f"{g['lesions_per_patient_mean']:.1f} ± {g['lesions_per_patient_sd']:.1f} "
              f"(target {g['lesions_per_patient_target'][0]} ± "
              f"{g['lesions_per_patient_target'][1]}), without lesions "
              f"{g['patients_without_lesions']:.2f} (target "
              f"{g['patients_without_lesions_target']:.2f})")
        print(f"    per-lesion PRL: truth {g['lesion_prl_fraction_truth']:.3f}, consensus "
              f"{g['lesion_prl_fraction_consensus']:.3f}, target "
              f"{g['lesion_prl_fraction_target']:.3f}")
        print(f"    per-patient >=1 PRL: truth {g['patient_prl_fraction_truth']:.3f}, consensus "
              f"{g['patient_prl_fraction_consensus']:.3f}, target "
              f"{g['patient_prl_fraction_target']:.3f}")
        print(f"    scans/patient {g['scans_per_patient_mean']:.2f} (target mean "
              f"{g['scans_per_patient_target_mean']})")
    print("pairwise reader kappa: " + ", ".join(f"{k} {v:.3f}"
                                                for k, v in rep["pairwise_kappa"].items())
          + f" (mean {rep['mean_pairwise_kappa']:.3f})")
    print("readers vs truth kappa: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                 rep["reader_vs_truth_kappa"].items()))
    print(f"consensus vs truth: {json.dumps(rep['consensus_vs_truth'])}")
    print(f"follow-up: {json.dumps(rep['followup'])}")
    return rep


def speed(args) -> float:
    import resource

    from training.simulate.anatomy import base_anatomy
    from training.simulate.cohort import simulate_cohort

    def cpu_s():
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    tmp = Path(tempfile.mkdtemp(prefix="bench_sim_"))
    try:
        c0 = cpu_s()
        t0 = time.perf_counter()
        base_anatomy("mni", (1.0, 1.0, 1.0), None)
        t_tpl = time.perf_counter() - t0
        out = simulate_cohort(tmp / "ds", preset=args.preset, n_subjects=args.subjects,
                              seed=args.seed, scanner=args.scanner,
                              voxel_size_mm=tuple(args.voxel_size), workers=args.workers,
                              progress=True)
        dt = time.perf_counter() - t0
        cpu = cpu_s() - c0
        n_scans = sum(1 for _ in out.glob("sub-*/ses-*"))
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        print(f"{args.subjects} subjects, {n_scans} scans, voxel {args.voxel_size} mm, "
              f"scanner {args.scanner}, {args.workers} workers: {dt:.1f} s total "
              f"({t_tpl:.1f} s template), {dt / n_scans:.1f} s per scan, "
              f"{dt / args.subjects:.1f} s per subject, {size:.0f} MB written; CPU time "
              f"{cpu:.1f} s ({cpu / n_scans:.1f} s per scan), i.e. {cpu / args.workers:.0f} s "
              f"of wall time on {args.workers} otherwise idle cores")
        return dt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["calibration", "speed"])
    p.add_argument("--preset", default="seed-study")
    p.add_argument("--subjects", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scanner", default="siemens")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    args = p.parse_args()
    if args.subjects is None:
        args.subjects = 53 if args.what == "calibration" else 10
    calibration(args) if args.what == "calibration" else speed(args)


if __name__ == "__main__":
    main()
