"""Speed and memory of iLSQR on a 224 x 224 x 160 float32 field.

Prints the total time, the time of each step, the time per LSQR iteration and the time
of the FFT pair each iteration does (measured inside the same run, and separately on the
same grid with the same threads), and the peak memory. Targets (issue 2): total <= 15 s
on 2 cores, iteration <= 1.3 x its FFTs, peak <= 4 GB. Anchor: STI Suite's iLSQR ~ 340 s.

The ratio is ``iteration wall time / wall time of the FFT calls per iteration``, both
from the same run (the FFT calls are timed inside the operators; an iteration does one
FFT pair, and the LSQR start and the final image add one pair, hence ``n + 1``). The
median and the mean iteration are both shown (the mean includes the occasional
iteration that renormalises a vector, and the last one, which also applies the solution
updates LSQR batched). The machine's load average is printed, because other jobs on
the same cores change every figure. Peak memory comes from an extra run under
``tracemalloc`` (which slows Python-level work, so it is not timed). The numba kernels
of the numpy backend are compiled (first run after a change: ~15 s) or loaded from
numba's disk cache before the timed runs; that time is printed separately.

Run::

    python benchmarks/bench_ilsqr.py [--shape 224 224 160] [--device cpu] [--repeat 1]
        [--no-memory]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.fft

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qsm_core.backend import get_backend  # noqa: E402
from qsm_core.inversion import ilsqr  # noqa: E402
from tests.qsm_core.phantoms import head_phantom, local_field  # noqa: E402


def fft_pair_s(shape, repeat=5):
    """Median time of one rfftn + irfftn pair on ``shape`` (float32), all cores."""
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        s = scipy.fft.rfftn(x, workers=-1)
        scipy.fft.irfftn(s, s=shape, workers=-1, overwrite_x=True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def load_average() -> str:
    """``uptime``-style load averages (1, 5, 15 min)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(224, 224, 160))
    ap.add_argument("--voxel", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the extra run that measures peak memory under tracemalloc")
    args = ap.parse_args(argv)
    shape, vox = tuple(args.shape), tuple(args.voxel)
    b0 = np.array([0.0, 0.1, 1.0])
    b0 /= np.linalg.norm(b0)
    ph = head_phantom(shape, vox)
    mask = ph["mask"]
    field = local_field(ph["chi_ppm"], mask, voxel_size_mm=vox, b0_dir=b0)
    del ph
    print(f"field {shape} float32, mask {int(mask.sum())} voxels, cpus={os.cpu_count()}, "
          f"device={args.device}")
    kw = dict(voxel_size_mm=vox, b0_dir=b0, device=args.device, return_info=True)
    t0 = time.perf_counter()
    get_backend(args.device).warm()  # numba: compile once, or load from the disk cache
    print(f"fused kernels compiled or loaded from numba's cache in "
          f"{time.perf_counter() - t0:.2f} s (once per process, before the timed runs)")
    for rep in range(args.repeat):
        load0 = load_average()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        chi, info = ilsqr(field, mask, **kw)
        total = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        pair = fft_pair_s(info.grid_shape)
        print(f"\nrun {rep + 1}: total {total:.2f} s on grid {info.grid_shape}; CPU time "
              f"{cpu:.2f} s (on an idle machine the wall time lies between CPU/ncores and "
              f"CPU; a much larger wall time means other processes share the cores); "
              f"load average before {load0}, after {load_average()}")
        print("  steps: " + ", ".join(f"{k} {v:.2f} s" for k, v in info.step_times_s.items()))
        for step in ("lsqr", "streak"):
            it = np.asarray(info.iter_times_s[step])
            fft_in = info.fft_times_s[step] / max(len(it) + 1, 1)
            med, mean = float(np.median(it)), float(it.mean())
            print(f"  {step}: {info.n_iter[step]} iterations ({info.stop[step]}), "
                  f"median {med * 1e3:.1f} ms/iter (mean {mean * 1e3:.1f}); FFT pair inside "
                  f"the run {fft_in * 1e3:.1f} ms/iter, separately {pair * 1e3:.1f} ms -> "
                  f"iteration / FFTs = {med / fft_in:.2f} (mean {mean / fft_in:.2f}; vs "
                  f"separate pair {med / pair:.2f})")
    if not args.no_memory:
        # A separate run: tracemalloc slows every Python-level allocation, which would
        # inflate the element-wise part of the timings above.
        tracemalloc.start()
        ilsqr(field, mask, **kw)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"\npeak traced memory (numpy, during ilsqr; separate run under tracemalloc) "
              f"{peak / 2**30:.2f} GiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of the whole process (incl. phantom) {rss:.2f} GiB")
    print(f"chi: mean |chi| in mask {np.abs(chi[mask]).mean():.4f} ppm, finite "
          f"{bool(np.isfinite(chi).all())}")


if __name__ == "__main__":
    main()
