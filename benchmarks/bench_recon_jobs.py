"""Batch reconstruction throughput: ``qsmrim recon --jobs N`` against one scan at a time.

    python benchmarks/bench_recon_jobs.py [--bids DIR] [--scans 4] [--jobs 1 2] [--rounds 2]

Runs ``qsmrim recon`` (in this process, through the command line's own entry point) on the
same ``--scans`` scans once per ``--jobs`` value and round, each time into a fresh output
folder, alternating the order of the settings from round to round, and prints seconds per
scan (wall) and the throughput of each setting relative to the first. Worker start-up and
numba's first compilation are part of each run, as they are for a user.

Without ``--bids`` it first simulates ``--scans`` MS scans (``qsmrim simulate --preset
ms-only --subjects N --seed 11``, 1 mm, Siemens preset) into a temporary folder. The first
recon of the first round also warms numba's on-disk cache; run with ``--rounds 2`` or more
and read the later rounds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path


def simulate(root: Path, n: int) -> Path:
    from qsmrim.cli.main import main as qsmrim

    bids = root / "bids"
    rc = qsmrim(["simulate", str(bids), "--preset", "ms-only", "--subjects", str(n),
                 "--seed", "11", "--set", "MS.sessions_mean=1", "--workers", "2",
                 "--no-progress"])
    if rc != 0:
        sys.exit(f"simulate failed (exit {rc})")
    return bids


def participants(bids: Path, n: int) -> list[str]:
    subs = sorted(p.name for p in bids.glob("sub-*") if p.is_dir())
    if len(subs) < n:
        sys.exit(f"{bids}: {len(subs)} participants, fewer than --scans {n}")
    return subs[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bids", type=Path, help="BIDS dataset with MEGRE scans (default: simulate)")
    p.add_argument("--scans", type=int, default=4)
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    from qsmrim.cli.main import main as qsmrim

    work = Path(tempfile.mkdtemp(prefix="bench_recon_jobs_"))
    try:
        bids = args.bids or simulate(work, args.scans)
        subs = participants(bids, args.scans)
        print(f"{len(subs)} scans of {bids}: {' '.join(subs)}")
        times: dict[int, list[float]] = {j: [] for j in args.jobs}
        for r in range(args.rounds):
            order = args.jobs if r % 2 == 0 else args.jobs[::-1]
            for jobs in order:
                out = work / f"out_{r}_{jobs}"
                t0 = time.perf_counter()
                rc = qsmrim(["recon", str(bids), str(out), "--participant-label", *subs,
                             "--jobs", str(jobs), "--no-progress"])
                wall = time.perf_counter() - t0
                if rc != 0:
                    sys.exit(f"recon --jobs {jobs} failed (exit {rc})")
                times[jobs].append(wall)
                print(f"round {r + 1}, --jobs {jobs}: {wall:.1f} s, "
                      f"{wall / len(subs):.1f} s per scan", flush=True)
                shutil.rmtree(out)
        base = args.jobs[0]
        print("\nsetting | s per scan, each round | throughput vs --jobs "
              f"{base}, each round")
        for jobs in args.jobs:
            per = " / ".join(f"{t / len(subs):.1f}" for t in times[jobs])
            rel = " / ".join(f"{b / t:.2f}" for b, t in zip(times[base], times[jobs]))
            print(f"--jobs {jobs} | {per} | {rel}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
