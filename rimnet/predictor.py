"""Batch inference: score every FLAIR lesion of many scans with the CNN and the rule-based detector.

What ``qsmrim predict BIDS_DIR OUT_DIR --lesions DERIV_DIR`` does, scan by scan:

1. **Scans** are defined by the lesion maps ``DERIV_DIR/sub-L/[ses-S/][anat/]<name>_desc-lesion_
   mask.nii[.gz]`` (binary or labelled; ``<name>`` = ``sub-L[_ses-S][_acq-A][_run-R]``).
2. **QSM**: the Chimap ``<name>_Chimap.nii.gz`` is taken from ``--qsm`` or, failing that, from
   ``OUT_DIR``; if neither holds it, the scan is reconstructed from the raw MEGRE echoes of
   ``BIDS_DIR`` (:func:`qsm_core.pipeline.reconstruct`, iLSQR + V-SHARP) and the QSM outputs
   are written to ``OUT_DIR`` (so a rerun reuses them).
3. **FLAIR** ``BIDS_DIR/sub-L/[ses-S/]anat/<name>_FLAIR.nii[.gz]`` (needed when the model has a
   ``flair`` channel) and, for the review montage, the SWI next to the Chimap if any.
4. **Lesions** are labelled (:func:`rimnet.lesions.label_lesions`, long axis >= 3 mm on the
   lesion map's own grid), moved to the QSM grid by nearest neighbour if the grids differ, and
   described (:func:`rimnet.lesions.lesion_table`). FLAIR is resampled trilinearly onto the QSM
   grid. An empty lesion map is valid (e.g. NMOSD without brain lesions): the scan gets
   ``n_lesions = 0`` and a warning.
5. **Scores**: patches (:func:`rimnet.patches.extract_patches`, the model's channels and size)
   -> ``cnn_prob`` (the model's calibrated probability) and ``cnn_call`` (``cnn_prob >=
   threshold``), and ``rule_score`` / ``rule_call`` from :class:`RuleBasedRimDetector`.

Per scan, under ``OUT_DIR/sub-L/[ses-S/]``: ``<name>_predictions.tsv``, ``<name>_desc-lesion_
dseg.nii.gz`` (the labels used, on the QSM grid), ``<name>_desc-rim_probseg.nii.gz`` (each
lesion's voxels hold its rim probability: CNN if available, else the rule score), review PNGs
under ``review/`` and, written last, ``<name>_scan.json`` (the "done" marker, with the
counts). A scan that fails writes ``<name>_failed.json`` instead, and the others go on. The
batch then merges every finished scan found under ``OUT_DIR`` (whatever shard made it) into
``predictions.tsv``, ``subjects.tsv``, ``failures.tsv`` and ``index.html``.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from qsm_core import __version__
from qsm_core.errors import InputError, QSMRimError
from qsm_core.geometry import voxel_sizes_mm
from qsm_core.io.atomic import atomic_path, write_json
from qsm_core.io.bids import normalise_label, parse_entities
from qsm_core.io.nifti import load_nifti, save_nifti
from qsm_core.io.tables import NA, read_table, validate_table, write_table
from rimnet.lesions import label_lesions, lesion_table, resample_labels_to
from rimnet.patches import extract_patches, flair_reference_in_qsm_mask
from rimnet.rule_based import RuleBasedRimDetector

__all__ = [
    "LESION_TAIL",
    "GEOMETRY_COLUMNS",
    "PREDICTION_COLUMNS",
    "ScanInputs",
    "find_lesion_maps",
    "find_flair",
    "collect_scans",
    "select_shard",
    "parse_shard",
    "resample_image_to",
    "default_model_dir",
    "load_model",
    "Predictor",
    "run_batch",
    "merge_outputs",
]

log = logging.getLogger(__name__)

LESION_TAIL = "desc-lesion_mask"
GEOMETRY_COLUMNS = ["centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "centroid_i",
                    "centroid_j", "centroid_k", "volume_mm3", "long_axis_mm", "touches_edge",
                    "confluent", "n_neighbours"]
PREDICTION_COLUMNS = (["participant_id", "session_id", "lesion_id"] + GEOMETRY_COLUMNS
                      + ["cnn_prob", "cnn_call", "rule_score", "rule_call"])
SUBJECT_COLUMNS = ["participant_id", "session_id", "scan", "n_lesions", "n_prl_cnn",
                   "n_prl_rule"]
FAILURE_COLUMNS = ["scan", "participant_id", "session_id", "error_type", "message"]
RECON_PARAMETERS = {"method": "ilsqr", "bgremove": "vsharp", "phase_sign": 1, "mask": "auto"}


# ----------------------------------------------------------------------------- discovery
@dataclass
class ScanInputs:
    """The files of one scan to score.

    Attributes
    ----------
    participant_id : str
        ``sub-L``.
    session_id : str
        ``ses-S`` or ``n/a``.
    entities : dict
        Other BIDS entities (``acq``, ``run``...) shared by the scan's files.
    lesion_path : Path
        The FLAIR lesion map.
    """

    participant_id: str
    session_id: str
    entities: dict = field(default_factory=dict)
    lesion_path: Path | None = None

    @property
    def name(self) -> str:
        """``sub-L[_ses-S][_key-value...]``, the prefix of every per-scan output."""
        parts = [self.participant_id]
        if self.session_id != NA:
            parts.append(self.session_id)
        parts += [f"{k}-{v}" for k, v in self.entities.items()]
        return "_".join(parts)

    @property
    def folder(self) -> Path:
        """Relative output folder ``sub-L[/ses-S]``."""
        return Path(self.participant_id) / ("" if self.session_id == NA else self.session_id)


def find_lesion_maps(lesions_dir, *, participant_labels=None) -> list[ScanInputs]:
    """Every lesion map ``*_desc-lesion_mask.nii[.gz]`` under ``lesions_dir/sub-*``.

    Parameters
    ----------
    lesions_dir : str or Path
    participant_labels : sequence of str, optional
        Keep these participants (``'01'`` or ``'sub-01'``).

    Returns
    -------
    list of ScanInputs
        Sorted by name.

    Raises
    ------
    InputError
        No such folder, no lesion map, or a participant label matching nothing.
    """
    root = Path(lesions_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such lesion-map folder; check --lesions")
    wanted = None
    if participant_labels:
        wanted = {normalise_label(lab, "sub") for lab in participant_labels}
    found: dict[str, ScanInputs] = {}
    for path in sorted(root.glob(f"sub-*/**/*_{LESION_TAIL}.nii*")):
        stem = path.name.split(".", 1)[0]
        if not stem.endswith("_" + LESION_TAIL) or not path.name.endswith((".nii", ".nii.gz")):
            continue
        ents, _ = parse_entities(stem[: -len(LESION_TAIL) - 1] + "_x")
        if "sub" not in ents:
            continue
        sub = f"sub-{ents.pop('sub')}"
        ses = f"ses-{ents.pop('ses')}" if "ses" in ents else NA
        ents.pop("desc", None)
        ents.pop("space", None)
        if wanted is not None and sub not in wanted:
            continue
        item = ScanInputs(sub, ses, ents, path)
        if item.name in found:
            raise InputError(f"two lesion maps for {item.name}: {found[item.name].lesion_path} "
                             f"and {path}; remove one")
        found[item.name] = item
    if wanted is not None:
        missing = sorted(w for w in wanted if w not in {s.participant_id for s in found.values()})
        if missing:
            raise InputError(f"{root}: no lesion map for participant(s) {missing}; check "
                             "--participant-label")
    if not found:
        raise InputError(f"{root}: no lesion maps found; expected files like "
                         f"sub-<L>/[ses-<S>/]anat/sub-<L>[_ses-<S>]_{LESION_TAIL}.nii.gz")
    return [found[k] for k in sorted(found)]


def find_flair(bids_dir, scan: ScanInputs) -> Path | None:
    """The FLAIR image of a scan in a BIDS dataset, or None if there is none.

    Raises
    ------
    InputError
        If several FLAIR images match and the scan's entities cannot choose.
    """
    if bids_dir is None:
        return None
    folder = Path(bids_dir) / scan.folder / "anat"
    if not folder.is_dir():
        return None
    hits = []
    for path in sorted(folder.glob("*_FLAIR.nii*")):
        ents, _ = parse_entities(path.name)
        if f"sub-{ents.get('sub')}" != scan.participant_id:
            continue
        ses = f"ses-{ents['ses']}" if "ses" in ents else NA
        if ses != scan.session_id:
            continue
        hits.append((path, ents))
    if len(hits) > 1:
        exact = [p for p, e in hits if all(e.get(k) == v for k, v in scan.entities.items())
                 and not (set(e) - {"sub", "ses"} - set(scan.entities))]
        if len(exact) == 1:
            return exact[0]
        raise InputError(f"{folder}: several FLAIR images for {scan.name}: "
                         f"{[p.name for p, _ in hits]}; keep one or name the lesion map with "
                         "the same acq/run entities")
    return hits[0][0] if hits else None


def collect_scans(lesions_dir, *, participant_labels=None) -> list[ScanInputs]:
    """Alias of :func:`find_lesion_maps` (every scan is defined by its lesion map)."""
    return find_lesion_maps(lesions_dir, participant_labels=participant_labels)


def parse_shard(text: str | None) -> tuple[int, int]:
    """``'I/N'`` -> ``(I, N)`` with ``0 <= I < N`` (0-based, as SLURM's default arrays).

    Examples
    --------
    >>> parse_shard("2/4")
    (2, 4)
    """
    if text is None:
        return 0, 1
    try:
        i, n = (int(t) for t in str(text).split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/4 (0-based)") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need 0 <= I < N (0-based index)")
    return i, n


def select_shard(scans: list[ScanInputs], index: int, count: int) -> list[ScanInputs]:
    """The scans of shard ``index`` of ``count``: a stable CRC-32 hash of the scan name.

    The split depends only on each scan's name, so every job of an array agrees without
    talking to the others, and adding scans never moves existing ones to another shard.
    """
    if count == 1:
        return list(scans)
    return [s for s in scans if zlib.crc32(s.name.encode()) % count == index]


# ----------------------------------------------------------------------------- model
def default_model_dir() -> Path:
    """The model shipped with the package (``rimnet/default_model``)."""
    return Path(__file__).with_name("default_model")


def load_model(model_dir=None, *, device: str = "cpu", tta: str | None = None,
               folds=None, precision: str = "fp32"):
    """Load the rim CNN (:class:`rimnet.model.RimCNN`) from a model directory.

    Parameters
    ----------
    model_dir : str or Path, optional
        Default: the packaged model, :func:`default_model_dir`.
    device : str
    tta : str, optional
        Override the model's test-time augmentation (``none`` is fastest).
    folds : sequence of int, optional
        Use only these fold networks (fewer = faster, less accurate).
    precision : {"fp32", "bf16"}
        Inference arithmetic of the CNN (:class:`rimnet.model.RimCNN`); ``bf16`` is faster
        on CPUs with AMX units.

    Raises
    ------
    InputError
        No model directory (says how to get one), or one that cannot be loaded.
    """
    explicit = model_dir is not None
    path = Path(model_dir) if explicit else default_model_dir()
    hint = ("train one with `qsmrim train` (see docs/rimnet.md), pass it with --model DIR, or "
            "run the rule-based detector only with --no-cnn")
    if not path.is_dir() or not any(path.iterdir()):
        where = f"--model {path}" if explicit else f"the packaged default model ({path})"
        raise InputError(f"no CNN model: {where} does not exist or is empty; {hint}")
    try:
        from rimnet.model import RimCNN
    except ImportError as exc:
        raise InputError(f"the CNN model code is not available ({exc}); {hint}") from None
    try:
        kwargs = {"device": device, "precision": precision}
        if tta is not None:
            kwargs["tta"] = tta
        if folds is not None:
            kwargs["folds"] = [int(f) for f in folds]
        model = RimCNN.load(path, **kwargs)
    except QSMRimError as exc:
        raise InputError(f"{path}: not a usable model directory ({exc}); {hint}") from None
    except Exception as exc:  # torch/json/pickle errors of a corrupted directory
        raise InputError(f"{path}: corrupted model directory ({type(exc).__name__}: {exc}); "
                         f"{hint}") from None
    for attr in ("channels", "patch_mm", "patch_voxels", "predict_proba"):
        if not hasattr(model, attr):
            raise InputError(f"{path}: the loaded model lacks {attr!r}; {hint}")
    return model


# ----------------------------------------------------------------------------- images
def resample_image_to(image: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine,
                      *, order: int = 1, name: str = "image") -> np.ndarray:
    """Resample an image onto another grid (trilinear by default), edge values outside.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
    src_affine, dst_affine : ndarray, shape (4, 4)
    dst_shape : sequence of 3 ints
    order : int
        Spline order (1 = trilinear, 0 = nearest).
    name : str
        Used in error messages.

    Returns
    -------
    ndarray of float32, shape ``dst_shape``
    """
    dst_shape = tuple(int(s) for s in dst_shape)
    src_affine, dst_affine = np.asarray(src_affine, float), np.asarray(dst_affine, float)
    if image.shape == dst_shape and np.allclose(src_affine, dst_affine, atol=1e-4):
        return np.asarray(image, np.float32)
    m = np.linalg.inv(src_affine) @ dst_affine
    probe = resample_labels_to(np.ones(image.shape, np.uint8), src_affine, dst_shape,
                               dst_affine, name=name)
    if not probe.any():  # pragma: no cover - resample_labels_to raises first
        raise InputError(f"{name} does not overlap the QSM grid")
    return ndimage.affine_transform(np.asarray(image, np.float32), m[:3, :3], offset=m[:3, 3],
                                    output_shape=dst_shape, order=order, mode="nearest",
                                    prefilter=False)


def _same_grid(shape_a, aff_a, shape_b, aff_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(aff_a, aff_b, atol=1e-3)


# ----------------------------------------------------------------------------- predictor
@dataclass
class ScanResult:
    """What :meth:`Predictor.predict_scan` computed for one scan."""

    table: pd.DataFrame
    labels: np.ndarray
    affine: np.ndarray
    images: dict
    timings_s: dict


class Predictor:
    """Scores the lesions of scans with the CNN (optional) and the rule-based detector.

    Parameters
    ----------
    model : object, optional
        A loaded model with ``channels``, ``patch_mm``, ``patch_voxels`` and
        ``predict_proba(patches) -> (N, 2)`` (:class:`rimnet.model.RimCNN`); None runs the
        rule-based detector only.
    rule : RuleBasedRimDetector, optional
        Default: the documented defaults of :class:`RuleBasedRimDetector`.
    cnn_threshold : float, optional
        ``cnn_call = cnn_prob >= cnn_threshold``; default the model's ``threshold`` attribute
        or 0.5.
    min_long_axis_mm : float
        Lesion size filter.
    bids_dir : str or Path, optional
        Raw dataset: FLAIR and (for on-the-fly reconstruction) MEGRE echoes.
    qsm_dir : str or Path, optional
        Derivatives holding existing Chimaps (checked before ``out_dir``).
    device : str
        ``cpu`` or ``cuda``, for the CNN and the reconstruction.
    review : bool
        Write a PNG montage per lesion.
    batch_size : int
        Patches per CNN call.
    model_dir : str or Path, optional
        Where the model came from (recorded in the provenance).
    channels, patch_mm, patch_voxels, snap_to_voxels : optional
        Patch geometry when there is no model (default ``("qsm", "lesion", "others")``,
        32 mm, 32 voxels, centres snapped to the voxel grid); with a model, the model's own.
    """

    def __init__(self, model=None, *, rule: RuleBasedRimDetector | None = None,
                 cnn_threshold: float | None = None, min_long_axis_mm: float = 3.0,
                 bids_dir=None, qsm_dir=None, device: str = "cpu", review: bool = True,
                 batch_size: int = 256, model_dir=None, channels=None,
                 patch_mm: float | None = None, patch_voxels: int | None = None,
                 snap_to_voxels: bool | None = None):
        self.model = model
        self.model_dir = model_dir
        if model is not None and (channels or patch_mm or patch_voxels
                                  or snap_to_voxels is not None):
            raise InputError("patch channels, size and grid come from the model; do not set "
                             "them")
        self._snap_to_voxels = True if snap_to_voxels is None else bool(snap_to_voxels)
        self._warned_interpolated = False
        self._channels = tuple(channels) if channels else ("qsm", "lesion", "others")
        self._patch_mm = float(patch_mm or 32.0)
        self._patch_voxels = int(patch_voxels or 32)
        self.rule = rule
        if cnn_threshold is None:
            cnn_threshold = float(getattr(model, "threshold", 0.5) or 0.5)
        self.cnn_threshold = float(cnn_threshold)
        self.min_long_axis_mm = float(min_long_axis_mm)
        self.bids_dir = Path(bids_dir) if bids_dir is not None else None
        self.qsm_dir = Path(qsm_dir) if qsm_dir is not None else None
        self.device = device
        self.review = review
        self.batch_size = int(batch_size)

    # -- configuration ------------------------------------------------------------------
    @property
    def channels(self) -> tuple[str, ...]:
        """Patch channels: the model's, plus ``others`` for the rule if missing."""
        if self.model is None:
            return self._channels
        return tuple(self.model.channels)

    @property
    def patch_mm(self) -> float:
        """Patch side (mm)."""
        return float(self.model.patch_mm) if self.model is not None else self._patch_mm

    @property
    def snap_to_voxels(self) -> bool:
        """Whether patches are cut on the voxel grid (the model's setting, if any)."""
        if self.model is not None:
            return bool(getattr(self.model, "snap_to_voxels", False))
        return self._snap_to_voxels

    @property
    def patch_voxels(self) -> int:
        """Patch samples per side."""
        return int(self.model.patch_voxels) if self.model is not None else self._patch_voxels

    def provenance(self) -> dict:
        """Parameters and versions recorded in ``OUT_DIR/predict.json``."""
        rule = self.rule or RuleBasedRimDetector()
        info = {"qsmrim_version": __version__, "channels": list(self.channels),
                "patch_mm": self.patch_mm, "patch_voxels": self.patch_voxels,
                "snap_to_voxels": self.snap_to_voxels,
                "cnn_threshold": self.cnn_threshold if self.model is not None else None,
                "min_long_axis_mm": self.min_long_axis_mm,
                "rule_parameters": {k: v for k, v in rule.get_params().items()
                                    if k not in ("channels", "patch_shape")},
                "recon_parameters": RECON_PARAMETERS}
        if self.model is not None:
            info["model_dir"] = str(Path(self.model_dir).resolve()) if self.model_dir else None
            info["model"] = repr(self.model)
            info["precision"] = getattr(self.model, "precision", "fp32")
        return info

    # -- inputs -------------------------------------------------------------------------
    def _find_chimap(self, scan: ScanInputs, out_dir: Path) -> Path | None:
        from qsm_core.io.derivatives import find_derivative

        ses = None if scan.session_id == NA else scan.session_id
        for d in (self.qsm_dir, out_dir):
            if d is None or not Path(d).is_dir():
                continue
            try:
                return find_derivative(d, scan.participant_id, ses, "Chimap",
                                       entities=scan.entities or None)
            except InputError:
                continue
        return None

    def _reconstruct(self, scan: ScanInputs, out_dir: Path):
        from qsm_core.io.bids import discover_scans
        from qsm_core.io.derivatives import write_dataset_description, write_recon_outputs
        from qsm_core.pipeline import reconstruct

        where = f"--qsm {self.qsm_dir} or " if self.qsm_dir else ""
        if self.bids_dir is None:
            raise InputError(f"{scan.name}: no Chimap in {where}{out_dir} and no BIDS folder "
                             "to reconstruct from")
        try:
            raws = discover_scans(self.bids_dir, participant_labels=[scan.participant_id])
        except InputError as exc:
            raise InputError(f"{scan.name}: no Chimap in {where}{out_dir}, and no raw GRE to "
                             f"reconstruct from ({exc})") from None
        ses = None if scan.session_id == NA else scan.session_id
        raws = [r for r in raws if r.session_id == ses and r.entities == scan.entities]
        if len(raws) != 1:
            raise InputError(f"{scan.name}: no Chimap in {where}{out_dir}, and {len(raws)} "
                             f"matching MEGRE scans in {self.bids_dir} (need exactly one)")
        raw = raws[0]
        log.info("%s: reconstructing QSM from %d echo(es)", scan.name, len(raw.magnitude_files))
        try:
            raw.load()
            result = reconstruct(raw.magnitude, raw.phase_rad, raw.te_s, affine=raw.affine,
                                 field_strength_t=raw.field_strength_t,
                                 method=RECON_PARAMETERS["method"],
                                 bgremove=RECON_PARAMETERS["bgremove"],
                                 phase_sign=RECON_PARAMETERS["phase_sign"],
                                 device=self.device)
            write_dataset_description(out_dir, parameters=RECON_PARAMETERS,
                                      source_dataset=self.bids_dir)
            written = write_recon_outputs(out_dir, raw, result,
                                          extra_parameters={"device": self.device})
            raw_affine = raw.affine
        finally:
            raw.release()
        return written["Chimap"], result, raw_affine

    # -- one scan -----------------------------------------------------------------------
    def read_scan_files(self, scan: ScanInputs, out_dir) -> dict:
        """Read the image files of one scan that need no reconstruction, for prefetching.

        Reads the Chimap (and its SWI), the lesion map and the FLAIR where they exist. Used by
        :func:`run_batch` in a background thread to load the next scan while this one is
        scored; a file that cannot be read is left out, so that :meth:`prepare_scan` meets
        the same error in its own, failure-isolated place.

        Returns
        -------
        dict
            ``{Path: (data, affine)}`` as returned by :func:`qsm_core.io.nifti.load_nifti`;
            empty when the scan needs reconstructing (its inputs are read by the recon).
        """
        chimap = self._find_chimap(scan, Path(out_dir))
        if chimap is None:
            return {}
        paths = [chimap, _swi_beside(chimap), scan.lesion_path, find_flair(self.bids_dir, scan)]
        files = {}
        for path in paths:
            if path is not None and Path(path).is_file():
                try:
                    files[Path(path)] = load_nifti(path)
                except QSMRimError:
                    continue  # raised again, isolated, when the scan itself is prepared
        return files

    def prepare_scan(self, scan: ScanInputs, out_dir, *,
                     files: dict | None = None) -> tuple[ScanResult, np.ndarray]:
        """Load (or reconstruct) one scan, label its lesions and cut their patches.

        Parameters
        ----------
        scan : ScanInputs
        out_dir : str or Path
            Output folder (an on-the-fly Chimap is written and looked for there).
        files : dict, optional
            Files already read by :meth:`read_scan_files` (``{Path: (data, affine)}``);
            the others are read here.

        Returns
        -------
        result : ScanResult
            ``table`` holds the lesion geometry only (no scores yet).
        patches : ndarray, shape (N, C, P, P, P)
            In the order of ``result.table``, channels :attr:`channels`.
        """
        out_dir = Path(out_dir)
        files = files or {}

        def read(path):
            got = files.get(Path(path))
            return got if got is not None else load_nifti(path)

        t: dict[str, float] = {}
        t0 = time.perf_counter()
        chimap = self._find_chimap(scan, out_dir)
        if chimap is None:
            chimap, result, aff = self._reconstruct(scan, out_dir)
            t["recon"] = time.perf_counter() - t0
            # keep the arrays just computed (as written: float32) instead of re-reading them
            chi = np.asarray(result.chi_ppm, np.float32)
            swi = None if result.swi is None else np.asarray(result.swi, np.float32)
            del result
        else:
            chi, aff = read(chimap)
            swi_path = _swi_beside(chimap)
            swi = read(swi_path)[0] if swi_path.is_file() else None
        vs = voxel_sizes_mm(aff)
        self._warn_interpolated(vs, scan)

        lmap, laff = read(scan.lesion_path)
        labels = label_lesions(lmap, voxel_size_mm=voxel_sizes_mm(laff),
                               min_long_axis_mm=self.min_long_axis_mm,
                               name=str(scan.lesion_path))
        if not _same_grid(labels.shape, laff, chi.shape, aff):
            labels = resample_labels_to(labels, laff, chi.shape, aff,
                                        name=str(scan.lesion_path))
        elif labels.shape != chi.shape:  # pragma: no cover - _same_grid checks shapes
            raise InputError(f"{scan.lesion_path}: shape {labels.shape} differs from the QSM")

        images: dict[str, np.ndarray] = {"qsm": chi}
        flair_path = find_flair(self.bids_dir, scan)
        if flair_path is not None:
            fl, faff = read(flair_path)
            images["flair"] = resample_image_to(fl, faff, chi.shape, aff, name=str(flair_path))
        elif "flair" in self.channels:
            where = self.bids_dir / scan.folder / "anat" if self.bids_dir else "(no BIDS_DIR)"
            raise InputError(f"{scan.name}: the model needs FLAIR but there is no "
                             f"{scan.name}_FLAIR.nii.gz in {where}; add it or use --no-cnn")
        if swi is not None:
            images["swi"] = swi
        t["load"] = time.perf_counter() - t0 - t.get("recon", 0.0)

        table = lesion_table(labels, aff, participant_id=scan.participant_id,
                             session_id=scan.session_id)
        n = len(table)
        if n == 0:
            log.warning("%s: no lesions in %s (after the %.1f mm size filter); recorded with "
                        "n_lesions = 0", scan.name, scan.lesion_path, self.min_long_axis_mm)
        t1 = time.perf_counter()
        flair_ref = None
        if "flair" in images and "flair" in self.channels:
            # within the QSM mask (chi != 0); training (training.dataset) uses the same
            flair_ref = flair_reference_in_qsm_mask(images["flair"], qsm=chi,
                                                    lesion_labels=labels)
        ids = table["lesion_id"].to_numpy(int)
        cents = table[["centroid_i", "centroid_j", "centroid_k"]].to_numpy(float)
        patches = extract_patches(images, labels, ids, voxel_size_mm=vs, patch_mm=self.patch_mm,
                                  patch_voxels=self.patch_voxels, channels=self.channels,
                                  centroids_vox=cents, flair_ref=flair_ref,
                                  snap_to_voxels=self.snap_to_voxels, affine=aff)
        t["patches"] = time.perf_counter() - t1
        return ScanResult(table=table, labels=labels, affine=aff, images=images,
                          timings_s=t), patches

    def _warn_interpolated(self, voxel_size_mm, scan: ScanInputs) -> None:
        """Warn once if the model was trained on voxel-grid crops and this scan cannot be cut so.

        On such scans (e.g. 0.9x0.9x2 mm) the patches are interpolated, a rim looks weaker
        than in training, and the probabilities run low (the ranking holds better).
        """
        if self.model is None or not self.snap_to_voxels or self._warned_interpolated:
            return
        from rimnet.patches import snappable_axes

        step = self.patch_mm / self.patch_voxels
        if len(snappable_axes(voxel_size_mm, patch_mm=self.patch_mm,
                              patch_voxels=self.patch_voxels)) == 3:
            return
        self._warned_interpolated = True
        log.warning("%s: voxels of %s mm do not fall on the model's %.3g mm patch grid, so its "
                    "patches are interpolated while the model was trained on exact crops; "
                    "expect lower probabilities and fewer calls than on %.3g mm scans (rank "
                    "by cnn_prob, or choose a threshold on data like yours)", scan.name,
                    "x".join(f"{v:.3g}" for v in voxel_size_mm), step, step)

    def predict_scan(self, scan: ScanInputs, out_dir, *,
                     files: dict | None = None) -> ScanResult:
        """Score every lesion of one scan (no files written except on-the-fly QSM).

        ``files``: as in :meth:`prepare_scan`.

        Returns
        -------
        ScanResult
            ``table`` has :data:`PREDICTION_COLUMNS`; ``labels`` the lesion labels on the
            QSM grid; ``images`` the QSM/FLAIR/SWI arrays for the review montage.
        """
        res, patches = self.prepare_scan(scan, out_dir, files=files)
        table, t, n = res.table, res.timings_s, len(res.table)
        t2 = time.perf_counter()
        if self.model is not None and n:
            probs = [np.asarray(self.model.predict_proba(patches[i:i + self.batch_size]))[:, 1]
                     for i in range(0, n, self.batch_size)]
            cnn = np.concatenate(probs).astype(float)
            if cnn.shape != (n,) or not np.all(np.isfinite(cnn)):
                raise QSMRimError(f"{scan.name}: the model returned invalid probabilities")
            table["cnn_prob"] = cnn
            table["cnn_call"] = (cnn >= self.cnn_threshold).astype(int)
        else:
            table["cnn_prob"] = np.nan
            table["cnn_call"] = np.nan
        t["cnn"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        if n:
            rule = self.rule if self.rule is not None else RuleBasedRimDetector()
            rule = _configured_rule(rule, self.channels, self.patch_mm)
            score, call = rule.score_and_call(patches)
            table["rule_score"] = score
            table["rule_call"] = call
        else:
            table["rule_score"] = np.nan
            table["rule_call"] = np.nan
        t["rule"] = time.perf_counter() - t3
        res.table = table.reindex(columns=PREDICTION_COLUMNS)
        return res

    # -- one scan, with files -------------------------------------------------------------
    def process_scan(self, scan: ScanInputs, out_dir, *, files: dict | None = None) -> dict:
        """Predict one scan and write its outputs atomically; the done marker last.

        ``files``: as in :meth:`prepare_scan`.

        Returns
        -------
        dict
            The summary also written to ``<name>_scan.json``.
        """
        from rimnet.review import MontageWriter

        out_dir = Path(out_dir)
        t0 = time.perf_counter()
        res = self.predict_scan(scan, out_dir, files=files)
        folder = out_dir / scan.folder
        table = res.table
        write_table(table, folder / f"{scan.name}_predictions.tsv", "predictions")
        save_nifti(folder / f"{scan.name}_desc-lesion_dseg.nii.gz", res.labels.astype(np.int32),
                   res.affine, description="qsmrim lesion labels on the QSM grid")
        use_cnn = self.model is not None
        score_col = "cnn_prob" if use_cnn else "rule_score"
        prob = np.zeros(res.labels.shape, np.float32)
        if len(table):
            lut = np.zeros(int(res.labels.max()) + 1, np.float32)
            lut[table["lesion_id"].to_numpy(int)] = table[score_col].to_numpy(np.float32)
            prob = lut[res.labels]
        save_nifti(folder / f"{scan.name}_desc-rim_probseg.nii.gz", prob, res.affine,
                   description=f"qsmrim rim probability per lesion ({score_col})")
        pngs = []
        if self.review and len(table):
            t_rev = time.perf_counter()
            writer = MontageWriter(res.images, res.labels,
                                   voxel_size_mm=voxel_sizes_mm(res.affine))
            for row in table.itertuples(index=False):
                png = folder / "review" / f"{scan.name}_lesion-{int(row.lesion_id)}.png"
                writer.write(png, int(row.lesion_id),
                             (row.centroid_i, row.centroid_j, row.centroid_k),
                             title=_title(scan, row))
                pngs.append(png.relative_to(out_dir).as_posix())
            res.timings_s["review"] = time.perf_counter() - t_rev
        summary = {
            "scan": scan.name, "participant_id": scan.participant_id,
            "session_id": scan.session_id, "n_lesions": int(len(table)),
            "n_prl_cnn": int(table["cnn_call"].sum()) if use_cnn else None,
            "n_prl_rule": int(np.nansum(table["rule_call"].to_numpy(float))),
            "lesion_map": str(scan.lesion_path), "review": pngs,
            "timings_s": {k: round(v, 3) for k, v in res.timings_s.items()},
            "total_s": round(time.perf_counter() - t0, 3),
        }
        failed = folder / f"{scan.name}_failed.json"
        write_json(folder / f"{scan.name}_scan.json", summary)
        if failed.exists():
            failed.unlink()
        return summary


def _swi_beside(chimap: Path) -> Path:
    """The SWI that ``qsmrim recon`` writes next to a Chimap."""
    return chimap.with_name(chimap.name.replace("_Chimap.", "_swi."))


def _configured_rule(rule: RuleBasedRimDetector, channels, patch_mm) -> RuleBasedRimDetector:
    """A fitted copy of ``rule`` reading ``channels`` at ``patch_mm``."""
    from sklearn.base import clone

    if hasattr(rule, "threshold_") and tuple(rule.channels) == tuple(channels) \
            and float(rule.patch_mm) == float(patch_mm):
        return rule
    r = clone(rule).set_params(channels=tuple(channels), patch_mm=float(patch_mm),
                               patch_shape=None)
    r.classes_ = np.array([0, 1])
    r.threshold_ = float(getattr(rule, "threshold_", 0.0))
    return r


def _title(scan: ScanInputs, row) -> str:
    parts = [f"{scan.name}  lesion {int(row.lesion_id)}", f"{row.volume_mm3:.0f} mm3"]
    if not pd.isna(row.cnn_prob):
        parts.append(f"CNN {row.cnn_prob:.2f}{' PRL' if row.cnn_call == 1 else ''}")
    parts.append(f"rule {row.rule_score:.2f}{' PRL' if row.rule_call == 1 else ''}")
    return "  |  ".join(parts)


# ----------------------------------------------------------------------------- batch
def _scan_files(out_dir: Path, scan: ScanInputs) -> tuple[Path, Path]:
    folder = out_dir / scan.folder
    return folder / f"{scan.name}_scan.json", folder / f"{scan.name}_failed.json"


def run_batch(scans: list[ScanInputs], out_dir, *, predictor: Predictor,
              overwrite: bool = False, progress: bool = True, prefetch: bool = True,
              jobs: int = 1, worker_predictor=None) -> dict:
    """Process scans, isolating failures; skip finished ones unless ``overwrite``.

    Parameters
    ----------
    scans : list of ScanInputs
    out_dir : str or Path
    predictor : Predictor
        Scores the scans when ``jobs`` is 1; its provenance goes to ``predict.json``.
    overwrite : bool
        Recompute scans that are already done.
    progress : bool
        Show a progress bar.
    prefetch : bool
        Read the next scan's files (:meth:`Predictor.read_scan_files`) in a background
        thread while the current one is scored; at most two scans are in memory at once.
        Only with ``jobs`` = 1.
    jobs : int
        Scans scored side by side in this many spawned worker processes, each pinned to its
        own share of the CPUs (:func:`qsm_core.workers.pinned_pool`) and holding one scan at
        a time. The outputs do not depend on it (each scan is scored by the same code with
        the same model).
    worker_predictor : callable, optional
        Needed when ``jobs`` > 1: builds the predictor in each worker (called once there);
        picklable, e.g. a module-level function or a ``functools.partial`` of one, and
        building a predictor with the same provenance as ``predictor``.

    Returns
    -------
    dict
        ``done``, ``skipped`` (lists of scan names) and ``failures`` (list of dicts with
        :data:`FAILURE_COLUMNS`).
    """
    import sys

    from tqdm.auto import tqdm

    if not (isinstance(jobs, int) and jobs >= 1):
        raise InputError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1 and worker_predictor is None:
        raise InputError("jobs > 1 needs worker_predictor (a picklable predictor factory)")
    out_dir = Path(out_dir)
    prov = json.loads(json.dumps(predictor.provenance(), default=str))
    prov_path = out_dir / "predict.json"
    if prov_path.is_file() and not overwrite:
        try:
            old = json.loads(prov_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != prov:
            raise InputError(f"{out_dir} holds predictions made with other settings (see "
                             f"{prov_path}); use the same model and options, --overwrite, or "
                             "another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(prov_path, prov)
    done, skipped, failures = [], [], []
    todo = []
    for scan in scans:
        if _scan_files(out_dir, scan)[0].is_file() and not overwrite:
            skipped.append(scan.name)
            log.info("%s: already done; skipped", scan.name)
        else:
            todo.append(scan)
    bar = tqdm(total=len(todo), desc="qsmrim predict", unit="scan", file=sys.stderr,
               disable=not progress)
    try:
        if jobs > 1 and len(todo) > 1:
            results = _score_in_workers(todo, out_dir, min(jobs, len(todo)), worker_predictor)
        else:
            results = _score_here(todo, out_dir, predictor, prefetch)
        for scan, failure in results:
            bar.set_postfix_str(scan.name, refresh=False)
            bar.update()
            if failure is None:
                done.append(scan.name)
            else:
                failures.append(failure)
                tqdm.write(f"qsmrim predict: {scan.name} failed: {failure['message']}",
                           file=sys.stderr)
    finally:
        bar.close()
    order = {scan.name: i for i, scan in enumerate(todo)}  # workers finish in any order
    done.sort(key=order.__getitem__)
    failures.sort(key=lambda f: order[f["scan"]])
    return {"done": done, "skipped": skipped, "failures": failures}


def _score_isolated(predictor: Predictor, scan: ScanInputs, out_dir: Path,
                    files: dict | None = None) -> dict | None:
    """Process one scan; on failure write its ``_failed.json`` and return the record."""
    try:
        predictor.process_scan(scan, out_dir, files=files)
        return None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        if not isinstance(exc, QSMRimError):
            log.error("%s: failed\n%s", scan.name, traceback.format_exc())
        return _record_failure(out_dir, scan, type(exc).__name__, str(exc))


def _record_failure(out_dir: Path, scan: ScanInputs, error_type: str, message: str) -> dict:
    rec = {"scan": scan.name, "participant_id": scan.participant_id,
           "session_id": scan.session_id, "error_type": error_type,
           "message": " ".join(message.split())}
    write_json(_scan_files(out_dir, scan)[1], rec)
    return rec


def _score_here(todo: list[ScanInputs], out_dir: Path, predictor: Predictor, prefetch: bool):
    """Scans one after the other in this process; yields ``(scan, failure or None)``."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="qsmrim-prefetch") if prefetch else None
    pending = None  # the prefetch of the scan whose turn is next
    try:
        for i, scan in enumerate(todo):
            try:
                files = pending.result() if pending is not None else None
            except Exception as exc:  # the read failed: process_scan reads again and says why
                log.debug("%s: prefetch failed (%s)", scan.name, exc)
                files = None
            pending = None
            if pool is not None and i + 1 < len(todo):
                pending = pool.submit(predictor.read_scan_files, todo[i + 1], out_dir)
            yield scan, _score_isolated(predictor, scan, out_dir, files)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_WORKER_PREDICTOR: list[Predictor] = []


def _start_worker(worker_predictor) -> None:
    """In a pinned worker: torch on this worker's cores, then build its predictor."""
    from qsm_core.workers import worker_cpus

    cpus = worker_cpus()
    if cpus:
        import torch

        torch.set_num_threads(len(cpus))
    _WORKER_PREDICTOR[:] = [worker_predictor()]


def _score_in_worker(scan: ScanInputs, out_dir: Path) -> dict | None:
    return _score_isolated(_WORKER_PREDICTOR[0], scan, out_dir)


def _score_in_workers(todo: list[ScanInputs], out_dir: Path, n_jobs: int, worker_predictor):
    """Scans in ``n_jobs`` pinned worker processes; yields ``(scan, failure or None)``."""
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    from qsm_core.workers import pinned_pool

    log.info("scoring %d scans in %d processes", len(todo), n_jobs)
    pool = pinned_pool(n_jobs, initializer=_start_worker, initargs=(worker_predictor,))
    try:
        futures = {pool.submit(_score_in_worker, scan, out_dir): scan for scan in todo}
        for fut in as_completed(futures):
            scan = futures[fut]
            try:
                failure = fut.result()
            except BrokenProcessPool:  # a worker died (killed, out of memory): pool is gone
                failure = _record_failure(
                    out_dir, scan, "WorkerDied",
                    f"a predict worker process died before {scan.name} finished (killed, or "
                    f"out of memory: each of the {n_jobs} workers holds one scan); rerun "
                    "with fewer --jobs, finished scans are skipped")
            yield scan, failure
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def merge_outputs(out_dir) -> dict:
    """Merge every finished scan under ``out_dir`` into the batch tables and the HTML index.

    Writes ``predictions.tsv``, ``subjects.tsv``, ``failures.tsv`` (header only when none)
    and ``index.html``. Safe to call at any time, e.g. after the shards of a job array.

    Returns
    -------
    dict
        ``predictions`` and ``subjects`` DataFrames, ``failures`` list.
    """
    from rimnet.review import write_review_index

    out_dir = Path(out_dir)
    preds, subjects, failures = [], [], []
    for marker in sorted(out_dir.glob("sub-*/**/*_scan.json")):
        try:
            summary = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable; scan ignored in the merge (rerun it)", marker)
            continue
        tsv = marker.with_name(f"{summary['scan']}_predictions.tsv")
        preds.append(read_table(tsv, "predictions"))
        subjects.append({k: summary.get(k) for k in SUBJECT_COLUMNS})
    for fail in sorted(out_dir.glob("sub-*/**/*_failed.json")):
        if fail.with_name(fail.name.replace("_failed.json", "_scan.json")).is_file():
            continue
        try:
            failures.append(json.loads(fail.read_text()))
        except (OSError, json.JSONDecodeError):
            failures.append({"scan": fail.name, "participant_id": NA, "session_id": NA,
                             "error_type": "unknown", "message": "unreadable failure record"})
    pred = (pd.concat([p for p in preds if len(p)], ignore_index=True)
            if any(len(p) for p in preds) else pd.DataFrame(columns=PREDICTION_COLUMNS))
    pred = pred.reindex(columns=PREDICTION_COLUMNS)
    pred = pred.sort_values(["participant_id", "session_id", "lesion_id"], kind="stable")
    write_table(pred, out_dir / "predictions.tsv", "predictions")
    subj = pd.DataFrame(subjects, columns=SUBJECT_COLUMNS)
    if len(subj):
        subj = validate_table(subj, "subjects")
    write_table(subj.reindex(columns=SUBJECT_COLUMNS), out_dir / "subjects.tsv", "subjects")
    fail_df = pd.DataFrame(failures, columns=FAILURE_COLUMNS)
    with atomic_path(out_dir / "failures.tsv") as tmp:
        fail_df.to_csv(tmp, sep="\t", index=False, na_rep=NA)
    write_review_index(out_dir, pred, subj, fail_df)
    return {"predictions": pred, "subjects": subj, "failures": failures}

