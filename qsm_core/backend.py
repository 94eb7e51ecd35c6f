"""A tiny array backend shim so one algorithm runs on numpy (CPU) or torch (CPU/GPU).

Only the handful of operations the pipeline needs are wrapped: real FFTs, in-place
BLAS-like updates, dot products and transfers for the inversions, and a few element-wise
functions, separable Gaussian filters and mirror extension for the stages before them
(:mod:`qsm_core.unwrap`, :mod:`qsm_core.echo_fit`, :mod:`qsm_core.background`). Code
written against it uses only what numpy arrays and torch tensors share besides
(arithmetic, slicing, boolean indexing, ``reshape``, ``sum(axis=...)``).

Complex spectra are treated as real vectors (real and imaginary parts interleaved) by
:meth:`dot`, :meth:`axpy` and :meth:`scal`, which is what LSQR needs when its unknown lives
in k-space.

Torch is imported lazily, only when a torch device is asked for.

The iLSQR operators and LSQR also use a few *fused* kernels
(:meth:`NumpyBackend.lsqr_update`, :meth:`~NumpyBackend.lsqr_update_group`,
:meth:`~NumpyBackend.weighted_residual`, :meth:`~NumpyBackend.spectrum_update`,
:meth:`~NumpyBackend.scatter_scaled`, :meth:`~NumpyBackend.gather_update`,
:meth:`~NumpyBackend.gradient_residual`). Each does in one sweep over memory what would
otherwise be several full-volume numpy passes: on numpy they are parallel numba kernels
(:mod:`qsm_core.inversion._kernels`, compiled or loaded from numba's cache by
:meth:`NumpyBackend.warm`, which the operators call when they are built); on torch they
are plain tensor expressions.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import scipy.fft
from scipy import ndimage

from qsm_core.errors import InputError

__all__ = ["get_backend", "resolve_workers", "row_spans", "NumpyBackend", "TorchBackend", "DEVICES"]

DEVICES = ("cpu", "torch-cpu", "cuda")

log = logging.getLogger(__name__)

_KERNELS = None


def _kernels():
    """The numba kernel module (imported, i.e. compiled or loaded from cache, once)."""
    global _KERNELS
    if _KERNELS is None:
        t0 = time.perf_counter()
        from qsm_core.inversion import _kernels

        _KERNELS = _kernels
        took = time.perf_counter() - t0
        log.log(logging.INFO if took > 5 else logging.DEBUG,
                "numba kernels compiled or loaded from numba's cache in %.1f s (compiled once "
                "per change of the code, then cached on disk)", took)
    return _KERNELS


def row_spans(support: np.ndarray) -> np.ndarray:
    """Per row of a 3D boolean array, the smallest segment ``[k0, k1)`` holding its Trues.

    Parameters
    ----------
    support : ndarray of bool, shape (X, Y, Z)

    Returns
    -------
    ndarray, shape (X, Y, 2), int32
        ``[k0, k1)`` per row; ``[0, 0)`` for a row without a True.
    """
    support = np.asarray(support, bool)
    nz = support.shape[2]
    any_ = support.any(axis=2)
    k0 = np.argmax(support, axis=2)
    k1 = nz - np.argmax(support[:, :, ::-1], axis=2)
    spans = np.stack([np.where(any_, k0, 0), np.where(any_, k1, 0)], axis=-1)
    return np.ascontiguousarray(spans, dtype=np.int32)


def _full_spans(shape) -> np.ndarray:
    """Spans covering whole rows of an array of ``shape`` (X, Y, Z): ``[0, Z)``."""
    spans = np.zeros(tuple(shape[:2]) + (2,), np.int32)
    spans[:, :, 1] = shape[2]
    return spans


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int = -1) -> int:
    """Number of threads for ``workers``: -1 all the CPUs this process may use, -2 one fewer...

    Unlike ``scipy.fft``'s own reading of a negative count (``os.cpu_count()``), this counts
    the CPUs of the process's affinity mask, so a process pinned to some cores (``taskset``,
    a batch scheduler, ``qsmrim recon --jobs``) does not start more threads than it has cores.

    Examples
    --------
    >>> resolve_workers(3)
    3
    >>> resolve_workers(-1) == _cpu_count()
    True
    """
    workers = int(workers)
    return max(1, _cpu_count() + 1 + workers if workers < 0 else workers)


class NumpyBackend:
    """numpy/scipy backend: float32 arrays, ``scipy.fft``, fused numba kernels.

    Parameters
    ----------
    workers : int
        FFT workers (-1: all the cores this process may use, :func:`resolve_workers`); the
        kernels use as many threads (:attr:`threads`, capped by numba's pool,
        ``NUMBA_NUM_THREADS``).
    """

    name = "numpy"

    def __init__(self, workers: int = -1):
        self.threads = resolve_workers(workers)
        self.workers = self.threads  # FFT threads, as many as the kernels'

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
        """Flat indices for :meth:`gather`/:meth:`scatter`, as contiguous int32.

        (Half the memory traffic of int64 in the cone sweeps.)
        """
        idx = np.asarray(idx)
        if idx.size and (idx.min() < 0 or idx.max() >= 2**31):
            raise ValueError("flat indices must lie in [0, 2**31) (a spectrum of at most "
                             "2**31 entries)")
        return np.ascontiguousarray(idx, dtype=np.int32)

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
        """Prepare a real k-space kernel to multiply a spectrum (contiguous float32)."""
        return np.ascontiguousarray(k, dtype=np.float32)

    @staticmethod
    def mul_spec(spec, kernel, out=None):
        """``out = spec * kernel`` for a kernel from :meth:`kernel` (in place if out is spec).

        Real and imaginary parts are multiplied as reals (no complex product).
        """
        if out is None:
            out = np.empty_like(spec)
        pairs = spec.shape + (2,)
        np.multiply(spec.view(np.float32).reshape(pairs), kernel[..., None],
                    out=out.view(np.float32).reshape(pairs))
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

    def _run(self, name: str, *args):
        k = _kernels()
        return k.launch(getattr(k, name), self.threads, *args)

    def warm(self) -> None:
        """Compile the numba kernels, or load them from numba's cache (once per process)."""
        _kernels()

    # -- preprocessing stages (unwrapping, echo fit, background removal) -----------------
    @staticmethod
    def as_bool(a) -> np.ndarray:
        """Boolean array (nonzero = True)."""
        a = np.asarray(a)
        return a if a.dtype == bool else a != 0

    @staticmethod
    def as_float64(a) -> np.ndarray:
        """float64 copy."""
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def as_float32(a) -> np.ndarray:
        """float32 (no copy if it is one)."""
        return np.asarray(a, dtype=np.float32)

    @staticmethod
    def wrap(a) -> np.ndarray:
        """``a`` wrapped to [-pi, pi] (in place for float32 arrays)."""
        a = np.asarray(a, np.float32)
        a -= np.float32(2 * np.pi) * np.rint(a * np.float32(1 / (2 * np.pi)))
        return a

    sin = staticmethod(np.sin)
    sqrt = staticmethod(np.sqrt)
    where = staticmethod(np.where)

    @staticmethod
    def maximum(a, floor: float):
        """``max(a, floor)`` element-wise, in ``a``'s dtype."""
        return np.maximum(a, np.asarray(floor, dtype=np.asarray(a).dtype))

    @staticmethod
    def full(shape, value, dtype) -> np.ndarray:
        """Array of ``shape`` filled with ``value`` (numpy dtype)."""
        return np.full(shape, value, dtype=dtype)

    @staticmethod
    def any(a) -> bool:
        """Whether any element is nonzero."""
        return bool(np.any(a))

    @staticmethod
    def mean64(a) -> float:
        """Mean with a float64 accumulator."""
        return float(np.mean(a, dtype=np.float64))

    @staticmethod
    def mirror(x) -> np.ndarray:
        """``x`` followed by its reverse along every axis: shape (2X, 2Y, 2Z).

        The even (half-sample symmetric) extension, on which a periodic FFT acts as a
        DCT-II on ``x``.
        """
        for axis in range(x.ndim):
            x = np.concatenate([x, np.flip(x, axis)], axis=axis)
        return x

    def gaussian_filter1d(self, x, sigma: float, axis: int, order: int = 0):
        """Gaussian (or its ``order``-th derivative) along ``axis``, zeros beyond the edge.

        ``scipy.ndimage.gaussian_filter1d(..., mode="constant", truncate=3.0)``.
        """
        return ndimage.gaussian_filter1d(x, sigma, axis=axis, order=order, mode="constant",
                                         truncate=3.0)

    @staticmethod
    def gaussian_filter(x, sigmas):
        """Gaussian of per-axis ``sigmas`` (voxels), zeros beyond the edge (scipy's)."""
        return ndimage.gaussian_filter(x, sigmas, mode="constant", truncate=3.0)

    def dot(self, a, b) -> float:
        """Real inner product (complex arrays as interleaved real vectors), float64 sums."""
        return float(self._run("dot", self.real_view(a), self.real_view(b), self.threads))

    def nrm2(self, a) -> float:
        """Euclidean norm (complex arrays as interleaved real vectors)."""
        return float(np.sqrt(max(self.dot(a, a), 0.0)))

    def axpy(self, alpha: float, x, y):
        """``y += alpha * x`` in place; returns ``y``."""
        self._run("axpy", float(alpha), self.real_view(x), self.real_view(y))
        return y

    def scal(self, alpha: float, x):
        """``x *= alpha`` in place; returns ``x``."""
        self._run("scal", float(alpha), self.real_view(x))
        return x

    def copy(self, a):
        """A contiguous copy."""
        return a.copy()

    def synchronize(self) -> None:
        """No-op (numpy is synchronous)."""

    def zeros_like(self, a) -> np.ndarray:
        """Zeros like ``a``."""
        return np.zeros_like(a)

    # -- fused kernels (numba, one sweep over memory; see qsm_core.inversion._kernels) -----
    def lsqr_update(self, x, w, v, a: float, c: float):
        """LSQR's solution update: ``x += a w`` then ``w = v + c w``, in one sweep.

        All three are contiguous arrays of one shape and dtype (complex as real pairs).
        Returns ``x``.
        """
        self._run("lsqr_update", self.real_view(x), self.real_view(w), self.real_view(v),
                  float(a), float(c))
        return x

    def lsqr_update_group(self, x, w, updates, lo: int, hi: int):
        """``x += a w`` then ``w = v + c w`` for each ``(a, c, v)`` in turn, in one sweep.

        Only the elements ``[lo, hi)`` of the real views are touched; ``c`` None means
        only ``x += a w``. Up to four updates share one sweep. Returns ``x``.
        """
        if hi <= lo:
            return x
        rx, rw = self.real_view(x), self.real_view(w)
        for g in range(0, len(updates), 4):
            part = updates[g: g + 4]
            a, c, has_c = np.zeros(4), np.zeros(4), np.zeros(4, bool)
            vs = [rw] * 4
            for j, (aj, cj, vj) in enumerate(part):
                a[j] = aj
                if cj is not None:
                    c[j], has_c[j], vs[j] = cj, True, self.real_view(vj)
            self._run("lsqr_update_group", rx, rw, *vs, a, c, has_c, len(part), int(lo),
                      int(hi))
        return x

    def weighted_residual(self, img, w_sq, out, c: float, spans=None) -> float:
        """``out = w_sq * img - c out`` (in place); returns ``sum out^2 / w_sq`` (w_sq > 0).

        With ``out = W u`` (a data vector stored pre-weighted, in the box of the adjoint's
        zero-padded FFT input) this is ``W (W img - c u)`` and its norm ``||u||^2``.

        Parameters
        ----------
        img : ndarray, shape (X, Y, Z), float32
            May be a view with contiguous rows (a box inside a padded image).
        w_sq : ndarray, shape (X, Y, Z), float32, contiguous
            ``W^2`` (0 where ``W = 0``; ``1 / W^2`` is formed on the fly).
        out : ndarray, shape (X, Y, Z), float32
            May be a view with contiguous rows.
        c : float
        spans : ndarray, shape (X, Y, 2), int32, optional
            :func:`row_spans` of ``w_sq > 0``: only these row segments are swept (``out``
            must be 0 outside them, where it stays 0). Default: whole rows.
        """
        if w_sq.size == 0:
            return 0.0
        k = _kernels()
        spans = _full_spans(w_sq.shape) if spans is None else spans
        return float(self._run("weighted_residual", *k.row_span(img), w_sq, *k.row_span(out),
                               float(c), spans, self.threads))

    def spectrum_update(self, s, v, c: float, k_sq):
        """``s = k_sq * s - c v`` (in place) on half spectra, and ``sum |s|^2 / k_sq``.

        Parameters
        ----------
        s, v : ndarray, shape (X, Y, M), complex64, contiguous
        c : float
        k_sq : ndarray, shape (X, Y, M)
            Real kernel from :meth:`kernel` (>= 0; the norm's weight ``1 / k_sq``, 0 where
            ``k_sq = 0``, is formed on the fly).

        Returns
        -------
        tuple of 3 floats
            The weighted sum over the whole spectrum, over the plane ``[..., 0]`` and over
            the plane ``[..., -1]`` (for Hermitian weights).
        """
        real = s.shape[:2] + (2 * s.shape[2],)
        sums = self._run("spectrum_update", s.view(np.float32).reshape(real),
                         v.view(np.float32).reshape(real), float(c), k_sq, self.threads)
        return tuple(float(x) for x in sums)

    def scatter_scaled(self, buf, idx, values, kernel):
        """``buf.ravel()[idx] = kernel * values`` (complex ``values``, real kernel).

        ``idx`` must be unique. Returns ``buf``.
        """
        self._run("scatter_scaled", self.real_view(buf), idx, self.real_view(values),
                  kernel)
        return buf

    def gather_update(self, buf, idx, kernel, v, c: float):
        """``r = kernel * buf.ravel()[idx] - c v`` (a new array like ``v``) and ``||r||^2``.

        One sweep; returns ``(r, ||r||^2)``.
        """
        out = np.empty_like(v)
        sq = self._run("gather_update", self.real_view(buf), idx, kernel, self.real_view(v),
                       float(c), self.real_view(out), self.threads)
        return out, float(sq)

    def gradient_residual(self, img, z, c: float, a_sq, out, spans=None) -> float:
        """Weighted gradient normal operator of a residual image, in one sweep.

        ``z = img - c z`` (in place) and ``out = sum_j D_j^T (a_j D_j z)`` with ``D_j`` the
        forward difference along axis ``j`` (``D_j z[i] = z[i + e_j] - z[i]``, zero across
        the last plane; ``D_j^T t[i] = t[i - e_j] - t[i]``). Returns
        ``<z, out> = sum_j ||sqrt(a_j) D_j z||^2``.

        Parameters
        ----------
        img : ndarray, shape (X, Y, Z), float32
            May be a view with contiguous rows; may be ``z`` itself (then ``z`` is not
            touched: just the stencil).
        z : ndarray, shape (X, Y, Z), float32, contiguous
            Updated in place.
        c : float
        a_sq : ndarray, shape (3, X, Y, Z), float32, contiguous
            Squared weights of the three difference components.
        out : ndarray, shape (X, Y, Z), float32
            Output (may be a view with contiguous rows into a padded array).
        spans : ndarray, shape (X, Y, 2), int32, optional
            :func:`row_spans` of the weights' support (voxels with a nonzero weight on one
            of their six differences): only these row segments are swept; ``z`` outside
            them is left as it is (it never reaches ``L z``) and ``out`` must be 0 there.
            Default: whole rows.
        """
        if z.size == 0:
            return 0.0
        k = _kernels()
        spans = _full_spans(z.shape) if spans is None else spans
        return float(self._run("gradient_residual", *k.row_span(img), z, float(c),
                               img is not z, a_sq, *k.row_span(out), spans, self.threads))


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

    def warm(self) -> None:
        """No-op (nothing to compile)."""

    # -- preprocessing stages (see NumpyBackend for the contracts) ------------------------
    def as_bool(self, a):
        """Boolean tensor on the device from an array (nonzero = True)."""
        return self.torch.from_numpy(np.ascontiguousarray(NumpyBackend.as_bool(a))
                                     ).to(self.device)

    def as_float64(self, a):
        """float64 tensor."""
        return a.to(self.torch.float64)

    def as_float32(self, a):
        """float32 tensor."""
        return a.to(self.torch.float32)

    def wrap(self, a):
        """``a`` wrapped to [-pi, pi] (in place for float32 tensors)."""
        two_pi = 2 * np.pi
        return a.sub_(self.torch.round(a * (1 / two_pi)).mul_(two_pi))

    def sin(self, a):
        """Element-wise sine."""
        return self.torch.sin(a)

    def sqrt(self, a):
        """Element-wise square root."""
        return self.torch.sqrt(a)

    def where(self, cond, a, b):
        """``a`` where ``cond`` else ``b`` (scalars allowed)."""
        t = self.torch
        dtype = next((v.dtype for v in (a, b) if isinstance(v, t.Tensor)), t.float32)
        a, b = (v if isinstance(v, t.Tensor) else t.tensor(v, dtype=dtype, device=self.device)
                for v in (a, b))
        return t.where(cond, a, b)

    def maximum(self, a, floor: float):
        """``max(a, floor)`` element-wise."""
        return self.torch.clamp(a, min=float(floor))

    def full(self, shape, value, dtype):
        """Tensor of ``shape`` filled with ``value`` (numpy dtype)."""
        dt = self.torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
        return self.torch.full(tuple(shape), value, dtype=dt, device=self.device)

    @staticmethod
    def any(a) -> bool:
        """Whether any element is nonzero."""
        return bool(a.any())

    def mean64(self, a) -> float:
        """Mean with a float64 accumulator."""
        return float(a.to(self.torch.float64).mean())

    def mirror(self, x):
        """See :meth:`NumpyBackend.mirror`."""
        for axis in range(x.ndim):
            x = self.torch.cat([x, x.flip(axis)], dim=axis)
        return x

    def gaussian_filter1d(self, x, sigma: float, axis: int, order: int = 0):
        """See :meth:`NumpyBackend.gaussian_filter1d`: the same weights, as a 1-D convolution.

        The weights are scipy's own (its filter applied to a unit impulse), so both
        backends filter with identical kernels.
        """
        t = self.torch
        radius = int(3.0 * float(sigma) + 0.5)
        impulse = np.zeros(2 * radius + 1, np.float64)
        impulse[radius] = 1.0
        w = ndimage.gaussian_filter1d(impulse, sigma, order=order, mode="constant",
                                      truncate=3.0)
        # out[i] = sum_j h[j] x[i - j] (convolution); conv1d correlates: flip h
        k = t.tensor(w[::-1].copy(), dtype=x.dtype, device=x.device).view(1, 1, -1)
        moved = x.movedim(axis, -1)
        shape = moved.shape
        rows = moved.reshape(-1, 1, shape[-1])
        out = t.nn.functional.conv1d(rows, k, padding=radius)
        return out.reshape(shape).movedim(-1, axis).contiguous()

    def gaussian_filter(self, x, sigmas):
        """See :meth:`NumpyBackend.gaussian_filter`: one 1-D pass per axis, in order."""
        for axis, sigma in enumerate(sigmas):
            x = self.gaussian_filter1d(x, sigma, axis)
        return x

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

    def weighted_residual(self, img, w_sq, out, c: float, spans=None) -> float:
        """``out = w_sq * img - c out`` (in place); returns ``sum out^2 / w_sq`` (w_sq > 0)."""
        out.mul_(-c).addcmul_(w_sq, img)
        return float(self.torch.where(w_sq > 0, out.square() / w_sq, 0.0).sum())

    def spectrum_update(self, s, v, c: float, k_sq):
        """``s = k_sq * s - c v`` (in place); sums of ``|s|^2 / k_sq`` (all, first, last)."""
        rs = self.real_view(s)
        rs.mul_(k_sq).sub_(self.real_view(v), alpha=c)
        sq = self.torch.where(k_sq > 0, rs.square() / k_sq, 0.0).reshape(s.shape + (2,)).sum(-1)
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

    def gradient_residual(self, img, z, c: float, a_sq, out, spans=None) -> float:
        """``z = img - c z`` (in place), ``out = sum_j D_j^T (a_j D_j z)``; ``<z, out>``.

        (Whole rows: ``spans`` only lets the numpy backend skip zero weights.)
        """
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


def get_backend(device: str = "cpu", *, workers: int = -1):
    """Backend for a device name.

    Parameters
    ----------
    device : {"cpu", "torch-cpu", "cuda", "cuda:N"}
        ``"cpu"``: numpy/scipy; ``"torch-cpu"``: the torch code path on the CPU (for
        testing the GPU path without a GPU); ``"cuda"``: torch on a GPU.
    workers : int
        FFT workers of the numpy backend (-1: all cores); torch ignores it.

    Returns
    -------
    NumpyBackend or TorchBackend
    """
    if device == "cpu":
        return NumpyBackend(workers)
    if device == "torch-cpu":
        return TorchBackend("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return TorchBackend(device)
    raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
