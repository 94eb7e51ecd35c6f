"""``qsmrim recon``: multi-echo GRE -> QSM, from a BIDS dataset or from explicit files.

BIDS mode::

    qsmrim recon BIDS_DIR OUT_DIR [--participant-label L ...] [--session-label S ...]
                 [--method ilsqr|tkd|tikhonov] [--bgremove vsharp|pdf|lbv]
                 [--mask FILE | --mask-dir DIR]
                 [--device cpu|cuda] [--phase-sign 1|-1] [--overwrite]

Explicit files (no BIDS layout needed)::

    qsmrim recon --magnitude M1 M2 ... --phase P1 P2 ... --echo-times T1 T2 ...
                 --field-strength 3 --out OUT_DIR [--participant-label L] [...same options]

Scans are processed one at a time under a progress bar, or ``--jobs N`` at a time in N
worker processes that share the CPUs out between them. A failing scan is reported,
listed in ``OUT_DIR/qsmrim_failures.tsv`` and skipped; the others finish. A scan whose
Chimap already exists is skipped (resume) unless ``--overwrite``. Exit status: 0 all
done, 2 some scan had bad input (and nothing worse), 1 some scan failed otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

from qsm_core.errors import InputError, QSMRimError
from qsm_core.workers import pinned_pool
from qsmrim.cli import add_no_progress, picklable_options

logger = logging.getLogger(__name__)

INVERSION_CHOICES = ("ilsqr", "tkd", "tikhonov")
BGREMOVE_CHOICES = ("vsharp", "pdf", "lbv")
FAILURES_FILE = "qsmrim_failures.tsv"


def add_parser(parser: argparse.ArgumentParser, name: str = "recon") -> None:
    """Fill the ``recon`` parser."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  qsmrim recon bids/ bids/derivatives/qsmrim --participant-label 01 02\n"
        "  qsmrim recon --magnitude m1.nii.gz m2.nii.gz --phase p1.nii.gz p2.nii.gz \\\n"
        "               --echo-times 0.0072 0.0134 --field-strength 3 --out qsm/ "
        "--participant-label 01\n"
        "outputs: OUT_DIR/sub-L/[ses-S/]anat/sub-L[_ses-S]_{Chimap,desc-brain_mask,"
        "desc-local_fieldmap,swi,minIP}.nii.gz + JSON sidecars")
    parser.add_argument("bids_dir", nargs="?", metavar="BIDS_DIR",
                        help="BIDS dataset with multi-echo GRE (MEGRE) scans")
    parser.add_argument("out_dir", nargs="?", metavar="OUT_DIR",
                        help="derivatives folder to write (e.g. BIDS_DIR/derivatives/qsmrim)")
    sel = parser.add_argument_group("selection")
    sel.add_argument("--participant-label", nargs="+", metavar="L",
                     help="participants to process ('01' or 'sub-01'); with explicit files, "
                          "the one label naming the outputs")
    sel.add_argument("--session-label", nargs="+", metavar="S",
                     help="sessions to process ('1' or 'ses-1'); with explicit files, the "
                          "one session naming the outputs")
    exp = parser.add_argument_group("explicit files (instead of BIDS_DIR OUT_DIR)")
    exp.add_argument("--magnitude", nargs="+", metavar="FILE",
                     help="magnitude images, one per echo in echo order, or one 4D series")
    exp.add_argument("--phase", nargs="+", metavar="FILE",
                     help="phase images matching --magnitude")
    exp.add_argument("--echo-times", nargs="+", type=float, metavar="TE_S",
                     help="echo times in SECONDS (default: EchoTime of JSON sidecars next to "
                          "the files)")
    exp.add_argument("--out", metavar="OUT_DIR", help="output folder (explicit-files mode)")
    acq = parser.add_argument_group("acquisition (override the sidecars)")
    acq.add_argument("--field-strength", type=float, metavar="T",
                     help="B0 in tesla (default: MagneticFieldStrength of the sidecars)")
    acq.add_argument("--phase-units", choices=("auto", "rad", "deg", "arbitrary"),
                     help="phase units (default: the phase sidecar's Units, else detected); "
                          "vendor integer scaling is detected and rescaled")
    acq.add_argument("--phase-sign", type=int, choices=(1, -1), default=1,
                     help="+1: phase = phi0 + 2 pi f TE (default, right-handed); -1 for "
                          "data in the opposite convention (without it, paramagnetic "
                          "sources come out dark)")
    alg = parser.add_argument_group("algorithm")
    alg.add_argument("--method", choices=INVERSION_CHOICES, default="ilsqr",
                     help="dipole inversion (default: ilsqr)")
    alg.add_argument("--bgremove", choices=BGREMOVE_CHOICES, default="vsharp",
                     help="background field removal (default: vsharp)")
    alg.add_argument("--mask", metavar="FILE",
                     help="user brain mask on the GRE grid (wins over the automatic mask); "
                          "only when one scan is processed")
    alg.add_argument("--mask-dir", metavar="DIR",
                     help="folder with BIDS-named masks <name>_desc-brain_mask.nii.gz, one per "
                          "scan (e.g. an earlier qsmrim output)")
    alg.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                     help="compute device (default: cpu)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="scans reconstructed at the same time, in N worker processes that "
                             "split the CPUs between them (default 1: one scan at a time on "
                             "all of them); each holds one scan in memory (1.3 GB peak for a "
                             "4-echo 185x221x175 head). BIDS mode and --device cpu only")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute scans whose Chimap exists (default: skip them)")
    add_no_progress(parser)


