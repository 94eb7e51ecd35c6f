"""Experiment (not a product path): one-step iLSQR on the SMV-filtered total field.

Background removal throws away the part of the local field that is harmonic inside the
mask (docs/pipeline.md, "Known gaps"). A one-step method keeps it: instead of V-SHARP
followed by iLSQR step 1 on the local field, step 1 solves

    min || W R S (f - D M chi) ||      over chi (inside the brain mask M)

where ``S`` is V-SHARP's composite SMV high-pass (each voxel of the final mask ``R`` takes
the largest ball that fits in ``M``), ``f`` the fitted *total* field and ``W`` iLSQR's
Laplacian weights. ``S`` kills every background field exactly, and chi outside ``M`` is
not an unknown, so nothing harmonic has to be guessed. iLSQR's steps 2-4 then run as
usual (FastQSM prior from the pipeline's local field). Each iteration costs 2 + 2 x
(number of radii) FFTs instead of step 1's 2.

Prints the NRMSE of the one-step chi next to the pipeline's (same phantom, noise and
masks as ``bench_pipeline.py --presets siemens``) and, as a control, on the *exact* local
field (no background, no noise), where iLSQR itself reaches the isolated-dipole figure.

Usage::

    python benchmarks/exp_onestep.py [--iters 50] [--tol 1e-3]
"""

from __future__ import annotations

import argparse
import time

import bench_pipeline as bp
import numpy as np
import scipy.fft
from scipy.sparse.linalg import LinearOperator, lsqr


def onestep_step1(field_ppm, mask, *, vox, b0, radii_mm, iters: int, tol: float):
    """Step 1 on the SMV-filtered field (chi confined to ``mask``); chi on the input grid."""
    from qsm_core.backend import get_backend
    from qsm_core.background import _smv_spectrum
    from qsm_core.inversion._common import finish, prepare
    from qsm_core.inversion.ilsqr import laplacian_weights

    g = prepare(field_ppm, mask, voxel_size_mm=vox, b0_dir=b0, pad_voxels=14, method="onestep")
    shape, m = g.shape, g.mask
    d = g.kernel().astype(np.float32)
    be = get_backend("cpu")

    def fft(x):
        return scipy.fft.rfftn(x, workers=-1)

    def ifft(x):
        return scipy.fft.irfftn(x, shape, workers=-1)

    mspec = fft(m.astype(np.float32))
    which = np.full(shape, -1, np.int8)
    highpass = []
    for i, r in enumerate(sorted(radii_mm, reverse=True)):
        s_r, n_ball = _smv_spectrum(shape, r, vox, be)
        fits = (ifft(mspec * s_r) > 1 - 0.5 / n_ball) & (which < 0) & m
        which[fits] = i
        highpass.append((1 - s_r).astype(np.float32))
    regions = [which == i for i in range(len(highpass))]
    data = which >= 0
    w = laplacian_weights(g.field_ppm, m, vox) * data

    def composite(spec):
        out = np.zeros(shape, np.float32)
        for hp, reg in zip(highpass, regions):
            out[reg] = ifft(spec * hp)[reg]
        return out

    b = (composite(fft(g.field_ppm)) * w)[data]

    def matvec(x):
        chi = np.zeros(shape, np.float32)
        chi[m] = x
        return (composite(fft(chi) * d) * w)[data].astype(np.float64)

    def rmatvec(y):
        u = np.zeros(shape, np.float32)
        u[data] = y
        u *= w
        acc = sum(fft(np.where(reg, u, 0)) * hp for hp, reg in zip(highpass, regions))
        return ifft(acc * d)[m].astype(np.float64)

    op = LinearOperator((int(data.sum()), int(m.sum())), matvec=matvec, rmatvec=rmatvec,
                        dtype=np.float64)
    x, stop, n_iter = lsqr(op, b.astype(np.float64), atol=tol, btol=tol, iter_lim=iters)[:3]
    chi = np.zeros(shape, np.float32)
    chi[m] = x
    return finish(chi, g, reference="mask_mean"), n_iter


