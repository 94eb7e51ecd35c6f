"""Tiny synthetic BIDS MEGRE datasets and phantoms for the I/O and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from qsm_core import ppm_to_hz
from qsm_core.dipole import forward_field_ppm
from qsm_core.geometry import b0_dir_from_affine, voxel_sizes_mm


def save(path: Path, data, affine=None, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.eye(4) if affine is None else affine)
    nib.save(img, str(path))
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_megre(root: Path, sub: str, ses: str | None = None, *, magnitude, phase, te_s,
                b0_t=3.0, units="rad", affine=None, entities: str = "", four_d=False,
                echo_numbers=None, phase_dtype=np.float32, mag_meta=None, phase_meta=None):
    """Write one MEGRE scan; returns (magnitude files, phase files).

    magnitude, phase : (X, Y, Z, E) arrays. ``entities`` e.g. '_acq-fast_run-1'.
    """
    anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + entities
    mags, phases = [], []
    n = magnitude.shape[3]
    if four_d:
        specs = [(None, slice(None), list(te_s))]
    else:
        nums = echo_numbers or list(range(1, n + 1))
        specs = [(nums[e], e, te_s[e]) for e in range(n)]
    for num, sl, te in specs:
        echo = "" if num is None else f"_echo-{num}"
        for part, data, files, dtype in (("mag", magnitude, mags, np.float32),
                                         ("phase", phase, phases, phase_dtype)):
            stem = f"{prefix}{echo}_part-{part}_MEGRE"
            files.append(save(anat / f"{stem}.nii.gz", data[..., sl], affine, dtype))
            meta = {"EchoTime": te, "MagneticFieldStrength": b0_t}
            if part == "phase" and units is not None:
                meta["Units"] = units
            meta.update((mag_meta if part == "mag" else phase_meta) or {})
            write_json(anat / f"{stem}.json", meta)
    return mags, phases


def random_scan(rng, shape=(12, 10, 8), n_echo=2):
    mag = rng.uniform(0.5, 1.0, shape + (n_echo,)).astype(np.float32)
    phase = rng.uniform(-np.pi, np.pi, shape + (n_echo,)).astype(np.float32)
    return mag, phase


def head_phantom(shape=(48, 48, 48), voxel_mm=(1.0, 1.0, 1.0), te_s=(0.010, 0.020), b0_t=3.0,
                 affine=None, noise=0.0, rng=None):
    """A head-ish phantom: an ellipsoidal brain with WM/GM-like regions and a +0.2 ppm sphere.

    Returns dict: chi_ppm (truth), brain (bool), magnitude, phase_rad (X, Y, Z, E), affine.
    """
    if affine is None:
        affine = np.diag(list(voxel_mm) + [1.0])
    vox = voxel_sizes_mm(affine)
    idx = np.indices(shape).astype(np.float32)
    c = [(n - 1) / 2 for n in shape]
    d = [(idx[i] - c[i]) * vox[i] for i in range(3)]
    semi = [0.42 * n * vox[i] for i, n in enumerate(shape)]
    ell = sum((d[i] / semi[i]) ** 2 for i in range(3))
    brain = ell <= 1.0
    chi = np.zeros(shape, np.float32)
    chi[brain] = -0.02                      # white-matter-like
    chi[brain & (ell > 0.7)] = 0.02         # cortex-like shell
    sphere = sum((d[i] - (0.25 * semi[i] if i == 0 else 0)) ** 2 for i in range(3)) <= 5.0 ** 2
    chi[sphere] = 0.2                       # iron-rich nucleus
    field_hz = forward_field_ppm(chi, voxel_size_mm=vox, b0_dir=b0_dir_from_affine(affine)) \
        * ppm_to_hz(b0_t)
    te = np.asarray(te_s, float)
    mag = np.where(brain, 1.0, 0.02)[..., None] * np.exp(-te / 0.05)
    phase = 2 * np.pi * field_hz[..., None] * te + 0.3
    if noise > 0:
        rng = rng or np.random.default_rng(0)
        z = mag * np.exp(1j * phase)
        z = z + noise * (rng.standard_normal(z.shape) + 1j * rng.standard_normal(z.shape))
        mag, phase = np.abs(z), np.angle(z)
    phase = np.angle(np.exp(1j * phase))
    return {"chi_ppm": chi, "brain": brain, "sphere": sphere, "field_hz": field_hz,
            "magnitude": mag.astype(np.float32), "phase_rad": phase.astype(np.float32),
            "affine": affine, "te_s": tuple(te_s)}
