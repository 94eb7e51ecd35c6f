"""Poisson solver with zero Dirichlet boundary on a voxel domain (for LBV).

:func:`poisson_dirichlet` solves ``-lap_h x = rhs`` on the voxels of a boolean ``domain``,
``x = 0`` on every voxel outside it, with the 7-point Laplacian of anisotropic spacing
``h`` (``-lap_h x = sum_a (2 x - x[+a] - x[-a]) / h_a^2``). Conjugate gradients
preconditioned by one multigrid V-cycle (cell-centred geometric multigrid: trilinear
prolongation, its transpose as restriction, damped Jacobi smoothing, the operator
re-discretised on coarser masks, a sparse direct solve on the coarsest level). Axes much
finer than the coarsest axis are coarsened first (semi-coarsening), so anisotropic voxels
keep a good smoother. The preconditioner is a fixed symmetric positive linear operator, so
plain PCG applies. Everything is float32 except the inner products (float64).

:func:`qsm_core.background.lbv` (Laplacian boundary value background removal) uses it.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from qsm_core.errors import InputError

__all__ = ["poisson_dirichlet", "laplacian_7pt"]

log = logging.getLogger(__name__)

_JACOBI_OMEGA = np.float32(0.8)
_COARSEST_UNKNOWNS = 3000


def _dot(a, b) -> float:
    return float(np.add.reduce((a * b).ravel(), dtype=np.float64))


def laplacian_7pt(x, weights):
    """``sum_a w_a (x[+a] + x[-a] - 2 x)`` with zeros beyond the array (float32).

    Parameters
    ----------
    x : ndarray, shape (X, Y, Z)
    weights : sequence of 3 floats
        ``1 / h_a^2`` per axis.
    """
    out = np.multiply(x, np.float32(-2.0 * sum(weights)), dtype=np.float32)
    for axis, w in enumerate(weights):
        w = np.float32(w)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        out[lo] += w * x[hi]
        out[hi] += w * x[lo]
    return out


class _Level:
    """One grid of the multigrid hierarchy."""

    def __init__(self, domain, spacing):
        self.domain = domain
        self.spacing = np.asarray(spacing, float)
        self.weights = tuple(float(w) for w in 1.0 / self.spacing**2)
        self.diag = np.float32(2.0 * sum(self.weights))
        self.n = int(domain.sum())
        self.coarsen = None  # axes coarsened to reach the next level
        self.solve = None  # direct solver on the coarsest level

    def apply(self, x):
        """``A x`` (A = -Laplacian, Dirichlet zero outside the domain); x is zero outside."""
        y = laplacian_7pt(x, self.weights)
        y *= np.float32(-1.0)
        y *= self.domain
        return y

    def smooth(self, x, b, sweeps):
        for _ in range(sweeps):
            r = b - self.apply(x)
            x += (_JACOBI_OMEGA / self.diag) * r
        return x

    def build_direct(self):
        idx = np.full(self.domain.shape, -1, np.int64)
        idx[self.domain] = np.arange(self.n)
        rows = [np.arange(self.n)]
        cols = [np.arange(self.n)]
        vals = [np.full(self.n, float(self.diag))]
        coords = np.nonzero(self.domain)
        for axis, w in enumerate(self.weights):
            for step in (-1, 1):
                nb = list(coords)
                nb[axis] = nb[axis] + step
                ok = (nb[axis] >= 0) & (nb[axis] < self.domain.shape[axis])
                j = np.full(self.n, -1, np.int64)
                j[ok] = idx[tuple(c[ok] for c in nb)]
                sel = j >= 0
                rows.append(np.nonzero(sel)[0])
                cols.append(j[sel])
                vals.append(np.full(int(sel.sum()), -w))
        a = scipy.sparse.csc_matrix((np.concatenate(vals),
                                     (np.concatenate(rows), np.concatenate(cols))),
                                    shape=(self.n, self.n))
        factor = scipy.sparse.linalg.factorized(a)

        def solve(b):
            x = np.zeros(self.domain.shape, np.float32)
            if self.n:
                x[self.domain] = factor(b[self.domain].astype(np.float64))
            return x

        self.solve = solve


def _prolong_axis(c, axis, n_fine):
    """Cell-centred linear interpolation along ``axis`` (zeros beyond the ends)."""
    c = np.moveaxis(c, axis, 0)
    prev = np.zeros_like(c)
    prev[1:] = c[:-1]
    nxt = np.zeros_like(c)
    nxt[:-1] = c[1:]
    f = np.empty((2 * c.shape[0], *c.shape[1:]), np.float32)
    f[0::2] = 0.75 * c + 0.25 * prev
    f[1::2] = 0.75 * c + 0.25 * nxt
    return np.moveaxis(f[:n_fine], 0, axis)


def _restrict_axis(r, axis, n_coarse):
    """Transpose of :func:`_prolong_axis`, divided by 2 (a weighted average)."""
    r = np.moveaxis(r, axis, 0)
    if r.shape[0] < 2 * n_coarse:
        r = np.concatenate([r, np.zeros((2 * n_coarse - r.shape[0], *r.shape[1:]),
                                        np.float32)])
    even, odd = r[0::2], r[1::2]
    c = 0.375 * (even + odd)
    c[1:] += 0.125 * odd[:-1]
    c[:-1] += 0.125 * even[1:]
    return np.moveaxis(c, 0, axis)


def _build_levels(domain, spacing):
    levels = [_Level(domain, spacing)]
    while True:
        lev = levels[-1]
        h = lev.spacing
        axes = [a for a in range(3) if h[a] <= 1.5 * h.min() and lev.domain.shape[a] > 4]
        if lev.n <= _COARSEST_UNKNOWNS or not axes:
            break
        # coarse voxel in the domain if at least half of its children are
        frac = lev.domain.astype(np.float32)
        for a in axes:
            nc = (frac.shape[a] + 1) // 2
            frac = np.moveaxis(frac, a, 0)
            if frac.shape[0] < 2 * nc:
                frac = np.concatenate([frac, np.zeros((1, *frac.shape[1:]), np.float32)])
            frac = np.moveaxis(0.5 * (frac[0::2] + frac[1::2]), 0, a)
        coarse = frac >= 0.5
        if not coarse.any():
            break
        lev.coarsen = axes
        h2 = h.copy()
        h2[axes] *= 2.0
        levels.append(_Level(coarse, h2))
    levels[-1].build_direct()
    return levels


def _vcycle(levels, k, b, sweeps):
    lev = levels[k]
    if lev.solve is not None:
        return lev.solve(b)
    x = lev.smooth(np.zeros_like(b), b, sweeps)
    r = (b - lev.apply(x))
    nxt = levels[k + 1]
    for a in lev.coarsen:
        r = _restrict_axis(r, a, nxt.domain.shape[a])
    r *= nxt.domain
    e = _vcycle(levels, k + 1, r, sweeps)
    for a in reversed(lev.coarsen):
        e = _prolong_axis(e, a, lev.domain.shape[a])
    x += e * lev.domain
    return lev.smooth(x, b, sweeps)


def poisson_dirichlet(rhs, domain, *, voxel_size_mm, tol: float = 1e-5, max_iter: int = 100,
                      sweeps: int = 2, return_info: bool = False):
    """Solve ``-lap_h x = rhs`` on ``domain`` with ``x = 0`` outside it (MG-PCG).

    Parameters
    ----------
    rhs : ndarray, shape (X, Y, Z)
        Right-hand side (used on ``domain`` only).
    domain : ndarray of bool, shape (X, Y, Z)
        The unknowns. Voxels outside it (and beyond the array) are the zero boundary.
    voxel_size_mm : sequence of 3 floats
        Grid spacing ``h`` (mm); the Laplacian is in 1/mm^2.
    tol : float
        Stop when ``||rhs - A x|| <= tol ||rhs||`` on the domain.
    max_iter : int
        Maximum PCG iterations.
    sweeps : int
        Damped-Jacobi sweeps before and after each coarse-grid correction.
    return_info : bool
        Also return ``{"iterations", "relative_residual", "levels"}``.

    Returns
    -------
    x : ndarray, shape (X, Y, Z), float32
        Zero outside ``domain``.
    """
    d = np.asarray(domain, bool)
    b = np.asarray(rhs, np.float32) * d
    if b.shape != d.shape or d.ndim != 3:
        raise InputError(f"rhs {b.shape} and domain {d.shape} must be the same 3D shape")
    levels = _build_levels(d, voxel_size_mm)
    fine = levels[0]
    x = np.zeros(d.shape, np.float32)
    bnorm = np.sqrt(_dot(b, b))
    info = {"iterations": 0, "relative_residual": 0.0, "levels": len(levels)}
    if bnorm == 0.0 or fine.n == 0:
        return (x, info) if return_info else x
    r = b.copy()
    z = _vcycle(levels, 0, r, sweeps)
    p = z.copy()
    rz = _dot(r, z)
    rel = 1.0
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        ap = fine.apply(p)
        alpha = np.float32(rz / _dot(p, ap))
        x += alpha * p
        r -= alpha * ap
        rel = np.sqrt(_dot(r, r)) / bnorm
        if rel <= tol:
            break
        z = _vcycle(levels, 0, r, sweeps)
        rz_new = _dot(r, z)
        p *= np.float32(rz_new / rz)
        p += z
        rz = rz_new
    log.info("Poisson MG-PCG: %d iterations, %d levels, relative residual %.2g", it,
             len(levels), rel)
    info.update(iterations=it, relative_residual=float(rel))
    return (x, info) if return_info else x
