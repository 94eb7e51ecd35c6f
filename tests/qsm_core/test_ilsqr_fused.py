"""The fused (speed) kernels and operators of iLSQR against straightforward references.

The backend kernels are checked against plain numpy expressions (float64) with tiny
blocks and several threads, so block and thread boundaries are exercised; the two LSQR
operators are checked by running LSQR on them and on dense float64 matrices of the
operators written the obvious way (scipy's LSQR): the iterates must agree.
"""

import numpy as np
import pytest
import scipy.fft
import scipy.sparse.linalg

from qsm_core.backend import NumpyBackend, get_backend
from qsm_core.inversion._common import hermitian_scale, prepare
from qsm_core.inversion.ilsqr import gradient_weights, laplacian_weights
from qsm_core.inversion.ilsqr_ops import ConeGradientOp, WeightedDipoleOp
from qsm_core.inversion.lsqr import lsqr
from tests.qsm_core.phantoms import head_phantom, local_field

VOX = (1.0, 1.0, 1.3)
B0 = np.array([0.05, 0.1, 1.0]) / np.linalg.norm([0.05, 0.1, 1.0])


def _backends():
    out = []
    for threads in (1, 2, 3):
        bk = NumpyBackend()
        bk.threads = threads
        out.append((f"numpy-{threads}", bk))
    try:
        import torch  # noqa: F401

        out.append(("torch-cpu", get_backend("torch-cpu")))
    except ImportError:  # pragma: no cover
        pass
    return out


@pytest.fixture(params=_backends(), ids=lambda p: p[0])
def bk(request):
    return request.param[1]


def _np(bk, a):
    return np.asarray(bk.to_numpy(a), dtype=np.complex128 if np.iscomplexobj(
        bk.to_numpy(a)) else np.float64)


def _close(got, ref, rtol=2e-5):
    got, ref = np.asarray(got), np.asarray(ref)
    assert np.linalg.norm(got - ref) <= rtol * max(np.linalg.norm(ref), 1e-30)


def _arr(bk, a):
    """A backend copy (numpy's asarray would alias the reference input)."""
    return bk.asarray(np.array(a))


def _cplx(rng, shape):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def test_lsqr_update(bk, rng):
    for x0, w0, v in ((rng.normal(size=(7, 5, 6)).astype(np.float32),
                       rng.normal(size=(7, 5, 6)).astype(np.float32),
                       rng.normal(size=(7, 5, 6)).astype(np.float32)),
                      (_cplx(rng, 301), _cplx(rng, 301), _cplx(rng, 301))):
        x, w = _arr(bk, x0), _arr(bk, w0)
        bk.lsqr_update(x, w, bk.asarray(v), 0.7, -0.3)
        _close(_np(bk, x), x0.astype(np.complex128) + 0.7 * w0)
        _close(_np(bk, w), v + (-0.3) * w0.astype(np.complex128))


def test_axpy_and_scal(bk, rng):
    x0, y0 = _cplx(rng, 517), _cplx(rng, 517)
    y = _arr(bk, y0)
    bk.axpy(-1.5, bk.asarray(x0), y)
    _close(_np(bk, y), y0 - 1.5 * x0.astype(np.complex128))
    bk.scal(0.25, y)
    _close(_np(bk, y), 0.25 * (y0 - 1.5 * x0.astype(np.complex128)))


