"""The two LSQR operators of iLSQR, written for speed (one FFT pair per iteration).

Both keep LSQR's unknown in k-space (the half spectrum scaled by ``1 / sqrt(N / w)``,
:func:`~qsm_core.inversion._common.hermitian_scale`, which makes the real FFT an isometry),
so an iteration costs one inverse and one forward FFT. Everything else an iteration needs
is done in a few fused sweeps over memory (:mod:`qsm_core.backend`):

* ``matvec_update`` computes the new data-space vector, its norm and the adjoint's FFT
  input in one sweep (cached for the ``unorm``/``rmatvec_update`` that LSQR calls next);
* ``rmatvec_update`` computes the new unknown, the kernel product the next inverse FFT
  needs and the unknown's norm in one sweep (cached for ``vnorm``).

:class:`WeightedDipoleOp` is step 1 (``v -> W F^-1 D v``), :class:`ConeGradientOp` step 3
(``v -> W_g grad F^-1 P v`` on the ill-conditioned cone ``P``). ``docs/ilsqr.md`` has the
derivations and the measured cost.
"""

from __future__ import annotations

import math
import time

import numpy as np

from qsm_core.backend import row_spans
from qsm_core.inversion._common import Grid
from qsm_core.inversion.lsqr import LinearOperator

__all__ = ["TimedFFT", "WeightedDipoleOp", "ConeGradientOp"]


class TimedFFT:
    """FFT wrappers of a backend that add their wall time to :attr:`fft_s`."""

    def __init__(self, bk):
        self.bk = bk
        self.fft_s = 0.0

    def rfftn(self, x):
        """Timed :meth:`rfftn` of the backend."""
        self.bk.synchronize()
        t0 = time.perf_counter()
        out = self.bk.rfftn(x)
        self.bk.synchronize()
        self.fft_s += time.perf_counter() - t0
        return out

    def irfftn(self, spec, shape, overwrite=True):
        """Timed :meth:`irfftn` of the backend."""
        self.bk.synchronize()
        t0 = time.perf_counter()
        out = self.bk.irfftn(spec, shape, overwrite=overwrite)
        self.bk.synchronize()
        self.fft_s += time.perf_counter() - t0
        return out