# --------------------------------------------------------------------- selection
def _select_scans(args) -> tuple[list, Path, Path | None]:
    """Scans to process, the output folder and the BIDS root (None for explicit files)."""
    from qsm_core.io.bids import discover_scans, normalise_label, scan_from_files

    explicit = args.magnitude is not None or args.phase is not None
    if explicit:
        if args.magnitude is None or args.phase is None:
            raise InputError("explicit-files mode needs both --magnitude and --phase")
        if args.bids_dir is not None:
            raise InputError(f"unexpected positional argument {args.bids_dir!r} with "
                             "--magnitude/--phase; give the output folder with --out")
        if args.out is None:
            raise InputError("explicit-files mode needs --out OUT_DIR")
        if args.participant_label and len(args.participant_label) > 1:
            raise InputError("with explicit files give one --participant-label (it names the "
                             "outputs)")
        if args.session_label and len(args.session_label) > 1:
            raise InputError("with explicit files give at most one --session-label")
        scan = scan_from_files(
            args.magnitude, args.phase, te_s=args.echo_times,
            field_strength_t=args.field_strength, phase_units=args.phase_units,
            participant_id=(args.participant_label or [None])[0],
            session_id=(args.session_label or [None])[0])
        return [scan], Path(args.out), None
    if args.bids_dir is None or args.out_dir is None:
        raise InputError("give BIDS_DIR and OUT_DIR, or explicit files with --magnitude, "
                         "--phase, --echo-times, --field-strength and --out")
    if args.out is not None:
        raise InputError("--out is for explicit-files mode; in BIDS mode OUT_DIR is the second "
                         "positional argument")
    if args.echo_times is not None:
        raise InputError("--echo-times is for explicit files; in BIDS mode the sidecars' "
                         "EchoTime are used")
    bids_dir, out_dir = Path(args.bids_dir), Path(args.out_dir)
    if out_dir.resolve() == bids_dir.resolve():
        raise InputError(f"{out_dir}: the output folder must not be the BIDS folder itself; "
                         "use e.g. BIDS_DIR/derivatives/qsmrim")
    scans = discover_scans(bids_dir, participant_labels=args.participant_label)
    if args.session_label:
        want = {normalise_label(s, "ses") for s in args.session_label}
        scans = [s for s in scans if s.session_id in want]
        if not scans:
            raise InputError(f"{bids_dir}: no MEGRE scan in session(s) {sorted(want)}; check "
                             "--session-label")
    for s in scans:
        s.field_strength_override_t = args.field_strength
        s.phase_units_override = args.phase_units
    return scans, out_dir, bids_dir


