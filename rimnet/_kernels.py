"""Compiled (numba) kernels of the per-lesion inference path.

Private helpers of :mod:`rimnet.patches`, :mod:`rimnet.fast_ensemble` and
:mod:`rimnet.rule_based`; each computes what a readable numpy/torch reference computes
(the equivalence is a test in ``tests/rimnet/test_kernels.py``), in one pass over the data
instead of dozens of whole-array operations. Compiled on first use and cached on disk
(``cache=True``). Kernels marked parallel split their work over lesions on numba's worker
threads (:func:`set_threads`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

__all__ = ["set_threads", "shell_features"]


def set_threads(n: int) -> None:
    """Use ``n`` numba worker threads (at most the number numba started with)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


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
    _shell_batch(x, int(qsm_channel), int(lesion_channel), oc, np.float32(clip),
                 np.float32(positive), feats, refs)
    return feats, refs


# ----------------------------------------------------------------------------- patches
@njit(cache=True, inline="always")
def _normalise(v, divide, sc, lo, hi):
    """``np.clip(v / sc if divide else v * sc, lo, hi)`` in float32 (NaN stays NaN)."""
    v = v / sc if divide else v * sc
    if v < lo:
        v = lo
    elif v > hi:
        v = hi
    return v


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
    for a in range(p):
        for b in range(p):
            for c in range(p):
                dst[a, b, c] = d2[c, b, a]


@njit(cache=True, parallel=True)
def _gather_linear(vol, flip, starts, w, rows, ch, divide, sc, lo, hi, out):
    """Trilinear patches of on-grid lesions (see :func:`gather_linear`)."""
    for r in prange(starts.shape[0]):
        if flip:
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
    if flip:  # read the (z, y, x) transpose in its memory order
        for k in range(p):
            for j in range(p):
                for i in range(p):
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
    _gather_linear(v, flip, np.ascontiguousarray(starts, np.int64),
                   np.ascontiguousarray(weights, np.float32), np.asarray(rows, np.int64),
                   int(channel), bool(divide), np.float32(scale), np.float32(lo),
                   np.float32(hi), out)


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
    _gather_masks(v, flip, np.ascontiguousarray(starts, np.int64), np.asarray(ids, np.int64),
                  np.asarray(rows, np.int64),
                  -1 if lesion_channel is None else int(lesion_channel),
                  -1 if others_channel is None else int(others_channel), out)


# ----------------------------------------------------------------------------- references
@njit(cache=True, inline="always")
def _at(a, flip, i, j, k):
    return a[k, j, i] if flip else a[i, j, k]


@njit(cache=True)
def _reference_values(flair, f_flip, qsm, q_flip, labels, l_flip, shape, step):
    n0, n1, n2 = shape
    m0, m1, m2 = (n0 + step - 1) // step, (n1 + step - 1) // step, (n2 + step - 1) // step
    vals = np.empty(m0 * m1 * m2, flair.dtype)
    n = 0
    if f_flip:  # loop in the flair volume's memory order
        for kk in range(m2):
            for jj in range(m1):
                for ii in range(m0):
                    i, j, k = ii * step, jj * step, kk * step
                    if _at(qsm, q_flip, i, j, k) != 0 and _at(labels, l_flip, i, j, k) == 0:
                        vals[n] = flair[k, j, i]
                        n += 1
    else:
        for ii in range(m0):
            for jj in range(m1):
                for kk in range(m2):
                    i, j, k = ii * step, jj * step, kk * step
                    if _at(qsm, q_flip, i, j, k) != 0 and _at(labels, l_flip, i, j, k) == 0:
                        vals[n] = flair[i, j, k]
                        n += 1
    return vals[:n]


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
    return _reference_values(f, ff, q, qf, la, lf, tuple(int(s) for s in flair.shape),
                             int(step))


def any_nonzero(a: np.ndarray) -> bool:
    """``bool(np.any(a != 0))``, stopping at the first non-zero value."""
    v, _ = _c_view(a)
    return bool(_any_nonzero(v))
