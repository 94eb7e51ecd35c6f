"""Compiled (numba) kernels of the per-lesion inference path.

Private helpers of :mod:`rimnet.patches`, :mod:`rimnet.fast_ensemble` and
:mod:`rimnet.rule_based`; each computes what a readable numpy/torch reference computes
(the equivalence is a test in ``tests/rimnet/test_kernels.py``), in one pass over the data
instead of dozens of whole-array operations. Compiled on first use (~40 s once) and cached
on disk (``cache=True``). Kernels marked parallel split their work over lesions on numba's
worker threads (:func:`set_threads`).

Threads: numba's ``workqueue`` layer unless ``NUMBA_THREADING_LAYER`` says otherwise, as in
:mod:`qsm_core.inversion._kernels` (the layer is process-wide): its workers sleep between
launches instead of spin-waiting on the cores torch needs next, and it survives forks, but
it is not thread-safe, so launches are serialised (:func:`_launch`, with the lock of
:mod:`qsm_core.inversion._kernels`, so QSM and rim kernels never launch at once).
"""

from __future__ import annotations

import sys

import numba
import numpy as np
from numba import njit, prange

from qsm_core.inversion._kernels import LOCK as _LOCK

# One process-wide layer and one lock for every numba launch of the project: importing
# qsm_core's kernels selects the ``workqueue`` layer (unless NUMBA_THREADING_LAYER is set),
# and its LOCK (_LOCK here) serialises launches from any thread, QSM and rim kernels alike.

__all__ = ["set_threads", "shell_features"]


def set_threads(n: int) -> None:
    """Use ``n`` numba worker threads (at most the number numba started with)."""
    _launch(numba.set_num_threads, max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _launch(fn, *args):
    """Call ``fn`` (a parallel kernel, or numba's thread setting), keeping torch's threads.

    Launches are serialised with qsm_core's (one lock for the process). With numba's
    OpenMP layer (``NUMBA_THREADING_LAYER=omp``),
    numba sets the OpenMP thread count of the calling thread to its own (when it starts
    its pool and at launches), and torch, on the same OpenMP runtime, then uses that count
    too: a torch set to 1 thread would run its convolutions on 2, and on a busy machine
    every OpenMP barrier waits for a descheduled thread (~10 ms per operation). The count
    is put back after each call.
    """
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else None
    try:
        # one lesion per scheduling chunk: lesions differ in cost, so threads take them
        # one at a time instead of fixed halves of the list
        with _LOCK, numba.parallel_chunksize(1):
            return fn(*args)
    finally:
        if n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)


# ----------------------------------------------------------------------------- bit masks
# A (P, P, P) mask of a patch is held as a (P, P) array of uint64 words, bit k of word
# [i, j] standing for voxel (i, j, k) (P <= 64). A 3x3x3 dilation is then three shift-or
# passes over P * P words instead of 27 * P^3 voxel reads.

@njit(cache=True, inline="always")
def _dilate_words(w, out, tmp, full, i0, i1, j0, j1):
    """3x3x3 binary dilation of the words ``w[i0:i1, j0:j1]`` into ``out`` (same range).

    Words outside the range count as empty; bits beyond ``full`` are dropped.
    """
    for i in range(i0, i1):
        for j in range(j0, j1):
            v = w[i, j]
            tmp[i, j] = (v | (v << np.uint64(1)) | (v >> np.uint64(1))) & full
    for i in range(i0, i1):
        for j in range(j0, j1):
            v = tmp[i, j]
            if j > j0:
                v |= tmp[i, j - 1]
            if j + 1 < j1:
                v |= tmp[i, j + 1]
            out[i, j] = v
    for j in range(j0, j1):
        prev = np.uint64(0)
        cur = out[i0, j]
        for i in range(i0, i1):
            nxt = out[i + 1, j] if i + 1 < i1 else np.uint64(0)
            out[i, j] = prev | cur | nxt
            prev = cur
            cur = nxt


@njit(cache=True, inline="always")
def _erode_words(w, out, tmp, comp, full, i0, i1, j0, j1, n0, n1):
    """3x3x3 binary erosion of ``w`` (voxels outside the patch count as inside the mask).

    The range ``[i0, i1) x [j0, j1)`` must hold every set word of ``w`` plus one word on
    each side that lies inside the patch (``n0 x n1`` words).
    """
    for i in range(i0, i1):
        for j in range(j0, j1):
            comp[i, j] = full & ~w[i, j]
    _dilate_words(comp, out, tmp, full, i0, i1, j0, j1)
    for i in range(i0, i1):
        for j in range(j0, j1):
            out[i, j] = full & ~out[i, j]
    # the range edge is the patch edge only where it is n0 / n1; elsewhere the dilation of
    # the complement missed the (complement-filled) words beyond it, but those edge words
    # hold no mask voxel (the range has one empty word on each side), so clear them
    if i0 > 0:
        for j in range(j0, j1):
            out[i0, j] = np.uint64(0)
    if i1 < n0:
        for j in range(j0, j1):
            out[i1 - 1, j] = np.uint64(0)
    if j0 > 0:
        for i in range(i0, i1):
            out[i, j0] = np.uint64(0)
    if j1 < n1:
        for i in range(i0, i1):
            out[i, j1 - 1] = np.uint64(0)