def _check_options(args, scans) -> None:
    if args.mask is not None and args.mask_dir is not None:
        raise InputError("give either --mask or --mask-dir, not both")
    if args.mask is not None:
        if len(scans) != 1:
            raise InputError(f"--mask {args.mask} applies to one scan but {len(scans)} are "
                             "selected; select one with --participant-label/--session-label, "
                             "or use --mask-dir with one BIDS-named mask per scan")
        if not Path(args.mask).is_file():
            raise InputError(f"{args.mask}: no such mask file; check --mask")
    if args.mask_dir is not None and not Path(args.mask_dir).is_dir():
        raise InputError(f"{args.mask_dir}: no such folder; check --mask-dir")
    if args.field_strength is not None and not 0.1 <= args.field_strength <= 21:
        raise InputError(f"--field-strength {args.field_strength}: give B0 in tesla (e.g. 3)")
    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and args.device != "cpu":
        raise InputError(f"--jobs {args.jobs} runs scans side by side on the CPU; on a GPU "
                         "give --jobs 1")
    if args.jobs > 1 and (args.magnitude is not None or args.phase is not None):
        raise InputError("--jobs is for BIDS datasets; explicit files are one scan")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here; use "
                             "--device cpu")


def _mask_for(args, scan):
    from qsm_core.io.bids import load_mask
    from qsm_core.io.derivatives import find_derivative

    if args.mask is not None:
        path = Path(args.mask)
    elif args.mask_dir is not None:
        path = find_derivative(args.mask_dir, scan.participant_id, scan.session_id, "mask",
                               entities=scan.entities)
    else:
        return None, None
    return load_mask(path, shape=scan.shape, affine=scan.affine), path


# --------------------------------------------------------------------- running
def _reconstruct(args, scan, report):
    scan.load()
    mask, mask_path = _mask_for(args, scan)
    from qsm_core.pipeline import reconstruct

    def progress(stage, *_a, **_k):
        report(str(stage))

    result = reconstruct(scan.magnitude, scan.phase_rad, scan.te_s, affine=scan.affine,
                         field_strength_t=scan.field_strength_t, method=args.method,
                         bgremove=args.bgremove, mask=mask, phase_sign=args.phase_sign,
                         device=args.device, progress=progress)
    return result, mask_path


def _run_parameters(args) -> dict:
    return {"method": args.method, "bgremove": args.bgremove, "phase_sign": args.phase_sign,
            "mask": "user" if (args.mask or args.mask_dir) else "auto"}


def _clean(text: str) -> str:
    return " ".join(str(text).replace("\t", " ").split())


def _write_failures(out_dir: Path, failures: list[dict]) -> Path | None:
    from qsm_core.io.atomic import write_text

    path = out_dir / FAILURES_FILE
    if not failures:
        if path.is_file():
            path.unlink()
        return None
    cols = ["scan", "participant_id", "session_id", "error_type", "message"]
    lines = ["\t".join(cols)]
    lines += ["\t".join(_clean(f[c]) for c in cols) for f in failures]
    return write_text(path, "\n".join(lines) + "\n")


def run(args) -> int:
    """Run ``qsmrim recon``; returns the exit status."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from qsm_core.io.derivatives import check_dataset_description

    scans, out_dir, bids_dir = _select_scans(args)
    _check_options(args, scans)
    run_params = _run_parameters(args)
    if not args.overwrite:
        check_dataset_description(out_dir, parameters=run_params)

    with logging_redirect_tqdm():  # log lines above the bar, not through it
        return _run_scans(args, scans, out_dir, bids_dir, run_params, tqdm)


def _process_scan(args, scan, out_dir, bids_dir, run_params, report) -> dict | None:
    """Reconstruct and write one scan; ``None`` on success, else the failure record.

    Bad input (:class:`QSMRimError`) and unexpected errors become a record so that the other
    scans go on; explicit-files mode (one scan) raises instead.
    """
    from qsm_core.io.derivatives import write_dataset_description, write_recon_outputs

    t0 = time.perf_counter()
    try:
        report("load")
        result, mask_path = _reconstruct(args, scan, report)
        report("write")
        extra = {"device": args.device}
        if mask_path is not None:
            extra["mask_file"] = str(Path(mask_path).resolve())
        write_dataset_description(out_dir, parameters=run_params, source_dataset=bids_dir,
                                  overwrite=args.overwrite)
        write_recon_outputs(out_dir, scan, result, extra_parameters=extra)
        logger.info("%s: done in %.1f s", scan.name, time.perf_counter() - t0)
        return None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        if bids_dir is None:
            raise
        bad_input = isinstance(exc, QSMRimError)
        return {"scan": scan.name, "participant_id": scan.participant_id,
                "session_id": scan.session_id or "n/a", "error_type": type(exc).__name__,
                "message": str(exc), "bad_input": bad_input,
                "traceback": None if bad_input else traceback.format_exc()}
    finally:
        scan.release()


def _report_failure(failure: dict, tqdm) -> None:
    if failure["traceback"]:
        logger.error("%s: reconstruction failed\n%s", failure["scan"], failure["traceback"])
    tqdm.write(f"qsmrim recon: {failure['scan']} failed: {failure['message']}",
               file=sys.stderr)


def _run_here(args, scans, out_dir, bids_dir, run_params, bar):
    """Scans one after the other in this process; yields each one's failure record or None."""
    for scan in scans:
        def report(stage, _name=scan.name):
            bar.set_postfix_str(f"{_name}: {stage}", refresh=True)

        yield _process_scan(args, scan, out_dir, bids_dir, run_params, report)
        bar.update()


