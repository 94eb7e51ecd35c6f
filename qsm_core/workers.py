"""Worker processes, each pinned to its own group of CPUs.

Batch commands (``qsmrim recon --jobs N``, ``qsmrim predict --jobs N``) run N scans side by
side in N spawned processes. Each process is pinned to a disjoint share of the CPUs this
process may use, so the thread pools inside it (FFT workers, numba, torch) start as many
threads as it has cores (:func:`qsm_core.backend.resolve_workers` reads the affinity mask)
instead of N times too many.

Processes are *spawned*, not forked: a forked child would inherit numba's and OpenMP's
thread pools in an unusable state.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor

__all__ = ["cpu_groups", "pinned_pool", "worker_cpus"]

_CPUS: list[int] = []


def cpu_groups(n_groups: int) -> list[list[int]]:
    """The CPUs this process may use, dealt out into ``n_groups`` disjoint groups.

    With fewer CPUs than groups, groups share CPUs (round robin). Off Linux, where affinity
    cannot be read, every group is empty (no pinning).

    Examples
    --------
    >>> groups = cpu_groups(2)
    >>> len(groups) == 2 and all(isinstance(g, list) for g in groups)
    True
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux: no pinning
        return [[] for _ in range(n_groups)]
    return [cpus[i::n_groups] or [cpus[i % len(cpus)]] for i in range(n_groups)]


def worker_cpus() -> list[int]:
    """The CPUs this worker process was pinned to (empty outside a :func:`pinned_pool`)."""
    return list(_CPUS)


def _start(groups, counter, log_level, initializer, initargs) -> None:
    """Pin this worker to the next group of CPUs, set up logging, run ``initializer``.

    Runs before the worker has imported numba or torch, so their pools start at this size.
    """
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    group = groups[index % len(groups)]
    if group:
        os.sched_setaffinity(0, group)
        _CPUS[:] = group
        # thread pools started from here on (torch, OpenMP, qsmrim's per-lesion kernels)
        # read this before the affinity mask
        os.environ["OMP_NUM_THREADS"] = str(len(group))
    if initializer is not None:
        initializer(*initargs)


def pinned_pool(n_jobs: int, *, initializer=None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of ``n_jobs`` spawned processes, each pinned to its own group of CPUs.

    Parameters
    ----------
    n_jobs : int
        Worker processes.
    initializer : callable, optional
        Run once in each worker after pinning (e.g. to load a model); must be importable by
        name (spawned processes unpickle it).
    initargs : tuple
        Its arguments (picklable).

    Returns
    -------
    concurrent.futures.ProcessPoolExecutor
        Shut it down (``with`` block or ``shutdown``) when done.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    return ProcessPoolExecutor(
        max_workers=n_jobs, mp_context=ctx, initializer=_start,
        initargs=(cpu_groups(n_jobs), counter, logging.getLogger().getEffectiveLevel(),
                  initializer, initargs))
