"""Multi-echo GRE (MEGRE) input: BIDS discovery, explicit file lists, loading with checks.

BIDS layout read here::

    BIDS_DIR/sub-<L>/[ses-<S>/]anat/<name>_echo-<N>_part-mag_MEGRE.nii[.gz]
    BIDS_DIR/sub-<L>/[ses-<S>/]anat/<name>_echo-<N>_part-phase_MEGRE.nii[.gz]

(``<name>`` = ``sub-<L>[_ses-<S>][_acq-<A>][_run-<R>]``)

with a JSON sidecar per image (BIDS inheritance: sidecars higher in the tree with a
subset of the entities are merged first) giving ``EchoTime`` (s), ``MagneticFieldStrength``
(T) and, for phase, ``Units`` ('rad' or 'arbitrary'). A 4D echo series (echoes along the
fourth axis, no ``echo-`` entity, ``EchoTime`` a list) and single-echo data are valid.

Discovery only lists files and reads sidecars, so it is cheap on a large dataset; images
are read when :meth:`Scan.load` (or one of the array properties) is first used, and every
problem is an :class:`~qsm_core.errors.InputError` naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsm_core.errors import InputError
from qsm_core.io.nifti import load_nifti
from qsm_core.io.phase import normalise_units, phase_to_rad

__all__ = ["Scan", "discover_scans", "scan_from_files", "parse_entities", "normalise_label",
           "load_mask", "write_megre"]

logger = logging.getLogger(__name__)

_NIFTI_RE = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$")
_AFFINE_ATOL_MM = 1e-3
_ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part")


def parse_entities(name: str) -> tuple[dict[str, str], str]:
    """Split a BIDS file name into its entities and suffix.

    Parameters
    ----------
    name : str
        File name, e.g. ``sub-01_ses-1_echo-2_part-mag_MEGRE.nii.gz``.

    Returns
    -------
    entities : dict
        Key -> label, in file order.
    suffix : str

    Examples
    --------
    >>> parse_entities("sub-01_echo-2_part-phase_MEGRE.nii.gz")
    ({'sub': '01', 'echo': '2', 'part': 'phase'}, 'MEGRE')
    """
    stem = name.split(".", 1)[0]
    parts = stem.split("_")
    entities: dict[str, str] = {}
    for p in parts[:-1]:
        if "-" in p:
            k, v = p.split("-", 1)
            entities[k] = v
    return entities, parts[-1]


def normalise_label(label: str | None, prefix: str) -> str | None:
    """``'01'`` or ``'sub-01'`` -> ``'sub-01'`` (None, '' and 'n/a' stay None).

    Examples
    --------
    >>> normalise_label("01", "sub"), normalise_label("ses-2", "ses"), normalise_label("n/a", "ses")
    ('sub-01', 'ses-2', None)
    """
    if label is None:
        return None
    label = str(label).strip()
    if label in ("", "n/a"):
        return None
    if label.startswith(prefix + "-"):
        label = label[len(prefix) + 1:]
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise InputError(f"invalid {prefix} label {label!r}: BIDS labels are alphanumeric "
                         f"(e.g. {prefix}-01)")
    return f"{prefix}-{label}"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON sidecar ({exc}); fix or remove it") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: a JSON sidecar must hold an object ({{...}})")
    return obj


def _sidecar(image: Path, root: Path | None, cache: dict | None = None) -> dict:
    """Merged sidecar of ``image`` (BIDS inheritance principle, nearest file wins).

    ``cache`` (one per discovery) keeps folder listings and parsed JSON files, so that a
    dataset of thousands of images lists each folder and reads each sidecar once.
    """
    cache = {} if cache is None else cache
    ents, suffix = parse_entities(image.name)
    folders = [image.parent]
    if root is not None:
        p = image.parent
        while p != root and root in p.parents:
            p = p.parent
            folders.append(p)
    meta: dict = {}
    for folder in reversed(folders):  # top level first, the image's own folder last
        key = ("dir", folder, suffix)
        if key not in cache:
            listing = []
            for js in sorted(folder.glob(f"*{suffix}.json")):
                jents, jsuf = parse_entities(js.name)
                if jsuf == suffix:
                    listing.append((jents, js))
            cache[key] = listing
        cands = [(len(jents), js) for jents, js in cache[key]
                 if all(ents.get(k) == v for k, v in jents.items())]
        for _, js in sorted(cands):
            if ("json", js) not in cache:
                cache[("json", js)] = _read_json(js)
            meta.update(cache[("json", js)])
    return meta


@dataclass
class Scan:
    """One multi-echo GRE acquisition: file names and metadata now, arrays on demand.

    Attributes
    ----------
    participant_id : str
        ``sub-<label>``.
    session_id : str or None
        ``ses-<label>``, or None for a single-session dataset.
    entities : dict
        Other BIDS entities that tell scans apart (``acq``, ``run``, ``rec``...), in order.
    magnitude_files, phase_files : tuple of Path
        One per echo, or a single 4D file each (echoes along the fourth axis).
    magnitude_meta, phase_meta : tuple of dict
        Merged JSON sidecars, one per file.
    root : Path or None
        BIDS dataset root (source paths in provenance are relative to it).
    notes : list of str
        What was detected or changed while loading (vendor scaling...).
    te_override_s, field_strength_override_t, phase_units_override :
        Values given on the command line; they win over the sidecars.
    problem : str or None
        A defect found at discovery (e.g. an echo without phase); raised as an
        :class:`InputError` when the scan is used, so that other scans still run.
    """

    participant_id: str
    session_id: str | None
    magnitude_files: tuple[Path, ...]
    phase_files: tuple[Path, ...]
    entities: dict[str, str] = field(default_factory=dict)
    magnitude_meta: tuple[dict, ...] = ()
    phase_meta: tuple[dict, ...] = ()
    root: Path | None = None
    notes: list[str] = field(default_factory=list)
    te_override_s: tuple[float, ...] | None = None
    field_strength_override_t: float | None = None
    phase_units_override: str | None = None
    problem: str | None = None
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)

    # ----------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        """BIDS prefix of the outputs: ``sub-L[_ses-S][_acq-A][_run-R]``."""
        parts = [self.participant_id]
        if self.session_id:
            parts.append(self.session_id)
        parts += [f"{k}-{v}" for k, v in self.entities.items()]
        return "_".join(parts)

    @property
    def source_files(self) -> list[Path]:
        """Every input image, magnitude first."""
        return list(self.magnitude_files) + list(self.phase_files)

    def source_names(self) -> list[str]:
        """Input images as paths relative to the dataset root (absolute without one)."""
        out = []
        for p in self.source_files:
            if self.root is not None and self.root in p.parents:
                out.append(p.relative_to(self.root).as_posix())
            else:
                out.append(str(p.resolve()))
        return out

    # ----------------------------------------------------------------- metadata
    @property
    def four_d(self) -> bool:
        """Whether the echoes are stored as one 4D series."""
        return len(self.magnitude_files) == 1 and self._n_volumes() > 1

    def _n_volumes(self) -> int:
        import nibabel as nib

        f = self.magnitude_files[0]
        if not f.exists():
            raise InputError(f"{f}: no such file; check the path")
        try:
            shape = nib.load(str(f)).shape
        except Exception as exc:
            raise InputError(f"{f}: not a readable NIfTI image ({exc})") from None
        return int(shape[3]) if len(shape) == 4 else 1

    @property
    def te_s(self) -> tuple[float, ...]:
        """Echo times in seconds, increasing (checked)."""
        if "te_s" not in self._arrays:
            self._arrays["te_s"] = self._echo_times()
        return self._arrays["te_s"]

    def _check_problem(self) -> None:
        if self.problem:
            raise InputError(self.problem)

    def _echo_times(self) -> tuple[float, ...]:
        self._check_problem()
        if self.te_override_s is not None:
            tes = [float(t) for t in self.te_override_s]
            where = "--echo-times"
        else:
            tes = []
            for i, f in enumerate(self.magnitude_files):
                meta = self.magnitude_meta[i] if i < len(self.magnitude_meta) else {}
                pmeta = self.phase_meta[i] if i < len(self.phase_meta) else {}
                te = meta.get("EchoTime", pmeta.get("EchoTime"))
                if te is None:
                    raise InputError(f"{f}: the JSON sidecar has no EchoTime; add \"EchoTime\" "
                                     "(seconds) to the sidecar or give --echo-times")
                tes += [float(t) for t in (te if isinstance(te, list) else [te])]
            where = f"EchoTime of {self.magnitude_files[0]}"
        n_files = len(self.magnitude_files)
        n_echo = self._n_volumes() if n_files == 1 else n_files
        if len(tes) != n_echo:
            raise InputError(f"{where}: {len(tes)} echo time(s) for {n_echo} echo(es) in "
                             f"{self.magnitude_files[0]}; give one EchoTime per echo (echoes "
                             "along the fourth axis of a 4D series)")
        arr = np.asarray(tes, float)
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise InputError(f"{where}: echo times must be positive seconds, got {tes}")
        if np.any(arr > 1.0):
            raise InputError(f"{where}: echo times {tes} look like milliseconds; BIDS EchoTime "
                             "is in seconds (e.g. 0.0072 for 7.2 ms)")
        if np.any(np.diff(arr) <= 0):
            raise InputError(f"{where}: echo times {tes} are not strictly increasing in echo "
                             "order; check the echo- entities or the order of the files")
        return tuple(float(t) for t in arr)

    @property
    def field_strength_t(self) -> float:
        """B0 in tesla (command line, else sidecar ``MagneticFieldStrength``)."""
        self._check_problem()
        sidecar = None
        for meta in list(self.magnitude_meta) + list(self.phase_meta):
            if "MagneticFieldStrength" in meta:
                sidecar = float(meta["MagneticFieldStrength"])
                break
        if self.field_strength_override_t is not None:
            b0 = float(self.field_strength_override_t)
            if sidecar is not None and abs(sidecar - b0) > 1e-3:
                logger.warning("%s: --field-strength %g T overrides MagneticFieldStrength %g T "
                               "of the sidecar", self.name, b0, sidecar)
        elif sidecar is None:
            raise InputError(f"{self.magnitude_files[0]}: no MagneticFieldStrength in the JSON "
                             "sidecar; add it (tesla) or give --field-strength")
        else:
            b0 = sidecar
        if not np.isfinite(b0) or not 0.1 <= b0 <= 21:
            raise InputError(f"{self.magnitude_files[0]}: field strength {b0} T is not "
                             "plausible; MagneticFieldStrength is in tesla (e.g. 3)")
        return b0

    # ----------------------------------------------------------------- arrays
    @property
    def magnitude(self) -> np.ndarray:
        """Magnitude, shape (X, Y, Z, E), float32."""
        self.load()
        return self._arrays["magnitude"]

    @property
    def phase_rad(self) -> np.ndarray:
        """Phase in radians, shape (X, Y, Z, E), float32."""
        self.load()
        return self._arrays["phase_rad"]

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world affine, shape (4, 4) (mm)."""
        self.load()
        return self._arrays["affine"]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z)."""
        return tuple(self.magnitude.shape[:3])

    def release(self) -> None:
        """Drop the loaded arrays (the metadata stays)."""
        for k in ("magnitude", "phase_rad", "affine"):
            self._arrays.pop(k, None)

    def load(self) -> Scan:
        """Read and check every image once; returns self.

        Raises
        ------
        InputError
            Missing files, 2D data, NaN/Inf, echoes of different shapes or geometry,
            magnitude and phase that do not match, bad echo times or phase units.
        """
        if "magnitude" in self._arrays:
            return self
        self._check_problem()
        te_s = self.te_s
        _ = self.field_strength_t  # metadata errors before reading any image
        n_echo = len(te_s)
        if len(self.magnitude_files) != len(self.phase_files):
            raise InputError(f"{self.name}: {len(self.magnitude_files)} magnitude file(s) but "
                             f"{len(self.phase_files)} phase file(s); give one phase image per "
                             "magnitude image")
        mags, phases, affine, ref = [], [], None, None
        for i, (mf, pf) in enumerate(zip(self.magnitude_files, self.phase_files)):
            m, m_aff = load_nifti(mf, allow_4d=True)
            p, p_aff = load_nifti(pf, allow_4d=True)
            if m.shape != p.shape:
                raise InputError(f"{pf}: phase shape {p.shape} does not match magnitude "
                                 f"{mf} shape {m.shape}; magnitude and phase must come from "
                                 "the same acquisition")
            if not np.allclose(m_aff, p_aff, atol=_AFFINE_ATOL_MM):
                raise InputError(f"{pf}: its affine differs from that of magnitude {mf}; "
                                 "magnitude and phase must share the same geometry")
            if ref is None:
                ref, affine = mf, m_aff
            elif m.shape[:3] != mags[0].shape[:3]:
                raise InputError(f"{mf}: echo shape {m.shape[:3]} differs from "
                                 f"{mags[0].shape[:3]} of {ref}; all echoes must have the "
                                 "same matrix")
            elif not np.allclose(m_aff, affine, atol=_AFFINE_ATOL_MM):
                raise InputError(f"{mf}: its affine differs from that of {ref}; all echoes "
                                 "must share the same geometry")
            units = self.phase_units_override
            if units is None and i < len(self.phase_meta):
                units = self.phase_meta[i].get("Units")
                if units is None and self.phase_meta[i]:
                    logger.warning("%s: no Units in the phase sidecar; detecting the scaling",
                                   pf)
            normalise_units(units, source=str(pf))
            rad, note = phase_to_rad(p, units=units, source=str(pf))
            if note not in self.notes:
                self.notes.append(note)
            if m.ndim == 3:
                m, rad = m[..., None], rad[..., None]
            if np.any(m < 0):
                logger.warning("%s: negative magnitude values; using their absolute value", mf)
                m = np.abs(m)
            mags.append(m.astype(np.float32, copy=False))
            phases.append(rad)
        magnitude = np.concatenate(mags, axis=3)
        phase = np.concatenate(phases, axis=3)
        if magnitude.shape[3] != n_echo:
            raise InputError(f"{self.magnitude_files[0]}: {magnitude.shape[3]} echo volume(s) "
                             f"but {n_echo} echo time(s)")
        if not np.any(magnitude > 0):
            raise InputError(f"{self.magnitude_files[0]}: the magnitude is zero everywhere")
        self._arrays.update(magnitude=magnitude, phase_rad=phase, affine=affine)
        return self


def load_mask(path, *, shape, affine=None) -> np.ndarray:
    """Read a user brain mask and check it against the scan.

    Parameters
    ----------
    path : str or Path
        3D NIfTI; voxels > 0 are inside.
    shape : tuple of 3 ints
        The scan's spatial shape.
    affine : ndarray, shape (4, 4), optional
        The scan's affine; the mask's must match to 1e-3 mm.

    Returns
    -------
    ndarray of bool, shape ``shape``

    Raises
    ------
    InputError
        Missing file, wrong shape or geometry, or an empty mask.
    """
    data, m_aff = load_nifti(path)
    if data.shape != tuple(shape):
        raise InputError(f"{path}: mask shape {data.shape} does not match the scan's "
                         f"{tuple(shape)}; give a mask on the GRE grid")
    if affine is not None and not np.allclose(m_aff, affine, atol=_AFFINE_ATOL_MM):
        raise InputError(f"{path}: the mask's affine differs from the scan's; resample the "
                         "mask onto the GRE grid")
    mask = data > 0
    if not mask.any():
        raise InputError(f"{path}: the mask is empty (all zero); give a mask with the brain "
                         "set to 1")
    return mask


# --------------------------------------------------------------------- discovery
def _group_key(ents: dict[str, str]) -> tuple:
    return tuple((k, v) for k, v in ents.items() if k not in ("echo", "part"))


def discover_scans(bids_dir, *, participant_labels=None) -> list[Scan]:
    """Find every MEGRE scan of a BIDS dataset.

    Parameters
    ----------
    bids_dir : str or Path
        Dataset root (holds ``sub-*`` folders).
    participant_labels : sequence of str, optional
        Keep these participants only (``'01'`` or ``'sub-01'``).

    Returns
    -------
    list of Scan
        Sorted by participant, session and other entities; echoes sorted by ``echo-``
        index. Images are not read yet.

    Raises
    ------
    InputError
        No such folder, no MEGRE scan, or a label that matches nothing. Defects of one
        scan (an echo without phase, a duplicated echo) are kept in ``Scan.problem`` and
        raised when that scan is used, so that the other scans still run.
    """
    root = Path(bids_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such BIDS folder; check the path")
    root = root.resolve()
    wanted = None
    if participant_labels:
        wanted = {normalise_label(lab, "sub") for lab in participant_labels}
    groups: dict[tuple, dict] = {}
    for path in sorted(root.glob("sub-*/**/anat/*_MEGRE.nii*")):
        if not _NIFTI_RE.match(path.name):
            continue
        rel = path.relative_to(root).parts
        if len(rel) not in (3, 4):
            continue
        ents, _ = parse_entities(path.name)
        if "sub" not in ents or ents.get("part") not in ("mag", "phase"):
            if ents.get("part") not in ("mag", "phase"):
                logger.info("%s: not part-mag/part-phase; ignored", path)
            continue
        if wanted is not None and f"sub-{ents['sub']}" not in wanted:
            continue
        key = _group_key(ents)
        g = groups.setdefault(key, {"ents": ents, "mag": {}, "phase": {}, "problem": None})
        echo = ents.get("echo")
        try:
            echo_idx = int(echo) if echo is not None else 0
        except ValueError:
            raise InputError(f"{path}: echo-{echo} is not an integer echo index") from None
        slot = g[ents["part"]]
        if echo_idx in slot:
            g["problem"] = (f"{path}: echo {echo_idx} appears twice ({slot[echo_idx]}); "
                            "remove the duplicate (.nii and .nii.gz of the same image?)")
        slot[echo_idx] = path
    if wanted is not None:
        found = {f"sub-{dict(k)['sub']}" for k in groups}
        missing = sorted(w for w in wanted if w not in found)
        if missing:
            raise InputError(f"{root}: no MEGRE scan for participant(s) {missing}; check "
                             "--participant-label")
    if not groups:
        raise InputError(f"{root}: no multi-echo GRE found; expected files like "
                         "sub-<L>/[ses-<S>/]anat/sub-<L>[_ses-<S>]_echo-<N>_part-{mag,phase}"
                         "_MEGRE.nii.gz")
    scans = []
    cache: dict = {}
    for key in sorted(groups):
        g = groups[key]
        mag, pha, problem = g["mag"], g["phase"], g["problem"]
        if sorted(mag) != sorted(pha) and problem is None:
            only_m = sorted(set(mag) - set(pha))
            only_p = sorted(set(pha) - set(mag))
            f = mag[only_m[0]] if only_m else pha[only_p[0]]
            other = "phase" if only_m else "magnitude"
            problem = (f"{f}: no matching {other} image for this echo; every echo needs "
                       "both part-mag and part-phase")
        order = sorted(set(mag) & set(pha)) if problem is None else sorted(mag)
        ents = dict(key)
        sub = f"sub-{ents.pop('sub')}"
        ses = f"ses-{ents.pop('ses')}" if "ses" in ents else None
        extra = {k: ents[k] for k in sorted(ents, key=lambda k: (
            _ENTITY_ORDER.index(k) if k in _ENTITY_ORDER else 99, k))}
        mfiles = tuple(mag[i] for i in order)
        pfiles = tuple(pha[i] for i in order if i in pha)
        scans.append(Scan(
            participant_id=sub, session_id=ses, entities=extra,
            magnitude_files=mfiles, phase_files=pfiles,
            magnitude_meta=tuple(_sidecar(f, root, cache) for f in mfiles),
            phase_meta=tuple(_sidecar(f, root, cache) for f in pfiles),
            root=root, problem=problem))
    return scans


def scan_from_files(magnitude_files, phase_files, *, te_s=None, field_strength_t=None,
                    phase_units=None, participant_id=None, session_id=None) -> Scan:
    """A :class:`Scan` from explicit files (no BIDS layout needed).

    Parameters
    ----------
    magnitude_files, phase_files : sequence of path
        One 3D image per echo in echo order, or one 4D series each (echoes on axis 3).
    te_s : sequence of float, optional
        Echo times in seconds; default: ``EchoTime`` of JSON sidecars next to the files.
    field_strength_t : float, optional
        B0 in tesla; default: ``MagneticFieldStrength`` of the sidecars.
    phase_units : str, optional
        'rad', 'deg', 'arbitrary' or 'auto'; default: the phase sidecars' ``Units``, else
        detected.
    participant_id, session_id : str, optional
        Names of the outputs; default: the ``sub-``/``ses-`` entities of the first
        magnitude file name.

    Raises
    ------
    InputError
        Missing files, unequal numbers of magnitude and phase files, no participant name.
    """
    mfiles = tuple(Path(f) for f in magnitude_files)
    pfiles = tuple(Path(f) for f in phase_files)
    if not mfiles or not pfiles:
        raise InputError("give at least one --magnitude and one --phase image")
    for f in mfiles + pfiles:
        if not f.is_file():
            raise InputError(f"{f}: no such file; check the path")
    if len(mfiles) != len(pfiles):
        raise InputError(f"{len(mfiles)} --magnitude file(s) but {len(pfiles)} --phase file(s); "
                         "give one phase image per magnitude image, in the same echo order")
    ents, _ = parse_entities(mfiles[0].name)
    sub = normalise_label(participant_id, "sub") if participant_id else None
    if sub is None:
        if "sub" not in ents:
            raise InputError(f"{mfiles[0]}: cannot name the outputs; give --participant-label "
                             "(e.g. 01), or use BIDS file names (sub-01_...)")
        sub = f"sub-{ents['sub']}"
    ses = normalise_label(session_id, "ses") if session_id else (
        f"ses-{ents['ses']}" if "ses" in ents and not participant_id else None)

    def side(f: Path) -> dict:
        js = f.with_name(_NIFTI_RE.match(f.name).group("stem") + ".json")
        return _read_json(js) if js.is_file() else {}

    for f in mfiles + pfiles:
        if not _NIFTI_RE.match(f.name):
            raise InputError(f"{f}: expected a NIfTI file (.nii or .nii.gz)")
    if phase_units is not None:
        phase_units = normalise_units(phase_units, source="--phase-units")
    return Scan(participant_id=sub, session_id=ses, magnitude_files=mfiles, phase_files=pfiles,
                magnitude_meta=tuple(side(f) for f in mfiles),
                phase_meta=tuple(side(f) for f in pfiles),
                te_override_s=None if te_s is None else tuple(float(t) for t in te_s),
                field_strength_override_t=field_strength_t, phase_units_override=phase_units)


def write_megre(bids_dir, participant_id, session_id, magnitude, phase_rad, te_s, affine, *,
                field_strength_t: float, entities=None, four_d: bool = False,
                metadata=None) -> tuple[list[Path], list[Path]]:
    """Write one multi-echo GRE scan as BIDS raw data (the inverse of :func:`discover_scans`).

    For simulators and converters: images and sidecars are written atomically, phase in
    radians with ``Units: rad``.

    Parameters
    ----------
    bids_dir : str or Path
    participant_id, session_id : str
        ``'sub-01'`` / ``'01'``; ``session_id`` None for single-session data.
    magnitude, phase_rad : ndarray, shape (X, Y, Z, E)
        Echoes last; phase in radians (wrapped or not).
    te_s : sequence of E floats
        Echo times (s), increasing.
    affine : ndarray, shape (4, 4)
    field_strength_t : float
        ``MagneticFieldStrength`` (T).
    entities : dict, optional
        Other entities (``{'acq': 'siemens'}``), in BIDS order.
    four_d : bool
        One 4D file per part (``EchoTime`` a list) instead of one file per echo.
    metadata : dict, optional
        More sidecar fields (e.g. ``Manufacturer``, ``FlipAngle``).

    Returns
    -------
    magnitude_files, phase_files : list of Path
    """
    from qsm_core.io.atomic import write_json
    from qsm_core.io.nifti import save_nifti
    from qsm_core.io.phase import wrap_rad

    sub = normalise_label(participant_id, "sub")
    ses = normalise_label(session_id, "ses")
    mag = np.asarray(magnitude, dtype=np.float32)
    pha = np.asarray(phase_rad, dtype=np.float32)
    if mag.ndim == 3:
        mag, pha = mag[..., None], pha[..., None]
    te = [float(t) for t in np.atleast_1d(te_s)]
    if mag.shape != pha.shape or mag.ndim != 4 or mag.shape[3] != len(te):
        raise InputError(f"write_megre: magnitude {mag.shape}, phase {pha.shape} and "
                         f"{len(te)} echo time(s) do not agree (echoes last)")
    anat = Path(bids_dir) / sub / (ses or "") / "anat"
    prefix = "_".join([sub] + ([ses] if ses else [])
                      + [f"{k}-{v}" for k, v in (entities or {}).items()])
    base = {"MagneticFieldStrength": float(field_strength_t)}
    base.update(metadata or {})
    items = [(None, slice(None), te)] if four_d else [
        (e + 1, slice(e, e + 1), te[e]) for e in range(len(te))]
    mfiles, pfiles = [], []
    for num, sl, echo_te in items:
        echo = "" if num is None else f"_echo-{num}"
        for part, data, files in (("mag", mag, mfiles), ("phase", pha, pfiles)):
            stem = f"{prefix}{echo}_part-{part}_MEGRE"
            vol = data[..., sl]
            vol = vol[..., 0] if vol.shape[3] == 1 else vol
            if part == "phase":
                vol = wrap_rad(vol)
            files.append(save_nifti(anat / f"{stem}.nii.gz", vol, affine))
            meta = dict(base, EchoTime=echo_te)
            if part == "phase":
                meta["Units"] = "rad"
            write_json(anat / f"{stem}.json", meta)
    return mfiles, pfiles