@njit(cache=True)
def _shell_one(q, les, oth, has_oth, clip, positive, feats):
    """Shell features of one patch (see :func:`shell_features`); returns the reference."""
    n0, n1, n2 = q.shape
    one = np.uint64(1)
    full = ~np.uint64(0) if n2 == 64 else (one << np.uint64(n2)) - one
    lw = np.zeros((n0, n1), np.uint64)
    fw = np.zeros((n0, n1), np.uint64)
    lo0, hi0, lo1, hi1 = n0, -1, n1, -1
    for i in range(n0):
        for j in range(n1):
            v = np.uint64(0)
            f = full
            for k in range(n2):
                if les[i, j, k] > 0.5:
                    v |= one << np.uint64(k)
                if has_oth and oth[i, j, k] > 0.5:
                    f &= ~(one << np.uint64(k))
            lw[i, j] = v
            fw[i, j] = f
            if v != 0:
                lo0 = min(lo0, i)
                hi0 = max(hi0, i)
                lo1 = min(lo1, j)
                hi1 = max(hi1, j)
    if hi0 < 0:  # no lesion voxel: every mask is empty, every feature 0
        for f in range(feats.size):
            feats[f] = 0.0
        return np.float32(0.0)
    # words that can hold a shell voxel (within 6 of the lesion), plus one
    i0, i1 = max(lo0 - 7, 0), min(hi0 + 8, n0)
    j0, j1 = max(lo1 - 7, 0), min(hi1 + 8, n1)
    tmp = np.zeros((n0, n1), np.uint64)
    comp = np.zeros((n0, n1), np.uint64)
    dil = np.zeros((7, n0, n1), np.uint64)
    ero = np.zeros((4, n0, n1), np.uint64)
    dil[0] = lw
    ero[0] = lw
    for d in range(1, 7):
        _dilate_words(dil[d - 1], dil[d], tmp, full, i0, i1, j0, j1)
    for e in range(1, 4):
        _erode_words(ero[e - 1], ero[e], tmp, comp, full, max(lo0 - 1, 0), min(hi0 + 2, n0),
                     max(lo1 - 1, 0), min(hi1 + 2, n1), n0, n1)
    # reference: mean QSM of the ring 4-6 layers out (other lesions excluded, else included)
    s_ring = 0.0
    n_ring = 0
    s_all = 0.0
    n_all = 0
    for i in range(i0, i1):
        for j in range(j0, j1):
            ring = dil[6, i, j] & ~dil[3, i, j]
            if ring == 0:
                continue
            fr = ring & fw[i, j]
            for k in range(n2):
                b = one << np.uint64(k)
                if ring & b:
                    v = q[i, j, k]
                    s_all += v
                    n_all += 1
                    if fr & b:
                        s_ring += v
                        n_ring += 1
    if n_ring > 0:
        ref = np.float32(np.float32(s_ring) / np.float32(n_ring))
    else:
        ref = np.float32(np.float32(s_all) / np.float32(max(n_all, 1)))
    lo_c = np.float32(-clip)
    hi_c = np.float32(clip)
    # sums of the clipped contrast over the layers: in1, in2, in3, core, out1, out2
    sums = np.zeros(6)
    cnts = np.zeros(6, np.int64)
    sc = 0.0
    scc = 0.0
    n_pos = 0
    n_edge = 0
    for i in range(i0, i1):
        for j in range(j0, j1):
            lv = lw[i, j]
            fv = fw[i, j]
            ring = dil[6, i, j] & ~dil[3, i, j] & fv
            out1 = dil[1, i, j] & ~lv & fv
            out2 = dil[2, i, j] & ~dil[1, i, j] & fv
            if lv == 0 and ring == 0 and out1 == 0 and out2 == 0:
                continue
            e1, e2, e3 = ero[1, i, j], ero[2, i, j], ero[3, i, j]
            for k in range(n2):
                b = one << np.uint64(k)
                if not ((lv | ring | out1 | out2) & b):
                    continue
                c = np.float32(q[i, j, k] - ref)
                c = min(max(c, lo_c), hi_c)
                if ring & b:
                    sc += c
                    scc += np.float32(c * c)
                if lv & b:
                    if not (e1 & b):
                        layer = 0
                    elif not (e2 & b):
                        layer = 1
                    elif not (e3 & b):
                        layer = 2
                    else:
                        layer = 3
                elif out1 & b:
                    layer = 4
                elif out2 & b:
                    layer = 5
                else:
                    continue
                sums[layer] += c
                cnts[layer] += 1
                if layer == 0 or layer == 4:
                    n_edge += 1
                    if c > positive:
                        n_pos += 1
    nr = np.float32(max(n_ring, 1))
    var = np.float32(np.float32(scc) / nr)
    mean_ring = np.float32(np.float32(sc) / nr)
    noise = np.float32(np.sqrt(max(np.float32(var - mean_ring * mean_ring), np.float32(0.0))))
    mu = np.zeros(6, np.float32)
    for m in range(6):
        mu[m] = np.float32(sums[m]) / np.float32(max(cnts[m], 1))
    if cnts[3] > 0:
        deepest = mu[3]
    elif cnts[2] > 0:
        deepest = mu[2]
    elif cnts[1] > 0:
        deepest = mu[1]
    else:
        deepest = mu[0]
    feats[0] = noise
    feats[1] = mu[0]
    feats[2] = mu[1]
    feats[3] = mu[2]
    feats[4] = mu[3]
    feats[5] = mu[4]
    feats[6] = mu[5]
    feats[7] = np.float32(n_pos) / np.float32(max(n_edge, 1))
    feats[8] = np.float32(max(mu[0], mu[4]) - deepest)
    return ref