class WeightedDipoleOp(LinearOperator):
    """``v -> W * F^-1(D v)`` on the bounding box (iLSQR step 1), unknown in k-space.

    The unknown is the isometrically scaled half spectrum ``v`` (``s v`` is the spectrum,
    ``s = sqrt(N / w)``). Vectors are stored as ``y = D s v``, which is exactly the input
    of the inverse FFT of ``A v = W F^-1(D s v)`` (so the forward product needs no
    multiply; the FFT does not overwrite its input). The adjoint is
    ``y' = D^2 F(W u)`` and the norm ``||v||^2 = sum (w / N) |y|^2 / D^2`` (entries with
    ``D = 0`` are not in the range of ``A^T`` and stay zero). One sweep over the spectrum
    (:meth:`rmatvec_update`) makes ``y' - beta y`` in place and its norm. Data vectors are
    kept pre-weighted, as ``W u`` in the box of the adjoint's zero-padded FFT input
    (:attr:`pad`, which :meth:`matvec_update` returns as the new ``u``): one sweep makes
    ``W^2 img - c W u`` and the norm ``sum (W u)^2 / W^2``. A plain box array (LSQR's
    right-hand side) is accepted wherever a data vector is.

    Parameters
    ----------
    bk : backend
    grid : Grid
    d : ndarray
        Dipole kernel on the grid's half spectrum (float32).
    scale : ndarray
        :func:`hermitian_scale` of the grid.
    weight : ndarray, shape ``grid.shape``
        Data weight ``W`` (zero outside the mask).
    """

    keeps_v = True

    def __init__(self, bk, grid: Grid, d: np.ndarray, scale: np.ndarray, weight: np.ndarray):
        self.backend = bk
        bk.warm()  # compile / load the fused kernels now, not inside the timed iterations
        self.fft = TimedFFT(bk)
        self.shape, self.box = grid.shape, grid.box
        self.n = float(np.prod(grid.shape))
        self.even = grid.shape[2] % 2 == 0
        self.d = np.asarray(d, np.float32)
        self.scale = scale
        d2 = self.d.astype(np.float64) ** 2
        with np.errstate(divide="ignore"):
            inv_d2 = np.where(d2 > 0, 1.0 / np.where(d2 > 0, d2, 1.0), 0.0)
        self.k_inv_sq_real = bk.asarray(inv_d2.astype(np.float32))  # (vdot only)
        self.k_sq = bk.kernel(d2)  # for the fused sweep (which forms 1 / D^2 itself)
        w = np.asarray(weight[grid.box], np.float64)
        w = np.where(w * w > 1e-30, w, 0.0)  # (weights this small are zero in float32)
        self.weight = bk.asarray(w.astype(np.float32))
        self.w_sq = bk.asarray((w * w).astype(np.float32))  # (1 / W^2 formed on the fly)
        # The residual sweep skips the ends of the box rows where W = 0 (outside the mask
        # the stored W u is 0 and stays 0): about half of the box for a head.
        self.spans = row_spans(w > 0)
        # Data vectors u are stored pre-weighted, as W u in the box of this zero-padded
        # array (the adjoint's FFT input): the LSQR update becomes W^2 img - c (W u) and
        # the norm sum (W u)^2 / W^2, so u needs neither an array nor a copy of its own.
        self.pad = bk.zeros(grid.shape)
        self._vnorm = (None, 0.0)  # (vector, norm) cached by rmatvec_update
        self._unorm = (None, 0.0)  # (vector, norm) cached by matvec_update
        self._pad_of = None  # the plain data vector u whose W u fills pad[box]

    # -- helpers -------------------------------------------------------------------------
    def _hermitian(self, total: float, first: float, last: float) -> float:
        """``sum (w / N) ...`` from the plain sum and the sums over the edge planes."""
        val = 2.0 * total - first - (last if self.even else 0.0)
        return max(val, 0.0) / self.n

    def _image(self, y):
        return self.fft.irfftn(y, self.shape, overwrite=False)

    # -- norms and inner products ----------------------------------------------------------
    def vnorm(self, v):
        """Norm of an unknown (cached by :meth:`rmatvec_update`)."""
        if self._vnorm[0] is v:
            return self._vnorm[1]
        return math.sqrt(max(self.vdot(v, v), 0.0))

    def vdot(self, a, b):
        """Inner product of two unknowns (the isometric one)."""
        bk = self.backend
        kb = bk.mul(b, self.k_inv_sq_real)
        total = bk.dot(a, kb)
        first = bk.dot(bk.copy(a[:, :, 0]), bk.copy(kb[:, :, 0]))
        last = bk.dot(bk.copy(a[:, :, -1]), bk.copy(kb[:, :, -1]))
        return (2.0 * total - first - (last if self.even else 0.0)) / self.n

    def vscale(self, alpha, v):
        """Scale an unknown in place."""
        self.backend.scal(alpha, v)
        if self._vnorm[0] is v:
            self._vnorm = (v, self._vnorm[1] * abs(alpha))
        return v

    def _plain(self, u):
        """A data vector as a plain box array (``u`` itself unless it is the pad)."""
        if u is self.pad:
            w = self.backend.to_numpy(self.weight)
            with np.errstate(divide="ignore"):
                w_inv = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), 0.0)
            return self.backend.mul(u[self.box], self.backend.asarray(w_inv))
        return u

    def unorm(self, u):
        """Norm of a data-space vector (cached by :meth:`matvec_update`)."""
        if self._unorm[0] is u:
            return self._unorm[1]
        return self.backend.nrm2(self._plain(u))

    def udot(self, a, b):
        """Inner product of two data-space vectors."""
        return self.backend.dot(self._plain(a), self._plain(b))

    def uscale(self, alpha, u):
        """Scale a data-space vector in place."""
        if u is self.pad:
            box = self.pad[self.box]
            self.backend.mul(box, alpha, out=box)
        else:
            self.backend.scal(alpha, u)
            if self._pad_of is u:
                self._pad_of = None  # W u in pad is stale
        if self._unorm[0] is u:
            self._unorm = (u, self._unorm[1] * abs(alpha))
        return u

    # -- products ----------------------------------------------------------------------------
    def to_vhat(self, v_scaled):
        """The stored form ``y = D s v`` of an isometric unknown ``v`` (tests)."""
        k = self.d * np.broadcast_to(self.scale, self.d.shape)
        return self.backend.mul(v_scaled, self.backend.asarray(k.astype(np.float32)))

    def solution_image(self, x):
        """``chi = F^-1(s x) = F^-1(y / D)`` on the padded grid (overwrites ``x``)."""
        with np.errstate(divide="ignore"):
            k = np.where(self.d != 0, 1.0 / np.where(self.d != 0, self.d, 1.0), 0.0)
        spec = self.backend.mul(x, self.backend.asarray(k.astype(np.float32)), out=x)
        return self.fft.irfftn(spec, self.shape)

    def matvec(self, v):
        """``A v`` (a new data-space vector)."""
        return self.backend.mul(self._image(v)[self.box], self.weight)

    def matvec_update(self, v, u, alpha):
        """``A v - alpha u`` in one sweep, as ``W (A v - alpha u)`` in the pad (returned)."""
        img = self._image(v)
        self._load_pad(u)
        sq = self.backend.weighted_residual(img[self.box], self.w_sq, self.pad[self.box],
                                            alpha, self.spans)
        self._unorm = (self.pad, math.sqrt(max(sq, 0.0)))
        self._pad_of = None
        return self.pad

    def _load_pad(self, u):
        """Make the pad hold ``W u`` (a no-op when ``u`` is the pad)."""
        if u is not self.pad and self._pad_of is not u:
            self.backend.mul(u, self.weight, out=self.pad[self.box])
            self._pad_of = u

    def _adjoint_spectrum(self, u):
        self._load_pad(u)
        return self.fft.rfftn(self.pad)

    def rmatvec(self, u):
        """``A^T u`` (a new unknown)."""
        spec = self._adjoint_spectrum(u)
        return self.backend.mul_spec(spec, self.k_sq, out=spec)

    def rmatvec_update(self, u, v, beta):
        """``A^T u - beta v`` in one sweep (caches the norm of the result)."""
        s = self._adjoint_spectrum(u)
        sums = self.backend.spectrum_update(s, v, beta, self.k_sq)
        self._vnorm = (s, math.sqrt(self._hermitian(*sums)))
        return s


