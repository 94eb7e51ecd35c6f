"""Fused numba kernels of the numpy backend (one pass over memory each).

Each kernel does in one parallel loop nest what would otherwise be several full-volume
numpy passes (with temporaries): the LSQR updates, the step-1 residual and spectrum
sweeps, the step-3 cone scatter/gather and the step-3 7-point stencil.
:class:`~qsm_core.backend.NumpyBackend` calls them; ``docs/ilsqr.md`` explains
where they sit in an iteration.

Conventions

* Element-wise arithmetic is float32 with the float scalars rounded to float32 first, in
  the same order as the numpy expressions in the docstrings, so the element results are
  those of numpy (``np.float32`` arrays with Python floats, NEP 50).
* Reductions are accumulated in float64 (squares and products of float32 values are
  formed exactly in float64; quotients are float32), per parallel chunk, and the chunk
  sums are added in a fixed order.
* ``fastmath={"reassoc"}`` only: it lets LLVM vectorise the float64 accumulations
  (the summation order changes, the float64 error stays ~1e-16 relative); NaN/Inf
  semantics and exact division are kept (no ``nnan``/``ninf``/``arcp``/``afn``).
* The kernels have explicit signatures (no silent recompilation for a new layout: a
  wrong dtype or layout is a TypeError) and are compiled when this module is first
  imported, or loaded from numba's on-disk cache (``cache=True``). The backend imports it
  lazily (:meth:`~qsm_core.backend.NumpyBackend.warm`), before any timed loop.
* Threads: numba's ``workqueue`` layer unless ``NUMBA_THREADING_LAYER`` says otherwise.
  Its workers sleep between launches (no spin-waiting that would steal the cores from the
  FFT's threads or torch's OpenMP pool) and it is fork-safe (the simulator forks worker
  processes), but it is not thread-safe: launches are serialised by :data:`LOCK`. The
  thread count is set per launch by the backend (``numba.set_num_threads``). The layer is
  process-wide: other ``parallel=True`` numba code in the same process must not launch
  from several Python threads at once either (numba then aborts the process with
  "Concurrent access has been detected"); it can launch through :func:`launch`. (GNU
  OpenMP, numba's default here, is thread-safe but not fork-safe and spin-waits: it
  doubled the CPU time of these kernels on the 2-core machine; TBB, ``pip install tbb``,
  would be both thread- and fork-safe.)

Arrays named ``*_r`` are real (float32) views of complex64 arrays: real and imaginary
parts interleaved along the last axis.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import prange

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

__all__ = ["LOCK", "launch", "row_span", "dot", "axpy", "scal", "lsqr_update",
           "lsqr_update_group", "weighted_residual", "spectrum_update", "scatter_scaled",
           "gather_update", "gradient_residual"]

LOCK = threading.Lock()
"""Serialises kernel launches (the ``workqueue`` layer is not thread-safe)."""

_OPTS = dict(parallel=True, cache=True, nogil=True, fastmath={"reassoc"}, error_model="numpy")
_SERIAL = dict(cache=True, fastmath={"reassoc"}, error_model="numpy")
"""Options of the one-thread helpers (``error_model="numpy"``: a division by zero gives
inf/nan like numpy instead of a per-division check and exception, which would stop LLVM
from vectorising the loop)."""
_EXACT = dict(cache=True, error_model="numpy")
"""Options of the helpers without reductions (IEEE float32 in the written order)."""

_f32 = numba.float32
_f64 = numba.float64
_i64 = numba.int64
_spans = numba.int32[:, :, ::1]  # (X, Y, 2) per-row [k0, k1)
_flat = _f32[::1]  # contiguous 1D float32
_cvol = _f32[:, :, ::1]  # 3D float32, C-contiguous


def _chunk(n: int, parts: int, t: int):
    """Bounds of part ``t`` of ``range(n)`` cut into ``parts`` near-equal parts."""
    return n * t // parts, n * (t + 1) // parts


_chunk = numba.njit(cache=True, inline="always")(_chunk)


def _dot_serial(a, b):
    """``sum a * b`` in float64 on one thread."""
    s = 0.0
    for i in range(a.shape[0]):  # (indices from 0: no negative-index wraparound code)
        s += np.float64(a[i]) * np.float64(b[i])
    return s


_dot_serial = numba.njit(**_SERIAL)(_dot_serial)


@numba.njit(_f64(_flat, _flat, _i64), **_OPTS)
def dot(a, b, parts):
    """``sum a * b`` in float64.

    Parameters
    ----------
    a, b : ndarray, shape (N,), float32, contiguous
    parts : int
        Parallel chunks (the sum does not depend on the thread count, only on this).

    Returns
    -------
    float
    """
    n = a.shape[0]
    acc = np.zeros(parts)
    for t in prange(parts):
        lo, hi = _chunk(n, parts, t)
        acc[t] = _dot_serial(a[lo:hi], b[lo:hi])
    return acc.sum()


@numba.njit(numba.void(_f64, _flat, _flat), **_OPTS)
def axpy(alpha, x, y):
    """``y += alpha * x`` in place (``y + (alpha x)`` in float32).

    Parameters
    ----------
    alpha : float
    x, y : ndarray, shape (N,), float32, contiguous
    """
    a = np.float32(alpha)
    for i in prange(y.shape[0]):
        y[i] = y[i] + a * x[i]


@numba.njit(numba.void(_f64, _flat), **_OPTS)
def scal(alpha, x):
    """``x *= alpha`` in place.

    Parameters
    ----------
    alpha : float
    x : ndarray, shape (N,), float32, contiguous
    """
    a = np.float32(alpha)
    for i in prange(x.shape[0]):
        x[i] = x[i] * a


@numba.njit(numba.void(_flat, _flat, _flat, _f64, _f64), **_OPTS)
def lsqr_update(x, w, v, a, c):
    """LSQR's solution update ``x += a w`` then ``w = v + c w``, in place.

    Parameters
    ----------
    x, w, v : ndarray, shape (N,), float32, contiguous
    a, c : float
    """
    a32, c32 = np.float32(a), np.float32(c)
    for i in prange(x.shape[0]):
        wi = w[i]
        x[i] = x[i] + wi * a32
        w[i] = wi * c32 + v[i]


@numba.njit(numba.void(_flat, _flat, _flat, _flat, _flat, _flat, _f64[::1], _f64[::1],
                       numba.boolean[::1], _i64, _i64, _i64), **_OPTS)
def lsqr_update_group(x, w, v0, v1, v2, v3, a, c, has_c, n, lo, hi):
    """Up to four LSQR updates ``x += a_j w; w = v_j + c_j w`` in turn, on ``[lo, hi)``.

    ``x`` and ``w`` stay in registers over the ``n`` updates, so the group costs one pass
    over ``x`` and ``w`` instead of ``n``.

    Parameters
    ----------
    x, w : ndarray, shape (N,), float32, contiguous
        Updated in place on the elements ``[lo, hi)``.
    v0, v1, v2, v3 : ndarray, shape (N,), float32, contiguous
        The ``v_j`` (the unused ones may be any array of the shape, e.g. ``w``).
    a, c : ndarray, shape (4,), float64
    has_c : ndarray, shape (4,), bool
        False: update ``j`` is only ``x += a_j w``.
    n : int
        Number of updates (1 to 4).
    lo, hi : int
    """
    a0, a1, a2, a3 = np.float32(a[0]), np.float32(a[1]), np.float32(a[2]), np.float32(a[3])
    c0, c1, c2, c3 = np.float32(c[0]), np.float32(c[1]), np.float32(c[2]), np.float32(c[3])
    h0, h1, h2, h3 = has_c[0], has_c[1], has_c[2], has_c[3]
    xs, ws = x[lo:hi], w[lo:hi]
    u0, u1, u2, u3 = v0[lo:hi], v1[lo:hi], v2[lo:hi], v3[lo:hi]
    for i in prange(hi - lo):
        xi, wi = xs[i], ws[i]
        xi = xi + wi * a0
        if h0:
            wi = wi * c0 + u0[i]
        if n > 1:
            xi = xi + wi * a1
            if h1:
                wi = wi * c1 + u1[i]
        if n > 2:
            xi = xi + wi * a2
            if h2:
                wi = wi * c2 + u2[i]
        if n > 3:
            xi = xi + wi * a3
            if h3:
                wi = wi * c3 + u3[i]
        xs[i], ws[i] = xi, wi


def _residual_row(img, w_sq, out, c32):
    """:func:`weighted_residual` on one row; returns its weighted sum of squares."""
    s = 0.0
    for k in range(w_sq.shape[0]):
        ws = w_sq[k]
        r = ws * img[k] - out[k] * c32
        out[k] = r
        q = r * r / ws  # (inf or nan where ws = 0: not selected; a select, not a branch)
        s += np.float64(q if ws > 0 else np.float32(0.0))
    return s


_residual_row = numba.njit(**_SERIAL)(_residual_row)


@numba.njit(_f64(_flat, _i64, _i64, _cvol, _flat, _i64, _i64, _f64, _spans, _i64), **_OPTS)
def weighted_residual(img, img_s0, img_s1, w_sq, out, out_s0, out_s1, c, spans, parts):
    """``out = w_sq * img - c * out`` in place; returns ``sum out^2 / w_sq`` (``w_sq > 0``).

    The inverse weight is formed on the fly (one array fewer to read). Only the row
    segments in ``spans`` are touched.

    Parameters
    ----------
    img : ndarray, shape (S,), float32, contiguous
        A (X, Y, Z) array with rows contiguous, as its flat span (:func:`row_span`):
        element ``[i, j, k]`` is ``img[i * img_s0 + j * img_s1 + k]``.
    img_s0, img_s1 : int
        Its strides along axes 0 and 1, in elements.
    w_sq : ndarray, shape (X, Y, Z), float32, C-contiguous
        ``W^2`` (>= 0).
    out : ndarray, shape (S',), float32, contiguous
        Like ``img`` (with strides ``out_s0``, ``out_s1``); updated in place.
    out_s0, out_s1 : int
    c : float
    spans : ndarray, shape (X, Y, 2), int32, C-contiguous
        Per row ``[i, j]`` the segment ``[k0, k1)`` to process (``backend.row_spans`` of
        ``w_sq > 0``: outside it ``w_sq = 0``, and an ``out`` that is 0 there stays 0).
    parts : int
        Parallel chunks along axis 0.

    Returns
    -------
    float
    """
    nx, ny = w_sq.shape[0], w_sq.shape[1]
    c32 = np.float32(c)
    acc = np.zeros(parts)
    for t in prange(parts):
        lo, hi = _chunk(nx, parts, t)
        s = 0.0
        for i in range(lo, hi):
            for j in range(ny):
                k0, k1 = spans[i, j, 0], spans[i, j, 1]
                if k1 > k0:
                    bi, bo = i * img_s0 + j * img_s1, i * out_s0 + j * out_s1
                    s += _residual_row(img[bi + k0: bi + k1], w_sq[i, j, k0:k1],
                                       out[bo + k0: bo + k1], c32)
        acc[t] = s
    return acc.sum()


def _weighted_sq(re, im, k):
    """``|re + i im|^2 / k`` (0 where ``k = 0``), as float64."""
    q = (re * re + im * im) / k
    return np.float64(q if k > 0 else np.float32(0.0))


_weighted_sq = numba.njit(inline="always", **_SERIAL)(_weighted_sq)


def _spectrum_row(s, v, k_sq, c32):
    """:func:`spectrum_update` on one row (real views); returns its weighted sum."""
    acc = 0.0
    for k in range(k_sq.shape[0]):
        kk = k_sq[k]
        re = s[2 * k] * kk - v[2 * k] * c32
        im = s[2 * k + 1] * kk - v[2 * k + 1] * c32
        s[2 * k] = re
        s[2 * k + 1] = im
        acc += _weighted_sq(re, im, kk)
    return acc


_spectrum_row = numba.njit(**_SERIAL)(_spectrum_row)


@numba.njit(numba.types.UniTuple(_f64, 3)(_cvol, _cvol, _f64, _cvol, _i64), **_OPTS)
def spectrum_update(s_r, v_r, c, k_sq, parts):
    """``s = k_sq * s - c v`` in place on a half spectrum, and ``sum |s|^2 / k_sq``.

    Parameters
    ----------
    s_r, v_r : ndarray, shape (X, Y, 2 M), float32, C-contiguous
        Real views of complex64 spectra of shape (X, Y, M).
    c : float
    k_sq : ndarray, shape (X, Y, M), float32, C-contiguous
        Real kernel (>= 0); the norm's weight ``1 / k_sq`` (0 where ``k_sq = 0``) is formed
        on the fly.
    parts : int
        Parallel chunks along axis 0.

    Returns
    -------
    tuple of 3 floats
        The weighted sum over the whole spectrum, over the plane ``[..., 0]`` and over the
        plane ``[..., M - 1]`` (for the Hermitian weights).
    """
    nx, ny, m = k_sq.shape
    c32 = np.float32(c)
    tot = np.zeros(parts)
    first = np.zeros(parts)
    last = np.zeros(parts)
    for t in prange(parts):
        lo, hi = _chunk(nx, parts, t)
        st = sf = sl = 0.0
        for i in range(lo, hi):
            for j in range(ny):
                sr, kr = s_r[i, j], k_sq[i, j]
                st += _spectrum_row(sr, v_r[i, j], kr, c32)
                sf += _weighted_sq(sr[0], sr[1], kr[0])
                sl += _weighted_sq(sr[2 * m - 2], sr[2 * m - 1], kr[m - 1])
        tot[t], first[t], last[t] = st, sf, sl
    return tot.sum(), first.sum(), last.sum()


@numba.njit(numba.void(_flat, numba.int32[::1], _flat, _flat), **_OPTS)
def scatter_scaled(buf_r, idx, values_r, kernel):
    """``buf[idx] = kernel * values`` (complex entries scaled by a real kernel).

    Parameters
    ----------
    buf_r : ndarray, shape (2 N,), float32, contiguous
        Real view of the flat complex64 target (N entries).
    idx : ndarray, shape (n,), int32
        Unique flat indices into the complex target.
    values_r : ndarray, shape (2 n,), float32, contiguous
        Real view of the complex64 values.
    kernel : ndarray, shape (n,), float32
    """
    for i in prange(idx.shape[0]):
        p = np.int64(idx[i])
        k = kernel[i]
        buf_r[2 * p] = values_r[2 * i] * k
        buf_r[2 * p + 1] = values_r[2 * i + 1] * k


def _gather_serial(buf_r, idx, kernel, v_r, c, out_r):
    """:func:`gather_update` of one chunk on one thread; returns its ``||out||^2``."""
    c32 = np.float32(c)
    s = 0.0
    for i in range(idx.shape[0]):
        p = np.int64(idx[i])
        k = kernel[i]
        re = buf_r[2 * p] * k - v_r[2 * i] * c32
        im = buf_r[2 * p + 1] * k - v_r[2 * i + 1] * c32
        out_r[2 * i] = re
        out_r[2 * i + 1] = im
        s += np.float64(re) * np.float64(re) + np.float64(im) * np.float64(im)
    return s


_gather_serial = numba.njit(**_SERIAL)(_gather_serial)


@numba.njit(_f64(_flat, numba.int32[::1], _flat, _flat, _f64, _flat, _i64), **_OPTS)
def gather_update(buf_r, idx, kernel, v_r, c, out_r, parts):
    """``out = kernel * buf[idx] - c v``; returns ``||out||^2`` (complex entries).

    Parameters
    ----------
    buf_r : ndarray, shape (2 N,), float32, contiguous
        Real view of the flat complex64 source.
    idx : ndarray, shape (n,), int32
    kernel : ndarray, shape (n,), float32
    v_r, out_r : ndarray, shape (2 n,), float32, contiguous
        Real views of complex64 vectors (``out`` may be ``v``: each element is read
        before it is written).
    c : float
    parts : int
        Parallel chunks.

    Returns
    -------
    float
    """
    n = idx.shape[0]
    acc = np.zeros(parts)
    for t in prange(parts):
        lo, hi = _chunk(n, parts, t)
        acc[t] = _gather_serial(buf_r, idx[lo:hi], kernel[lo:hi], v_r[2 * lo: 2 * hi], c,
                                out_r[2 * lo: 2 * hi])
    return acc.sum()


def _stencil_row(zc, zxm, zxp, zym, zyp, a0m, a0c, a1m, a1c, a2c, out):
    """One row of ``L z`` from the rows around it (float32).

    ``zc`` is the row, ``zxm``/``zxp`` and ``zym``/``zyp`` its neighbours along axes 0 and
    1 (the row itself at a face: the difference is then zero), ``a0m``/``a1m`` the weights
    of the backward differences along axes 0/1, ``a0c``/``a1c``/``a2c`` those of the
    forward differences. Axis-0/1 terms first, then the axis-2 terms along the row.
    """
    nz = zc.shape[0]
    for k in range(nz):
        c = zc[k]
        out[k] = ((a0m[k] * (c - zxm[k]) - a0c[k] * (zxp[k] - c))
                  + (a1m[k] * (c - zym[k]) - a1c[k] * (zyp[k] - c)))
    if nz > 1:
        for k in range(1, nz - 1):
            c = zc[k]
            out[k] = out[k] + (a2c[k - 1] * (c - zc[k - 1]) - a2c[k] * (zc[k + 1] - c))
        out[0] = out[0] - a2c[0] * (zc[1] - zc[0])
        out[nz - 1] = out[nz - 1] + a2c[nz - 2] * (zc[nz - 1] - zc[nz - 2])


_stencil_row = numba.njit(**_EXACT)(_stencil_row)


def _update_row(img, z, c32):
    """``z = img - c z`` on one row (float32)."""
    for k in range(z.shape[0]):
        z[k] = img[k] - z[k] * c32


_update_row = numba.njit(**_EXACT)(_update_row)


def _update_plane(img, s0, s1, z, c32, spans, p):
    """``z[p] = img[p] - c z[p]`` in place on the row spans (``img`` as a flat span)."""
    for j in range(z.shape[1]):
        k0, k1 = spans[p, j, 0], spans[p, j, 1]
        if k1 > k0:
            b = p * s0 + j * s1
            _update_row(img[b + k0: b + k1], z[p, j, k0:k1], c32)


_update_plane = numba.njit(**_EXACT)(_update_plane)


def _stencil_plane(z, a0, a1, a2, out, s0, s1, spans, p):
    """``out[p] = (L z)[p]`` on the row spans; returns ``<z[p], out[p]>`` (float64)."""
    nx, ny = z.shape[0], z.shape[1]
    pm, pp = max(p - 1, 0), min(p + 1, nx - 1)
    s = 0.0
    for j in range(ny):
        k0, k1 = spans[p, j, 0], spans[p, j, 1]
        if k1 <= k0:
            continue
        jm, jp = max(j - 1, 0), min(j + 1, ny - 1)
        b = p * s0 + j * s1
        row = out[b + k0: b + k1]
        zc = z[p, j, k0:k1]
        _stencil_row(zc, z[pm, j, k0:k1], z[pp, j, k0:k1], z[p, jm, k0:k1], z[p, jp, k0:k1],
                     a0[pm, j, k0:k1], a0[p, j, k0:k1], a1[p, jm, k0:k1], a1[p, j, k0:k1],
                     a2[p, j, k0:k1], row)
        s += _dot_serial(zc, row)
    return s


_stencil_plane = numba.njit(**_EXACT)(_stencil_plane)


@numba.njit(_f64(_flat, _i64, _i64, _cvol, _f64, numba.boolean, _f32[:, :, :, ::1], _flat,
                 _i64, _i64, _spans, _i64), **_OPTS)
def gradient_residual(img, img_s0, img_s1, z, c, update, a_sq, out, out_s0, out_s1, spans,
                      parts):
    """``z = img - c z`` (in place, if ``update``), ``out = L z``; returns ``<z, L z>``.

    ``L z = sum_j D_j^T (a_j D_j z)`` with ``D_j`` the forward difference along axis ``j``
    (``D_j z[i] = z[i + e_j] - z[i]``, zero across the last plane; ``D_j^T t[i] =
    t[i - e_j] - t[i]``), computed per voxel from its 7-point neighbourhood. Only the row
    segments in ``spans`` are touched: given the ``backend.row_spans`` of the support of
    the weights (voxels with a nonzero weight on one of their six differences), ``z``
    outside it never reaches ``L z`` (its weights are zero) and ``L z`` is zero there.

    One pass: axis 0 is cut into ``parts`` chunks; the first and last plane of every chunk
    are updated first (a chunk's stencil reads its neighbours' boundary planes), then each
    chunk updates its plane ``p + 1`` just before the stencil of plane ``p``, so the
    stencil reads the new ``z`` from cache.

    Parameters
    ----------
    img : ndarray, shape (S,), float32, contiguous
        An (X, Y, Z) array with rows contiguous, as its flat span (:func:`row_span`):
        element ``[i, j, k]`` is ``img[i * img_s0 + j * img_s1 + k]``; ignored unless
        ``update``.
    img_s0, img_s1 : int
        Its strides along axes 0 and 1, in elements.
    z : ndarray, shape (X, Y, Z), float32, C-contiguous
    c : float
    update : bool
        False: ``z`` is not touched (just the stencil).
    a_sq : ndarray, shape (3, X, Y, Z), float32, C-contiguous
        Squared weights of the three difference components (finite).
    out : ndarray, shape (S',), float32, contiguous
        The (X, Y, Z) output as a flat span like ``img`` (strides ``out_s0``, ``out_s1``).
    out_s0, out_s1 : int
    spans : ndarray, shape (X, Y, 2), int32, C-contiguous
        Per row ``[i, j]`` the segment ``[k0, k1)`` to process.
    parts : int
        Chunks along axis 0 (the result does not depend on the thread count).

    Returns
    -------
    float
        ``<z, out>`` accumulated in float64.
    """
    nx = z.shape[0]
    c32 = np.float32(c)
    a0, a1, a2 = a_sq[0], a_sq[1], a_sq[2]
    if update:
        for t in prange(parts):
            lo, hi = _chunk(nx, parts, t)
            if hi > lo:
                _update_plane(img, img_s0, img_s1, z, c32, spans, lo)
            if hi - 1 > lo:
                _update_plane(img, img_s0, img_s1, z, c32, spans, hi - 1)
    acc = np.zeros(parts)
    for t in prange(parts):
        lo, hi = _chunk(nx, parts, t)
        s = 0.0
        for p in range(lo, hi):
            if update and lo < p + 1 < hi - 1:
                _update_plane(img, img_s0, img_s1, z, c32, spans, p + 1)
            s += _stencil_plane(z, a0, a1, a2, out, out_s0, out_s1, spans, p)
        acc[t] = s
    return acc.sum()


def row_span(a: np.ndarray):
    """A 3D array with contiguous rows as ``(flat, s0, s1)`` for the strided kernels.

    Parameters
    ----------
    a : ndarray, shape (X, Y, Z)
        Unit stride along the last axis, non-negative strides (e.g. a box view of a
        C-contiguous array).

    Returns
    -------
    flat : ndarray, shape (S,), contiguous
        A view of the memory from ``a[0, 0, 0]`` to ``a[-1, -1, -1]``.
    s0, s1 : int
        Strides of ``a`` along axes 0 and 1, in elements.
    """
    item = a.itemsize
    s0, s1, s2 = a.strides
    if a.ndim != 3 or s2 != item or s0 < 0 or s1 < 0 or s0 % item or s1 % item:
        raise ValueError(f"row_span needs a 3D array with contiguous rows, got shape "
                         f"{a.shape} strides {a.strides}")
    s0, s1 = s0 // item, s1 // item
    span = (a.shape[0] - 1) * s0 + (a.shape[1] - 1) * s1 + a.shape[2] if a.size else 0
    flat = np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(item,))
    return flat, s0, s1

def launch(kernel, threads: int, *args):
    """Run ``kernel(*args)`` on ``threads`` numba threads (at most numba's pool size).

    Launches are serialised by :data:`LOCK`; the GIL is released inside the kernel.
    """
    with LOCK:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        return kernel(*args)
