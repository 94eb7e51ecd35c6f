"""Per-step commands on NIfTI files, for people who mix toolboxes.

::

    qsmrim unwrap   PHASE OUT [--echo-time TE ...] [--magnitude MAG] [--mask MASK]
                    [--out-noise FILE] [--device cpu|cuda]
    qsmrim bgremove FIELD MASK OUT [--method vsharp|pdf|lbv] [--out-mask FILE]
                    [--device cpu|cuda]
    qsmrim invert   FIELD MASK OUT [--field-units hz|ppm] [--field-strength T]
                    [--method ilsqr|tkd|tikhonov] [--device cpu|cuda]
                    [--noise FILE | --weights FILE]

Every output gets a JSON sidecar with ``GeneratedBy`` (qsmrim, version, parameters),
``Units`` and ``Sources``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from pathlib import Path

import numpy as np

from qsm_core.errors import InputError

logger = logging.getLogger(__name__)

INVERSION_CHOICES = ("ilsqr", "tkd", "tikhonov")
BGREMOVE_CHOICES = ("vsharp", "pdf", "lbv")


def add_parser(parser: argparse.ArgumentParser, name: str) -> None:
    """Fill the parser of ``unwrap``, ``bgremove`` or ``invert`` (chosen by ``name``)."""
    if name == "unwrap":
        parser.add_argument("phase", metavar="PHASE",
                            help="wrapped phase, 3D or 4D (echoes along the 4th axis)")
        parser.add_argument("out", metavar="OUT",
                            help="output .nii.gz: unwrapped phase (rad), or with --echo-time "
                                 "the total field (Hz)")
        parser.add_argument("--echo-time", nargs="+", type=float, metavar="TE_S",
                            help="echo time(s) in seconds: output the field in Hz, fitted "
                                 "over the echoes (magnitude-weighted with --magnitude)")
        parser.add_argument("--magnitude", metavar="FILE",
                            help="magnitude of the same echoes (fit weights; needs "
                                 "--echo-time)")
        parser.add_argument("--mask", metavar="FILE",
                            help="region where the phase is trusted (optional)")
        parser.add_argument("--phase-units", choices=("auto", "rad", "deg", "arbitrary"),
                            help="default: Units of PHASE's JSON sidecar, else detected")
        parser.add_argument("--phase-sign", type=int, choices=(1, -1), default=1,
                            help="sign of phase = +-2 pi f TE (default +1)")
        parser.add_argument("--out-noise", metavar="FILE",
                            help="with --echo-time: also write the field's noise standard "
                                 "deviation (Hz) per voxel (e.g. for invert --weights)")
    elif name == "bgremove":
        parser.add_argument("field", metavar="FIELD", help="total field (Hz, or any unit: "
                                                           "the output keeps it)")
        parser.add_argument("mask", metavar="MASK", help="brain mask on the same grid")
        parser.add_argument("out", metavar="OUT", help="output local field .nii.gz")
        parser.add_argument("--method", choices=BGREMOVE_CHOICES, default="vsharp",
                            help="default: vsharp")
        parser.add_argument("--out-mask", metavar="FILE",
                            help="also write the (eroded) mask where the local field is valid")
    elif name == "invert":
        parser.add_argument("field", metavar="FIELD", help="local field")
        parser.add_argument("mask", metavar="MASK", help="brain mask on the same grid")
        parser.add_argument("out", metavar="OUT", help="output susceptibility map (ppm)")
        parser.add_argument("--field-units", choices=("hz", "ppm"), default="hz",
                            help="units of FIELD (default: hz)")
        parser.add_argument("--field-strength", type=float, metavar="T",
                            help="B0 in tesla, needed for --field-units hz (default: "
                                 "MagneticFieldStrength of FIELD's JSON sidecar)")
        parser.add_argument("--method", choices=INVERSION_CHOICES, default="ilsqr",
                            help="default: ilsqr")
        parser.add_argument("--weights", metavar="FILE",
                            help="data weights on the same grid (iLSQR only), e.g. 1 / the "
                                 "noise std written by unwrap --out-noise; --noise FILE "
                                 "does that division for you")
        parser.add_argument("--noise", metavar="FILE",
                            help="noise standard deviation of FIELD per voxel (iLSQR only): "
                                 "weights 1 / noise (zero = unknown, weight 0)")
    else:  # pragma: no cover - main.py only maps the three names above here
        raise ValueError(f"unknown step {name!r}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="compute device (default: cpu; lbv always runs on the CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(_step=name)


# --------------------------------------------------------------------- helpers
def _sidecar_of(path: Path) -> dict:
    name = path.name
    stem = name[:-7] if name.endswith(".nii.gz") else name.rsplit(".", 1)[0]
    js = path.with_name(stem + ".json")
    if not js.is_file():
        return {}
    try:
        obj = json.loads(js.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{js}: not a readable JSON sidecar ({exc})") from None
    return obj if isinstance(obj, dict) else {}


def _check_out(args, *paths) -> None:
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if not (p.name.endswith(".nii.gz") or p.name.endswith(".nii")):
            raise InputError(f"{p}: output names must end in .nii.gz or .nii")
        if p.exists() and not args.overwrite:
            raise InputError(f"{p}: exists; use --overwrite to replace it")


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here; use "
                             "--device cpu")


def _load_mask(path, like_shape, like_affine):
    from qsm_core.io.bids import load_mask

    return load_mask(path, shape=like_shape, affine=like_affine)


def _accepts(func, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


# --------------------------------------------------------------------- steps
def _unwrap(args) -> int:
    from qsm_core.echo_fit import fit_frequency
    from qsm_core.geometry import voxel_sizes_mm
    from qsm_core.io.derivatives import write_image_with_sidecar
    from qsm_core.io.nifti import load_nifti
    from qsm_core.io.phase import phase_to_rad
    from qsm_core.unwrap import laplacian_unwrap

    _check_out(args, args.out, args.out_noise)
    _check_device(args.device)
    if args.out_noise is not None and args.echo_time is None:
        raise InputError("--out-noise is the noise of the fitted field; give --echo-time too")
    src = Path(args.phase)
    raw, affine = load_nifti(src, allow_4d=True)
    units = args.phase_units or _sidecar_of(src).get("Units")
    phase, note = phase_to_rad(raw, units=units, source=str(src))
    del raw
    phase4 = phase if phase.ndim == 4 else phase[..., None]
    n_echo = phase4.shape[3]
    vox = voxel_sizes_mm(affine)
    mask = None if args.mask is None else _load_mask(args.mask, phase4.shape[:3], affine)
    sources = [str(src.resolve())]
    params = {"step": "unwrap", "unwrap": "laplacian", "phase_units_note": note,
              "device": args.device}
    if args.magnitude is not None and args.echo_time is None:
        raise InputError("--magnitude only weights the fit over echoes; give --echo-time too")
    if args.echo_time is None:
        out = np.stack([laplacian_unwrap(phase4[..., e], voxel_size_mm=vox, mask=mask,
                                         device=args.device) for e in range(n_echo)], axis=3)
        out = out if phase.ndim == 4 else out[..., 0]
        write_image_with_sidecar(args.out, out, affine, units="rad", parameters=params,
                                 sources=sources,
                                 description="Laplacian-unwrapped phase (rad), defined up to "
                                             "a harmonic function")
        return 0
    if len(args.echo_time) != n_echo:
        raise InputError(f"{src}: {n_echo} echo(es) but {len(args.echo_time)} --echo-time "
                         "value(s); give one echo time (s) per echo")
    if args.magnitude is not None:
        mag, m_aff = load_nifti(args.magnitude, allow_4d=True)
        if mag.shape != phase.shape:
            raise InputError(f"{args.magnitude}: shape {mag.shape} does not match phase "
                             f"{src} shape {phase.shape}")
        if not np.allclose(m_aff, affine, atol=1e-3):
            raise InputError(f"{args.magnitude}: its affine differs from that of {src}")
        mag4 = np.abs(mag if mag.ndim == 4 else mag[..., None])
        sources.insert(0, str(Path(args.magnitude).resolve()))
    else:
        mag4 = np.ones_like(phase4)
    fit = fit_frequency(phase4, mag4, args.echo_time, voxel_size_mm=vox,
                        phase_sign=args.phase_sign, unwrap_mask=mask, device=args.device)
    params.update(echo_times_s=list(args.echo_time), phase_sign=args.phase_sign,
                  fit="magnitude-weighted" if args.magnitude else "unweighted")
    write_image_with_sidecar(args.out, fit.frequency_hz, affine, units="Hz", parameters=params,
                             sources=sources, extra={"EchoTime": list(args.echo_time)},
                             description="Total field (Hz) from Laplacian-unwrapped phase "
                                         "fitted over echo time")
    if args.out_noise is not None:
        write_image_with_sidecar(args.out_noise, fit.noise_std_hz, affine, units="Hz",
                                 parameters={**params, "noise_method": fit.noise_method},
                                 sources=sources,
                                 description="Standard deviation (Hz) of the fitted field")
    return 0


def _bgremove(args) -> int:
    from qsm_core.background import BGREMOVE_METHODS
    from qsm_core.geometry import b0_dir_from_affine, voxel_sizes_mm
    from qsm_core.io.derivatives import write_image_with_sidecar
    from qsm_core.io.nifti import load_nifti

    _check_out(args, args.out, args.out_mask)
    _check_device(args.device)
    if args.method not in BGREMOVE_METHODS:
        raise InputError(f"--method {args.method}: expected one of {sorted(BGREMOVE_METHODS)}")
    src = Path(args.field)
    field, affine = load_nifti(src)
    mask = _load_mask(args.mask, field.shape, affine)
    func = BGREMOVE_METHODS[args.method]
    kwargs = {"voxel_size_mm": voxel_sizes_mm(affine)}
    if _accepts(func, "b0_dir"):
        kwargs["b0_dir"] = b0_dir_from_affine(affine)
    if _accepts(func, "device"):
        kwargs["device"] = args.device
    local, out_mask = func(field, mask, **kwargs)
    units = _sidecar_of(src).get("Units", "Hz")
    params = {"step": "bgremove", "bgremove": args.method,
              "device": args.device if "device" in kwargs else "cpu"}
    sources = [str(src.resolve()), str(Path(args.mask).resolve())]
    local = np.where(out_mask, local, 0).astype(np.float32)
    write_image_with_sidecar(args.out, local, affine, units=units, parameters=params,
                             sources=sources, description="Local (tissue) field after "
                             f"background field removal ({args.method})")
    if args.out_mask is not None:
        write_image_with_sidecar(args.out_mask, out_mask, affine, units=None, dtype=np.uint8,
                                 parameters=params, sources=sources,
                                 description="Mask where the local field is valid",
                                 extra={"Type": "Brain"})
    return 0


def _invert(args) -> int:
    from qsm_core import ppm_to_hz
    from qsm_core.geometry import b0_dir_from_affine, closest_ras, voxel_sizes_mm
    from qsm_core.inversion import METHODS
    from qsm_core.io.derivatives import write_image_with_sidecar
    from qsm_core.io.nifti import load_nifti

    _check_out(args, args.out)
    if args.method not in METHODS:
        raise InputError(f"--method {args.method}: expected one of {sorted(METHODS)}")
    src = Path(args.field)
    field, affine = load_nifti(src)
    mask = _load_mask(args.mask, field.shape, affine)
    side = _sidecar_of(src)
    params = {"step": "invert", "method": args.method, "field_units": args.field_units}
    if args.field_units == "hz":
        b0 = args.field_strength
        if b0 is None and "MagneticFieldStrength" in side:
            b0 = float(side["MagneticFieldStrength"])
        if b0 is None:
            raise InputError(f"{src}: a field in Hz needs the field strength; give "
                             "--field-strength T (e.g. 3), or --field-units ppm")
        if not 0.1 <= b0 <= 21:
            raise InputError(f"--field-strength {b0}: give B0 in tesla (e.g. 3)")
        local_ppm = (field / np.float32(ppm_to_hz(b0))).astype(np.float32)
        params["field_strength_t"] = b0
    else:
        local_ppm = field.astype(np.float32)
    _check_device(args.device)
    opts, sources = {}, [str(src.resolve()), str(Path(args.mask).resolve())]
    if args.weights is not None or args.noise is not None:
        if args.weights is not None and args.noise is not None:
            raise InputError("give --weights or --noise, not both")
        if not _accepts(METHODS[args.method], "weights"):
            raise InputError(f"--method {args.method} has no weighted data term; use "
                             "--method ilsqr with --weights/--noise")
        wpath = Path(args.weights if args.weights is not None else args.noise)
        wmap, w_aff = load_nifti(wpath)
        if wmap.shape != field.shape or not np.allclose(w_aff, affine, atol=1e-3):
            raise InputError(f"{wpath}: shape {wmap.shape} or affine differs from {src}; "
                             "give a map on the field's grid")
        if args.noise is not None:
            from qsm_core.inversion.weights import noise_weights

            try:
                wmap = noise_weights(wmap, mask)
            except InputError as exc:
                raise InputError(f"{wpath}: {exc}") from None
        inside = wmap[np.asarray(mask) != 0]
        if not np.all(np.isfinite(inside)) or np.any(inside < 0) or not np.any(inside > 0):
            raise InputError(f"{wpath}: weights must be finite, non-negative and not all zero "
                             "inside the mask")
        opts["weights"] = wmap
        params["weights"] = "noise" if args.noise is not None else "user"
        sources.append(str(wpath.resolve()))
    # on the grid closest to RAS, as `recon` does: the result does not depend on how the
    # file stores its axes (iLSQR's one-sided differences would)
    reo = closest_ras(affine, local_ppm.shape)
    opts = {k: reo.to_ras(v) for k, v in opts.items()}
    ras = reo.ras_affine(affine)
    chi = METHODS[args.method](reo.to_ras(local_ppm), reo.to_ras(mask),
                               voxel_size_mm=voxel_sizes_mm(ras), b0_dir=b0_dir_from_affine(ras),
                               device=args.device, **opts)
    chi = np.where(mask, reo.from_ras(np.asarray(chi)), 0).astype(np.float32)
    params["device"] = args.device
    params["orientation"] = {"stored": reo.stored_axcodes, "processed": "RAS"}
    write_image_with_sidecar(args.out, chi, affine, units="ppm", parameters=params,
                             sources=sources,
                             description="Magnetic susceptibility (chi) in ppm, positive = "
                                         f"paramagnetic ({args.method})")
    return 0


def run(args) -> int:
    """Run one step; returns the exit status."""
    step = {"unwrap": _unwrap, "bgremove": _bgremove, "invert": _invert}[args._step]
    status = step(args)
    print(f"qsmrim {args._step}: wrote {args.out}", file=sys.stderr)
    return status