@njit(cache=True, parallel=True)
def _shell_batch(x, qc, lc, oc, clip, positive, feats, refs):
    for b in prange(x.shape[0]):
        has_oth = oc >= 0
        refs[b] = _shell_one(x[b, qc], x[b, lc], x[b, oc if has_oth else lc], has_oth,
                             clip, positive, feats[b])


def shell_features(x: np.ndarray, *, qsm_channel: int, lesion_channel: int,
                   others_channel: int | None, clip: float,
                   positive: float) -> tuple[np.ndarray, np.ndarray]:
    """:class:`rimnet.shells.ShellFeatures` of a batch, in one pass per patch.

    Parameters
    ----------
    x : ndarray of float32, shape (N, C, P, P, P)
        Patches, ``P <= 64`` along the last axis.
    qsm_channel, lesion_channel, others_channel : int
        Channel indices as in ``ShellFeatures`` (``others_channel`` None: no others mask).
    clip, positive : float
        ``ShellFeatures.clip`` and ``ShellFeatures.positive`` (patch units).

    Returns
    -------
    features : ndarray of float32, shape (N, 9)
    reference : ndarray of float32, shape (N,)

    Notes
    -----
    The layers are the same voxel sets as the torch module's erosions and dilations (held
    as bit masks, one 64-bit word per line of voxels); sums are accumulated in float64, so
    the features differ from the module's float32 reductions by float32 rounding only.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    feats = np.zeros((n, 9), np.float32)
    refs = np.zeros(n, np.float32)
    oc = -1 if others_channel is None else int(others_channel)
    _launch(_shell_batch, x, int(qsm_channel), int(lesion_channel), oc, np.float32(clip),
            np.float32(positive), feats, refs)
    return feats, refs


# ----------------------------------------------------------------------------- patches
@njit(cache=True, inline="always")
def _normalise(v, divide, sc, lo, hi):
    """``np.clip(v / sc if divide else v * sc, lo, hi)`` in float32 (NaN stays NaN)."""
    v = v / sc if divide else v * sc
    return min(max(v, lo), hi)  # branch-free; Python's max/min keep a NaN first argument


_TILE = 8
"""Side of the square tiles in which the kernels swap the x and z axes of a patch."""


@njit(cache=True)
def _transpose_xz(src, dst):
    """``dst[a, b, c] = src[c, b, a]`` for (P, P, P) blocks, in 8 x 8 tiles of (a, c).

    Element by element, one side of a transpose steps by P^2 values; in tiles both sides
    stay within a few cache lines (about 3x faster for 32^3 patches).
    """
    p0, p1, p2 = dst.shape
    for b in range(p1):
        for a0 in range(0, p0, _TILE):
            for c0 in range(0, p2, _TILE):
                for a in range(a0, min(a0 + _TILE, p0)):
                    for c in range(c0, min(c0 + _TILE, p2)):
                        dst[a, b, c] = src[c, b, a]


@njit(cache=True)
def _linear_c(vol, s0, s1, s2, w, divide, sc, lo, hi, dst):
    """One lesion of :func:`_gather_linear` from a C-ordered (x, y, z) volume."""
    p = dst.shape[0]
    t = np.empty((p + 1, p + 1, p + 1), np.float32)
    for i in range(p + 1):
        for j in range(p + 1):
            for k in range(p + 1):
                t[i, j, k] = _normalise(np.float32(vol[s0 + i, s1 + j, s2 + k]), divide,
                                        sc, lo, hi)
    # a + (b - a) * w along x, then y, then z, as patches._sample_linear
    d0 = np.empty((p, p + 1, p + 1), np.float32)
    for a in range(p):
        wa = w[0, a]
        for j in range(p + 1):
            for k in range(p + 1):
                d0[a, j, k] = (t[a + 1, j, k] - t[a, j, k]) * wa + t[a, j, k]
    d1 = np.empty((p, p, p + 1), np.float32)
    for a in range(p):
        for b in range(p):
            wb = w[1, b]
            for k in range(p + 1):
                d1[a, b, k] = (d0[a, b + 1, k] - d0[a, b, k]) * wb + d0[a, b, k]
    wc = w[2]
    for a in range(p):
        for b in range(p):
            for c in range(p):
                dst[a, b, c] = (d1[a, b, c + 1] - d1[a, b, c]) * wc[c] + d1[a, b, c]


@njit(cache=True)
def _linear_f(vol_t, s0, s1, s2, w, divide, sc, lo, hi, dst):
    """One lesion of :func:`_gather_linear` from the (z, y, x) transpose of the volume.

    The same operations on every value as :func:`_linear_c`, in the transposed memory order.
    """
    p = dst.shape[0]
    t = np.empty((p + 1, p + 1, p + 1), np.float32)  # (z, y, x)
    for k in range(p + 1):
        for j in range(p + 1):
            for i in range(p + 1):
                t[k, j, i] = _normalise(np.float32(vol_t[s2 + k, s1 + j, s0 + i]), divide,
                                        sc, lo, hi)
    wx = w[0]
    d0 = np.empty((p + 1, p + 1, p), np.float32)  # (z, y, x)
    for k in range(p + 1):
        for j in range(p + 1):
            for a in range(p):
                d0[k, j, a] = (t[k, j, a + 1] - t[k, j, a]) * wx[a] + t[k, j, a]
    d1 = np.empty((p + 1, p, p), np.float32)  # (z, y, x)
    for k in range(p + 1):
        for b in range(p):
            wb = w[1, b]
            for a in range(p):
                d1[k, b, a] = (d0[k, b + 1, a] - d0[k, b, a]) * wb + d0[k, b, a]
    d2 = np.empty((p, p, p), np.float32)  # (z, y, x)
    for c in range(p):
        wc = w[2, c]
        for b in range(p):
            for a in range(p):
                d2[c, b, a] = (d1[c + 1, b, a] - d1[c, b, a]) * wc + d1[c, b, a]
    _transpose_xz(d2, dst)


@njit(cache=True)
def _copy_c(vol, s0, s1, s2, divide, sc, lo, hi, dst):
    """A lesion whose samples are voxels (all weights 0): a normalised crop, C order."""
    p = dst.shape[0]
    for a in range(p):
        for b in range(p):
            for c in range(p):
                dst[a, b, c] = _normalise(np.float32(vol[s0 + a, s1 + b, s2 + c]), divide, sc,
                                          lo, hi)


@njit(cache=True)
def _copy_f(vol_t, s0, s1, s2, divide, sc, lo, hi, dst):
    """:func:`_copy_c` from the (z, y, x) transpose of the volume."""
    p = dst.shape[0]
    for b in range(p):  # in tiles of (a, c), as _transpose_xz
        for a0 in range(0, p, _TILE):
            for c0 in range(0, p, _TILE):
                for a in range(a0, min(a0 + _TILE, p)):
                    for c in range(c0, min(c0 + _TILE, p)):
                        dst[a, b, c] = _normalise(np.float32(vol_t[s2 + c, s1 + b, s0 + a]),
                                                  divide, sc, lo, hi)


@njit(cache=True)
def _all_zero(w):
    for v in w.ravel():
        if v != 0:
            return False
    return True


@njit(cache=True, parallel=True)
def _gather_linear(vol, flip, starts, w, rows, ch, divide, sc, lo, hi, out):
    """Trilinear patches of on-grid lesions (see :func:`gather_linear`)."""
    for r in prange(starts.shape[0]):
        if _all_zero(w[r]):  # samples on voxels: a + (b - a) * 0 == a, so crop and normalise
            if flip:
                _copy_f(vol, starts[r, 0], starts[r, 1], starts[r, 2], divide, sc, lo, hi,
                        out[rows[r], ch])
            else:
                _copy_c(vol, starts[r, 0], starts[r, 1], starts[r, 2], divide, sc, lo, hi,
                        out[rows[r], ch])
        elif flip:
            _linear_f(vol, starts[r, 0], starts[r, 1], starts[r, 2], w[r], divide, sc, lo, hi,
                      out[rows[r], ch])
        else:
            _linear_c(vol, starts[r, 0], starts[r, 1], starts[r, 2], w[r], divide, sc, lo, hi,
                      out[rows[r], ch])


@njit(cache=True)
def _masks_one(labels, flip, s0, s1, s2, lid, dst, ch_les, ch_oth):
    """Both masks of one lesion from one read of its label block."""
    p = dst.shape[1]
    blk = np.empty((p, p, p), labels.dtype)  # (x, y, z)
    if flip:  # from the (z, y, x) transpose, in tiles as _transpose_xz
        for j in range(p):
            for i0 in range(0, p, _TILE):
                for k0 in range(0, p, _TILE):
                    for i in range(i0, min(i0 + _TILE, p)):
                        for k in range(k0, min(k0 + _TILE, p)):
                            blk[i, j, k] = labels[s2 + k, s1 + j, s0 + i]
    else:
        for i in range(p):
            for j in range(p):
                for k in range(p):
                    blk[i, j, k] = labels[s0 + i, s1 + j, s2 + k]
    if ch_les >= 0:
        d = dst[ch_les]
        for i in range(p):
            for j in range(p):
                for k in range(p):
                    d[i, j, k] = np.float32(blk[i, j, k] == lid)
    if ch_oth >= 0:
        d = dst[ch_oth]
        for i in range(p):
            for j in range(p):
                for k in range(p):
                    v = blk[i, j, k]
                    d[i, j, k] = np.float32((v != lid) & (v > 0))


@njit(cache=True, parallel=True)
def _gather_masks(labels, flip, starts, ids, rows, ch_les, ch_oth, out):
    """Nearest-neighbour lesion / other-lesion masks of on-grid lesions."""
    for r in prange(starts.shape[0]):
        _masks_one(labels, flip, starts[r, 0], starts[r, 1], starts[r, 2], ids[r],
                   out[rows[r]], ch_les, ch_oth)


def _c_view(vol: np.ndarray) -> tuple[np.ndarray, bool]:
    """A C-contiguous view of ``vol`` (its transpose if Fortran-ordered), and if transposed."""
    if vol.flags.c_contiguous:
        return vol, False
    if vol.flags.f_contiguous:
        return vol.T, True
    return np.ascontiguousarray(vol), False


def gather_linear(vol: np.ndarray, starts: np.ndarray, weights: np.ndarray, rows: np.ndarray,
                  channel: int, out: np.ndarray, *, divide: bool, scale: float, lo: float,
                  hi: float) -> None:
    """Normalised, trilinearly sampled patches of lesions whose samples are on the grid.

    Parameters
    ----------
    vol : ndarray, shape (X, Y, Z)
        Any real dtype (cast to float32 first), C- or Fortran-ordered.
    starts : ndarray of int, shape (N, 3)
        First voxel of each lesion's ``(P + 1)^3`` block.
    weights : ndarray of float32, shape (N, 3, P)
        Interpolation weight of the upper neighbour per sample and axis.
    rows, channel : ndarray of int (N,), int
        Lesion ``r`` goes to ``out[rows[r], channel]``.
    out : ndarray of float32, shape (M, C, P, P, P)
    divide, scale, lo, hi : bool, float, float, float
        The normalisation ``clip(v / scale if divide else v * scale, lo, hi)`` (float32).

    Notes
    -----
    The same float32 operations in the same order as :func:`rimnet.patches._sample_linear`
    (normalise the block, then ``a + (b - a) * w`` along x, y and z), hence the same bits.
    """
    v, flip = _c_view(vol)
    _launch(_gather_linear, v, flip, np.ascontiguousarray(starts, np.int64),
            np.ascontiguousarray(weights, np.float32), np.asarray(rows, np.int64), int(channel),
            bool(divide), np.float32(scale), np.float32(lo), np.float32(hi), out)


def gather_masks(labels: np.ndarray, starts: np.ndarray, ids: np.ndarray, rows: np.ndarray,
                 out: np.ndarray, *, lesion_channel: int | None,
                 others_channel: int | None) -> None:
    """This-lesion and other-lesions masks of on-grid lesions, from one read of the labels.

    ``starts`` (N, 3) are the first voxels of the ``P^3`` blocks (P from ``out``, shape
    (M, C, P, P, P)); ``out[rows[r], lesion_channel]`` receives 1 where the label is
    ``ids[r]``, else 0, and ``out[rows[r], others_channel]`` 1 where it is another non-zero
    label (either channel None: not written).
    """
    v, flip = _c_view(labels)
    _launch(_gather_masks, v, flip, np.ascontiguousarray(starts, np.int64),
            np.asarray(ids, np.int64), np.asarray(rows, np.int64),
            -1 if lesion_channel is None else int(lesion_channel),
            -1 if others_channel is None else int(others_channel), out)


# ----------------------------------------------------------------------------- references
@njit(cache=True, inline="always")
def _at(a, flip, i, j, k):
    return a[k, j, i] if flip else a[i, j, k]


@njit(cache=True, parallel=True)
def _reference_values(flair, f_flip, qsm, q_flip, labels, l_flip, shape, step):
    n0, n1, n2 = shape
    m0, m1, m2 = (n0 + step - 1) // step, (n1 + step - 1) // step, (n2 + step - 1) // step
    # the flair volume's slowest axis outermost; each outer index fills its own segment
    n_outer = m2 if f_flip else m0
    cap = m0 * m1 * m2 // n_outer
    vals = np.empty(n_outer * cap, flair.dtype)
    counts = np.zeros(n_outer, np.int64)
    for o in prange(n_outer):
        n = o * cap
        for jj in range(m1):
            for ii in range(m0 if f_flip else m2):
                if f_flip:  # (z, y, x) memory order: x fastest
                    i, j, k = ii * step, jj * step, o * step
                else:
                    i, j, k = o * step, jj * step, ii * step
                if _at(qsm, q_flip, i, j, k) != 0 and _at(labels, l_flip, i, j, k) == 0:
                    vals[n] = _at(flair, f_flip, i, j, k)
                    n += 1
        counts[o] = n - o * cap
    total = 0
    for o in range(n_outer):  # compact the segments
        c = counts[o]
        for t in range(c):
            vals[total + t] = vals[o * cap + t]
        total += c
    return vals[:total]


@njit(cache=True)
def _any_nonzero(a):
    for v in a.reshape(a.size):
        if v != 0:
            return True
    return False


def reference_values(flair: np.ndarray, qsm: np.ndarray, labels: np.ndarray,
                     step: int) -> np.ndarray:
    """FLAIR values on the sub-grid ``[::step]`` (each axis) where ``qsm != 0 and labels == 0``.

    The voxels that :func:`rimnet.patches.flair_reference` takes the median of with
    ``brain_mask = qsm != 0`` (in another order: the median does not depend on it). Any
    memory order of the three volumes (shape (X, Y, Z) each).
    """
    views = [_c_view(a) for a in (flair, qsm, labels)]
    if not all(v.flags.c_contiguous for v, _ in views):  # pragma: no cover - _c_view copies
        raise ValueError("volumes must be C- or Fortran-contiguous")
    (f, ff), (q, qf), (la, lf) = views
    return _launch(_reference_values, f, ff, q, qf, la, lf,
                   tuple(int(s) for s in flair.shape), int(step))


def any_nonzero(a: np.ndarray) -> bool:
    """``bool(np.any(a != 0))``, stopping at the first non-zero value."""
    v, _ = _c_view(a)
    return bool(_any_nonzero(v))


# ----------------------------------------------------------------------------- rule-based
_BIG = 1 << 20  # "no lesion voxel within reach" in squared-distance maps


@njit(cache=True)
def _min_plus_line(line, out, n, t_max, big):
    """``out[x] = min_{|t| <= t_max} line[x + t] + t^2`` (0 <= x + t < n)."""
    for x in range(n):
        out[x] = line[x]
    for t in range(1, min(t_max, n - 1) + 1):
        w = t * t
        for x in range(t, n):
            v = line[x - t] + w
            if v < out[x]:
                out[x] = v
        for x in range(n - t):
            v = line[x + t] + w
            if v < out[x]:
                out[x] = v


@njit(cache=True)
def _seed_line(line, out, n, t_max, big):
    """:func:`_min_plus_line` of a line of seeds (0) and ``big``, by two scans."""
    last = -(1 << 30)
    for x in range(n):  # distance to the nearest seed at or before x
        if line[x] == 0:
            last = x
        out[x] = x - last
    last = 1 << 30
    for x in range(n - 1, -1, -1):  # ... or after it
        if line[x] == 0:
            last = x
        t = min(out[x], last - x)
        out[x] = t * t if t <= t_max else big


@njit(cache=True)
def _min_plus(d, lo, hi, t_max, big):
    """Separable min-plus passes (offsets up to ``t_max``) over the sub-box ``[lo, hi)``.

    ``d`` holds 0 at the seed voxels and ``big`` elsewhere; the result is, everywhere in
    the sub-box, the smallest ``a^2 + b^2 + c^2`` over seeds at offsets ``(a, b, c)`` with
    each ``|offset| <= t_max`` (``big`` if none), as ``rule_based._min_plus_passes``.
    """
    nmax = max(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])
    line = np.empty(nmax, d.dtype)
    res = np.empty(nmax, d.dtype)
    for axis in range(3):
        n = hi[axis] - lo[axis]
        a1, a2 = (1, 2) if axis == 0 else ((0, 2) if axis == 1 else (0, 1))
        for u in range(lo[a1], hi[a1]):
            for v in range(lo[a2], hi[a2]):
                empty = True
                for x in range(n):
                    if axis == 0:
                        val = d[lo[0] + x, u, v]
                    elif axis == 1:
                        val = d[u, lo[1] + x, v]
                    else:
                        val = d[u, v, lo[2] + x]
                    line[x] = val
                    if val < big:
                        empty = False
                if empty:  # nothing within reach on this line: it stays big
                    continue
                if axis == 0:  # seeds only (0 or big): distance to the nearest seed
                    _seed_line(line, res, n, t_max, big)
                else:
                    _min_plus_line(line, res, n, t_max, big)
                for x in range(n):
                    if axis == 0:
                        d[lo[0] + x, u, v] = res[x]
                    elif axis == 1:
                        d[u, lo[1] + x, v] = res[x]
                    else:
                        d[u, v, lo[2] + x] = res[x]


@njit(cache=True)
def _median32(vals):
    """:func:`rimnet.patches._median` of finite float32 values (one selection), as float32."""
    n = vals.size
    if n == 1:
        return vals[0]
    k = n // 2
    part = np.partition(vals, k)
    if n % 2:
        return part[k]
    lo = part[0]
    for i in range(1, k):
        if part[i] > lo:
            lo = part[i]
    return np.float32(np.float32(lo + part[k]) / np.float32(2.0))


@njit(cache=True)
def _pairwise_block(a, lo, n):
    """Pairwise sum (as numpy's) of at most 128 values (8 accumulators, then the rest)."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r = np.empty(8)
    for j in range(8):
        r[j] = a[lo + j]
    i = 8
    while i < n - (n % 8):
        for j in range(8):
            r[j] += a[lo + i + j]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True)
