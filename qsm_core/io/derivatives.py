"""QSM outputs as BIDS derivatives, with provenance.

Layout written by ``qsmrim recon OUT_DIR`` (``<name>`` = ``sub-L[_ses-S][_acq-A][_run-R]``)::

    OUT_DIR/dataset_description.json                 DatasetType 'derivative', GeneratedBy
    OUT_DIR/sub-L/[ses-S/]anat/<name>_Chimap.nii.gz              susceptibility, ppm, float32
    OUT_DIR/sub-L/[ses-S/]anat/<name>_desc-brain_mask.nii.gz     brain mask, uint8 (1 inside)
    OUT_DIR/sub-L/[ses-S/]anat/<name>_desc-local_fieldmap.nii.gz local field, Hz, float32
    OUT_DIR/sub-L/[ses-S/]anat/<name>_swi.nii.gz                 SWI, magnitude units, float32
    OUT_DIR/sub-L/[ses-S/]anat/<name>_minIP.nii.gz               SWI minimum-intensity projection

Every image has a JSON sidecar of the same name with ``GeneratedBy`` (name ``qsmrim``,
version, the reconstruction parameters), ``Units``, ``Sources`` (the raw images) and the
acquisition values used (``EchoTime``, ``MagneticFieldStrength``). Other packages find
these files with :func:`find_derivative` / :func:`find_derivatives`, never by pasting names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsm_core import __version__
from qsm_core.errors import InputError
from qsm_core.io.atomic import json_default, write_json
from qsm_core.io.bids import normalise_label, parse_entities
from qsm_core.io.nifti import save_nifti

__all__ = ["DerivativeSpec", "OUTPUTS", "BIDS_VERSION", "generated_by", "derivative_path",
           "find_derivative", "find_derivatives", "write_dataset_description",
           "dataset_description", "check_dataset_description", "write_image_with_sidecar",
           "write_derivative", "write_recon_outputs", "derivative_sidecar"]

logger = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"
PIPELINE_NAME = "qsmrim"


@dataclass(frozen=True)
class DerivativeSpec:
    """One kind of output image.

    Attributes
    ----------
    key : str
        Short name used in code (``'Chimap'``, ``'mask'``, ``'localfield'``...).
    tail : str
        End of the file name after the scan's entities, without extension.
    units : str or None
        ``Units`` of the sidecar.
    dtype : str
        On-disk data type.
    description : str
        ``Description`` of the sidecar.
    """

    key: str
    tail: str
    units: str | None
    dtype: str
    description: str


#: The outputs of ``qsmrim recon``, in writing order (the Chimap last, so that its
#: presence means the scan is complete; resume relies on it).
OUTPUTS: dict[str, DerivativeSpec] = {s.key: s for s in (
    DerivativeSpec("mask", "desc-brain_mask", None, "uint8",
                   "Brain mask used for background field removal and dipole inversion "
                   "(1 inside)"),
    DerivativeSpec("localfield", "desc-local_fieldmap", "Hz", "float32",
                   "Local (tissue) field after background field removal, in Hz"),
    DerivativeSpec("swi", "swi", "arbitrary", "float32",
                   "Susceptibility-weighted image (magnitude times high-pass phase mask)"),
    DerivativeSpec("minIP", "minIP", "arbitrary", "float32",
                   "Minimum-intensity projection of the SWI over a slab along the slice axis"),
    DerivativeSpec("Chimap", "Chimap", "ppm", "float32",
                   "Magnetic susceptibility (chi) in ppm, positive = paramagnetic"),
)}

# ReconResult attribute of each output
_RESULT_FIELDS = {"mask": "mask", "localfield": "local_field_hz", "swi": "swi", "minIP": "mip",
                  "Chimap": "chi_ppm"}


def _spec(output: str) -> DerivativeSpec:
    if output in OUTPUTS:
        return OUTPUTS[output]
    for spec in OUTPUTS.values():
        if output == spec.tail:
            return spec
    raise InputError(f"unknown derivative {output!r}; expected one of {sorted(OUTPUTS)}")


def generated_by(parameters: dict | None = None) -> list[dict]:
    """The BIDS ``GeneratedBy`` list naming qsmrim, its version and the parameters.

    Examples
    --------
    >>> generated_by({"method": "ilsqr"})[0]["Name"]
    'qsmrim'
    """
    entry = {"Name": PIPELINE_NAME, "Version": __version__,
             "Description": "qsmrim classical QSM: Laplacian unwrapping, multi-echo fit, "
                            "brain mask, background field removal, dipole inversion"}
    if parameters is not None:
        entry["Parameters"] = _jsonable(parameters)
    return [entry]


def _jsonable(obj):
    """Round-trip through JSON so that numpy values become plain Python values."""
    return json.loads(json.dumps(obj, default=json_default, allow_nan=False))


def _entity_prefix(participant_id, session_id, entities) -> tuple[str, str | None, str]:
    sub = normalise_label(participant_id, "sub")
    if sub is None:
        raise InputError("a participant_id is needed to name derivative files")
    ses = normalise_label(session_id, "ses")
    parts = [sub] + ([ses] if ses else []) + [f"{k}-{v}" for k, v in (entities or {}).items()]
    return sub, ses, "_".join(parts)


def derivative_path(deriv_dir, participant_id, session_id, output, *, entities=None,
                    ext: str = ".nii.gz") -> Path:
    """Path of one output image of one scan (whether or not it exists).

    Parameters
    ----------
    deriv_dir : str or Path
        The derivatives folder (``OUT_DIR`` of ``qsmrim recon``).
    participant_id : str
        ``'sub-01'`` or ``'01'``.
    session_id : str or None
        ``'ses-1'``, ``'1'``, or None / ``'n/a'`` for single-session data.
    output : str
        A key of :data:`OUTPUTS` (``'Chimap'``, ``'mask'``, ``'localfield'``, ``'swi'``,
        ``'minIP'``) or its file tail (``'desc-brain_mask'``...).
    entities : dict, optional
        Other entities of the scan (``{'acq': 'fast', 'run': '1'}``), in BIDS order.
    ext : str
        ``'.nii.gz'`` or ``'.json'``.

    Examples
    --------
    >>> derivative_path("out", "01", "ses-2", "mask").as_posix()
    'out/sub-01/ses-2/anat/sub-01_ses-2_desc-brain_mask.nii.gz'
    """
    spec = _spec(output)
    sub, ses, prefix = _entity_prefix(participant_id, session_id, entities)
    folder = Path(deriv_dir) / sub / (ses or "") / "anat"
    return folder / f"{prefix}_{spec.tail}{ext}"


def find_derivatives(deriv_dir, output: str = "Chimap") -> list[dict]:
    """Every existing image of one kind in a derivatives folder.

    Parameters
    ----------
    deriv_dir : str or Path
    output : str
        Key or tail of :data:`OUTPUTS`.

    Returns
    -------
    list of dict
        ``participant_id``, ``session_id`` (None if absent), ``entities`` (dict of the
        other entities) and ``path``, sorted by name.
    """
    spec = _spec(output)
    root = Path(deriv_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such derivatives folder; run `qsmrim recon` first")
    found = []
    for path in sorted(root.glob(f"sub-*/**/anat/*_{spec.tail}.nii*")):
        name = path.name.split(".", 1)[0]
        head = name[: -len(spec.tail) - 1]
        ents, _ = parse_entities(head + "_x")
        if "sub" not in ents or name != f"{head}_{spec.tail}":
            continue
        sub = f"sub-{ents.pop('sub')}"
        ses = f"ses-{ents.pop('ses')}" if "ses" in ents else None
        found.append({"participant_id": sub, "session_id": ses, "entities": ents, "path": path})
    return found


def find_derivative(deriv_dir, participant_id, session_id, output, *, entities=None) -> Path:
    """The existing output image of one scan, found by participant, session and kind.

    Parameters
    ----------
    deriv_dir : str or Path
    participant_id : str
        ``'sub-01'`` or ``'01'``.
    session_id : str or None
        ``'ses-1'``, ``'1'``, or None / ``'n/a'``.
    output : str
        Key or tail of :data:`OUTPUTS`, e.g. ``'Chimap'`` or ``'mask'``.
    entities : dict, optional
        Other entities (``acq``, ``run``...). When omitted, the scan without other
        entities is taken, else the only one there is.

    Returns
    -------
    Path

    Raises
    ------
    InputError
        Nothing matches (run ``qsmrim recon`` first), or several scans match and
        ``entities`` is needed to choose.
    """
    exact = derivative_path(deriv_dir, participant_id, session_id, output, entities=entities)
    for ext in (".nii.gz", ".nii"):
        cand = exact.with_name(exact.name[: -len(".nii.gz")] + ext)
        if cand.is_file():
            return cand
    sub, ses, _ = _entity_prefix(participant_id, session_id, entities)
    if entities is None and Path(deriv_dir).is_dir():
        hits = [d["path"] for d in find_derivatives(deriv_dir, output)
                if d["participant_id"] == sub and d["session_id"] == ses]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InputError(f"{deriv_dir}: several {output} images for {sub} "
                             f"{ses or ''}: {[h.name for h in hits]}; say which with entities")
    raise InputError(f"{exact}: no such {output} derivative; run `qsmrim recon` for {sub}"
                     f"{' ' + ses if ses else ''} first, or check the derivatives folder")


def dataset_description(*, parameters: dict | None = None, source_dataset=None) -> dict:
    """Content of ``dataset_description.json`` (see :func:`write_dataset_description`)."""
    desc = {
        "Name": "qsmrim QSM derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by(parameters),
    }
    if source_dataset is not None:
        uri = Path(source_dataset).resolve().as_uri()
        desc["SourceDatasets"] = [{"URL": uri}]
        desc["DatasetLinks"] = {"raw": uri}
    return _jsonable(desc)


def check_dataset_description(deriv_dir, *, parameters: dict | None = None) -> None:
    """Refuse a folder whose qsmrim outputs were made with other parameters.

    Raises
    ------
    InputError
        ``dataset_description.json`` exists, is unreadable or records other
        ``GeneratedBy`` parameters; mixing them would make the provenance false.
    """
    path = Path(deriv_dir) / "dataset_description.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
        old_params = old["GeneratedBy"][0].get("Parameters")
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        raise InputError(f"{path}: unreadable dataset description; remove it, use another "
                         "output folder, or --overwrite") from None
    new_params = generated_by(parameters)[0].get("Parameters")
    if old_params != new_params:
        raise InputError(f"{path}: this folder holds qsmrim outputs made with other "
                         f"parameters ({old_params}, now {new_params}); use the same options, "
                         "another output folder, or --overwrite")


def write_dataset_description(deriv_dir, *, parameters: dict | None = None,
                              source_dataset=None, overwrite: bool = False) -> Path:
    """Write ``dataset_description.json`` of a qsmrim derivatives folder.

    Parameters
    ----------
    deriv_dir : str or Path
    parameters : dict, optional
        Run-wide options (method, background removal, phase sign...), stored under
        ``GeneratedBy[0].Parameters``.
    source_dataset : str or Path, optional
        The raw BIDS dataset; recorded in ``SourceDatasets`` and as the ``raw`` dataset
        link that the sidecars' ``bids:raw:`` sources refer to.
    overwrite : bool
        Replace an existing description made with other parameters.

    Raises
    ------
    InputError
        See :func:`check_dataset_description` (only when ``overwrite`` is False).
    """
    path = Path(deriv_dir) / "dataset_description.json"
    if not overwrite:
        check_dataset_description(deriv_dir, parameters=parameters)
    desc = dataset_description(parameters=parameters, source_dataset=source_dataset)
    if path.is_file():
        try:
            if json.loads(path.read_text()) == desc:
                return path
        except (OSError, json.JSONDecodeError):
            pass
    write_json(path, desc)
    return path


def derivative_sidecar(output: str, *, parameters: dict | None, sources, extra=None) -> dict:
    """The JSON sidecar of one output image (see the module docstring)."""
    spec = _spec(output)
    side: dict = {"Description": spec.description}
    if spec.units is not None:
        side["Units"] = spec.units
    if spec.key == "mask":
        side["Type"] = "Brain"
    side["GeneratedBy"] = generated_by(parameters)
    side["Sources"] = [str(s) for s in sources]
    if extra:
        side.update(_jsonable(extra))
    return side


def write_derivative(path, data: np.ndarray, affine: np.ndarray, *, output: str,
                     parameters: dict | None, sources, extra=None) -> Path:
    """Write one output image and its JSON sidecar (both atomically).

    Parameters
    ----------
    path : str or Path
        Image path (``.nii.gz``); the sidecar goes next to it with ``.json``.
    data : ndarray, shape (X, Y, Z)
    affine : ndarray, shape (4, 4)
    output : str
        Key or tail of :data:`OUTPUTS` (sets dtype, units and description).
    parameters : dict or None
        Reconstruction parameters for ``GeneratedBy``.
    sources : sequence of str
        Input files (BIDS URIs or paths).
    extra : dict, optional
        More sidecar fields.
    """
    spec = _spec(output)
    path = Path(path)
    arr = np.asarray(data)
    if spec.dtype == "uint8":
        arr = (arr > 0).astype(np.uint8)
    save_nifti(path, arr, affine, dtype=np.dtype(spec.dtype),
               description=f"qsmrim {__version__} {spec.key}")
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    write_json(path.with_name(stem + ".json"),
               derivative_sidecar(output, parameters=parameters, sources=sources, extra=extra))
    return path


def write_image_with_sidecar(path, data: np.ndarray, affine: np.ndarray, *, description: str,
                             units: str | None, parameters: dict | None, sources,
                             dtype=np.float32, extra=None) -> Path:
    """Write any image (e.g. a per-step output) with a provenance sidecar, atomically.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz``; the sidecar is written next to it as ``.json``.
    data : ndarray, shape (X, Y, Z[, N])
    affine : ndarray, shape (4, 4)
    description, units : str
        Sidecar ``Description`` and ``Units`` (None: no Units).
    parameters : dict or None
        ``GeneratedBy`` parameters.
    sources : sequence of str
        Input files.
    dtype : numpy dtype
        On-disk type (uint8 masks are binarised).
    extra : dict, optional
        More sidecar fields.
    """
    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise InputError(f"{path}: output names must end in .nii.gz or .nii")
    arr = np.asarray(data)
    if np.dtype(dtype) == np.uint8:
        arr = (arr > 0).astype(np.uint8)
    save_nifti(path, arr, affine, dtype=np.dtype(dtype), description=f"qsmrim {__version__}")
    side: dict = {"Description": description}
    if units is not None:
        side["Units"] = units
    side["GeneratedBy"] = generated_by(parameters)
    side["Sources"] = [str(s) for s in sources]
    if extra:
        side.update(_jsonable(extra))
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    write_json(path.with_name(stem + ".json"), side)
    return path


def write_recon_outputs(deriv_dir, scan, result, *, extra_parameters=None) -> dict[str, Path]:
    """Write every output of one reconstructed scan; the Chimap last.

    Parameters
    ----------
    deriv_dir : str or Path
    scan : qsm_core.io.bids.Scan
        Loaded scan (names, affine, echo times, field strength, sources, notes).
    result : qsm_core.pipeline.ReconResult
        With ``chi_ppm``, ``mask``, ``local_field_hz``, ``swi``, ``mip`` and ``parameters``.
    extra_parameters : dict, optional
        Run options added to ``result.parameters`` in ``GeneratedBy`` (result wins).

    Returns
    -------
    dict
        Output key -> written image path.
    """
    if scan.root is not None:
        sources = [f"bids:raw:{s}" for s in scan.source_names()]
    else:
        sources = scan.source_names()
    extra = {"EchoTime": list(scan.te_s), "MagneticFieldStrength": scan.field_strength_t}
    if scan.notes:
        extra["InputNotes"] = list(scan.notes)
    params = dict(extra_parameters or {})
    params.update(getattr(result, "parameters", None) or {})
    written = {}
    for key in OUTPUTS:
        data = getattr(result, _RESULT_FIELDS[key], None)
        if data is None:
            logger.info("%s: no %s in the result; not written", scan.name, key)
            continue
        path = derivative_path(deriv_dir, scan.participant_id, scan.session_id, key,
                               entities=scan.entities)
        written[key] = write_derivative(path, data, scan.affine, output=key, parameters=params,
                                        sources=sources, extra=extra)
    return written
