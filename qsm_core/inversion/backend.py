"""A tiny array backend shim so one algorithm runs on numpy (CPU) or torch (CPU/GPU).

Only the handful of operations the inversions need are wrapped: real FFTs, in-place
BLAS-like updates, dot products and transfers. Complex spectra are treated as real
vectors (real and imaginary parts interleaved) by :meth:`dot`, :meth:`axpy` and
:meth:`scal`, which is what LSQR needs when its unknown lives in k-space.

Torch is imported lazily, only when a torch device is asked for.

The iLSQR operators and LSQR also use a few *fused* kernels
(:meth:`NumpyBackend.lsqr_update`, :meth:`~NumpyBackend.lsqr_update_group`,
:meth:`~NumpyBackend.weighted_residual`, :meth:`~NumpyBackend.spectrum_update`,
:meth:`~NumpyBackend.scatter_scaled`, :meth:`~NumpyBackend.gather_update`,
:meth:`~NumpyBackend.gradient_residual`). Each does in one sweep over memory what would
otherwise be several full-volume numpy passes: on numpy they walk the arrays in blocks of
about 64 k elements (so intermediates stay in the L2 cache) split over the cores by a
small thread pool (numpy releases the GIL inside its loops); on torch they are plain
tensor expressions.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft
import scipy.linalg.blas as blas

from qsm_core.errors import InputError

__all__ = ["get_backend", "NumpyBackend", "TorchBackend", "DEVICES"]

DEVICES = ("cpu", "torch-cpu", "cuda")

BLOCK_ELEMS = 1 << 16
"""Elements per block of the fused numpy kernels (256 KiB of float32)."""

_POOLS: dict = {}
_POOL_LOCK = threading.Lock()


def _forget_pools() -> None:  # pragma: no cover - runs in forked children
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    # A forked child has none of the parent's pool threads: start fresh pools there.
    os.register_at_fork(after_in_child=_forget_pools)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _split_run(n: int, threads: int, work) -> list:
    """Call ``work(lo, hi)`` on ``threads`` contiguous parts of ``range(n)``, in parallel.

    The first part runs in the calling thread, the others on a shared pool. Returns the
    results in part order.
    """
    threads = max(1, min(threads, n))
    if threads == 1:
        return [work(0, n)]
    bounds = [n * i // threads for i in range(threads + 1)]
    with _POOL_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads - 1,
                                                        thread_name_prefix="qsm-backend")
    futures = [pool.submit(work, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    first = work(bounds[0], bounds[1])
    return [first] + [f.result() for f in futures]


def _dot32(a: np.ndarray, b: np.ndarray) -> float:
    """Inner product of two float32 blocks (BLAS ``sdot``; short, so on this thread)."""
    return float(np.dot(a.reshape(-1), b.reshape(-1)))


def _rows_per_block(shape) -> int:
    """Planes (along axis 0) per block so that a block holds about BLOCK_ELEMS elements."""
    plane = int(np.prod(shape[1:], dtype=np.int64)) or 1
    return max(1, BLOCK_ELEMS // plane)


class NumpyBackend:
    """numpy/scipy backend: float32 arrays, ``scipy.fft`` with all cores, BLAS updates.

    Parameters
    ----------
    workers : int
        FFT threads (-1: all cores).
    """

    name = "numpy"

    def __init__(self, workers: int = -1):
        self.workers = workers
        ncpu = _cpu_count()
        self.threads = max(1, ncpu + 1 + workers if workers < 0 else workers)

    # -- creation and transfer -------------------------------------------------------
    def asarray(self, a) -> np.ndarray:
        """Contiguous float32 (or complex64) copy/view of a numpy array."""
        a = np.asarray(a)
        dtype = np.complex64 if np.iscomplexobj(a) else np.float32
        return np.ascontiguousarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        """The array as numpy."""
        return np.asarray(a)

    def zeros(self, shape) -> np.ndarray:
        """float32 zeros."""
        return np.zeros(shape, dtype=np.float32)

    def empty_like(self, a) -> np.ndarray:
        """Uninitialised array like ``a``."""
        return np.empty_like(a)

    # -- FFTs --------------------------------------------------------------------------
    def rfftn(self, x) -> np.ndarray:
        """Real-to-complex FFT over all three axes (complex64)."""
        return scipy.fft.rfftn(x, workers=self.workers, overwrite_x=False)

    def irfftn(self, spec, shape, *, overwrite: bool = True) -> np.ndarray:
        """Inverse of :meth:`rfftn` (float32 of ``shape``); may overwrite ``spec``."""
        return scipy.fft.irfftn(spec, s=shape, workers=self.workers, overwrite_x=overwrite)

    @staticmethod
    def index(idx) -> np.ndarray:
        """Flat indices for :meth:`gather`/:meth:`scatter`."""
        return np.asarray(idx, dtype=np.intp)

    @staticmethod
    def gather(a, idx):
        """``a.ravel()[idx]`` (a new contiguous array)."""
        return np.take(a.reshape(-1), idx)

    @staticmethod
    def scatter(buf, idx, values):
        """``buf.ravel()[idx] = values`` in place; returns ``buf``."""
        buf.reshape(-1)[idx] = values
        return buf

    @staticmethod
    def zeros_complex(shape) -> np.ndarray:
        """complex64 zeros."""
        return np.zeros(shape, dtype=np.complex64)

    # -- element-wise and BLAS-like ------------------------------------------------------
    @staticmethod
    def real_view(a) -> np.ndarray:
        """Flat float32 view of a contiguous float32 or complex64 array."""
        return a.reshape(-1).view(np.float32)

    def kernel(self, k) -> np.ndarray:
        """Prepare a real k-space kernel to multiply a spectrum's :meth:`real_view`."""
        return np.ascontiguousarray(np.repeat(np.asarray(k, np.float32), 2, axis=-1).reshape(-1))

    def mul_spec(self, spec, kernel, out=None):
        """``out = spec * kernel`` for a kernel from :meth:`kernel` (in place if out is spec)."""
        if out is None:
            out = np.empty_like(spec)
        np.multiply(self.real_view(spec), kernel, out=self.real_view(out))
        return out

    @staticmethod
    def mul(a, b, out=None):
        """Element-wise product (``out=`` may be a view)."""
        return np.multiply(a, b, out=out)

    @staticmethod
    def sub(a, b, out=None):
        """Element-wise difference."""
        return np.subtract(a, b, out=out)

    @staticmethod
    def add(a, b, out=None):
        """Element-wise sum."""
        return np.add(a, b, out=out)

    @staticmethod
    def iadd(view, x):
        """``view += x`` in place (``view`` may be a slice of a larger array)."""
        return np.add(view, x, out=view)

    @staticmethod
    def isub(view, x):
        """``view -= x`` in place."""
        return np.subtract(view, x, out=view)

    def dot(self, a, b) -> float:
        """Real inner product (complex arrays as interleaved real vectors).

        In blocks on the backend's threads (OpenBLAS's own threads are slow to start when
        the cores are busy).
        """
        ra, rb = self.real_view(a), self.real_view(b)

        def work(lo, hi):
            return sum(_dot32(ra[s: min(s + BLOCK_ELEMS, hi)], rb[s: min(s + BLOCK_ELEMS, hi)])
                       for s in range(lo, hi, BLOCK_ELEMS))

        return float(sum(_split_run(ra.size, self.threads if ra.size > BLOCK_ELEMS else 1,
                                    work)))

    def nrm2(self, a) -> float:
        """Euclidean norm (complex arrays as interleaved real vectors)."""
        return float(np.sqrt(max(self.dot(a, a), 0.0)))

    def axpy(self, alpha: float, x, y):
        """``y += alpha * x`` in place; returns ``y``.

        Blocked numpy on the backend's threads rather than BLAS ``saxpy``: OpenBLAS's own
        threads cost more than the update itself when the cores are busy.
        """
        rx, ry = self.real_view(x), self.real_view(y)
        if ry.size <= BLOCK_ELEMS:
            blas.saxpy(rx, ry, a=alpha)
            return y

        def work(lo, hi):
            tmp = np.empty(min(BLOCK_ELEMS, hi - lo), np.float32)
            for s in range(lo, hi, BLOCK_ELEMS):
                e = min(s + BLOCK_ELEMS, hi)
                t = tmp[: e - s]
                np.multiply(rx[s:e], alpha, out=t)
                np.add(ry[s:e], t, out=ry[s:e])

        _split_run(ry.size, self.threads, work)
        return y

    def scal(self, alpha: float, x):
        """``x *= alpha`` in place; returns ``x``."""
        rx = self.real_view(x)

        def work(lo, hi):
            np.multiply(rx[lo:hi], alpha, out=rx[lo:hi])

        _split_run(rx.size, self.threads if rx.size > BLOCK_ELEMS else 1, work)
        return x

    def copy(self, a):
        """A contiguous copy."""
        return a.copy()

    def synchronize(self) -> None:
        """No-op (numpy is synchronous)."""

    def zeros_like(self, a) -> np.ndarray:
        """Zeros like ``a``."""
        return np.zeros_like(a)

    # -- fused kernels (one sweep over memory, blocked and threaded) -----------------------
    def lsqr_update(self, x, w, v, a: float, c: float):
        """LSQR's solution update: ``x += a w`` then ``w = v + c w``, in one sweep.

        All three are contiguous arrays of one shape and dtype (complex as real pairs).
        Returns ``x``.
        """
        rx, rw, rv = self.real_view(x), self.real_view(w), self.real_view(v)

        def work(lo, hi):
            tmp = np.empty(min(BLOCK_ELEMS, hi - lo), np.float32)
            for s in range(lo, hi, BLOCK_ELEMS):
                e = min(s + BLOCK_ELEMS, hi)
                t, xb, wb = tmp[: e - s], rx[s:e], rw[s:e]
                np.multiply(wb, a, out=t)
                np.add(xb, t, out=xb)
                np.multiply(wb, c, out=wb)
                np.add(wb, rv[s:e], out=wb)

        _split_run(rx.size, self.threads, work)
        return x

    def lsqr_update_group(self, x, w, updates, lo: int, hi: int):
        """``x += a w`` then ``w = v + c w`` for each ``(a, c, v)`` in turn, in one sweep.

        Only the elements ``[lo, hi)`` of the real views are touched; ``c`` None means
        only ``x += a w``. Returns ``x``.
        """
        rx, rw = self.real_view(x), self.real_view(w)
        rvs = [(a, c, None if c is None else self.real_view(v)) for a, c, v in updates]

        def work(p0, p1):
            p0, p1 = lo + p0, lo + p1
            tmp = np.empty(min(BLOCK_ELEMS, max(p1 - p0, 1)), np.float32)
            for s in range(p0, p1, BLOCK_ELEMS):
                e = min(s + BLOCK_ELEMS, p1)
                t, xb, wb = tmp[: e - s], rx[s:e], rw[s:e]
                for a, c, rv in rvs:
                    np.multiply(wb, a, out=t)
                    np.add(xb, t, out=xb)
                    if c is not None:
                        np.multiply(wb, c, out=wb)
                        np.add(wb, rv[s:e], out=wb)

        if hi > lo:  # (a short range is not worth a thread hand-off)
            _split_run(hi - lo, self.threads if hi - lo > 8 * BLOCK_ELEMS else 1, work)
        return x

    def weighted_residual(self, img, w_sq, out, c: float, w_inv_sq) -> float:
        """``out = w_sq * img - c out`` (in place); returns ``sum w_inv_sq out^2``.

        With ``out = W u`` (a data vector stored pre-weighted, in the box of the adjoint's
        zero-padded FFT input) this is ``W (W img - c u)`` and its norm ``||u||^2``.

        Parameters
        ----------
        img : ndarray, shape (X, Y, Z), float32
            May be a strided view (a box inside a padded image).
        w_sq, w_inv_sq : ndarray, shape (X, Y, Z), float32, contiguous
            ``W^2`` and ``1 / W^2`` (0 where ``W = 0``).
        out : ndarray, shape (X, Y, Z), float32
            May be a strided view.
        c : float
        """
        rows = _rows_per_block(w_sq.shape)

        def work(lo, hi):
            acc = 0.0
            tmp = np.empty((2, min(rows, hi - lo)) + w_sq.shape[1:], np.float32)
            for s in range(lo, hi, rows):
                e = min(s + rows, hi)
                t, t2, ob = tmp[0, : e - s], tmp[1, : e - s], out[s:e]
                np.multiply(ob, c, out=t2)  # the strided arrays are touched once each
                np.multiply(w_sq[s:e], img[s:e], out=t)
                np.subtract(t, t2, out=t)
                np.copyto(ob, t)
                np.multiply(t, w_inv_sq[s:e], out=t2)
                acc += _dot32(t2, t)
            return acc

        return float(sum(_split_run(w_sq.shape[0], self.threads, work)))

    def spectrum_update(self, s, v, c: float, k_mul, k_norm):
        """``s = k_mul * s - c v`` (in place) on half spectra, and its weighted norm.

        Parameters
        ----------
        s, v : ndarray, shape (X, Y, M), complex64, contiguous
        c : float
        k_mul, k_norm : ndarray
            Real kernels from :meth:`kernel` (interleaved to match the real views).

        Returns
        -------
        tuple of 3 floats
            ``sum k_norm |s|^2`` over the whole spectrum, over the plane ``[..., 0]`` and
            over the plane ``[..., -1]`` (for Hermitian weights).
        """
        shape = s.shape
        plane = 2 * shape[1] * shape[2]
        rows = _rows_per_block((shape[0], plane))
        rs_all, rv_all = self.real_view(s), self.real_view(v)

        def work(lo, hi):
            tot = first = last = 0.0
            tmp = np.empty(min(rows, hi - lo) * plane, np.float32)
            for r0 in range(lo, hi, rows):
                r1 = min(r0 + rows, hi)
                a, b = r0 * plane, r1 * plane
                t, rs = tmp[: b - a], rs_all[a:b]
                np.multiply(rs, k_mul[a:b], out=rs)
                np.multiply(rv_all[a:b], c, out=t)
                np.subtract(rs, t, out=rs)
                np.multiply(rs, k_norm[a:b], out=t)
                tot += _dot32(rs, t)
                s4 = rs.reshape(r1 - r0, shape[1], shape[2], 2)
                t4 = t.reshape(r1 - r0, shape[1], shape[2], 2)
                first += _dot32(s4[:, :, 0], t4[:, :, 0])
                last += _dot32(s4[:, :, -1], t4[:, :, -1])
            return tot, first, last

        parts = _split_run(shape[0], self.threads, work)
        return tuple(float(sum(p[i] for p in parts)) for i in range(3))

    def scatter_scaled(self, buf, idx, values, kernel):
        """``buf.ravel()[idx] = kernel * values`` (complex ``values``, real-pair kernel).

        ``idx`` must be sorted and unique (blocks of it are written by different threads).
        Returns ``buf``.
        """
        flat, rv = buf.reshape(-1), self.real_view(values)
        n = idx.size
        step = BLOCK_ELEMS // 2

        def work(lo, hi):
            tmp = np.empty(min(step, hi - lo), values.dtype)
            for s in range(lo, hi, step):
                e = min(s + step, hi)
                t = tmp[: e - s]
                np.multiply(rv[2 * s: 2 * e], kernel[2 * s: 2 * e], out=self.real_view(t))
                flat[idx[s:e]] = t

        _split_run(n, self.threads if n > step else 1, work)
        return buf

    def gather_update(self, buf, idx, kernel, v, c: float):
        """``r = kernel * buf.ravel()[idx] - c v`` (a new array like ``v``) and ``||r||^2``.

        One sweep; returns ``(r, ||r||^2)``.
        """
        flat = buf.reshape(-1)
        out = np.empty_like(v)
        ro, rv = self.real_view(out), self.real_view(v)
        step = BLOCK_ELEMS // 2
        n = idx.size

        def work(lo, hi):
            acc = 0.0
            tmp = np.empty(2 * min(step, hi - lo), np.float32)
            for s in range(lo, hi, step):
                e = min(s + step, hi)
                a, b = 2 * s, 2 * e
                out[s:e] = flat[idx[s:e]]
                np.multiply(ro[a:b], kernel[a:b], out=ro[a:b])
                t = tmp[: b - a]
                np.multiply(rv[a:b], c, out=t)
                np.subtract(ro[a:b], t, out=ro[a:b])
                acc += _dot32(ro[a:b], ro[a:b])
            return acc

        sq = sum(_split_run(n, self.threads if n > step else 1, work))
        return out, float(sq)

    def gradient_residual(self, img, z, c: float, a_sq, out) -> float:
        """Weighted gradient normal operator of a residual image, in one sweep.

        ``z = img - c z`` (in place) and ``out = sum_j D_j^T (a_j D_j z)`` with ``D_j`` the
        forward difference along axis ``j`` (``D_j z[i] = z[i + e_j] - z[i]``, zero past
        the last plane; ``D_j^T t[i] = t[i - e_j] - t[i]``). Returns
        ``<z, out> = sum_j ||sqrt(a_j) D_j z||^2``.

        Parameters
        ----------
        img : ndarray, shape (X, Y, Z), float32
            May be a strided view; may be ``z`` itself (with ``c = 0``: just the stencil).
        z : ndarray, shape (X, Y, Z), float32, contiguous
            Updated in place.
        c : float
        a_sq : ndarray, shape (3, X, Y, Z), float32, contiguous
            Squared weights of the three difference components; must vanish on the last
            plane along their axis (the differences are taken on the flattened arrays, so
            these zeros are what stops them at the array's faces).
        out : ndarray, shape (X, Y, Z), float32
            Output (may be a view into a padded array).
        """
        nx = z.shape[0]
        rows = _rows_per_block(z.shape)
        plane = int(np.prod(z.shape[1:]))
        n = nx * plane
        offsets = (plane, z.shape[2], 1)  # flat strides of the three axes
        zf = z.reshape(-1)
        af = a_sq.reshape(3, -1)
        same = img is z

        def update(p0, p1):  # z = img - c z on planes [p0, p1)
            if p1 > p0 and not same:
                zb = z[p0:p1]
                np.multiply(zb, c, out=zb)
                np.subtract(img[p0:p1], zb, out=zb)

        # Each part's first and last planes are updated before any part's stencil (a
        # part's stencil reads its neighbours' boundary planes); the other planes are
        # updated one block ahead of the stencil, so the stencil reads them from cache.
        threads = max(1, min(self.threads, nx))  # the same parts in both calls below

        def edges(lo, hi):
            update(lo, min(lo + 1, hi))
            update(max(hi - 1, lo + 1), hi)

        _split_run(nx, threads, edges)

        def stencil(lo, hi):  # out = L z on planes [lo, hi); returns <z, out>
            acc = 0.0
            size = min(rows, hi - lo) * plane
            tbuf = np.empty(size + plane, np.float32)
            ybuf = np.empty(size, np.float32)
            done = min(lo + 1, hi)  # planes [lo, done) are up to date (and hi - 1)
            for s in range(lo, hi, rows):
                e = min(s + rows, hi)
                ahead = min(e + 1, hi - 1)
                if ahead > done:
                    update(done, ahead)
                    done = ahead
                f0, f1 = s * plane, e * plane
                y = ybuf[: f1 - f0]
                y.fill(0.0)
                for j, o in enumerate(offsets):
                    # t[i] = a_j[i] (z[i + o] - z[i]) for i in [i0, i1); y[i] += t[i - o] - t[i]
                    i0, i1 = max(f0 - o, 0), min(f1, n - o)
                    t = tbuf[: i1 - i0]
                    np.subtract(zf[i0 + o: i1 + o], zf[i0:i1], out=t)
                    np.multiply(t, af[j, i0:i1], out=t)
                    # y[i] -= t[i] for i in [f0, i1)
                    np.subtract(y[: i1 - f0], t[f0 - i0:], out=y[: i1 - f0])
                    # y[i] += t[i - o] for i in [max(f0, i0 + o), f1)
                    k0 = max(f0, i0 + o)
                    np.add(y[k0 - f0:], t[k0 - o - i0: f1 - o - i0], out=y[k0 - f0:])
                acc += _dot32(zf[f0:f1], y)
                np.copyto(out[s:e], y.reshape((e - s,) + z.shape[1:]))
            return acc

        return float(sum(_split_run(nx, threads, stencil)))


