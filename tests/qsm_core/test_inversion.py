"""Dipole inversion: contract of every method, LSQR, operators, accuracy on a phantom."""

import numpy as np
import pytest
import scipy.sparse.linalg

from qsm_core.backend import get_backend
from qsm_core.errors import InputError
from qsm_core.inversion import METHODS, ilsqr, tkd
from qsm_core.inversion._common import hermitian_scale, prepare
from qsm_core.inversion.ilsqr import (
    _ConeGradientOp,
    _WeightedDipoleOp,
    gradient_weights,
    laplacian_weights,
)
from qsm_core.inversion.lsqr import LinearOperator, lsqr
from tests.qsm_core.phantoms import head_phantom, local_field, nrmse, streak_metric

VOX = (1.0, 1.0, 1.2)
B0 = np.array([0.05, 0.1, 1.0]) / np.linalg.norm([0.05, 0.1, 1.0])
FAST = {"ilsqr": {"max_iter": 15, "max_iter_streak": 5}, "tkd": {}, "tikhonov": {}}


@pytest.fixture(scope="module")
def small_case():
    ph = head_phantom((32, 32, 28), VOX)
    f = local_field(ph["chi_ppm"], ph["mask"], voxel_size_mm=VOX, b0_dir=B0)
    return f, ph["mask"]


@pytest.fixture(scope="module")
def phantom_case():
    ph = head_phantom((56, 56, 48), VOX)
    f = local_field(ph["chi_ppm"], ph["mask"], voxel_size_mm=VOX, b0_dir=B0)
    return ph, f


# -- contract: every method ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract(name, small_case):
    f, mask = small_case
    chi = METHODS[name](f, mask, voxel_size_mm=VOX, b0_dir=B0, **FAST[name])
    assert chi.shape == f.shape and chi.dtype == np.float32
    assert np.all(np.isfinite(chi))
    assert np.all(chi[~mask] == 0)
    assert abs(chi[mask].mean()) < 1e-5  # mask_mean reference
    assert chi[mask].std() > 0.01  # it recovered structure


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bad_input(name, small_case):
    f, mask = small_case
    fn = METHODS[name]
    kw = dict(voxel_size_mm=VOX, b0_dir=B0)
    with pytest.raises(InputError, match="mask is empty"):
        fn(f, np.zeros_like(mask), **kw)
    with pytest.raises(InputError, match="does not match"):
        fn(f, mask[:-1], **kw)
    bad = f.copy()
    bad[16, 16, 14] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fn(bad, mask, **kw)
    with pytest.raises(InputError, match="3D"):
        fn(f[:, :, 0], mask[:, :, 0], **kw)
    with pytest.raises(InputError, match="voxel_size_mm"):
        fn(f, mask, voxel_size_mm=(1, 1, 0), b0_dir=B0)
    with pytest.raises(InputError, match="b0_dir"):
        fn(f, mask, voxel_size_mm=VOX, b0_dir=(0, 0, 0))
    with pytest.raises(InputError, match="device"):
        fn(f, mask, device="tpu", **kw)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_torch_path_matches_numpy(name, small_case):
    pytest.importorskip("torch")
    f, mask = small_case
    a = METHODS[name](f, mask, voxel_size_mm=VOX, b0_dir=B0, device="cpu", **FAST[name])
    b = METHODS[name](f, mask, voxel_size_mm=VOX, b0_dir=B0, device="torch-cpu",
                      **FAST[name])
    assert b.dtype == np.float32
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4


def test_cuda_without_gpu_is_a_clear_error(small_case):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    f, mask = small_case
    with pytest.raises(InputError, match="CUDA"):
        tkd(f, mask, voxel_size_mm=VOX, b0_dir=B0, device="cuda")


# -- LSQR and the operators ---------------------------------------------------------------

