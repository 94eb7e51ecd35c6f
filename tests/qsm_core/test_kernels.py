"""The numba kernels of the numpy backend against plain numpy expressions (float64).

Odd shapes, box views of padded arrays (strided, contiguous rows), 1 to 5 parallel chunks
(more chunks than threads, chunks of one plane, empty chunks) and the Hermitian edge
planes of the spectrum sweep.
"""

import os

import numpy as np
import pytest

from qsm_core.backend import _full_spans, row_spans
from qsm_core.inversion import _kernels as K
from tests.qsm_core.test_ilsqr_fused import _reference_normal

PARTS = [1, 2, 3, 5]


def _close(got, ref, rtol=2e-6):
    got, ref = np.asarray(got), np.asarray(ref)
    assert np.linalg.norm(got - ref) <= rtol * max(np.linalg.norm(ref), 1e-30)


def _f32(rng, shape):
    return rng.normal(size=shape).astype(np.float32)


def _c64(rng, shape):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def _run(kernel, *args, threads=2):
    return K.launch(kernel, threads, *args)


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_dot_axpy_scal(rng, parts, n):
    a, b = _f32(rng, n), _f32(rng, n)
    got = _run(K.dot, a, b, parts)
    assert got == pytest.approx(float(a.astype(np.float64) @ b), rel=1e-12, abs=1e-12)
    y = b.copy()
    _run(K.axpy, -0.7, a, y)
    np.testing.assert_array_equal(y, b + np.float32(-0.7) * a)  # numpy's float32 result
    _run(K.scal, 1.3, y)
    np.testing.assert_array_equal(y, (b + np.float32(-0.7) * a) * np.float32(1.3))


@pytest.mark.parametrize("threads", [1, 2])
def test_lsqr_update_matches_numpy_exactly(rng, threads):
    x, w, v = _f32(rng, 333), _f32(rng, 333), _f32(rng, 333)
    xr, wr = x + w * np.float32(0.6), w * np.float32(-0.2) + v
    _run(K.lsqr_update, x, w, v, 0.6, -0.2, threads=threads)
    np.testing.assert_array_equal(x, xr)
    np.testing.assert_array_equal(w, wr)


@pytest.mark.parametrize("n_upd", [1, 2, 3, 4])
@pytest.mark.parametrize("last_has_c", [True, False])
def test_lsqr_update_group(rng, n_upd, last_has_c):
    size, lo, hi = 257, 31, 200
    x0, w0 = _f32(rng, size), _f32(rng, size)
    vs = [_f32(rng, size) for _ in range(4)]
    a = rng.normal(size=4)
    c = rng.normal(size=4)
    has_c = np.ones(4, bool)
    has_c[n_upd - 1] = last_has_c
    x, w = x0.copy(), w0.copy()
    _run(K.lsqr_update_group, x, w, *vs, a, c, has_c, n_upd, lo, hi)
    xr, wr = x0.copy(), w0.copy()
    for j in range(n_upd):  # the numpy expressions, in order, on [lo, hi)
        xr[lo:hi] = xr[lo:hi] + wr[lo:hi] * np.float32(a[j])
        if has_c[j]:
            wr[lo:hi] = wr[lo:hi] * np.float32(c[j]) + vs[j][lo:hi]
    np.testing.assert_array_equal(x, xr)
    np.testing.assert_array_equal(w, wr)


def _box(shape, rng):
    """A box view (contiguous rows, strided planes) of a larger C-contiguous array."""
    full = _f32(rng, tuple(n + 3 for n in shape))
    box = (slice(1, 1 + shape[0]), slice(2, 2 + shape[1]), slice(1, 1 + shape[2]))
    return full, box


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("shape", [(5, 3, 7), (1, 1, 1), (4, 6, 2)])
@pytest.mark.parametrize("spans", ["full", "support"])
def test_weighted_residual(rng, parts, shape, spans):
    img_full, box = _box(shape, rng)
    out_full, _ = _box(shape, rng)
    w = rng.random(shape) * (rng.random(shape) > 0.3)  # zeros as outside a mask
    w_sq = (w * w).astype(np.float32)
    if spans == "full":
        sp = _full_spans(shape)
    else:  # the contract: out is 0 where w_sq is (and stays 0); whole rows of zeros too
        w_sq[0] = 0
        out_full[box] *= w_sq > 0
        sp = row_spans(w_sq > 0)
    out0 = out_full.copy()
    sq = _run(K.weighted_residual, *K.row_span(img_full[box]), w_sq,
              *K.row_span(out_full[box]), 0.4, sp, parts)
    ref = out0.copy()
    ref[box] = w_sq * img_full[box] - out0[box] * np.float32(0.4)
    np.testing.assert_array_equal(out_full, ref)  # the box, and nothing outside it
    r = ref[box].astype(np.float64)
    ref_sq = float((np.where(w_sq > 0, r * r / np.where(w_sq > 0, w_sq, 1), 0)).sum())
    assert sq == pytest.approx(ref_sq, rel=1e-6)


