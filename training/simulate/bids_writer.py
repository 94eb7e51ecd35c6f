"""Write a planned cohort as a BIDS dataset with lesion and ground-truth derivatives.

Layout (``sub-X``/``ses-Y`` always present)::

    dataset_description.json, participants.tsv, README
    sub-X/ses-Y/anat/sub-X_ses-Y_echo-N_part-{mag,phase}_MEGRE.nii.gz (+ .json sidecars)
    sub-X/ses-Y/anat/sub-X_ses-Y_FLAIR.nii.gz (+ .json)
    derivatives/lesions/dataset_description.json, lesions.tsv
    derivatives/lesions/sub-X/ses-Y/anat/sub-X_ses-Y_desc-lesion_mask.nii.gz   (FLAIR grid)
    derivatives/simulation/dataset_description.json, simulation.json
    derivatives/simulation/sub-X/ses-Y/anat/sub-X_ses-Y_{Chimap,desc-local_fieldmap,
        desc-rim_mask,desc-lesiontype_dseg,desc-brain_mask}.nii.gz

The dataset is built in a staging folder next to ``out_dir`` and moved into place at the
end, so an interrupted run leaves nothing half-written at ``out_dir``. Every file is
written atomically.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from qsm_core import __version__
from qsm_core.errors import InputError
from qsm_core.io import save_nifti, write_json, write_text
from qsm_core.io.nifti import write_image
from qsm_core.io.tables import write_table

__all__ = ["write_dataset", "session_paths", "write_session"]

log = logging.getLogger(__name__)
_PLAN = None  # the plan shared with forked workers


PHASE_SLOPE = np.pi / 4096.0
"""Phase quantisation (rad per integer step): 12 bits over [-pi, pi), as scanners store it."""


def save_scaled_int16(path, data, affine, *, slope: float, wrap_steps: int | None = None) -> Path:
    """Save an image as int16 with a NIfTI scale slope (what scanners write), atomically.

    Readers that apply ``scl_slope`` (nibabel, :func:`qsm_core.io.load_nifti`) get
    ``round(data / slope) * slope`` back; raw images are thus 2-3x smaller on disk than
    float32 noise, which dominates the writing time of a cohort. With ``wrap_steps`` (phase)
    the integers are wrapped into ``[-wrap_steps / 2, wrap_steps / 2)``.
    """
    import nibabel as nib

    data = np.asarray(data, np.float32)
    if not np.all(np.isfinite(data)):
        raise InputError(f"refusing to write NaN/Inf to {path}")
    q = np.round(data / slope)
    if wrap_steps:
        q = np.mod(q + wrap_steps // 2, wrap_steps) - wrap_steps // 2
    q = np.clip(q, -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(q, np.asarray(affine, float))
    img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return write_image(img, path)


def session_paths(root, participant_id: str, session_id: str) -> dict:
    """Paths of every file of one session."""
    root = Path(root)
    stem = f"{participant_id}_{session_id}"
    anat = root / participant_id / session_id / "anat"
    les = root / "derivatives" / "lesions" / participant_id / session_id / "anat"
    sim = root / "derivatives" / "simulation" / participant_id / session_id / "anat"
    return {"anat": anat, "stem": stem,
            "flair": anat / f"{stem}_FLAIR.nii.gz",
            "lesion_mask": les / f"{stem}_desc-lesion_mask.nii.gz",
            "chi": sim / f"{stem}_Chimap.nii.gz",
            "local_field": sim / f"{stem}_desc-local_fieldmap.nii.gz",
            "rim_mask": sim / f"{stem}_desc-rim_mask.nii.gz",
            "type_map": sim / f"{stem}_desc-lesiontype_dseg.nii.gz",
            "brain_mask": sim / f"{stem}_desc-brain_mask.nii.gz"}


def write_session(root, plan, subject_index: int, session_index: int, *,
                  flair_voxel_size_mm=None, workers: int = 1) -> dict:
    """Render one session and write its files; returns per-lesion rendered statistics."""
    from training.simulate.cohort import simulate_scan

    subj = plan.subjects[subject_index]
    ses = subj.sessions[session_index]
    r = simulate_scan(plan, subj, session_index, flair_voxel_size_mm=flair_voxel_size_mm,
                      workers=workers)
    p = session_paths(root, subj.participant_id, ses.session_id)
    sc = r.scanner
    meta = {"MagneticFieldStrength": sc.field_strength_t, "Manufacturer": sc.manufacturer,
            "RepetitionTime": sc.repetition_time_s, "FlipAngle": sc.flip_angle_deg,
            "MRAcquisitionType": "3D",
            "PhaseSign": "right-handed" if sc.phase_sign > 0 else "left-handed",
            "SimulatedBy": "qsmrim simulate"}
    mag_slope = max(float(r.magnitude.max()), 1e-6) / 4095.0  # 12 bits, as scanners
    for e, te in enumerate(r.echo_times_s):
        for part in ("mag", "phase"):
            f = p["anat"] / f"{p['stem']}_echo-{e + 1}_part-{part}_MEGRE.nii.gz"
            if part == "mag":
                save_scaled_int16(f, r.magnitude[..., e], r.gre_affine, slope=mag_slope)
                side = dict(meta, EchoTime=float(te))
            else:
                save_scaled_int16(f, r.phase_rad[..., e], r.gre_affine, slope=PHASE_SLOPE,
                                  wrap_steps=8192)
                side = dict(meta, EchoTime=float(te), Units="rad")
            write_json(f.with_name(f.name.replace(".nii.gz", ".json")), side)
    save_scaled_int16(p["flair"], r.flair, r.flair_affine,
                      slope=max(float(r.flair.max()), 1e-6) / 4095.0)
    write_json(p["anat"] / f"{p['stem']}_FLAIR.json",
               {"MagneticFieldStrength": sc.field_strength_t, "Manufacturer": sc.manufacturer,
                "MRAcquisitionType": "3D", "SimulatedBy": "qsmrim simulate"})
    save_nifti(p["lesion_mask"], r.lesion_labels.astype(np.int32), r.flair_affine,
               dtype=np.int32)
    save_nifti(p["chi"], r.chi_ppm, r.gre_affine, description="true susceptibility ppm (CSF=0)")
    save_nifti(p["local_field"], r.local_field_ppm, r.gre_affine,
               description="true field of brain sources, ppm")
    save_nifti(p["rim_mask"], r.rim_mask.astype(np.uint8), r.gre_affine, dtype=np.uint8)
    save_nifti(p["type_map"], r.type_map.astype(np.uint8), r.gre_affine, dtype=np.uint8)
    save_nifti(p["brain_mask"], r.brain_mask.astype(np.uint8), r.gre_affine, dtype=np.uint8)
    present = set(np.unique(r.lesion_labels).tolist()) - {0}
    return {lid: s for lid, s in r.stats.items() if lid in present}


def _job(args):
    root, si, se, fvox = args
    try:
        return si, se, write_session(root, _PLAN, si, se, flair_voxel_size_mm=fvox), None
    except Exception:  # isolate per-session failures; reported at the end
        return si, se, None, traceback.format_exc()


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} exists and is not empty; pass --overwrite to replace it or "
                         "choose an empty folder")


def _descriptions(root: Path, plan) -> None:
    gen = [{"Name": "qsmrim simulate", "Version": __version__,
            "CodeURL": "https://github.com/qsmrim/qsmrim"}]
    write_json(root / "dataset_description.json",
               {"Name": f"qsmrim simulated cohort ({plan.preset.name})", "BIDSVersion": "1.9.0",
                "DatasetType": "raw", "GeneratedBy": gen,
                "License": "CC0", "Authors": ["qsmrim simulator"]})
    for name in ("lesions", "simulation"):
        write_json(root / "derivatives" / name / "dataset_description.json",
                   {"Name": f"qsmrim simulated {name}", "BIDSVersion": "1.9.0",
                    "DatasetType": "derivative",
                    "GeneratedBy": [dict(gen[0], Parameters=plan.settings)]})
    write_text(root / "README",
               "Synthetic MS/NMOSD cohort made by `qsmrim simulate` (not patient data).\n"
               f"Settings: {plan.settings}\n")


def write_dataset(out_dir, plan, *, flair_voxel_size_mm=None, workers: int = 1,
                  overwrite: bool = False, progress: bool = True, tables_only: bool = False,
                  report: bool = False) -> Path:
    """Render (unless ``tables_only``) and write a planned cohort; see the module docstring.

    Raises
    ------
    InputError
        ``out_dir`` exists and is not empty (without ``overwrite``); a session failed (the
        dataset is then not moved into place; the error names the sessions).
    """
    global _PLAN
    from tqdm.auto import tqdm

    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    if not (isinstance(workers, int) and workers >= 1):
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _descriptions(stage, plan)
        lesions = plan.lesions.copy()
        jobs = [(str(stage), s.index, k, flair_voxel_size_mm)
                for s in plan.subjects for k in range(len(s.sessions))]
        if not tables_only:
            lesions["rendered_rim_coverage"] = np.nan
            _PLAN = plan
            failures = []
            bar = tqdm(total=len(jobs), desc="simulate", unit="scan", disable=not progress)
            if workers == 1:
                results = map(_job, jobs)
                pool = None
            else:
                ctx = mp.get_context("fork") if os.name == "posix" else None
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
                results = pool.map(_job, jobs)
            try:
                for si, se, stats, err in results:
                    bar.update(1)
                    if err:
                        failures.append((si, se, err))
                        continue
                    subj = plan.subjects[si]
                    sid = subj.sessions[se].session_id
                    sel = (lesions.participant_id == subj.participant_id) & \
                        (lesions.session_id == sid)
                    for idx in lesions.index[sel]:
                        lid = int(lesions.at[idx, "lesion_id"])
                        if lid in stats:
                            c = stats[lid]["centroid_mm"]
                            lesions.loc[idx, ["centroid_x_mm", "centroid_y_mm",
                                              "centroid_z_mm"]] = np.round(c, 3)
                            lesions.at[idx, "volume_mm3"] = round(stats[lid]["volume_mm3"], 3)
                            lesions.at[idx, "rendered_rim_coverage"] = round(
                                stats[lid]["rim_coverage"], 3)
                        else:
                            lesions.at[idx, "volume_mm3"] = 0.0
            finally:
                bar.close()
                if pool is not None:
                    pool.shutdown()
                _PLAN = None
            if failures:
                msg = "; ".join(f"{plan.subjects[si].participant_id} session {se + 1}: "
                                f"{err.strip().splitlines()[-1]}" for si, se, err in failures)
                raise InputError(f"simulation failed for {len(failures)} scan(s): {msg}")
            lost = lesions["volume_mm3"] <= 0
            if lost.any():  # a planned lesion that fell outside parenchyma entirely
                log.warning("%d planned lesions vanished on the output grid; dropped",
                            int(lost.sum()))
                lesions = lesions[~lost]
        write_table(plan.participants, stage / "participants.tsv", "participants")
        write_table(lesions, stage / "derivatives" / "lesions" / "lesions.tsv", "lesions")
        write_json(stage / "derivatives" / "simulation" / "simulation.json", plan.settings)
        if report:
            from training.simulate.report import calibration_report, write_report

            rep = calibration_report(plan, lesions)
            write_report(rep, stage / "derivatives" / "simulation")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out