def _pairwise_sum(a, lo, n):
    """Sum of ``a[lo:lo + n]`` (float64) exactly as numpy's ``add.reduce`` (pairwise).

    numpy halves blocks of more than 128 values (at a multiple of 8) and adds the halves'
    sums; the recursion is unrolled on an explicit stack (recursive numba functions do not
    survive the on-disk cache).
    """
    if n <= 128:
        return _pairwise_block(a, lo, n)
    st = np.empty((64, 3), np.int64)  # (start, length, 0: split / 1: add the two sums)
    vals = np.empty(64)
    st[0, 0], st[0, 1], st[0, 2] = lo, n, 0
    top = 1
    nv = 0
    while top > 0:
        top -= 1
        s0, m, phase = st[top, 0], st[top, 1], st[top, 2]
        if phase == 1:
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
        elif m <= 128:
            vals[nv] = _pairwise_block(a, s0, m)
            nv += 1
        else:
            n2 = m // 2
            n2 -= n2 % 8
            st[top, 0], st[top, 1], st[top, 2] = s0, m, 1
            st[top + 1, 0], st[top + 1, 1], st[top + 1, 2] = s0 + n2, m - n2, 0
            st[top + 2, 0], st[top + 2, 1], st[top + 2, 2] = s0, n2, 0
            top += 3
    return vals[0]


