"""LSQR (Paige & Saunders, ACM TOMS 1982) over an array backend.

Solves ``min ||A x - b||_2`` by Golub-Kahan bidiagonalisation. The operator supplies the
two products, optionally fused with the LSQR updates (``A v - alpha u`` and
``A^T u - beta v``) so an implementation can avoid temporaries. Vectors may be any
backend arrays (real images, complex spectra treated as real vectors, stacks of
gradients); only :meth:`dot`/:meth:`nrm2`/:meth:`axpy`/:meth:`scal` of the backend
touch them (and, where the backend has it, the fused ``lsqr_update(x, w, v, a, c)``:
``x += a w; w = v + c w`` in one sweep).

Stopping rule (MATLAB-style tolerances, as used by STI Suite): stop when the relative
residual ``||r|| / ||b|| <= btol`` or the relative normal-equation residual
``||A^T r|| / (||A|| ||r||) <= atol``, or after ``max_iter`` iterations.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

__all__ = ["LinearOperator", "LSQRResult", "lsqr"]

log = logging.getLogger(__name__)


class LinearOperator:
    """Base class of LSQR operators; subclasses define :meth:`matvec` and :meth:`rmatvec`.

    Subclasses may override :meth:`matvec_update`/:meth:`rmatvec_update` to fuse the
    LSQR updates; they may overwrite and return the ``u``/``v`` they are given, unless
    they set :attr:`keeps_v`: an operator that never modifies a ``v`` it is given (nor
    returns it) lets LSQR keep references to old ``v`` and batch its solution updates.
    """

    backend = None
    keeps_v = False

    def matvec(self, v):
        """``A v`` (a new array)."""
        raise NotImplementedError

    def rmatvec(self, u):
        """``A^T u`` (a new array)."""
        raise NotImplementedError

    def unorm(self, u) -> float:
        """Norm of a data-space vector (operators may store data vectors transformed)."""
        return self.backend.nrm2(u)

    def udot(self, a, b) -> float:
        """Inner product of two data-space vectors (consistent with :meth:`unorm`)."""
        return self.backend.dot(a, b)

    def uscale(self, alpha: float, u):
        """Scale a data-space vector in place."""
        return self.backend.scal(alpha, u)

    def vnorm(self, v) -> float:
        """Norm of a solution-space vector."""
        return self.backend.nrm2(v)

    def vdot(self, a, b) -> float:
        """Inner product of two solution-space vectors (consistent with :meth:`vnorm`)."""
        return self.backend.dot(a, b)

    def vscale(self, alpha: float, v):
        """Scale a solution-space vector in place."""
        return self.backend.scal(alpha, v)

    def matvec_update(self, v, u, alpha: float):
        """``A v - alpha u``; ``u`` may be overwritten."""
        out = self.matvec(v)
        return self.backend.axpy(-alpha, u, out)

    def rmatvec_update(self, u, v, beta: float):
        """``A^T u - beta v``; ``v`` may be overwritten."""
        out = self.rmatvec(u)
        return self.backend.axpy(-beta, v, out)


class _SolutionUpdates:
    """LSQR's solution updates ``x += a w; w = v + c w`` (raw vectors), in order.

    Without deferral each update is one fused sweep (``backend.lsqr_update``, or three
    BLAS-like passes). With ``defer`` (the operator promises not to modify the ``v`` it
    is given: ``keeps_v``) updates are batched in groups of :attr:`GROUP`: a group is
    applied one ``1/GROUP`` slice of the arrays per iteration, while the next group
    collects, so every iteration reads and writes ``x`` and ``w`` over a ``1/GROUP``
    slice only (``2 + 2 + GROUP`` array passes per ``GROUP`` iterations instead of
    ``5 GROUP``). The arithmetic per element is the same, in the same order. Groups
    shrink (to none) when the ``2 GROUP`` vectors held would exceed
    :attr:`MAX_HELD_BYTES`.
    """

    GROUP = 4
    MAX_HELD_BYTES = 512 * 2**20  # the old v kept alive (up to 2 GROUP of them)

    def __init__(self, bk, w, defer: bool):
        self.bk, self.w = bk, w
        self.x = None
        self.size = bk.real_view(w).shape[0]
        group = self.GROUP
        while group > 1 and 2 * group * 4 * self.size > self.MAX_HELD_BYTES:
            group //= 2  # large volumes: smaller groups, or none, to bound the memory
        self.group = group
        self.defer = defer and group > 1 and hasattr(bk, "lsqr_update_group")
        self.pending = []  # (a, c, v) not yet applied
        self.active = None  # group being applied slice by slice
        self.next_slice = 0

    def _bounds(self, k: int):
        return self.size * k // self.group, self.size * (k + 1) // self.group

    def _apply(self, group, lo: int, hi: int) -> None:
        if self.x is None:
            self.x = self.bk.zeros_like(self.w)
        self.bk.lsqr_update_group(self.x, self.w, group, lo, hi)

    def push(self, a: float, c, v) -> None:
        """Queue ``x += a w`` then (unless ``c`` is None) ``w = v + c w``."""
        bk = self.bk
        if not self.defer:
            if self.x is None:
                self.x = bk.scal(a, bk.copy(self.w))
            elif c is not None and hasattr(bk, "lsqr_update"):
                bk.lsqr_update(self.x, self.w, v, a, c)
                return
            else:
                bk.axpy(a, self.w, self.x)
            if c is not None:
                bk.scal(c, self.w)
                bk.axpy(1.0, v, self.w)
            return
        self.pending.append((a, c, v))
        if self.active is None and len(self.pending) == self.group:
            self.active, self.pending, self.next_slice = self.pending, [], 0
        if self.active is not None:
            self._apply(self.active, *self._bounds(self.next_slice))
            self.next_slice += 1
            if self.next_slice == self.group:
                self.active = None

    def finish(self):
        """Apply everything still queued; returns ``x``."""
        if self.active is not None:
            self._apply(self.active, self._bounds(self.next_slice)[0], self.size)
            self.active = None
        if self.pending:
            self._apply(self.pending, 0, self.size)
            self.pending = []
        if self.x is None:
            self.x = self.bk.zeros_like(self.w)
        return self.x


@dataclass
class LSQRResult:
    """Outcome of :func:`lsqr`.

    Attributes
    ----------
    x : array
        The solution (backend array).
    n_iter : int
    stop : str
        ``"residual"``, ``"normal_equations"``, ``"max_iter"`` or ``"zero_rhs"``.
    rnorm : float
        Estimated ``||b - A x||``.
    arnorm : float
        Estimated ``||A^T (b - A x)||``.
    anorm : float
        Frobenius-norm estimate of A.
    times_s : list of float
        Wall time of each iteration (s).
    """

    x: object
    n_iter: int
    stop: str
    rnorm: float
    arnorm: float
    anorm: float
    times_s: list = field(default_factory=list)


def lsqr(op: LinearOperator, b, *, atol: float = 1e-2, btol: float = 1e-2,
         max_iter: int = 100, progress=None, label: str = "LSQR") -> LSQRResult:
    """Least squares ``min ||A x - b||`` with ``x0 = 0`` by LSQR.

    Parameters
    ----------
    op : LinearOperator
        Provides ``backend`` and the (fused) products.
    b : array
        Right-hand side in the data space (backend array; it is overwritten).
    atol, btol : float
        Tolerances of the normal-equation and the residual tests (see module doc).
    max_iter : int
        Iteration cap.
    progress : callable, optional
        Called as ``progress(label, iteration, max_iter, rel_residual)`` every iteration.
    label : str
        Name used in logs and progress.

    Returns
    -------
    LSQRResult
    """
    bk = op.backend
    # Lazy normalisation: the Golub-Kahan vectors are kept unnormalised ("raw") with
    # known scales (u = su * u_raw, v = sv * v_raw, w = sw * w_raw); the scales are
    # folded into the fused operator updates, saving one pass over u and one over v
    # per iteration. Raw vectors are renormalised when a scale drifts far from 1.
    u = b
    beta = op.unorm(u)
    bnorm = beta
    if beta == 0.0:
        x = bk.scal(0.0, op.rmatvec(u))
        return LSQRResult(x, 0, "zero_rhs", 0.0, 0.0, 0.0)
    su = 1.0 / beta
    v = op.rmatvec(u)
    alpha = su * op.vnorm(v)
    if alpha == 0.0:
        return LSQRResult(bk.scal(0.0, v), 0, "zero_rhs", beta, 0.0, 0.0)
    sv = su / alpha
    w, sw = bk.copy(v), sv
    updates = _SolutionUpdates(bk, w, defer=getattr(op, "keeps_v", False))
    phibar, rhobar = beta, alpha
    anorm_sq = 0.0
    rnorm, arnorm = beta, alpha * beta
    stop = "max_iter"
    times = []
    itn = 0
    while itn < max_iter:
        t0 = time.perf_counter()
        itn += 1
        # Golub-Kahan step: beta u' = A v - alpha u ; alpha v' = A^T u' - beta v.
        u = op.matvec_update(v, u, alpha * su / sv)  # = (A v - alpha u) / sv
        beta = sv * op.unorm(u)
        anorm_sq += alpha * alpha + beta * beta
        if beta == 0.0:
            stop = "residual"
            break
        su = sv / beta
        if not 1e-4 < su < 1e4:  # keep raw magnitudes (and their squares) in float32 range
            op.uscale(su, u)
            su = 1.0
        v = op.rmatvec_update(u, v, beta * sv / su)  # = (A^T u' - beta v) / su
        alpha = su * op.vnorm(v)
        if alpha > 0.0:
            sv = su / alpha
            if not 1e-4 < sv < 1e4:
                op.vscale(sv, v)
                sv = 1.0
        # Plane rotation eliminating the sub-diagonal beta.
        rho = math.hypot(rhobar, beta)
        c, s = rhobar / rho, beta / rho
        theta = s * alpha
        rhobar = -c * alpha
        phi = c * phibar
        phibar = s * phibar
        # x += (phi / rho) w ;  w = v - (theta / rho) w. In raw terms x += a w_raw and
        # w_raw = v_raw + cw w_raw (then sw = sv); see _SolutionUpdates.
        a = phi / rho * sw
        if alpha > 0.0:
            cw = -theta / rho * sw / sv
            sw = sv
        else:
            cw = None
        updates.push(a, cw, v)
        times.append(time.perf_counter() - t0)
        rnorm = phibar
        arnorm = phibar * alpha * abs(c)
        anorm = math.sqrt(anorm_sq)
        rel_res = rnorm / bnorm
        if progress is not None:
            progress(label, itn, max_iter, rel_res)
        if rel_res <= btol:
            stop = "residual"
            break
        if rnorm > 0 and arnorm / (anorm * rnorm) <= atol:
            stop = "normal_equations"
            break
        if alpha == 0.0:
            stop = "normal_equations"
            break
    if times:
        t0 = time.perf_counter()
        x = updates.finish()
        bk.synchronize()
        times[-1] += time.perf_counter() - t0  # the deferred updates belong to the loop
    else:
        x = bk.scal(0.0, bk.copy(w))
    log.debug("%s: %d iterations, stop=%s, rel. residual %.3g", label, itn, stop,
              rnorm / bnorm)
    return LSQRResult(x, itn, stop, rnorm, arnorm, math.sqrt(anorm_sq), times)