def _worker_scan(args, scan, out_dir, bids_dir, run_params):
    return scan.name, _process_scan(args, scan, out_dir, bids_dir, run_params,
                                    lambda stage: None)



def _run_in_workers(args, scans, out_dir, bids_dir, run_params, bar):
    """Scans in ``args.jobs`` spawned worker processes, each pinned to its share of the CPUs.

    Yields each scan's failure record (or None) as it finishes; the bar shows the last one.
    """
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    n_jobs = min(args.jobs, len(scans))
    args = picklable_options(args)
    logger.info("reconstructing %d scans in %d processes", len(scans), n_jobs)
    pool = pinned_pool(n_jobs)
    try:
        futures = {pool.submit(_worker_scan, args, scan, out_dir, bids_dir, run_params): scan
                   for scan in scans}
        for fut in as_completed(futures):
            scan = futures[fut]
            try:
                _, failure = fut.result()
            except BrokenProcessPool:  # a worker was killed (out of memory?): the pool is gone
                failure = {"scan": scan.name, "participant_id": scan.participant_id,
                           "session_id": scan.session_id or "n/a",
                           "error_type": "WorkerDied",
                           "message": f"a recon worker process died before {scan.name} "
                                      "finished (killed, or out of memory: each of the "
                                      f"{n_jobs} workers holds one scan); rerun with fewer "
                                      "--jobs, finished scans are skipped",
                           "bad_input": False, "traceback": None}
            bar.set_postfix_str(f"{scan.name}: {'failed' if failure else 'done'}",
                                refresh=True)
            bar.update()
            yield failure
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_scans(args, scans, out_dir, bids_dir, run_params, tqdm) -> int:
    from qsm_core.io.derivatives import derivative_path

    failures: list[dict] = []
    todo = []
    for scan in scans:
        chimap = derivative_path(out_dir, scan.participant_id, scan.session_id, "Chimap",
                                 entities=scan.entities)
        if chimap.is_file() and not args.overwrite:
            logger.info("%s: %s exists; skipped (use --overwrite to recompute)", scan.name,
                        chimap)
        else:
            todo.append(scan)
    skipped = len(scans) - len(todo)
    bar = tqdm(total=len(scans), initial=skipped, desc="qsmrim recon", unit="scan",
               file=sys.stderr, disable=args.no_progress)
    if args.jobs > 1 and len(todo) > 1:
        run_one = _run_in_workers(args, todo, out_dir, bids_dir, run_params, bar)
    else:
        run_one = _run_here(args, todo, out_dir, bids_dir, run_params, bar)
    for failure in run_one:
        if failure is not None:
            failures.append(failure)
            _report_failure(failure, tqdm)
    done = len(todo) - len(failures)
    bar.close()
    order = {scan.name: i for i, scan in enumerate(todo)}
    failures.sort(key=lambda f: order[f["scan"]])  # workers finish in any order

    fail_path = None
    if bids_dir is not None and (failures or out_dir.is_dir()):
        fail_path = _write_failures(out_dir, failures)
    print(f"qsmrim recon: {done} scan(s) reconstructed, {skipped} skipped (already done), "
          f"{len(failures)} failed; outputs in {out_dir}", file=sys.stderr)
    if failures:
        print(f"qsmrim recon: error: {len(failures)} of {len(scans)} scan(s) failed; see "
              f"{fail_path}", file=sys.stderr)
        return 2 if all(f["bad_input"] for f in failures) else 1
    return 0