def test_row_spans(rng):
    support = rng.random((4, 3, 9)) > 0.8
    support[1, 2] = False
    spans = row_spans(support)
    assert spans.dtype == np.int32 and spans.shape == (4, 3, 2)
    for i in range(4):
        for j in range(3):
            k = np.flatnonzero(support[i, j])
            want = (k[0], k[-1] + 1) if k.size else (0, 0)
            assert tuple(spans[i, j]) == want


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("shape", [(5, 4, 6), (3, 5, 7), (4, 3, 1)])
def test_spectrum_update_and_hermitian_planes(rng, parts, shape):
    s0, v = _c64(rng, shape), _c64(rng, shape)
    k_sq = (rng.random(shape) * (rng.random(shape) > 0.2)).astype(np.float32)
    s = s0.copy()
    real = shape[:2] + (2 * shape[2],)
    tot, first, last = _run(K.spectrum_update, s.view(np.float32).reshape(real),
                            v.view(np.float32).reshape(real), 0.6, k_sq, parts)
    ref = k_sq * s0.astype(np.complex128) - 0.6 * v
    _close(s, ref)
    q = np.where(k_sq > 0, np.abs(ref) ** 2 / np.where(k_sq > 0, k_sq, 1), 0)
    assert (tot, first, last) == pytest.approx(
        (q.sum(), q[:, :, 0].sum(), q[:, :, -1].sum()), rel=1e-5)


@pytest.mark.parametrize("parts", PARTS)
def test_scatter_and_gather(rng, parts):
    shape = (6, 5, 4)
    idx = np.sort(rng.choice(np.prod(shape), size=57, replace=False)).astype(np.int32)
    vals, v = _c64(rng, 57), _c64(rng, 57)
    k = rng.random(57).astype(np.float32)
    buf = np.zeros(shape, np.complex64)
    _run(K.scatter_scaled, buf.reshape(-1).view(np.float32), idx, vals.view(np.float32), k)
    ref = np.zeros(shape, np.complex64)
    ref.reshape(-1)[idx] = vals * k  # numpy's float32 result, exactly
    np.testing.assert_array_equal(buf, ref)
    src = _c64(rng, shape)
    out = np.empty_like(v)
    sq = _run(K.gather_update, src.reshape(-1).view(np.float32), idx, k,
              v.view(np.float32), 0.3, out.view(np.float32), parts)
    ref = src.reshape(-1)[idx] * k - v * np.float32(0.3)
    np.testing.assert_array_equal(out, ref)
    assert sq == pytest.approx(float((np.abs(ref.astype(np.complex128)) ** 2).sum()),
                               rel=1e-6)


def _support(a_sq):
    """Voxels with a nonzero weight on one of their six differences."""
    sup = np.zeros(a_sq.shape[1:], bool)
    for ax in range(3):
        nz = a_sq[ax] != 0
        sup |= nz
        sup[(slice(None),) * ax + (slice(1, None),)] |= nz[(slice(None),) * ax + (slice(None, -1),)]
    return sup