class _Dense(LinearOperator):
    def __init__(self, bk, a):
        self.backend, self.a = bk, bk.asarray(a)

    def matvec(self, v):
        return self.a @ v

    def rmatvec(self, u):
        return self.a.T @ u


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_lsqr_matches_reference_solution(device, rng):
    if device != "cpu":
        pytest.importorskip("torch")
    bk = get_backend(device)
    a = rng.normal(size=(60, 25)) @ np.diag(np.logspace(0, -2, 25))
    b = rng.normal(size=60)
    res = lsqr(_Dense(bk, a), bk.asarray(b), atol=1e-7, btol=1e-7, max_iter=200)
    x = bk.to_numpy(res.x)
    ref = np.linalg.lstsq(a, b, rcond=None)[0]
    assert np.linalg.norm(x - ref) / np.linalg.norm(ref) < 1e-3
    assert res.stop in ("normal_equations", "residual")
    # Same iterates as SciPy's LSQR after a fixed number of steps (float32 vs float64).
    a = rng.normal(size=(60, 25)) @ np.diag(np.logspace(0, -1, 25))
    sp = scipy.sparse.linalg.lsqr(a, b, atol=0, btol=0, iter_lim=8)[0]
    res8 = lsqr(_Dense(bk, a), bk.asarray(b), atol=0, btol=0, max_iter=8)
    assert np.linalg.norm(bk.to_numpy(res8.x) - sp) / np.linalg.norm(sp) < 1e-4
    assert res8.n_iter == 8 and res8.stop == "max_iter"


@pytest.mark.parametrize("factor", [1e-6, 1e6])
def test_lsqr_is_scale_invariant(factor, rng):
    """Badly scaled operators exercise the lazy normalisation's rescaling."""
    bk = get_backend("cpu")
    a = rng.normal(size=(80, 30))
    b = rng.normal(size=80)
    ref = lsqr(_Dense(bk, a), bk.asarray(b), atol=0, btol=0, max_iter=40).x
    got = lsqr(_Dense(bk, a * factor), bk.asarray(b), atol=0, btol=0, max_iter=40).x
    assert np.all(np.isfinite(got))
    assert np.linalg.norm(got * factor - ref) / np.linalg.norm(ref) < 1e-4


def test_lsqr_zero_rhs():
    bk = get_backend("cpu")
    res = lsqr(_Dense(bk, np.eye(3)), bk.asarray(np.zeros(3)))
    assert res.stop == "zero_rhs" and np.all(bk.to_numpy(res.x) == 0)


def test_kspace_unknown_is_an_isometry(rng):
    x = rng.normal(size=(10, 12, 9)).astype(np.float32)
    for shape in [(10, 12, 9), (10, 12, 8)]:
        xi = x[..., : shape[2]]
        spec = np.fft.rfftn(xi) / hermitian_scale(shape)
        assert np.vdot(spec, spec).real == pytest.approx((xi.astype(float) ** 2).sum(),
                                                          rel=1e-5)


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_operators_are_adjoint(device, small_case, rng):
    """<A v, u> = <v, A^T u> for the two iLSQR operators (dot test; the data-space inner
    product is the operator's own, since step 3 stores data vectors unweighted)."""
    if device != "cpu":
        pytest.importorskip("torch")
    bk = get_backend(device)
    f, mask = small_case
    grid = prepare(f, mask, voxel_size_mm=VOX, b0_dir=B0, pad_voxels=4, method="test")
    d = grid.kernel()
    scale = hermitian_scale(grid.shape)
    wl = laplacian_weights(grid.field_ppm, grid.mask, VOX)
    cone = np.abs(d) < 0.1
    wg = gradient_weights(rng.normal(size=grid.shape).astype(np.float32), grid.mask, VOX)
    for op in (_WeightedDipoleOp(bk, grid, d, scale, wl),
               _ConeGradientOp(bk, grid, cone, scale, wg),
               _ConeGradientOp(bk, grid, cone, scale, wg, precondition=True)):
        # A valid (Hermitian) unknown: the scaled spectrum of a real image.
        v = bk.asarray(np.fft.rfftn(rng.normal(size=grid.shape)).astype(np.complex64)
                       / scale)
        if isinstance(op, _ConeGradientOp):
            v = op.compress(v)
        else:
            v = op.to_vhat(v)
        av = op.matvec(v)
        u = bk.asarray(rng.normal(size=tuple(av.shape)).astype(np.float32))
        atu = op.rmatvec(u)
        lhs, rhs = op.udot(av, u), op.vdot(v, atu)
        assert lhs == pytest.approx(rhs, rel=1e-4)