def steps_2_to_4(chi1, local_ppm, mask, *, vox, b0):
    """iLSQR's FastQSM prior, streaking estimate and subtraction, after a given step 1."""
    from qsm_core.backend import get_backend
    from qsm_core.inversion._common import finish, hermitian_scale, prepare
    from qsm_core.inversion.ilsqr import CONE_THRESHOLD, _fast_qsm, gradient_weights
    from qsm_core.inversion.ilsqr_ops import ConeGradientOp
    from qsm_core.inversion.lsqr import lsqr as lsqr_bk

    g = prepare(local_ppm, mask, voxel_size_mm=vox, b0_dir=b0, pad_voxels=12, method="ilsqr")
    bk = get_backend("cpu")
    d = g.kernel()
    c = np.zeros(g.shape, np.float32)
    c[g.box] = chi1[g.crop] * g.mask[g.box]
    chi_fast = _fast_qsm(bk, g, bk.rfftn(bk.asarray(g.field_ppm)), d)
    op = ConeGradientOp(bk, g, np.abs(d) < CONE_THRESHOLD, hermitian_scale(g.shape),
                        gradient_weights(chi_fast, g.mask, g.voxel_size_mm), precondition=True)
    res = lsqr_bk(op, op.rhs(bk.asarray(c)), atol=1e-3, btol=1e-3, max_iter=15)
    return finish(c - bk.to_numpy(op.image(res.x)), g, reference="mask_mean")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50, help="LSQR iterations of step 1")
    ap.add_argument("--tol", type=float, default=1e-3, help="LSQR tolerance of step 1")
    ap.add_argument("--radii", type=float, nargs="+", default=[12, 8, 5, 3, 2, 1],
                    help="SMV radii (mm), V-SHARP's by default")
    args = ap.parse_args(argv)

    import qsm_core
    from qsm_core.dipole import forward_field_ppm
    from qsm_core.geometry import b0_dir_from_affine
    from qsm_core.inversion import METHODS
    from qsm_core.pipeline import reconstruct

    ph, affine, vox = bp.build_phantom(quick=False)
    truth, brain = ph["chi_ppm"], ph["brain_mask"].astype(bool)
    t = np.deg2rad(bp.TILT_DEG)
    b0 = b0_dir_from_affine(affine, (np.sin(t), 0.0, np.cos(t)))
    chi_in = np.where(brain, truth - truth[brain].mean(), 0.0).astype(np.float32)
    ref = METHODS["ilsqr"](forward_field_ppm(chi_in, voxel_size_mm=vox, b0_dir=b0) * brain,
                           brain.astype(np.uint8), voxel_size_mm=vox, b0_dir=b0)
    te = bp.PRESETS["siemens"]
    mag, pha, b0_world, _ = bp.simulate_gre(ph, affine, vox, te, snr=40.0, seed=1)
    res = reconstruct(mag, pha, te, affine=affine, field_strength_t=bp.FIELD_T,
                      b0_world=b0_world)
    fm, bm = res.mask.astype(bool), res.brain_mask.astype(bool)
    hz = qsm_core.ppm_to_hz(bp.FIELD_T)
    n_ref = bp.nrmse(ref, truth, fm & brain)
    n_pipe = bp.nrmse(res.chi_ppm, truth, fm)
    print(f"isolated-dipole iLSQR {n_ref:.3f}; pipeline {n_pipe:.3f} (x{n_pipe / n_ref:.2f})")
    local_ppm = res.local_field_hz / np.float32(hz)
    exact = forward_field_ppm(np.where(bm, truth - truth[bm].mean(), 0).astype(np.float32),
                              voxel_size_mm=vox, b0_dir=b0)
    fields = {"fitted total field": res.total_field_hz / np.float32(hz),
              "exact local field (control)": exact}
    for name, field in fields.items():
        t0 = time.perf_counter()
        chi1, n_iter = onestep_step1(field, bm, vox=vox, b0=b0, radii_mm=args.radii,
                                     iters=args.iters, tol=args.tol)
        chi = steps_2_to_4(chi1, local_ppm, fm, vox=vox, b0=b0)
        n = bp.nrmse(chi, truth, fm)
        print(f"one-step iLSQR on the {name}: step 1 {n_iter} iterations, NRMSE "
              f"{n:.3f} (x{n / n_ref:.2f}), {time.perf_counter() - t0:.0f} s")
    direct = METHODS["ilsqr"](exact * fm, fm.astype(np.uint8), voxel_size_mm=vox, b0_dir=b0)
    n = bp.nrmse(direct, truth, fm)
    print(f"iLSQR on the exact local field (control): NRMSE {n:.3f} (x{n / n_ref:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
