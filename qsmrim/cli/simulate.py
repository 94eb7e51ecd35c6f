"""``qsmrim simulate OUT_DIR``: simulate an MS/NMOSD cohort as a BIDS dataset."""

from __future__ import annotations

import argparse

from qsm_core.errors import InputError
from qsmrim.cli import add_no_progress


def add_parser(parser: argparse.ArgumentParser, name: str) -> None:
    """Fill the subcommand's parser."""
    from qsm_core.dipole import DIPOLE_KERNELS
    from training.simulate.acquisition import ORIENTATIONS, SCANNERS
    from training.simulate.presets import PRESETS

    parser.add_argument("out_dir", metavar="OUT_DIR", help="dataset folder to create")
    parser.add_argument("--preset", default="seed-study", choices=sorted(PRESETS),
                        help="cohort preset (default: seed-study)")
    parser.add_argument("--subjects", type=int, default=10, help="number of participants")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--scanner", default="siemens", choices=sorted(SCANNERS),
                        help="GRE protocol preset (default: siemens)")
    parser.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0),
                        metavar=("X", "Y", "Z"), help="GRE voxel size in mm (default 1 1 1)")
    parser.add_argument("--flair-voxel-size", type=float, nargs=3, default=None,
                        metavar=("X", "Y", "Z"), help="FLAIR voxel size in mm (default: GRE)")
    parser.add_argument("--anatomy-voxel-size", type=float, nargs=3, default=None,
                        metavar=("X", "Y", "Z"),
                        help="simulation grid in mm (default 1 1 1; e.g. 1.5 1.5 1.5 with "
                             "--voxel-size 1.5 1.5 1.5 is ~3x faster, for demos)")
    parser.add_argument("--snr", type=float, default=None,
                        help="white-matter SNR at TE=0 (default: the scanner preset's)")
    parser.add_argument("--max-tilt", type=float, default=5.0,
                        help="maximum head tilt relative to B0 in degrees (default 5)")
    parser.add_argument("--forward-kernel", default="continuous",
                        choices=list(DIPOLE_KERNELS),
                        help="dipole kernel of the simulated fields: continuous (default, the "
                             "kernel qsmrim inverts with) or discrete (finite-difference; "
                             "data whose forward model the inversion does not share)")
    parser.add_argument("--background-blur", type=float, default=None, metavar="VOXELS",
                        help="partial-volume blur (Gaussian sigma, voxels) of the "
                             "susceptibility outside the brain in the forward model (default "
                             "1); 0 = point-sampled air edges, as before 2026-11-22, whose "
                             "Gibbs ringing reaches into the brain when B0 is tilted")
    parser.add_argument("--field-strength", type=float, default=None, metavar="TESLA",
                        help="B0 in tesla (default: the scanner preset's, 3); phase accrues "
                             "and R2* grows in proportion, echo times and SNR stay the "
                             "preset's")
    parser.add_argument("--orientation", default="axial", choices=sorted(ORIENTATIONS),
                        help="storage orientation of the images (default axial); sagittal "
                             "and coronal write the same scan with permuted, flipped voxel "
                             "axes, as other slab orientations are stored")
    parser.add_argument("--anatomy", default="mni", choices=["mni", "procedural"],
                        help="head model (default: MNI152 2009 template)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="change a preset value, e.g. --set MS.lesion_prl_fraction=0.3 "
                             "or --set lesions_mean=8 (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUT_DIR")
    parser.add_argument("--tables-only", action="store_true",
                        help="write participants.tsv and lesions.tsv without images")
    parser.add_argument("--report", action="store_true",
                        help="write a calibration report to derivatives/simulation/")
    add_no_progress(parser)


def _overrides(items: list[str]) -> dict:
    out = {}
    for it in items:
        key, sep, value = it.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set expects KEY=VALUE, got {it!r}")
        out[key.strip()] = value.strip()
    return out


def run(args: argparse.Namespace) -> int:
    """Simulate and write the dataset; print where it is."""
    from training.simulate.cohort import simulate_cohort

    blur = ({} if args.background_blur is None
            else {"background_blur_voxels": args.background_blur})
    out = simulate_cohort(
        args.out_dir, preset=args.preset, n_subjects=args.subjects, seed=args.seed,
        scanner=args.scanner, voxel_size_mm=tuple(args.voxel_size),
        flair_voxel_size_mm=None if args.flair_voxel_size is None
        else tuple(args.flair_voxel_size),
        workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
        tables_only=args.tables_only, report=args.report, source=args.anatomy,
        snr=args.snr, max_tilt_deg=args.max_tilt, forward_kernel=args.forward_kernel,
        field_strength_t=args.field_strength, orientation=args.orientation,
        overrides=_overrides(args.overrides), **blur,
        anatomy_voxel_mm=None if args.anatomy_voxel_size is None
        else tuple(args.anatomy_voxel_size))
    print(f"simulated cohort written to {out}")
    if args.report:
        print(f"calibration report: {out / 'derivatives' / 'simulation' / 'calibration.md'}")
    return 0