def test_laplacian_weights_range_and_percentiles(small_case):
    f, mask = small_case
    grid = prepare(f, mask, voxel_size_mm=VOX, b0_dir=B0, pad_voxels=2, method="test")
    w = laplacian_weights(grid.field_ppm, grid.mask, VOX)
    inside = w[grid.mask]
    assert np.all(w[~grid.mask] == 0)
    assert inside.min() >= 0.2 - 1e-6 and inside.max() == 1.0
    assert np.mean(inside == 1.0) == pytest.approx(0.6, abs=0.01)  # below the 60th pct
    assert np.mean(inside <= 0.2 + 1e-6) == pytest.approx(0.001, abs=0.002)


def test_gradient_weights_keep_smooth_regions(small_case, rng):
    _, mask = small_case
    chi = rng.normal(size=mask.shape).astype(np.float32)
    w = gradient_weights(chi, mask, (1.0, 1.0, 2.0))
    assert w.shape == (3,) + mask.shape
    assert np.all(w[:, ~mask] == 0)
    assert w[2].max() == pytest.approx(0.5)  # divided by the 2 mm voxel
    assert np.mean(w[0][mask] == 1.0) == pytest.approx(0.5, abs=0.05)


# -- accuracy -----------------------------------------------------------------------------

def test_sphere_susceptibility_is_recovered():
    """A 9 mm sphere (+0.2 ppm) in a spherical mask on anisotropic voxels."""
    from qsm_core.dipole import forward_field_ppm
    from tests.qsm_core.phantoms import sphere_fraction

    vox = (1.0, 1.0, 1.5)
    aff = np.diag(vox + (1.0,))
    shape = (48, 48, 32)
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    chi = 0.2 * sphere_fraction(aff, shape, centre, 9.0)
    x, y, z = np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, vox)], indexing="ij")
    r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    mask = r < 20
    f = np.where(mask, forward_field_ppm(chi, voxel_size_mm=vox, b0_dir=(0, 0, 1)), 0)
    core, far = r < 6, mask & (r > 12)
    got = {}
    for name in ("ilsqr", "tkd"):
        out = METHODS[name](f, mask, voxel_size_mm=vox, b0_dir=(0, 0, 1))
        got[name] = out[core].mean() - out[far].mean()
    assert got["ilsqr"] == pytest.approx(0.2, rel=0.15)
    assert abs(got["ilsqr"] - 0.2) <= abs(got["tkd"] - 0.2)


def test_ilsqr_beats_tkd_on_head_phantom(phantom_case):
    """Acceptance (small grid): NRMSE <= TKD's; streaking <= 0.6 x TKD's."""
    ph, f = phantom_case
    mask, truth = ph["mask"], ph["chi_ppm"]
    chi_tkd = tkd(f, mask, voxel_size_mm=VOX, b0_dir=B0)
    chi_il = ilsqr(f, mask, voxel_size_mm=VOX, b0_dir=B0)
    e_tkd, e_il = nrmse(chi_tkd, truth, mask), nrmse(chi_il, truth, mask)
    s_tkd, s_il = (streak_metric(c, truth, mask, ph) for c in (chi_tkd, chi_il))
    assert e_il <= e_tkd, (e_il, e_tkd)
    assert e_il < 0.25
    assert s_il <= 0.6 * s_tkd, (s_il, s_tkd)


def test_ilsqr_with_noise_still_beats_tkd(phantom_case, rng):
    ph, f = phantom_case
    mask, truth = ph["mask"], ph["chi_ppm"]
    noisy = f + np.where(mask, rng.normal(0, 0.001, f.shape), 0).astype(np.float32)
    e_tkd = nrmse(tkd(noisy, mask, voxel_size_mm=VOX, b0_dir=B0), truth, mask)
    chi, info = ilsqr(noisy, mask, voxel_size_mm=VOX, b0_dir=B0, return_info=True,
                      keep_intermediate=True)
    assert nrmse(chi, truth, mask) < e_tkd
    # Step 3 removes streaking: the final map is better than step 1 alone.
    assert nrmse(chi, truth, mask) < nrmse(info.chi_lsqr_ppm, truth, mask)
    assert info.n_iter["lsqr"] >= 1 and info.grid_shape[0] >= 48


def test_unpreconditioned_streak_step_as_published(phantom_case):
    """precondition=False (plain LSQR in step 3) also meets the acceptance, more slowly."""
    ph, f = phantom_case
    mask, truth = ph["mask"], ph["chi_ppm"]
    chi_tkd = tkd(f, mask, voxel_size_mm=VOX, b0_dir=B0)
    chi = ilsqr(f, mask, voxel_size_mm=VOX, b0_dir=B0, precondition=False, max_iter_streak=50)
    assert nrmse(chi, truth, mask) <= nrmse(chi_tkd, truth, mask)
    assert (streak_metric(chi, truth, mask, ph)
            <= 0.6 * streak_metric(chi_tkd, truth, mask, ph))