class ConeGradientOp(LinearOperator):
    """``v (scaled spectrum on the cone) -> W_g grad F^-1(P v)`` (iLSQR step 3).

    The unknown holds only the half-spectrum entries inside the cone ``P`` (about a
    quarter of the half spectrum), scattered into a zero spectrum before the inverse FFT
    and gathered after the forward one.

    Data-space vectors are stored as *images* ``z`` on the bounding box, standing for
    ``u = W_g grad z``: the right-hand side ``W_g grad chi`` and every ``A v`` have that
    form, and so has every LSQR vector ``u`` (a combination of them). An image is a third
    of the size of the three gradient components, and the norm and the adjoint need only
    ``L z = grad^T W_g^2 grad z`` (a 7-point stencil): ``||u||^2 = <z, L z>`` and
    ``A^T u = P F(L z)``. One fused sweep (:meth:`matvec_update`) makes the new ``z``,
    ``L z`` (the adjoint's FFT input) and the norm.

    Parameters
    ----------
    bk : backend
    grid : Grid
    cone : ndarray of bool
        Half-spectrum entries of the unknown.
    scale : ndarray
        :func:`hermitian_scale` of the grid.
    gweights : ndarray, shape (3,) + ``grid.shape``
        Per-component gradient weights (:func:`~qsm_core.inversion.ilsqr.gradient_weights`;
        zero where either end of the difference is outside the mask).
    precondition : bool
        Right-precondition by ``1 / |G(k)|`` (the forward-difference gradient's k-space
        magnitude).
    """

    keeps_v = True

    def __init__(self, bk, grid: Grid, cone: np.ndarray, scale: np.ndarray,
                 gweights: np.ndarray, precondition: bool = False):
        self.backend = bk
        bk.warm()  # compile / load the fused kernels now, not inside the timed iterations
        self.fft = TimedFFT(bk)
        self.shape, self.box = grid.shape, grid.box
        cone = np.asarray(cone, bool).copy()
        scale_full = np.broadcast_to(scale, cone.shape)
        pc = np.ones(cone.shape, np.float32)
        if precondition:
            # Right preconditioner 1/|G(k)| (forward-difference gradient magnitude):
            # makes the operator close to an isometry, so LSQR converges in few steps.
            g2 = np.zeros(cone.shape, np.float64)
            for ax, h in enumerate(grid.voxel_size_mm):
                n = grid.shape[ax]
                m = np.arange(cone.shape[ax])
                gk = (2.0 * np.sin(np.pi * m / n) / h) ** 2
                g2 = g2 + gk.reshape([-1 if a == ax else 1 for a in range(3)])
            cone[0, 0, 0] = False
            pc[cone] = 1.0 / np.sqrt(g2[cone])
        self.idx = bk.index(np.flatnonzero(cone))
        self.k_fwd = bk.kernel(scale_full[cone] * pc[cone])
        self.k_adj = bk.kernel(pc[cone] / scale_full[cone])
        box = (slice(None),) + grid.box
        a_sq = np.square(gweights[box])
        self.a_sq = bk.asarray(a_sq)
        # The stencil sweep skips the ends of the box rows where no difference has weight:
        # z there never reaches the data vector W_g grad z, and L z is 0 there.
        support = np.zeros(a_sq.shape[1:], bool)
        for ax in range(3):
            nz = a_sq[ax] != 0
            support |= nz
            support[(slice(None),) * ax + (slice(1, None),)] |= \
                nz[(slice(None),) * ax + (slice(None, -1),)]
        self.spans = row_spans(support)
        self.pad = bk.zeros(grid.shape)
        self.spec_full = bk.zeros_complex(cone.shape)
        self._unorm = (None, 0.0)  # (z, ||W_g grad z||) cached by matvec_update
        self._vnorm = (None, 0.0)  # (v, ||v||) cached by rmatvec_update
        self._pad_of = None  # the z whose L z fills pad[box]

    # -- images and data-space vectors --------------------------------------------------------
    def compress(self, spec_full):
        """Cone entries of a full (scaled) half spectrum."""
        return self.backend.gather(spec_full, self.idx)

    def image(self, v):
        """``F^-1(P v)`` on the padded grid."""
        full = self.backend.scatter_scaled(self.spec_full, self.idx, v, self.k_fwd)
        return self.fft.irfftn(full, self.shape, overwrite=False)

    def rhs(self, img):
        """The data-space vector of ``W_g grad img`` (an image on the padded grid)."""
        return self.backend.copy(img[self.box])

    def _normal(self, z, out):
        """``out = L z``; returns ``<z, L z>``."""
        return self.backend.gradient_residual(z, z, 0.0, self.a_sq, out, self.spans)

    # -- norms and inner products ----------------------------------------------------------
    def unorm(self, u):
        """Norm of a data-space vector (cached by :meth:`matvec_update`)."""
        if self._unorm[0] is u:
            return self._unorm[1]
        sq = self._normal(u, self.pad[self.box])
        self._pad_of = u
        return math.sqrt(max(sq, 0.0))

    def udot(self, a, b):
        """Inner product of two data-space vectors, ``<W_g grad a, W_g grad b>``."""
        lb = self.backend.zeros_like(b)
        self._normal(b, lb)
        return self.backend.dot(a, lb)

    def uscale(self, alpha, u):
        """Scale a data-space vector in place."""
        self.backend.scal(alpha, u)
        if self._unorm[0] is u:
            self._unorm = (u, self._unorm[1] * abs(alpha))
        if self._pad_of is u:
            self._pad_of = None
        return u

    # -- products ----------------------------------------------------------------------------
    def matvec(self, v):
        """``A v`` (a new data-space vector)."""
        return self.rhs(self.image(v))

    def matvec_update(self, v, u, alpha):
        """``A v - alpha u`` in one sweep (overwrites ``u``; caches the norm)."""
        # One sweep: z <- img - alpha z, L z (the adjoint's FFT input), ||u||^2.
        img = self.image(v)
        sq = self.backend.gradient_residual(img[self.box], u, alpha, self.a_sq,
                                            self.pad[self.box], self.spans)
        self._unorm = (u, math.sqrt(max(sq, 0.0)))
        self._pad_of = u
        return u

    def _adjoint_spectrum(self, u):
        if self._pad_of is not u:
            self._normal(u, self.pad[self.box])
            self._pad_of = u
        return self.fft.rfftn(self.pad)

    def rmatvec(self, u):
        """``A^T u`` (a new unknown)."""
        vals = self.backend.gather(self._adjoint_spectrum(u), self.idx)
        return self.backend.mul_spec(vals, self.k_adj, out=vals)

    def rmatvec_update(self, u, v, beta):
        """``A^T u - beta v`` in one sweep (caches the norm of the result)."""
        vals, sq = self.backend.gather_update(self._adjoint_spectrum(u), self.idx, self.k_adj,
                                              v, beta)
        self._vnorm = (vals, math.sqrt(max(sq, 0.0)))
        return vals

    def vnorm(self, v):
        """Norm of an unknown (cached by :meth:`rmatvec_update`)."""
        if self._vnorm[0] is v:
            return self._vnorm[1]
        return self.backend.nrm2(v)

    def vscale(self, alpha, v):
        """Scale an unknown in place."""
        self.backend.scal(alpha, v)
        if self._vnorm[0] is v:
            self._vnorm = (v, self._vnorm[1] * abs(alpha))
        return v