@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("shape", [(7, 5, 6), (2, 3, 1), (9, 1, 4), (1, 4, 5)])
def test_gradient_residual(rng, parts, shape):
    img_full, box = _box(shape, rng)
    out_full = np.zeros_like(img_full)
    a_sq = rng.random((3,) + shape).astype(np.float32)  # last planes too: ignored there
    z0 = _f32(rng, shape)
    z = z0.copy()
    sq = _run(K.gradient_residual, *K.row_span(img_full[box]), z, 0.8, True, a_sq,
              *K.row_span(out_full[box]), _full_spans(shape), parts)
    np.testing.assert_array_equal(z, img_full[box] - z0 * np.float32(0.8))
    ref_y = _reference_normal(z.astype(np.float64), a_sq.astype(np.float64))
    ref = np.zeros(img_full.shape)
    ref[box] = ref_y
    _close(out_full, ref, rtol=1e-6)
    assert sq == pytest.approx(float((z * ref_y).sum()), rel=1e-5, abs=1e-9)
    # update=False: the stencil alone, z untouched
    out2 = np.zeros_like(img_full)
    z_before = z.copy()
    sq2 = _run(K.gradient_residual, *K.row_span(z), z, 0.0, False, a_sq,
               *K.row_span(out2[box]), _full_spans(shape), parts)
    np.testing.assert_array_equal(z, z_before)
    np.testing.assert_array_equal(out2, out_full)
    assert sq2 == pytest.approx(sq, rel=1e-12)


@pytest.mark.parametrize("parts", PARTS)
def test_gradient_residual_on_the_support_spans(rng, parts):
    """Weights zero outside a ball (as outside a mask): the sweep on the support's row
    spans gives the whole-row result on the support, L z = 0 elsewhere."""
    shape = (9, 8, 11)
    img_full, box = _box(shape, rng)
    x, y, zz = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    ball = x * x + y * y + zz * zz < 12
    a_sq = (rng.random((3,) + shape) * ball).astype(np.float32)
    sup = _support(a_sq)
    assert 0 < sup.sum() < sup.size
    z0 = _f32(rng, shape)
    outs, zs, sqs = [], [], []
    for sp in (_full_spans(shape), row_spans(sup)):
        z, out_full = z0.copy(), np.zeros_like(img_full)
        sqs.append(_run(K.gradient_residual, *K.row_span(img_full[box]), z, 0.8, True, a_sq,
                        *K.row_span(out_full[box]), sp, parts))
        outs.append(out_full)
        zs.append(z)
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(zs[1][sup], zs[0][sup])
    assert sqs[1] == pytest.approx(sqs[0], rel=1e-12)
    assert not outs[0][box][~sup].any()


def test_row_span_rejects_non_contiguous_rows(rng):
    a = _f32(rng, (4, 5, 6))
    flat, s0, s1 = K.row_span(a[1:3, ::2, 1:5])
    assert (s0, s1) == (30, 12) and flat[s0 + s1 + 2] == a[2, 2, 3]
    with pytest.raises(ValueError, match="contiguous rows"):
        K.row_span(a[:, :, ::2])


def test_wrong_layout_is_a_type_error(rng):
    """Explicit signatures: no silent recompilation for a strided array."""
    z = _f32(rng, (4, 5, 6))
    with pytest.raises(TypeError):
        _run(K.dot, z[:, :, ::2].reshape(-1)[::2], z.reshape(-1)[:30], 1)


def _child_dot(_):
    from qsm_core.backend import NumpyBackend

    a = np.arange(1000, dtype=np.float32)
    return NumpyBackend().dot(a, a)


def test_threads_and_forked_children_can_launch_kernels():
    """The workqueue layer is not thread-safe (launches are serialised by a lock) and the
    simulator forks workers after the parent may have used the kernels."""
    import multiprocessing as mp
    import threading

    from qsm_core.backend import NumpyBackend

    bk = NumpyBackend()
    a = np.arange(1000, dtype=np.float32)
    want = float((a.astype(np.float64) ** 2).sum())
    assert bk.dot(a, a) == want
    got = []

    def work():
        got.extend(bk.dot(a, a) for _ in range(50))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 200
    with mp.get_context("fork").Pool(2) as pool:
        assert pool.map(_child_dot, range(2)) == [want] * 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_thread_counts_follow_the_cpu_affinity():
    """A process pinned to one core runs one FFT worker and one kernel thread."""
    from qsm_core.backend import NumpyBackend, resolve_workers

    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        be = NumpyBackend()
        assert (be.workers, be.threads) == (1, 1)
        assert resolve_workers(-1) == 1 and resolve_workers(3) == 3
    finally:
        os.sched_setaffinity(0, before)
    assert NumpyBackend().workers == len(before)
    assert NumpyBackend(-2).workers == max(1, len(before) - 1)
