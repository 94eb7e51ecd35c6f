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
    LSQR updates; they may overwrite and return the ``u``/``v`` they are given.
    """

    backend = None

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
    fused = hasattr(bk, "lsqr_update")
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
    x = None
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
        # x += (phi / rho) w ;  w = v - (theta / rho) w  (one fused sweep where the
        # backend has one: in raw terms x += a w_raw, w_raw = v_raw + c w_raw, sw = sv)
        a = phi / rho * sw
        if x is None:
            x = bk.scal(a, bk.copy(w))
            a = None
        if alpha > 0.0:
            c = -theta / rho * sw / sv
            if a is not None and fused:
                bk.lsqr_update(x, w, v, a, c)
            else:
                if a is not None:
                    bk.axpy(a, w, x)
                bk.scal(c, w)
                bk.axpy(1.0, v, w)
            sw = sv
        elif a is not None:
            bk.axpy(a, w, x)
        bk.synchronize()
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
    if x is None:
        x = bk.scal(0.0, bk.copy(w))
    log.debug("%s: %d iterations, stop=%s, rel. residual %.3g", label, itn, stop,
              rnorm / bnorm)
    return LSQRResult(x, itn, stop, rnorm, arnorm, math.sqrt(anorm_sq), times)
