"""The classical QSM pipeline: multi-echo GRE magnitude + phase -> susceptibility map.

Stages (design.md section 4), each a plain function of its own module:

1. ``mask``: brain mask from the magnitude (:func:`qsm_core.mask.brain_mask`); a user mask
   always wins.
2. ``unwrap_fit``: Laplacian unwrapping of each echo and a magnitude-weighted fit of phase
   vs TE (:func:`qsm_core.echo_fit.fit_frequency`) -> total field (Hz).
3. ``bgremove``: background field removal (:data:`qsm_core.background.BGREMOVE_METHODS`)
   -> local field (Hz) and the final mask.
4. ``inversion``: local field in ppm (Hz / :func:`qsm_core.ppm_to_hz`) -> chi (ppm) by
   :data:`qsm_core.inversion.METHODS`.
5. ``swi``: SWI and mIP from the echo nearest 20 ms and ``2 pi * local_field * TE``.

The B0 direction in voxel axes and the voxel sizes come from the affine
(:mod:`qsm_core.geometry`). Phase convention: ``phase = phi0 + phase_sign 2 pi f TE``.

Every scan is processed with its axes in the order and direction closest to RAS
(:func:`qsm_core.geometry.closest_ras`, a lossless permutation and flip) and the outputs
are returned on the stored grid, so the result does not depend on how a file stores its
axes (iLSQR's gradient weights use one-sided differences, which would).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import qsm_core
from qsm_core.background import BGREMOVE_METHODS, HIGHPASS_METHODS, restore_harmonic
from qsm_core.echo_fit import check_echo_inputs, fit_frequency
from qsm_core.errors import InputError
from qsm_core.geometry import b0_dir_from_affine, closest_ras, voxel_sizes_mm
from qsm_core.inversion.weights import noise_weights
from qsm_core.mask import brain_mask, dilate_ball
from qsm_core.swi import swi

__all__ = ["ReconResult", "reconstruct", "STAGES", "SWI_TARGET_TE_S", "chi_skewness",
           "SIGN_CHECK_SKEWNESS"]

log = logging.getLogger(__name__)

STAGES = ("mask", "unwrap_fit", "bgremove", "inversion", "swi")
"""Stage names passed to the ``progress`` callback, in order."""

SWI_TARGET_TE_S = 0.020
"""SWI uses the echo whose TE is nearest this (s); ~20 ms is customary at 3 T."""

SIGN_CHECK_SKEWNESS = -0.5
"""Below this skewness of chi in the mask, :func:`reconstruct` warns of a flipped phase sign.