def test_weighted_residual(bk, rng):
    img_full = rng.normal(size=(11, 9, 8)).astype(np.float32)
    box = (slice(1, 10), slice(2, 8), slice(1, 7))
    w = rng.random((9, 6, 6)) * (rng.random((9, 6, 6)) > 0.3)  # zeros like outside a mask
    w_inv_sq = np.where(w > 0, 1 / np.where(w > 0, w * w, 1), 0)
    pad0 = rng.normal(size=(11, 9, 8)).astype(np.float32)
    pad = _arr(bk, pad0)
    sq = bk.weighted_residual(bk.asarray(img_full)[box], bk.asarray(w * w), pad[box], 0.4)
    ref = pad0.astype(np.float64)
    ref[box] = w * w * img_full[box] - 0.4 * ref[box]
    _close(_np(bk, pad), ref)
    assert sq == pytest.approx(float((w_inv_sq * ref[box] ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("nz", [6, 7])
def test_spectrum_update(bk, rng, nz):
    shape = (9, 5, nz)
    s0, v0 = _cplx(rng, shape), _cplx(rng, shape)
    k_mul = (rng.random(shape) * (rng.random(shape) > 0.2)).astype(np.float32)  # some zeros
    k_norm = np.where(k_mul > 0, 1 / np.where(k_mul > 0, k_mul, 1), 0)
    s = _arr(bk, s0)
    sums = bk.spectrum_update(s, bk.asarray(v0), 0.6, bk.kernel(k_mul))
    ref = k_mul * s0.astype(np.complex128) - 0.6 * v0
    _close(_np(bk, s), ref)
    sq = k_norm * np.abs(ref) ** 2
    assert sums == pytest.approx((sq.sum(), sq[:, :, 0].sum(), sq[:, :, -1].sum()), rel=1e-5)


def _reference_normal(z, a_sq):
    """sum_j D_j^T (a_j D_j z) with explicit slicing (float64)."""
    y = np.zeros_like(z)
    for ax in range(3):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[ax], lo[ax] = slice(1, None), slice(None, -1)
        t = a_sq[ax][tuple(lo)] * (z[tuple(hi)] - z[tuple(lo)])
        y[tuple(lo)] -= t
        y[tuple(hi)] += t
    return y


def test_gradient_residual(bk, rng):
    shape = (10, 7, 6)
    img_full = rng.normal(size=(12, 9, 8)).astype(np.float32)
    box = (slice(1, 11), slice(1, 8), slice(1, 7))
    a_sq = rng.random((3,) + shape).astype(np.float32)
    for ax in range(3):  # the contract: weights vanish on the last plane along their axis
        a_sq[(ax,) + (slice(None),) * ax + (-1,)] = 0
    z_old = rng.normal(size=shape).astype(np.float32)
    z = _arr(bk, z_old)
    pad = bk.zeros((12, 9, 8))
    sq = bk.gradient_residual(bk.asarray(img_full)[box], z, 0.8, bk.asarray(a_sq), pad[box])
    ref_z = img_full[box].astype(np.float64) - 0.8 * z_old
    ref_y = _reference_normal(ref_z, a_sq.astype(np.float64))
    _close(_np(bk, z), ref_z)
    ref_pad = np.zeros((12, 9, 8))
    ref_pad[box] = ref_y
    _close(_np(bk, pad), ref_pad)
    assert sq == pytest.approx(float((ref_z * ref_y).sum()), rel=1e-5)
    # img is z, c = 0: the stencil alone, z untouched
    pad2 = bk.zeros((12, 9, 8))
    sq2 = bk.gradient_residual(z, z, 0.0, bk.asarray(a_sq), pad2[box])
    _close(_np(bk, z), ref_z)
    _close(_np(bk, pad2), ref_pad)
    assert sq2 == pytest.approx(sq, rel=1e-5)


def test_cone_scatter_and_gather(bk, rng):
    shape = (6, 5, 4)
    idx = np.sort(rng.choice(np.prod(shape), size=57, replace=False))
    vals, v = _cplx(rng, 57), _cplx(rng, 57)
    k = rng.random(57).astype(np.float32)
    full = bk.zeros_complex(shape)
    bk.scatter_scaled(full, bk.index(idx), bk.asarray(vals), bk.kernel(k))
    ref = np.zeros(shape, np.complex128)
    ref.reshape(-1)[idx] = k * vals
    _close(_np(bk, full), ref)
    src = _cplx(rng, shape)
    got, sq = bk.gather_update(bk.asarray(src), bk.index(idx), bk.kernel(k), bk.asarray(v),
                               0.3)
    ref = k * src.reshape(-1)[idx].astype(np.complex128) - 0.3 * v
    _close(_np(bk, got), ref)
    assert sq == pytest.approx(float((np.abs(ref) ** 2).sum()), rel=1e-5)


# -- LSQR on the operators vs LSQR on dense reference matrices ---------------------------

@pytest.fixture(scope="module")
def tiny():
    ph = head_phantom((16, 14, 12), VOX)
    f = local_field(ph["chi_ppm"], ph["mask"], voxel_size_mm=VOX, b0_dir=B0)
    grid = prepare(f, ph["mask"], voxel_size_mm=VOX, b0_dir=B0, pad_voxels=2, method="test")
    return grid, ph["chi_ppm"]


def _dense(fn, n_in):
    cols = []
    for i in range(n_in):
        e = np.zeros(n_in)
        e[i] = 1.0
        cols.append(fn(e))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_step1_iterates_match_plain_lsqr(tiny, device):
    """Step 1: ``min ||W (F^-1 D F chi - f)||`` in image space (two FFTs per product)."""
    if device != "cpu":
        pytest.importorskip("torch")
    grid, _ = tiny
    d = grid.kernel().astype(np.float64)
    w = laplacian_weights(grid.field_ppm, grid.mask, VOX).astype(np.float64)
    shape, box = grid.shape, grid.box

    def forward(chi_flat):  # chi on the padded grid -> W (D * chi) on the box
        chi = chi_flat.reshape(shape)
        img = np.fft.irfftn(d * np.fft.rfftn(chi), s=shape, axes=(0, 1, 2))
        return (w * img)[box].ravel()

    a = _dense(forward, int(np.prod(shape)))
    b = (w * grid.field_ppm)[box].ravel().astype(np.float64)
    bk = get_backend(device)
    op = WeightedDipoleOp(bk, grid, grid.kernel(), hermitian_scale(shape),
                          laplacian_weights(grid.field_ppm, grid.mask, VOX))
    for k in (1, 4, 9):
        ref = scipy.sparse.linalg.lsqr(a, b, atol=0, btol=0, iter_lim=k)[0].reshape(shape)
        op.fft.fft_s = 0.0
        res = lsqr(op, bk.asarray((w * grid.field_ppm)[box]), atol=0, btol=0, max_iter=k)
        got = bk.to_numpy(op.solution_image(res.x))
        assert res.n_iter == k
        _close(got, ref, rtol=1e-4)


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_step3_iterates_match_plain_lsqr(tiny, device, precondition):
    """Step 3: ``min ||W_g (grad chi_s - grad chi)||``, chi_s on the cone, written with
    the three weighted gradient components (the textbook form)."""
    if device != "cpu":
        pytest.importorskip("torch")
    grid, chi_true = tiny
    shape, box = grid.shape, grid.box
    d = grid.kernel()
    cone = np.abs(d) < 0.1
    scale = hermitian_scale(shape)
    rng = np.random.default_rng(3)
    prior = np.zeros(shape, np.float32)
    prior[box] = chi_true[grid.crop] + 0.01 * rng.normal(size=chi_true[grid.crop].shape)
    wg = gradient_weights(prior, grid.mask, VOX).astype(np.float64)
    bk = get_backend(device)
    op = ConeGradientOp(bk, grid, cone, scale, wg.astype(np.float32),
                        precondition=precondition)
    idx = np.flatnonzero(cone)
    if precondition:
        idx = idx[idx != 0]
    k_fwd = np.asarray(bk.to_numpy(op.k_fwd), np.float64)
    if k_fwd.size == 2 * idx.size:  # torch's kernels are interleaved (real pairs)
        k_fwd = k_fwd[0::2]

    def weighted_grad(img):
        return np.concatenate([
            (wg[ax] * (np.roll(img, -1, axis=ax) - img))[box].ravel() for ax in range(3)])

    def forward(re_im):  # real pairs of the cone unknown -> W_g grad F^-1(P K v)
        spec = np.zeros(d.shape, np.complex128)
        spec.reshape(-1)[idx] = k_fwd * (re_im[0::2] + 1j * re_im[1::2])
        return weighted_grad(np.fft.irfftn(spec, s=shape, axes=(0, 1, 2)))

    a = _dense(forward, 2 * idx.size)
    chi = np.fft.irfftn(np.fft.rfftn(prior) * (np.abs(d) >= 0.5), s=shape,
                         axes=(0, 1, 2))  # any image
    b = weighted_grad(chi)
    for k in (1, 3, 6):
        ref = scipy.sparse.linalg.lsqr(a, b, atol=0, btol=0, iter_lim=k)[0]
        res = lsqr(op, op.rhs(bk.asarray(chi.astype(np.float32))), atol=0, btol=0,
                   max_iter=k)
        got = bk.to_numpy(res.x).astype(np.complex128)
        _close(np.stack([got.real, got.imag], axis=1).ravel(), ref, rtol=1e-4)
        img_ref = np.asarray(forward(ref))
        _close(weighted_grad(bk.to_numpy(op.image(res.x)).astype(np.float64)), img_ref,
               rtol=1e-4)


# -- LSQR's batched solution updates -------------------------------------------------------

class _Dense:
    """A dense operator, optionally promising LSQR that it keeps the ``v`` it is given."""

    def __init__(self, bk, a, keeps_v):
        from qsm_core.inversion.lsqr import LinearOperator

        class Op(LinearOperator):
            def matvec(self, v):
                return self.a @ v

            def rmatvec(self, u):
                return self.a.T @ u

        self.op = Op()
        self.op.backend, self.op.a, self.op.keeps_v = bk, bk.asarray(a), keeps_v


@pytest.mark.parametrize("group,max_bytes", [(4, 2**29), (3, 2**29), (4, 1024), (4, 0)])
@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_batched_solution_updates_give_the_same_iterates(device, group, max_bytes, rng,
                                                         monkeypatch):
    """Deferring and batching ``x += a w; w = v + c w`` (keeps_v operators) changes no
    iterate, whatever the iteration count relative to the batch size (and with groups
    shrunk or switched off by the memory bound); the reported ``||A^T r||`` is the true
    one."""
    if device != "cpu":
        pytest.importorskip("torch")
    from qsm_core.inversion.lsqr import _SolutionUpdates

    monkeypatch.setattr(_SolutionUpdates, "GROUP", group)
    monkeypatch.setattr(_SolutionUpdates, "MAX_HELD_BYTES", max_bytes)
    bk = get_backend(device)
    a = rng.normal(size=(70, 31)) @ np.diag(np.logspace(0, -1.5, 31))
    b = rng.normal(size=70)
    for k in range(1, 12):
        plain = lsqr(_Dense(bk, a, False).op, bk.asarray(b), atol=0, btol=0, max_iter=k)
        batched = lsqr(_Dense(bk, a, True).op, bk.asarray(b), atol=0, btol=0, max_iter=k)
        ref = scipy.sparse.linalg.lsqr(a, b, atol=0, btol=0, iter_lim=k)[0]
        xb = np.asarray(bk.to_numpy(batched.x), np.float64)
        _close(xb, np.asarray(bk.to_numpy(plain.x), np.float64), rtol=1e-6)
        if k <= 6:  # (later, float32 LSQR drifts from float64 by itself)
            _close(xb, ref, rtol=1e-4)
        assert len(batched.times_s) == k
        true_arnorm = np.linalg.norm(a.T @ (b - a @ xb))
        assert batched.arnorm == pytest.approx(true_arnorm, rel=1e-2)
