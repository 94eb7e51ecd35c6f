"""Reading and writing ``.nii.gz`` volumes: qsmrim's ISA-L path against nibabel's own.

Every ``qsmrim`` command reads and writes gzipped NIfTI (echoes, Chimaps, FLAIR, lesion
maps, probability maps). :func:`qsm_core.io.nifti.write_image` compresses with ISA-L
(:mod:`isal.igzip`) at gzip level 1 and :func:`qsm_core.io.nifti.load_nifti` decompresses
with it; this script times both against ``nib.save`` / ``nib.load`` (zlib) on the same
images, interleaved, in one process, and checks the files decode to the same bytes.

Images: a 1 mm head-sized float32 volume (185 x 221 x 175; smooth structure plus noise, as a
Chimap or SWI) and the same scaled to int16 (as scanners store echoes).

Usage::

    python benchmarks/bench_nifti_io.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def images(rng) -> dict[str, nib.Nifti1Image]:
    shape = (185, 221, 175)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 3) * 5
    vol = (0.05 * smooth + 0.01 * rng.standard_normal(shape, dtype=np.float32))
    vol = vol.astype(np.float32)
    i16 = np.clip(np.round(vol / vol.std() * 400), -32768, 32767).astype(np.int16)
    return {"float32": nib.Nifti1Image(vol, np.eye(4)),
            "int16": nib.Nifti1Image(i16, np.eye(4))}


def nib_read(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, np.float32)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    from qsm_core.io.nifti import load_nifti, write_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_nifti_"))
    try:
        for name, img in images(np.random.default_rng(0)).items():
            ours, theirs = tmp / f"{name}_qsmrim.nii.gz", tmp / f"{name}_nibabel.nii.gz"
            w_ours = best(partial(write_image, img, ours), args.repeats)
            w_theirs = best(partial(nib.save, img, theirs), args.repeats)
            r_ours = best(partial(load_nifti, ours), args.repeats)
            r_theirs = best(partial(nib_read, theirs), args.repeats)
            same = gzip.decompress(ours.read_bytes()) == gzip.decompress(theirs.read_bytes())
            mb = img.get_data_dtype().itemsize * np.prod(img.shape) / 1e6
            print(f"{name} {img.shape} ({mb:.0f} MB raw): write {w_ours:.3f} s vs nib.save "
                  f"{w_theirs:.3f} s ({w_theirs / w_ours:.1f}x); read {r_ours:.3f} s vs "
                  f"nib.load {r_theirs:.3f} s ({r_theirs / r_ours:.1f}x); file "
                  f"{ours.stat().st_size / 1e6:.1f} vs {theirs.stat().st_size / 1e6:.1f} MB; "
                  f"same decoded bytes: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