@njit(cache=True)
def _rule_one(q, les_p, oth_p, has_oth, pad, t_out, t_in, c_le, c_nawm_in, c_nawm_out, c_rim,
              c_vein, c_in, n_sectors, rim_contrast, coverage_min, min_slices,
              min_sector_fraction, vein_min, qsm_scale, res):
    """Rule features of one patch into ``res`` (see :func:`rule_features`)."""
    p0, p1, p2 = q.shape
    lo = np.array([p0, p1, p2])
    hi = np.array([-1, -1, -1])
    for i in range(p0):
        for j in range(p1):
            for k in range(p2):
                if les_p[i, j, k] > 0.5:
                    lo[0] = min(lo[0], i)
                    hi[0] = max(hi[0], i)
                    lo[1] = min(lo[1], j)
                    hi[1] = max(hi[1], j)
                    lo[2] = min(lo[2], k)
                    hi[2] = max(hi[2], k)
    if hi[0] < 0:
        res[5] = -1.0
        return
    b0 = np.empty(3, np.int64)
    sz = np.empty(3, np.int64)
    for a in range(3):
        b0[a] = max(lo[a] - pad, 0)
        sz[a] = min(hi[a] + pad + 1, q.shape[a]) - b0[a]
    nx, ny, nz = sz[0], sz[1], sz[2]
    llo = lo - b0  # lesion bounding box in box coordinates
    lhi = hi - b0 + 1
    # one pass: the box's masks and QSM, the seeds of both distance maps, and per slice
    # the lesion's voxel count and index sums (for its in-slice centroid)
    les = np.empty((nx, ny, nz), np.bool_)
    oth = np.zeros((nx, ny, nz), np.bool_)
    chi = np.empty((nx, ny, nz), np.float32)
    n_out = np.empty((nx, ny, nz), np.int32)
    n_in = np.empty((nx, ny, nz), np.int32)
    cnt_l = np.zeros(nz, np.int64)
    si = np.zeros(nz, np.int64)
    sj = np.zeros(nz, np.int64)
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                gi, gj, gk = b0[0] + i, b0[1] + j, b0[2] + k
                li = les_p[gi, gj, gk] > 0.5
                les[i, j, k] = li
                if has_oth:
                    oth[i, j, k] = (oth_p[gi, gj, gk] > 0.5) and not li
                chi[i, j, k] = q[gi, gj, gk] / qsm_scale
                if li:
                    n_out[i, j, k] = 0
                    n_in[i, j, k] = _BIG
                    cnt_l[k] += 1
                    si[k] += i
                    sj[k] += j
                else:
                    n_out[i, j, k] = _BIG
                    n_in[i, j, k] = 0
    # squared distances (voxels) to the lesion, within t_out of its bounding box (beyond
    # it no lesion voxel is within reach: the seeds alone give the same), and of lesion
    # voxels to the nearest non-lesion voxel of the bounding box plus one
    rlo = np.empty(3, np.int64)
    rhi = np.empty(3, np.int64)
    for a in range(3):
        rlo[a] = max(llo[a] - t_out, 0)
        rhi[a] = min(lhi[a] + t_out, sz[a])
    _min_plus(n_out, rlo, rhi, t_out, _BIG)
    for a in range(3):
        rlo[a] = max(llo[a] - 1, 0)
        rhi[a] = min(lhi[a] + 1, sz[a])
    _min_plus(n_in, rlo, rhi, t_in, _BIG)
    # NAWM reference: median QSM of the ring (or, without one, of everything beyond the band)
    nvox = nx * ny * nz
    buf = np.empty(nvox, np.float32)
    m = 0
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                d = n_out[i, j, k]
                if not les[i, j, k] and not oth[i, j, k] and d > c_nawm_in and d <= c_nawm_out:
                    buf[m] = chi[i, j, k]
                    m += 1
    if m == 0:
        for i in range(nx):
            for j in range(ny):
                for k in range(nz):
                    if not les[i, j, k] and not oth[i, j, k] and n_out[i, j, k] > c_rim:
                        buf[m] = chi[i, j, k]
                        m += 1
    nawm = _median32(buf[:m].copy()) if m else np.float32(0.0)
    # vein suppression: 26-connected bright components (contrast chi - nawm > vein_min)
    # reaching beyond vein_mm
    comp = np.zeros((nx, ny, nz), np.int32)
    vein0 = np.zeros((nx, ny, nz), np.bool_)
    stack = np.empty((0, 3), np.int32)  # allocated at the first bright voxel
    members = np.empty((0, 3), np.int32)
    label = 0
    any_vein = False
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                if comp[i, j, k] != 0 or not (chi[i, j, k] - nawm > vein_min):
                    continue
                if label == 0:
                    stack = np.empty((nvox, 3), np.int32)
                    members = np.empty((nvox, 3), np.int32)
                label += 1
                comp[i, j, k] = label
                stack[0, 0], stack[0, 1], stack[0, 2] = i, j, k
                top = 1
                nm = 0
                far = False
                while top > 0:
                    top -= 1
                    x, y, z = stack[top, 0], stack[top, 1], stack[top, 2]
                    members[nm, 0], members[nm, 1], members[nm, 2] = x, y, z
                    nm += 1
                    if n_out[x, y, z] > c_vein:
                        far = True
                    for xx in range(max(x - 1, 0), min(x + 2, nx)):
                        for yy in range(max(y - 1, 0), min(y + 2, ny)):
                            for zz in range(max(z - 1, 0), min(z + 2, nz)):
                                if comp[xx, yy, zz] == 0 and chi[xx, yy, zz] - nawm > vein_min:
                                    comp[xx, yy, zz] = label
                                    stack[top, 0], stack[top, 1], stack[top, 2] = xx, yy, zz
                                    top += 1
                if far:
                    any_vein = True
                    for t in range(nm):
                        vein0[members[t, 0], members[t, 1], members[t, 2]] = True
    vein = np.zeros((nx, ny, nz), np.bool_)
    if any_vein:  # 3x3x3 dilation within the box
        for i in range(nx):
            for j in range(ny):
                for k in range(nz):
                    if not vein0[i, j, k]:
                        continue
                    for xx in range(max(i - 1, 0), min(i + 2, nx)):
                        for yy in range(max(j - 1, 0), min(j + 2, ny)):
                            for zz in range(max(k - 1, 0), min(k + 2, nz)):
                                vein[xx, yy, zz] = True
    # one pass over the regions: inner band (lesion edge), outer band (just outside) and
    # core; vein voxels in them; core contrasts; per slice and angular sector the band's
    # voxel count and, vein voxels left out, the inner and outer contrast sums (in voxel
    # order, as np.bincount adds them)
    nbin = nz * n_sectors
    tot = np.zeros(nbin, np.int64)
    cnt = np.zeros((2, nbin), np.int64)
    sm = np.zeros((2, nbin))
    two_pi = 2 * np.pi
    n_vein = 0
    m = 0
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                li = les[i, j, k]
                if li:
                    band = n_in[i, j, k] <= c_in
                elif oth[i, j, k] or n_out[i, j, k] > c_le:
                    continue
                else:
                    band = True
                vi = vein[i, j, k]
                if vi:
                    n_vein += 1
                if li and not band and not vi:
                    buf[m] = chi[i, j, k] - nawm
                    m += 1
                if not band or cnt_l[k] == 0:
                    continue
                ci = si[k] / cnt_l[k]
                cj = sj[k] / cnt_l[k]
                ang = np.arctan2(j - cj, i - ci)
                sec = min(int((ang + np.pi) / two_pi * n_sectors), n_sectors - 1)
                key = k * n_sectors + sec
                tot[key] += 1
                if not vi:
                    part = 0 if li else 1
                    cnt[part, key] += 1
                    sm[part, key] += chi[i, j, k] - nawm
    core_ref = np.float64(_median32(buf[:m].copy())) if m else 0.0
    ref = max(core_ref, 0.0)
    rim = np.empty(nbin)
    n_has = 0
    for b in range(nbin):
        a_in = sm[0, b] / cnt[0, b] if cnt[0, b] > 0 else np.nan
        a_out = sm[1, b] / cnt[1, b] if cnt[1, b] > 0 else np.nan
        if np.isnan(a_in):
            v = a_out
        elif np.isnan(a_out):
            v = a_in
        else:
            v = max(a_in, a_out)
        rim[b] = v
        if not np.isnan(v):
            n_has += 1
    has_vals = np.empty(n_has)
    h = 0
    for b in range(nbin):
        if not np.isnan(rim[b]):
            has_vals[h] = rim[b]
            h += 1
    cov = np.empty(nz)
    nsl = 0
    for k in range(nz):
        if cnt_l[k] == 0:
            continue
        avail = 0
        pos = 0
        for s in range(n_sectors):
            b = k * n_sectors + s
            if tot[b] > 0:
                avail += 1
            if not np.isnan(rim[b]) and rim[b] - ref > rim_contrast:
                pos += 1
        cov[nsl] = pos / max(avail, 1) if avail >= min_sector_fraction * n_sectors else 0.0
        nsl += 1
    run_cov = 0.0
    if nsl >= min_slices:
        for s in range(nsl - min_slices + 1):
            v = cov[s]
            for t in range(1, min_slices):
                v = min(v, cov[s + t])
            if s == 0 or v > run_cov:
                run_cov = v
    max_cov = 0.0
    for s in range(nsl):
        if s == 0 or cov[s] > max_cov:
            max_cov = cov[s]
    rim_mean = _pairwise_sum(has_vals, 0, n_has) / n_has if n_has else 0.0
    rim_minus_core = rim_mean - core_ref
    call = run_cov >= coverage_min - 1e-9 and rim_minus_core > 0
    res[0] = run_cov
    res[1] = max_cov
    res[2] = rim_mean
    res[3] = core_ref
    res[4] = np.float64(nawm)
    res[5] = nsl
    res[6] = n_vein
    res[7] = 1.0 if call else 0.0


