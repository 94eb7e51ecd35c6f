import pytest
import torch

from qsm_core.errors import InputError
from rimnet.network import ARCHS, FoldEnsemble, build_ensemble, build_network, count_parameters

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_types", [0, 5])
def test_output_shape(arch, n_types):
    net = build_network(in_channels=4, n_types=n_types, arch=arch).eval()
    with torch.no_grad():
        y = net(torch.randn(3, 4, 32, 32, 32))
    assert y.shape == (3, 1 + n_types)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_other_sizes_and_2d(arch):
    net = build_network(in_channels=2, arch=arch).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 2, 24, 24, 24)).shape == (2, 1)
    net2d = build_network(spatial_dims=2, in_channels=3, arch=arch).eval()
    with torch.no_grad():
        assert net2d(torch.randn(2, 3, 32, 32)).shape == (2, 1)


def test_default_network_is_small():
    net = build_network(in_channels=4)
    n = count_parameters(net)
    # 5 folds of float32 weights must stay well under the 10 MB budget
    assert 5 * 4 * n < 10e6
    assert n > 10_000


def test_bad_arguments():
    with pytest.raises(InputError, match="arch"):
        build_network(in_channels=4, arch="vit")
    with pytest.raises(InputError, match="4 channel widths"):
        build_network(in_channels=4, arch="resnet", channels=(8, 16))
    with pytest.raises(InputError):
        build_network(in_channels=0)
    with pytest.raises(InputError):
        build_network(in_channels=4, spatial_dims=4)


def test_ensemble_averages_and_calibrates():
    torch.manual_seed(0)
    nets = [build_network(in_channels=2, channels=(4, 4, 8, 8)).eval() for _ in range(3)]
    ens = FoldEnsemble(nets, temperature=2.0, offset=-0.5).eval()
    x = torch.randn(4, 2, 16, 16, 16)
    with torch.no_grad():
        expect = (torch.stack([n(x)[:, 0] for n in nets]).mean(0) - 0.5) / 2.0
        got = ens(x)
    assert got.shape == (4, 1)
    torch.testing.assert_close(got[:, 0], expect)
    e2 = build_ensemble(n_folds=3, in_channels=2, channels=(4, 4, 8, 8))
    e2.load_state_dict(ens.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(e2.eval()(x), got)
    with pytest.raises(InputError):
        FoldEnsemble(nets, temperature=0.0)