class TorchBackend:
    """torch backend (``torch-cpu`` or ``cuda``), float32/complex64 tensors.

    Parameters
    ----------
    device : str
        ``"cpu"`` or ``"cuda"`` (a torch device string).
    """

    name = "torch"

    def __init__(self, device: str = "cpu"):
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - torch is a dependency
            raise InputError("device needs torch; install it (pip install torch) or use "
                             "device='cpu'") from exc
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"device={device!r} was asked for but torch sees no CUDA GPU; "
                             "use device='cpu'")
        self.torch = torch
        self.device = torch.device(device)

    def asarray(self, a):
        """Tensor on the device (float32 or complex64)."""
        a = np.asarray(a)
        dtype = np.complex64 if np.iscomplexobj(a) else np.float32
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(self.device)

    def to_numpy(self, a) -> np.ndarray:
        """Tensor back to numpy."""
        return a.detach().cpu().numpy()

    def zeros(self, shape):
        """float32 zeros."""
        return self.torch.zeros(tuple(shape), dtype=self.torch.float32, device=self.device)

    def empty_like(self, a):
        """Uninitialised tensor like ``a``."""
        return self.torch.empty_like(a)

    def rfftn(self, x):
        """Real-to-complex FFT over all three axes."""
        return self.torch.fft.rfftn(x, dim=(0, 1, 2))

    def irfftn(self, spec, shape, *, overwrite: bool = True):
        """Inverse of :meth:`rfftn` (never overwrites ``spec``)."""
        return self.torch.fft.irfftn(spec, s=tuple(shape), dim=(0, 1, 2))

    def index(self, idx):
        """Flat indices (a long tensor on the device)."""
        return self.torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.device)

    @staticmethod
    def gather(a, idx):
        """``a.ravel()[idx]``."""
        return a.reshape(-1)[idx]

    @staticmethod
    def scatter(buf, idx, values):
        """``buf.ravel()[idx] = values`` in place."""
        buf.view(-1)[idx] = values
        return buf

    def zeros_complex(self, shape):
        """complex64 zeros."""
        return self.torch.zeros(tuple(shape), dtype=self.torch.complex64, device=self.device)

    def real_view(self, a):
        """Flat float32 view of a contiguous float32 or complex64 tensor."""
        if a.is_complex():
            a = self.torch.view_as_real(a)
        return a.reshape(-1)

    def kernel(self, k):
        """Prepare a real k-space kernel to multiply a spectrum's :meth:`real_view`."""
        k = np.repeat(np.asarray(k, np.float32), 2, axis=-1).reshape(-1)
        return self.asarray(k)

    def mul_spec(self, spec, kernel, out=None):
        """``out = spec * kernel`` for a kernel from :meth:`kernel`."""
        if out is None:
            out = self.torch.empty_like(spec)
        self.torch.mul(self.real_view(spec), kernel, out=self.real_view(out))
        return out

    def mul(self, a, b, out=None):
        """Element-wise product."""
        if out is None:
            return a * b
        return self.torch.mul(a, b, out=out) if out.is_contiguous() else out.copy_(a * b)

    def sub(self, a, b, out=None):
        """Element-wise difference."""
        if out is None:
            return a - b
        return self.torch.sub(a, b, out=out) if out.is_contiguous() else out.copy_(a - b)

    def add(self, a, b, out=None):
        """Element-wise sum."""
        if out is None:
            return a + b
        return self.torch.add(a, b, out=out) if out.is_contiguous() else out.copy_(a + b)

    @staticmethod
    def iadd(view, x):
        """``view += x`` in place."""
        return view.add_(x)

    @staticmethod
    def isub(view, x):
        """``view -= x`` in place."""
        return view.sub_(x)

    def dot(self, a, b) -> float:
        """Real inner product (complex tensors as interleaved real vectors)."""
        return float(self.torch.dot(self.real_view(a), self.real_view(b)))

    def nrm2(self, a) -> float:
        """Euclidean norm."""
        return float(self.torch.linalg.vector_norm(self.real_view(a)))

    def axpy(self, alpha: float, x, y):
        """``y += alpha * x`` in place."""
        self.real_view(y).add_(self.real_view(x), alpha=alpha)
        return y

    def scal(self, alpha: float, x):
        """``x *= alpha`` in place."""
        x.mul_(alpha)
        return x

    def copy(self, a):
        """A contiguous copy."""
        return a.clone(memory_format=self.torch.contiguous_format)

    def synchronize(self) -> None:
        """Wait for queued GPU work (for timing)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def zeros_like(self, a):
        """Zeros like ``a``."""
        return self.torch.zeros_like(a)

    # -- fused kernels (plain tensor expressions; see NumpyBackend for the contracts) ------
    def lsqr_update(self, x, w, v, a: float, c: float):
        """``x += a w`` then ``w = v + c w``; returns ``x``."""
        rx, rw = self.real_view(x), self.real_view(w)
        rx.add_(rw, alpha=a)
        rw.mul_(c).add_(self.real_view(v))
        return x

    def lsqr_update_group(self, x, w, updates, lo: int, hi: int):
        """``x += a w; w = v + c w`` for each ``(a, c, v)``, on real elements ``[lo, hi)``."""
        rx, rw = self.real_view(x)[lo:hi], self.real_view(w)[lo:hi]
        for a, c, v in updates:
            rx.add_(rw, alpha=a)
            if c is not None:
                rw.mul_(c).add_(self.real_view(v)[lo:hi])
        return x

    def weighted_residual(self, img, w_sq, out, c: float, w_inv_sq) -> float:
        """``out = w_sq * img - c out`` (in place); returns ``sum w_inv_sq out^2``."""
        out.mul_(-c).addcmul_(w_sq, img)
        return float((out.square() * w_inv_sq).sum())

    def spectrum_update(self, s, v, c: float, k_mul, k_norm):
        """``s = k_mul * s - c v`` (in place); sums of ``k_norm |s|^2`` (all, first, last)."""
        rs = self.real_view(s)
        rs.mul_(k_mul).sub_(self.real_view(v), alpha=c)
        sq = (rs.square() * k_norm).reshape(s.shape + (2,)).sum(-1)
        return float(sq.sum()), float(sq[:, :, 0].sum()), float(sq[:, :, -1].sum())

    def scatter_scaled(self, buf, idx, values, kernel):
        """``buf.ravel()[idx] = kernel * values``; returns ``buf``."""
        buf.view(-1)[idx] = self.torch.view_as_complex(
            (self.real_view(values) * kernel).reshape(-1, 2))
        return buf

    def gather_update(self, buf, idx, kernel, v, c: float):
        """``(r, ||r||^2)`` with ``r = kernel * buf.ravel()[idx] - c v`` (a new tensor)."""
        vals = buf.reshape(-1)[idx]
        rv = self.real_view(vals)
        rv.mul_(kernel).sub_(self.real_view(v), alpha=c)
        return vals, float(self.torch.dot(rv, rv))

    def gradient_residual(self, img, z, c: float, a_sq, out) -> float:
        """``z = img - c z`` (in place), ``out = sum_j D_j^T (a_j D_j z)``; ``<z, out>``."""
        if img is not z:
            z.mul_(-c).add_(img)
        y = self.torch.zeros_like(z)
        for ax in range(3):
            n = z.shape[ax]
            t = (z.narrow(ax, 1, n - 1) - z.narrow(ax, 0, n - 1)) \
                * a_sq[ax].narrow(ax, 0, n - 1)
            y.narrow(ax, 0, n - 1).sub_(t)
            y.narrow(ax, 1, n - 1).add_(t)
        out.copy_(y)
        return float(self.torch.dot(z.reshape(-1), y.reshape(-1)))


def get_backend(device: str = "cpu"):
    """Backend for a device name.

    Parameters
    ----------
    device : {"cpu", "torch-cpu", "cuda", "cuda:N"}
        ``"cpu"``: numpy/scipy; ``"torch-cpu"``: the torch code path on the CPU (for
        testing the GPU path without a GPU); ``"cuda"``: torch on a GPU.

    Returns
    -------
    NumpyBackend or TorchBackend
    """
    if device == "cpu":
        return NumpyBackend()
    if device == "torch-cpu":
        return TorchBackend("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return TorchBackend(device)
    raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
