"""A tiny array backend shim so one algorithm runs on numpy (CPU) or torch (CPU/GPU).

Only the handful of operations the inversions need are wrapped: real FFTs, in-place
BLAS-like updates, dot products and transfers. Complex spectra are treated as real
vectors (real and imaginary parts interleaved) by :meth:`dot`, :meth:`axpy` and
:meth:`scal`, which is what LSQR needs when its unknown lives in k-space.

Torch is imported lazily, only when a torch device is asked for.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.linalg.blas as blas

from qsm_core.errors import InputError

__all__ = ["get_backend", "NumpyBackend", "TorchBackend", "DEVICES"]

DEVICES = ("cpu", "torch-cpu", "cuda")


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
        """Real inner product (complex arrays as interleaved real vectors)."""
        return float(np.dot(self.real_view(a), self.real_view(b)))

    def nrm2(self, a) -> float:
        """Euclidean norm (complex arrays as interleaved real vectors)."""
        ra = self.real_view(a)
        return float(np.sqrt(np.dot(ra, ra)))

    def axpy(self, alpha: float, x, y):
        """``y += alpha * x`` in place; returns ``y``."""
        blas.saxpy(self.real_view(x), self.real_view(y), a=alpha)
        return y

    def scal(self, alpha: float, x):
        """``x *= alpha`` in place; returns ``x``."""
        blas.sscal(alpha, self.real_view(x))
        return x

    def copy(self, a):
        """A copy."""
        return a.copy()

    def synchronize(self) -> None:
        """No-op (numpy is synchronous)."""


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
        """A copy."""
        return a.clone()

    def synchronize(self) -> None:
        """Wait for queued GPU work (for timing)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


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