def test_progress_callback(small_case):
    f, mask = small_case
    calls = []
    ilsqr(f, mask, voxel_size_mm=VOX, b0_dir=B0, max_iter=3, max_iter_streak=3,
          progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["lsqr"] * 3 + ["streak"] * 3
    assert all(c[2] == 3 for c in calls)


def test_progress_bars_and_info(small_case):
    f, mask = small_case
    chi, info = ilsqr(f, mask, voxel_size_mm=VOX, b0_dir=B0, max_iter=4, max_iter_streak=2,
                      progress=True, return_info=True)
    assert info.n_iter == {"lsqr": 4, "streak": 2}
    assert len(info.iter_times_s["lsqr"]) == 4 and info.fft_times_s["streak"] > 0
    assert set(info.step_times_s) == {"prepare", "lsqr", "fast", "streak", "finish"}
    assert info.chi_lsqr_ppm is None  # only kept on request


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(METHODS))
def test_cuda_matches_numpy(name, small_case):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    f, mask = small_case
    a = METHODS[name](f, mask, voxel_size_mm=VOX, b0_dir=B0, device="cpu", **FAST[name])
    b = METHODS[name](f, mask, voxel_size_mm=VOX, b0_dir=B0, device="cuda", **FAST[name])
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3


# -- data weights from the field's noise ----------------------------------------------------

def test_noise_weighted_ilsqr_beats_unweighted(phantom_case, rng):
    """A few very noisy voxels (a vein, a low-signal edge): 1/sigma weights contain them."""
    from qsm_core.inversion.weights import noise_weights

    ph, f = phantom_case
    mask, truth = ph["mask"], ph["chi_ppm"]
    sd = np.where(mask, 0.0005, 0.0).astype(np.float32)
    bad = mask & (rng.random(f.shape) < 0.03)
    sd[bad] = 0.02  # 40x noisier
    noisy = (f + sd * rng.standard_normal(f.shape)).astype(np.float32)
    kw = dict(voxel_size_mm=VOX, b0_dir=B0)
    e_plain = nrmse(ilsqr(noisy, mask, **kw), truth, mask)
    w = noise_weights(sd, mask)
    e_weighted = nrmse(ilsqr(noisy, mask, weights=w, **kw), truth, mask)
    assert e_weighted < 0.7 * e_plain, (e_weighted, e_plain)
    # uniform weights change nothing (they are normalised to mean 1)
    e_uniform = nrmse(ilsqr(noisy, mask, weights=np.full(f.shape, 7.0), **kw), truth, mask)
    assert abs(e_uniform - e_plain) < 1e-4


def test_noise_weights_normalised_and_checked():
    from qsm_core.inversion.weights import noise_weights

    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    sd = np.where(mask, 2.0, 0.0)
    sd[1, 1, 1] = 0.0  # unknown -> weight 0
    w = noise_weights(sd, mask)
    assert w[1, 1, 1] == 0 and np.all(w[~mask] == 0)
    assert abs(w[mask].mean() - 1.0) < 1e-6
    assert np.allclose(w[mask & (sd > 0)], 8.0 / 7.0)
    with pytest.raises(InputError, match="does not match"):
        noise_weights(sd[:-1], mask)
    with pytest.raises(InputError, match="zero everywhere"):
        noise_weights(np.zeros_like(sd), mask)
    with pytest.raises(InputError, match="finite"):
        noise_weights(np.where(mask, np.nan, 0.0), mask)


def test_ilsqr_rejects_bad_weights(small_case):
    f, mask = small_case
    kw = dict(voxel_size_mm=VOX, b0_dir=B0, max_iter=2, max_iter_streak=1)
    with pytest.raises(InputError, match="weights shape"):
        ilsqr(f, mask, weights=np.ones(f.shape[:2]), **kw)
    with pytest.raises(InputError, match="non-negative"):
        ilsqr(f, mask, weights=-np.ones(f.shape), **kw)
    with pytest.raises(InputError, match="zero everywhere"):
        ilsqr(f, mask, weights=np.zeros(f.shape), **kw)