@njit(cache=True, parallel=True)
def _rule_batch(q, les, oth, has_oth, pad, t_out, t_in, cuts, n_sectors, rim_contrast,
                coverage_min, min_slices, min_sector_fraction, vein_min, qsm_scale, res):
    for b in prange(q.shape[0]):
        _rule_one(q[b], les[b], oth[b], has_oth, pad, t_out, t_in, cuts[0], cuts[1], cuts[2],
                  cuts[3], cuts[4], cuts[5], n_sectors, rim_contrast, coverage_min,
                  min_slices, min_sector_fraction, vein_min, qsm_scale, res[b])


def rule_features(qsm: np.ndarray, lesion: np.ndarray, others: np.ndarray | None, *,
                  pad: int, t_out: int, t_in: int, cuts: tuple, n_sectors: int,
                  rim_contrast_ppm: float, coverage_min: float, min_slices: int,
                  min_sector_fraction: float, vein_min_ppm: float,
                  qsm_scale: float) -> np.ndarray:
    """Rule-based features of a stack of patches (:func:`rimnet.rule_based.rim_features`).

    Parameters
    ----------
    qsm, lesion, others : ndarray of float32, shape (N, P, P, P)
        The patches' ``qsm`` channel (ppm x ``qsm_scale``) and masks (``others`` optional).
    pad, t_out, t_in : int
        Box margin and the distance reaches (voxels) of ``rim_features``.
    cuts : tuple of 6 ints
        Integer squared-distance cut-offs (``rule_based._band_cutoffs``): band, NAWM inner,
        NAWM outer, beyond the band, vein reach, inner band.
    others
        The remaining options of ``rim_features`` (slice axis 2).

    Returns
    -------
    ndarray of float64, shape (N, 8)
        run_coverage, max_coverage, rim_minus_nawm_ppm, core reference (ppm), nawm_ppm,
        n_slices (-1: empty lesion mask), n_vein_voxels, rule_call.
    """
    n = len(qsm)
    res = np.zeros((n, 8))
    oth = lesion if others is None else others
    _launch(_rule_batch, qsm, lesion, oth, others is not None, int(pad), int(t_out), int(t_in),
            np.asarray(cuts, np.int64), int(n_sectors), float(rim_contrast_ppm),
            float(coverage_min), int(min_slices), float(min_sector_fraction),
            np.float32(vein_min_ppm), np.float32(qsm_scale), res)
    return res