In a brain the strongest susceptibility sources are paramagnetic (veins, iron-rich deep
grey nuclei, PRL rims), so the distribution of chi has a long positive tail: skewness
+1.2 to +5.4 on every simulated head of the held-out and stress cohorts. A phase
convention opposite to ``phase_sign`` negates the map and the skewness with it.
"""


def chi_skewness(chi_ppm: np.ndarray, mask: np.ndarray, *, max_voxels: int = 500_000) -> float:
    """Sample skewness of ``chi_ppm`` inside ``mask`` (at most ``max_voxels``, evenly spaced).

    Returns 0.0 for fewer than 3 voxels or a constant map.
    """
    v = np.asarray(chi_ppm)[np.asarray(mask) != 0].astype(np.float64)
    v = v[:: max(1, v.size // max_voxels)]
    if v.size < 3:
        return 0.0
    d = v - v.mean()
    m2 = float(np.mean(d * d))
    return float(np.mean(d**3) / m2**1.5) if m2 > 0 else 0.0

DEFAULT_BGREMOVE_OPTIONS: dict = {"vsharp": {}, "pdf": {}, "lbv": {}}

DEFAULT_MASK_OPTIONS: dict = {"erode_mm": 2.0}
"""Options of the computed brain mask: a 2 mm erosion drops the skull, cavity and sinus
voxels that a magnitude threshold keeps at the brain's edge (on the MNI head phantom a few
hundred such voxels tripled the NRMSE). A user mask is used as given."""
"""Options used unless the caller passes ``bgremove_options`` (see docs/pipeline.md)."""


@dataclass
class ReconResult:
    """Outputs of :func:`reconstruct` (arrays of shape (X, Y, Z)).

    Attributes
    ----------
    chi_ppm : float32
        Susceptibility (ppm), zero outside ``mask``, referenced to its mean inside ``mask``.
    mask : uint8
        Final mask of ``chi_ppm`` (the brain mask after background removal's erosion).
    local_field_hz : float32
        Local (tissue) field (Hz), zero outside ``mask``.
    total_field_hz : float32
        Fitted total field (Hz) on the brain mask (up to a harmonic function, see
        :mod:`qsm_core.unwrap`), zero outside it.
    brain_mask : uint8
        The brain mask before background removal (user mask or computed).
    swi : float32
        Susceptibility-weighted image (magnitude units).
    mip : float32
        Minimum-intensity projection of ``swi``.
    parameters : dict
        Every parameter used, JSON-serialisable, for provenance.
    timings_s : dict
        Wall time of each stage (s).
    """

    chi_ppm: np.ndarray
    mask: np.ndarray
    local_field_hz: np.ndarray
    total_field_hz: np.ndarray
    brain_mask: np.ndarray
    swi: np.ndarray
    mip: np.ndarray
    parameters: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)


RESULT_ARRAYS = ("chi_ppm", "mask", "local_field_hz", "total_field_hz", "brain_mask", "swi",
                 "mip")


def _inversion_methods():
    from qsm_core.inversion import METHODS

    return METHODS


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return repr(obj)


def reconstruct(magnitude, phase_rad, te_s, *, affine, field_strength_t: float,
                method: str = "ilsqr", bgremove: str = "vsharp", mask=None,
                phase_sign: int = +1, b0_world=(0.0, 0.0, 1.0), device: str = "cpu",
                progress: Callable[[str], None] | None = None, mask_options=None,
                bgremove_options=None, inversion_options=None, fit_options=None,
                data_weights: str = "noise", restore_iter: int = 1,
                unwrap_dilate_mm: float = 2.0) -> ReconResult:
    """Run the whole QSM pipeline on one multi-echo GRE scan.

    Parameters
    ----------
    magnitude : array_like, shape (X, Y, Z, E) or (X, Y, Z)
        Magnitude of each echo (echoes last; 3D = single echo).
    phase_rad : array_like, same shape
        Wrapped phase (rad) of each echo.
    te_s : sequence of E floats
        Echo times (s), strictly increasing.
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine (mm); gives voxel sizes and the B0 direction.
    field_strength_t : float
        B0 (T), for Hz -> ppm.
    method : str
        Dipole inversion, a key of :data:`qsm_core.inversion.METHODS`.
    bgremove : str
        Background removal, a key of :data:`qsm_core.background.BGREMOVE_METHODS`.
    mask : array_like, shape (X, Y, Z), optional
        User brain mask (nonzero inside); always used instead of the computed one.
    phase_sign : {+1, -1}
        Phase convention, see :mod:`qsm_core.echo_fit`.
    b0_world : sequence of 3 floats
        B0 direction in world coordinates (+z for scanner-aligned data).
    device : str
        Where the unwrapping, echo fit, background removal (V-SHARP, PDF and the harmonic
        restoration) and inversion run: ``"cpu"`` (numpy/scipy), ``"cuda"`` (torch on a
        GPU) or ``"torch-cpu"`` (the torch code on the CPU, for tests). The brain mask,
        LBV and SWI always run on the CPU.
    progress : callable, optional
        Called with each stage name of :data:`STAGES` as it starts.
    mask_options, bgremove_options, inversion_options, fit_options : dict, optional
        Extra keyword options of :func:`~qsm_core.mask.brain_mask` (default
        :data:`DEFAULT_MASK_OPTIONS`), the background method, the inversion method and
        :func:`~qsm_core.echo_fit.fit_frequency`.
    data_weights : {"noise", "none"}
        ``"noise"``: methods with a weighted data term (iLSQR) get the weights
        ``1 / noise_std_hz`` of the echo fit (:func:`qsm_core.inversion.weights.noise_weights`),
        and so does PDF; closed-form methods (TKD, Tikhonov) have none, ``parameters``
        records which was used. ``"none"``: unweighted. ``weights`` in ``inversion_options`` wins.
    restore_iter : int
        Iterations of :func:`qsm_core.background.restore_harmonic` after V-SHARP or LBV
        (which drop the part of the local field that is harmonic inside the mask); 0 =
        off. Not applied after PDF, which keeps that part by construction.
    unwrap_dilate_mm : float
        The phase is unwrapped on the brain mask dilated by this much (mm), so that noise
        outside the head cannot leak into the field (see :mod:`qsm_core.unwrap`). A
        negative value unwraps on the whole volume.

    Returns
    -------
    ReconResult
        Arrays on the grid of the inputs. The stages ran on the same voxels with the axes
        closest to R, A, S (``parameters["orientation"]``); the voxel-axis parameters
        (``voxel_size_mm``, ``b0_dir_voxel``, the mIP axis) refer to the inputs' axes.

    Raises
    ------
    InputError
        Shape mismatch, TE count or order, NaN/Inf, empty mask, unknown method...
    """
    shape = np.shape(phase_rad)
    options = dict(method=method, bgremove=bgremove, phase_sign=phase_sign, b0_world=b0_world,
                   device=device, progress=progress, mask_options=mask_options,
                   bgremove_options=bgremove_options, inversion_options=inversion_options,
                   fit_options=fit_options, data_weights=data_weights,
                   restore_iter=restore_iter, unwrap_dilate_mm=unwrap_dilate_mm,
                   field_strength_t=field_strength_t)
    consistent = (len(shape) in (3, 4) and np.shape(magnitude) == shape
                  and (mask is None or np.shape(mask) == shape[:3])
                  and np.shape(affine) == (4, 4))
    if not consistent:  # let the checks report the problem in the caller's terms
        return _reconstruct_on_grid(magnitude, phase_rad, te_s, affine=affine, mask=mask,
                                    **options)
    reo = closest_ras(affine, shape)
    res = _reconstruct_on_grid(reo.to_ras(magnitude), reo.to_ras(phase_rad), te_s,
                               affine=reo.ras_affine(affine),
                               mask=None if mask is None else reo.to_ras(mask), **options)
    params = res.parameters
    params["orientation"] = {"stored": reo.stored_axcodes, "processed": "RAS"}
    if reo.is_identity:
        return res
    # the voxel-axis parameters of the stored grid, as the caller sees it
    params["voxel_size_mm"] = [float(v) for v in voxel_sizes_mm(affine)]
    params["b0_dir_voxel"] = [float(v) for v in b0_dir_from_affine(affine, b0_world)]
    params["swi"]["mip_axis"] = reo.stored_axis(params["swi"]["mip_axis"])
    return ReconResult(**{k: reo.from_ras(getattr(res, k)) for k in RESULT_ARRAYS},
                       parameters=params, timings_s=res.timings_s)


def _reconstruct_on_grid(magnitude, phase_rad, te_s, *, affine, field_strength_t: float,
                         method: str, bgremove: str, mask, phase_sign: int, b0_world,
                         device: str, progress, mask_options, bgremove_options,
                         inversion_options, fit_options, data_weights: str, restore_iter: int,
                         unwrap_dilate_mm: float) -> ReconResult:
    """:func:`reconstruct` on the grid the arrays are given on (no reorientation)."""
    timings: dict[str, float] = {}
    phase, mag, te = check_echo_inputs(phase_rad, magnitude, te_s)
    shape = phase.shape[:3]
    vox = voxel_sizes_mm(affine)
    b0_dir = b0_dir_from_affine(affine, b0_world)
    if not (np.isfinite(field_strength_t) and field_strength_t > 0):
        raise InputError(f"field_strength_t must be a positive number of tesla, got "
                         f"{field_strength_t!r}")
    methods = _inversion_methods()
    if method not in methods:
        raise InputError(f"unknown inversion method {method!r}; choose one of "
                         f"{sorted(methods)}")
    if bgremove not in BGREMOVE_METHODS:
        raise InputError(f"unknown background removal {bgremove!r}; choose one of "
                         f"{sorted(BGREMOVE_METHODS)}")
    if phase_sign not in (1, -1):
        raise InputError(f"phase_sign must be +1 or -1, got {phase_sign!r}")
    if not (isinstance(restore_iter, int | np.integer) and restore_iter >= 0):
        raise InputError(f"restore_iter must be an integer >= 0, got {restore_iter!r}")
    if data_weights not in ("noise", "none"):
        raise InputError(f"data_weights must be 'noise' or 'none', got {data_weights!r}")
    fit_opts = dict(fit_options or {})
    mask_options = {**DEFAULT_MASK_OPTIONS, **(mask_options or {})}
    bg_opts = dict(DEFAULT_BGREMOVE_OPTIONS.get(bgremove, {}))
    bg_opts.update(bgremove_options or {})
    inv_opts = dict(inversion_options or {})
    if mask is not None:
        user_mask = np.asarray(mask)
        if user_mask.shape != shape:
            raise InputError(f"mask shape {user_mask.shape} does not match the image shape "
                             f"{shape}; pass a mask on the same grid as the GRE images")
        if not np.all(np.isfinite(user_mask)):
            raise InputError("mask contains NaN or Inf")
        if not np.any(user_mask):
            raise InputError("the mask is empty; pass a mask that covers the brain")

    def stage(name):
        if progress is not None:
            progress(name)
        log.info("stage %s", name)
        return time.perf_counter()

    t0 = stage("mask")
    if mask is not None:
        bmask = (np.asarray(mask) != 0).astype(np.uint8)
        mask_source = "user"
    else:
        bmask = brain_mask(mag, voxel_size_mm=vox, **mask_options)
        mask_source = "brain_mask"
    timings["mask"] = time.perf_counter() - t0

    t0 = stage("unwrap_fit")
    unwrap_mask = None
    if unwrap_dilate_mm >= 0:
        unwrap_mask = dilate_ball(bmask.astype(bool), unwrap_dilate_mm, voxel_size_mm=vox)
    fit = fit_frequency(phase, mag, te, voxel_size_mm=vox, phase_sign=phase_sign,
                        mask=bmask, unwrap_mask=unwrap_mask, device=device, **fit_opts)
    total_hz = (fit.frequency_hz * bmask).astype(np.float32)
    del fit.unwrapped_phase_rad
    timings["unwrap_fit"] = time.perf_counter() - t0

    t0 = stage("bgremove")
    bg_run = dict(bg_opts)
    bg_weights = "none"
    if bgremove == "pdf" and data_weights == "noise" and "weight" not in bg_run:
        bg_run["weight"] = noise_weights(fit.noise_std_hz, bmask)  # PDF's data term
        bg_weights = "noise"
    if "device" in inspect.signature(BGREMOVE_METHODS[bgremove]).parameters:
        bg_run["device"] = device
    local_hz, final_mask = BGREMOVE_METHODS[bgremove](total_hz, bmask, voxel_size_mm=vox,
                                                      b0_dir=b0_dir, **bg_run)
    del bg_run
    final_mask = final_mask.astype(np.uint8)
    if not final_mask.any():
        raise InputError("the mask is empty after background removal (it is thinner than "
                         "the V-SHARP kernel); pass a larger mask")
    n_restore = restore_iter if bgremove in HIGHPASS_METHODS else 0
    if n_restore:
        local_hz = restore_harmonic(BGREMOVE_METHODS[bgremove], local_hz, bmask, final_mask,
                                    voxel_size_mm=vox, b0_dir=b0_dir, n_iter=n_restore,
                                    device=device, **bg_opts)
    timings["bgremove"] = time.perf_counter() - t0

    t0 = stage("inversion")
    hz_per_ppm = qsm_core.ppm_to_hz(field_strength_t)
    local_ppm = local_hz / np.float32(hz_per_ppm)
    weights_used = "user" if "weights" in inv_opts else "none"
    if (data_weights == "noise" and "weights" not in inv_opts
            and "weights" in inspect.signature(methods[method]).parameters):
        inv_opts["weights"] = noise_weights(fit.noise_std_hz, final_mask)
        weights_used = "noise"
    chi = methods[method](local_ppm, final_mask, voxel_size_mm=vox, b0_dir=b0_dir,
                          device=device, **inv_opts)
    inv_opts.pop("weights", None)
    chi = np.asarray(chi, dtype=np.float32)
    timings["inversion"] = time.perf_counter() - t0

    t0 = stage("swi")
    e_swi = int(np.argmin(np.abs(te - SWI_TARGET_TE_S)))
    swi_phase = (2.0 * np.pi * te[e_swi]) * local_hz
    mip_axis = int(np.argmax(np.abs(b0_dir)))
    swi_img, mip_img = swi(mag[..., e_swi], swi_phase.astype(np.float32), voxel_size_mm=vox,
                           highpass=None, mask=final_mask, mip_axis=mip_axis)
    timings["swi"] = time.perf_counter() - t0

    for name, arr in (("chi_ppm", chi), ("local_field_hz", local_hz), ("swi", swi_img)):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"the pipeline produced NaN/Inf in {name}; check the inputs "
                             "(magnitude all zero? mask outside the head?)")
    skewness = chi_skewness(chi, final_mask)
    if skewness < SIGN_CHECK_SKEWNESS:
        log.warning("chi is skewed towards negative values in the brain (skewness %.2f): veins "
                    "and iron-rich nuclei, the strongest sources, should be paramagnetic "
                    "(positive). The phase convention of this scan is probably the opposite "
                    "of phase_sign=%+d; rerun with phase_sign=%+d (--phase-sign %d)",
                    skewness, phase_sign, -phase_sign, -phase_sign)

    parameters = _jsonable({
        "qsmrim_version": qsm_core.__version__,
        "method": method,
        "bgremove": bgremove,
        "device": device,
        "phase_sign": phase_sign,
        "field_strength_t": float(field_strength_t),
        "hz_per_ppm": hz_per_ppm,
        "echo_times_s": te,
        "voxel_size_mm": vox,
        "b0_world": np.asarray(b0_world, float),
        "b0_dir_voxel": b0_dir,
        "mask_source": mask_source,
        "mask_options": mask_options,
        "unwrap": {"method": "laplacian", "formula": "wrapped", "echoes": "differences",
                   "dilate_mm": unwrap_dilate_mm},
        "echo_fit": {"weights": "magnitude^2", "intercept": te.size > 1,
                     "noise_method": fit.noise_method, "phase_offset": "smooth",
                     **fit_opts},
        "data_weights": weights_used,
        "bgremove_options": bg_opts,
        "harmonic_restoration_iter": n_restore,
        "bgremove_weights": bg_weights,
        "inversion_options": inv_opts,
        "swi": {"echo_index": e_swi, "te_s": float(te[e_swi]), "power": 4,
                "mip_slab_mm": 8.0, "mip_axis": mip_axis, "phase": "local_field"},
        "qc": {"chi_skewness": skewness,
               "phase_sign_suspect": bool(skewness < SIGN_CHECK_SKEWNESS)},
    })
    log.info("pipeline timings (s): %s", {k: round(v, 2) for k, v in timings.items()})
    return ReconResult(chi_ppm=chi, mask=final_mask, local_field_hz=local_hz * final_mask,
                       total_field_hz=total_hz, brain_mask=bmask, swi=swi_img, mip=mip_img,
                       parameters=parameters, timings_s=timings)
