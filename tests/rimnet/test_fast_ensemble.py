"""The stacked fold ensemble and the fast max pooling reproduce the networks they replace."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rimnet.fast_ensemble import (
    StackedEnsemble,
    checked_stacked_ensemble,
    max_pool3d_k3s2p1,
)
from rimnet.model import RimCNN, ensemble_logits
from rimnet.network import ARCHS, build_network, shared_shell_features


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16, 16), (1, 2, 17, 5, 9), (2, 1, 1, 2, 3),
                                   (3, 4, 8)])
def test_max_pool_is_exactly_torchs(shape):
    x = torch.randn(shape)
    ref = F.max_pool3d(x[None] if x.ndim == 3 else x, 3, stride=2, padding=1)
    got = max_pool3d_k3s2p1(x)
    assert torch.equal(got, ref[0] if x.ndim == 3 else ref)
    # under vmap, whatever the batched axis
    xb = torch.randn(4, *shape)
    for d in (0, 1):
        v = torch.vmap(max_pool3d_k3s2p1, in_dims=d)(xb.movedim(0, d))
        assert torch.equal(v, torch.stack([max_pool3d_k3s2p1(a) for a in xb]))


def _nets(k, seed=0, **kw):
    torch.manual_seed(seed)
    nets = [build_network(in_channels=4, **kw) for _ in range(k)]
    for net in nets:  # non-trivial batch-norm statistics, so folding them matters
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        net.eval()
    return nets


def _patches(n=6, p=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 4, p, p, p), generator=g) * 0.5
    idx = torch.arange(p, dtype=torch.float32) - (p - 1) / 2
    r = (idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2).sqrt()
    x[:, 2] = (r <= 5).float()
    x[:, 3] = ((r > 9) & (r <= 11)).float()
    return x


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_ensemble_matches_each_network(arch):
    nets = _nets(3, arch=arch)
    arch_size = 4
    x = _patches(arch_size)
    with torch.inference_mode():
        ref = torch.stack([net(x) for net in nets])
        got = StackedEnsemble(nets)(x)
    assert got.shape == ref.shape == (3, arch_size, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_stacked_ensemble_with_shell_features():
    nets = _nets(2, arch="resnet",
                 shell_channels={"qsm": 0, "lesion": 2, "others": 3}, centre_qsm=True)
    x = _patches(4)
    with torch.inference_mode():
        sh = shared_shell_features(nets, x)
        assert sh is not None
        ref = sum(net(x, sh) for net in nets)
        got = StackedEnsemble(nets).sum(x, sh)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_rimcnn_scores_unchanged_by_the_stacked_path(tta):
    nets = _nets(5, arch="resnet")
    cfg = {"channels": ["qsm", "flair", "lesion", "others"], "patch_mm": 32.0,
           "patch_voxels": 32, "arch": "resnet", "net_channels": [8, 16, 32, 64]}
    model = RimCNN(nets, config=cfg, tta=tta, batch_size=4)
    x = _patches(6).numpy()
    assert model._stacked_ensemble() is not None
    loop = ensemble_logits(nets, x, tta=tta, batch_size=4)
    np.testing.assert_allclose(model.raw_logits(x), loop, rtol=1e-5, atol=2e-5)
    # the cache follows the weights
    first = model._stacked_ensemble()
    with torch.no_grad():
        nets[0].rim_head.bias.add_(1.0)
    assert model._stacked_ensemble() is not first
    loop = ensemble_logits(nets, x, tta=tta, batch_size=4)
    np.testing.assert_allclose(model.raw_logits(x), loop, rtol=1e-5, atol=2e-5)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        f = x.mean(dim=(2, 3, 4))
        return self.lin(f) if bool(self.lin.weight.sum() > 0) else -self.lin(f)  # no vmap


def test_unsupported_network_falls_back_with_a_warning(caplog):
    nets = [_DataDependent().eval(), _DataDependent().eval()]
    with caplog.at_level(logging.WARNING, logger="rimnet.fast_ensemble"):
        assert checked_stacked_ensemble(nets, _patches(2, p=8)) is None
    assert "per-network loop" in caplog.text


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shells", [False, True])
def test_grouped_ensemble_matches_each_network(arch, shells):
    from rimnet.fast_ensemble import GroupedEnsemble

    kw = {"shell_channels": {"qsm": 0, "lesion": 2, "others": 3}} if shells else {}
    nets = _nets(3, arch=arch, **kw)
    x = _patches(5)
    with torch.inference_mode():
        sh = shared_shell_features(nets, x)
        args = (x,) if sh is None else (x, sh)
        ref = torch.stack([net(*args) for net in nets])
        fast = GroupedEnsemble(nets, batch_size=2)  # chunks of 2, 2 and 1 patches
        fsh = fast.shell_features(x)
        assert (fsh is None) == (sh is None)
        got = fast(*((x,) if fsh is None else (x, fsh)))
        assert checked_stacked_ensemble(nets, x).__class__ is GroupedEnsemble
    assert got.shape == ref.shape == (3, 5, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [1, 2, 7, 32])
def test_chunk_sizes_are_the_fewest_and_even(size):
    from rimnet.fast_ensemble import _chunk_sizes

    assert _chunk_sizes(0, size) == []
    for n in range(1, 3 * size + 2):
        sizes = _chunk_sizes(n, size)
        assert sum(sizes) == n
        assert len(sizes) == -(-n // size)  # as few chunks as the size limit allows
        assert max(sizes) <= size and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("shells", [False, True])
def test_bf16_grouped_ensemble_is_close_to_float32(shells):
    from rimnet.fast_ensemble import GroupedEnsemble

    kw = {"shell_channels": {"qsm": 0, "lesion": 2, "others": 3}} if shells else {}
    nets = _nets(3, arch="resnet", **kw)
    x = _patches(12)
    with torch.inference_mode():
        sh = shared_shell_features(nets, x)
        args = (x,) if sh is None else (x, sh)
        ref = torch.stack([net(*args) for net in nets])
        fast = checked_stacked_ensemble(nets, x, precision="bf16")
        assert isinstance(fast, GroupedEnsemble) and fast.precision == "bf16"
        assert next(fast.module.parameters()).dtype == torch.bfloat16
        fsh = fast.shell_features(x)
        got = fast(*((x,) if fsh is None else (x, fsh)))
    assert got.dtype == torch.float32 and got.shape == ref.shape
    spread = (ref.max() - ref.min()).item()
    err = (got - ref).abs().max().item()
    assert 0 < err <= 0.05 * spread + 0.05  # rounded, not wrong
    # the ranking of the patches is what the scores are for: (nearly) unchanged
    r = torch.argsort(torch.argsort(ref.mean(0)[:, 0])).float()
    g = torch.argsort(torch.argsort(got.mean(0)[:, 0])).float()
    assert torch.corrcoef(torch.stack([r, g]))[0, 1] > 0.95
    with pytest.raises(ValueError, match="precision"):
        GroupedEnsemble(nets, precision="fp16")


def test_rimcnn_bf16_uses_the_grouped_form_or_autocast():
    from qsm_core.errors import InputError
    from rimnet.fast_ensemble import GroupedEnsemble

    cfg = {"channels": ["qsm", "flair", "lesion", "others"], "patch_mm": 32.0,
           "patch_voxels": 32, "arch": "resnet", "net_channels": [8, 16, 32, 64]}
    nets = _nets(2, arch="resnet")
    x = _patches(6).numpy()
    fp32 = RimCNN(nets, config=cfg).raw_logits(x)
    model = RimCNN(nets, config=cfg, precision="bf16")
    assert isinstance(model._stacked_ensemble(), GroupedEnsemble)
    np.testing.assert_allclose(model.raw_logits(x), fp32, atol=0.05 * np.ptp(fp32) + 0.05)
    assert "precision='bf16'" in repr(model)
    with pytest.raises(InputError, match="precision"):
        RimCNN(nets, config=cfg, precision="half")
    # no grouped form: the per-network loop runs under bfloat16 autocast
    odd = [_DataDependent().eval(), _DataDependent().eval()]
    cfg2 = {**cfg, "patch_voxels": 8}
    y = _patches(3, p=8).numpy()
    low = RimCNN(odd, config=cfg2, precision="bf16")
    assert low._stacked_ensemble() is None
    np.testing.assert_allclose(low.raw_logits(y), RimCNN(odd, config=cfg2).raw_logits(y),
                               atol=0.05)


def test_grouped_form_pools_without_the_custom_operator(monkeypatch):
    # the custom operator's first call imports torch's tracing stack (seconds per process);
    # the grouped form, which needs no vmap, must not reach it
    import rimnet.fast_ensemble as fe

    nets = _nets(2, arch="resnet")
    x = _patches(3)
    with torch.inference_mode():
        ref = torch.stack([net(x) for net in nets])

    def forbidden(x):
        raise AssertionError("custom operator called")

    monkeypatch.setattr(fe, "max_pool3d_k3s2p1", forbidden)
    grouped = fe.GroupedEnsemble(nets)
    with torch.inference_mode():
        got = grouped(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bf16_on_a_cpu_without_bf16_units_warns(monkeypatch, caplog):
    import rimnet.model as model_mod

    cfg = {"channels": ["qsm", "flair", "lesion", "others"], "patch_mm": 32.0,
           "patch_voxels": 32, "arch": "resnet", "net_channels": [8, 16, 32, 64]}
    nets = _nets(1, arch="resnet")
    monkeypatch.setattr(model_mod, "cpu_has_bf16_units", lambda: False)
    with caplog.at_level(logging.WARNING, logger="rimnet.model"):
        RimCNN(nets, config=cfg)  # fp32: nothing to say
        assert caplog.text == ""
        RimCNN(nets, config=cfg, precision="bf16")
    assert "slower than in fp32" in caplog.text
    monkeypatch.setattr(model_mod, "cpu_has_bf16_units", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rimnet.model"):
        RimCNN(nets, config=cfg, precision="bf16")
    assert caplog.text == ""
