"""Network factory for the rim classifier, built from MONAI parts.

Every network maps a batch of patches, shape (N, C, P, P, P), to logits, shape
(N, out_channels + n_types): column 0 (``out_channels=1``) is the rim logit, the optional
next ``n_types`` columns are the logits of the QSM lesion types (iso-, hypo-, hyper-intense,
hypo-intense rim, paramagnetic rim) of the second head. One tensor out (not a dict) keeps
the networks easy to export, trace and load as a MONAI bundle.

Architectures (``arch``):

``"resnet"``
    :class:`monai.networks.nets.ResNet` with basic blocks ``[1, 1, 1, 1]``, a 3x3x3 stride-2
    stem and max pooling, widths ``channels`` (4 values). About 0.2 M parameters (~1 MB) at
    the default widths (8, 16, 32, 64); the stem brings a 32-voxel patch to 8^3 fast, which
    is what keeps CPU inference fast.
``"fastresnet"``
    The same ResNet with a "patchify" stem: two 2x2x2 stride-2 convolutions (MONAI
    :class:`~monai.networks.blocks.Convolution`) replace the 3x3x3 convolution and the max
    pooling, which dominate the CPU time of the ``resnet`` stem; about 1.6-1.8x faster.
    In a one-fold comparison on simulated data it ranked rims a little worse than
    ``resnet`` (the training default), see docs/benchmarks.md.
``"convnet"``
    A plain stack of MONAI :class:`~monai.networks.blocks.Convolution` blocks (stride-2
    convolution + a stride-1 convolution per width), widths ``channels`` (any length).
``"densenet"``
    :class:`monai.networks.nets.DenseNet` with ``init_features=channels[0]``,
    ``growth_rate=channels[0]`` and one dense block of 2 layers per further width.

A :class:`FoldEnsemble` averages the logits of several fold networks and applies the
calibration (prior offset, temperature); it is what a MONAI bundle exports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet, ResNet
from torch import nn

from qsm_core.errors import InputError
from rimnet.shells import ShellFeatures

__all__ = ["ARCHS", "RimNet", "FoldEnsemble", "build_network", "build_ensemble",
           "count_parameters", "shared_shell_features"]

ARCHS = ("resnet", "fastresnet", "convnet", "densenet")
DEFAULT_WIDTHS = {"resnet": (8, 16, 32, 64), "fastresnet": (8, 16, 32, 64),
                  "convnet": (8, 16, 32, 64), "densenet": (8, 16, 32)}


class RimNet(nn.Module):
    """A feature trunk followed by a rim head and an optional lesion-type head.

    Parameters
    ----------
    trunk : nn.Module
        Maps (N, C, P, P, P) to pooled features (N, n_features).
    n_features : int
        Width of the trunk's output.
    out_channels : int
        Outputs of the rim head (1: a single rim logit).
    n_types : int
        Outputs of the optional lesion-type head (0: no second head).
    dropout : float
        Dropout before the heads (training only).
    shells : ShellFeatures, optional
        Lesion-edge shell features (:mod:`rimnet.shells`) computed from the input and fused
        into the heads, QSMRim-Net style: batch-normalised, both directly and through a
        small ReLU layer of ``shell_width`` units.
    centre_qsm : bool
        With ``shells``: subtract each patch's normal-appearing ring mean from its QSM
        channel before the trunk (invariance to the offsets background removal leaves).
    """

    def __init__(self, trunk: nn.Module, n_features: int, *, out_channels: int = 1,
                 n_types: int = 0, dropout: float = 0.0, shells: ShellFeatures | None = None,
                 centre_qsm: bool = False, shell_width: int = 16):
        super().__init__()
        self.trunk = trunk
        self.shells = shells
        self.centre_qsm = bool(centre_qsm and shells is not None)
        n_head = n_features
        if shells is not None:
            self.shell_norm = nn.BatchNorm1d(shells.n_features)
            self.shell_mlp = nn.Sequential(nn.Linear(shells.n_features, shell_width), nn.ReLU())
            n_head += shells.n_features + shell_width
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rim_head = nn.Linear(n_head, out_channels)
        self.type_head = nn.Linear(n_head, n_types) if n_types > 0 else None

    def forward(self, x: torch.Tensor,
                shell_features: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """Logits, shape (N, out_channels + n_types).

        ``shell_features``: the ``(features, reference)`` pair of ``self.shells(x)`` when the
        caller has it already (it is the same for every fold network and for every flip or
        90-degree rotation of ``x``, so an ensemble computes it once).
        """
        if self.shells is None:
            f = self.trunk(x).flatten(1)
        else:
            s, ref = self.shells(x) if shell_features is None else shell_features
            if self.centre_qsm:  # QSM relative to the normal-appearing ring around the lesion
                qc = self.shells.qsm_channel
                x = torch.cat([x[:, :qc], x[:, qc:qc + 1] - ref[:, None, None, None, None],
                               x[:, qc + 1:]], dim=1)
            s = self.shell_norm(s)
            f = torch.cat([self.trunk(x).flatten(1), s, self.shell_mlp(s)], dim=1)
        f = self.dropout(f)
        out = self.rim_head(f)
        if self.type_head is not None:
            out = torch.cat([out, self.type_head(f)], dim=1)
        return out


class _Pool(nn.Module):
    """Global average pooling to (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.ndim)))


class _DenseTrunk(nn.Module):
    """MONAI DenseNet features + its norm/relu/pool, without the final linear layer."""

    def __init__(self, net: DenseNet):
        super().__init__()
        self.features = net.features
        layers = list(net.class_layers.children())
        self.post = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Linear)])
        self.n_features = next(m for m in layers if isinstance(m, nn.Linear)).in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.features(x))


def _check_widths(arch: str, channels: Sequence[int] | None) -> tuple[int, ...]:
    widths = tuple(int(c) for c in (channels or DEFAULT_WIDTHS[arch]))
    if not widths or any(c < 1 for c in widths):
        raise InputError(f"network channels must be positive integers, got {channels!r}")
    if arch in ("resnet", "fastresnet") and len(widths) != 4:
        raise InputError(f"arch 'resnet' needs 4 channel widths, got {widths}")
    return widths


def build_network(*, spatial_dims: int = 3, in_channels: int, out_channels: int = 1,
                  n_types: int = 0, arch: str = "resnet",
                  channels: Sequence[int] | None = None, dropout: float = 0.0,
                  norm: str = "batch", shell_channels: dict | None = None,
                  centre_qsm: bool = True) -> RimNet:
    """Build a rim classifier from MONAI parts.

    Parameters
    ----------
    spatial_dims : int
        2 or 3 (patches are 3D in qsmrim).
    in_channels : int
        Input channels (e.g. 4: qsm, flair, lesion, others).
    out_channels : int
        Outputs of the rim head (1 for a binary rim logit).
    n_types : int
        Outputs of the optional lesion-type head (5 for the QSM lesion types; 0: none).
    arch : {'resnet', 'fastresnet', 'convnet', 'densenet'}
    channels : sequence of int, optional
        Feature widths (default per arch, see the module docstring).
    dropout : float
        Dropout probability before the heads.
    norm : str
        MONAI normalisation name for ``convnet`` and ``resnet`` (``"batch"``,
        ``"instance"``).
    shell_channels : dict, optional
        ``{"qsm": i, "lesion": j[, "others": k]}``: channel indices for the lesion-edge
        shell features (:class:`rimnet.shells.ShellFeatures`) fused into the heads; None:
        image features only.
    centre_qsm : bool
        With ``shell_channels``: centre the QSM channel on the ring around the lesion.

    Returns
    -------
    RimNet
        ``forward(x: (N, in_channels, *spatial)) -> (N, out_channels + n_types)`` logits.

    Examples
    --------
    >>> net = build_network(in_channels=4)
    >>> net(torch.zeros(2, 4, 32, 32, 32)).shape
    torch.Size([2, 1])
    """
    if arch not in ARCHS:
        raise InputError(f"unknown network arch {arch!r}; choose one of {list(ARCHS)}")
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if in_channels < 1 or out_channels < 1 or n_types < 0:
        raise InputError(f"bad channel counts: in_channels={in_channels}, "
                         f"out_channels={out_channels}, n_types={n_types}")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {dropout}")
    widths = _check_widths(arch, channels)
    if arch == "resnet":
        trunk = ResNet("basic", [1, 1, 1, 1], list(widths), spatial_dims=spatial_dims,
                       n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=2,
                       no_max_pool=False, feed_forward=False, norm=norm)
        n_features = widths[-1]
    elif arch == "fastresnet":
        trunk = ResNet("basic", [1, 1, 1, 1], list(widths), spatial_dims=spatial_dims,
                       n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=2,
                       no_max_pool=True, feed_forward=False, norm=norm)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        trunk.conv1 = nn.Sequential(
            Convolution(spatial_dims, in_channels, widths[0], strides=2, kernel_size=2,
                        padding=0, act="relu", norm=norm),
            conv(widths[0], widths[0], kernel_size=2, stride=2, padding=0, bias=False))
        n_features = widths[-1]
    elif arch == "convnet":
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers.append(Convolution(spatial_dims, c, w, strides=2, kernel_size=3,
                                      act="relu", norm=norm))
            layers.append(Convolution(spatial_dims, w, w, strides=1, kernel_size=3,
                                      act="relu", norm=norm))
            c = w
        layers.append(_Pool())
        trunk = nn.Sequential(*layers)
        n_features = widths[-1]
    else:
        dense = DenseNet(spatial_dims, in_channels, 1, init_features=widths[0],
                         growth_rate=widths[0], block_config=tuple(2 for _ in widths[1:]) or (2,),
                         bn_size=2)
        trunk = _DenseTrunk(dense)
        n_features = trunk.n_features
    shells = None
    if shell_channels is not None:
        try:
            shells = ShellFeatures(qsm_channel=shell_channels["qsm"],
                                   lesion_channel=shell_channels["lesion"],
                                   others_channel=shell_channels.get("others"))
        except KeyError as exc:
            raise InputError(f"shell features need the {exc} channel; the patches must "
                             "hold 'qsm' and 'lesion' channels") from None
        if max(shell_channels.values()) >= in_channels:
            raise InputError(f"shell channel indices {shell_channels} exceed the "
                             f"{in_channels} input channels")
    return RimNet(trunk, n_features, out_channels=out_channels, n_types=n_types,
                  dropout=dropout, shells=shells, centre_qsm=centre_qsm)


class FoldEnsemble(nn.Module):
    """Average the rim logits of fold networks and calibrate them.

    ``forward(x)`` returns calibrated rim logits, shape (N, 1):
    ``(mean_k net_k(x)[:, 0] + offset) / temperature``; ``sigmoid`` of it is the rim
    probability.

    Parameters
    ----------
    nets : sequence of nn.Module
        Fold networks with identical input conventions.
    temperature : float
        Temperature (> 0) fitted on out-of-fold logits.
    offset : float
        Logit offset (prior correction for class-weighted training).
    prior_shift : float
        Logit shift after the temperature (training to deployment prevalence).
    """

    def __init__(self, nets: Sequence[nn.Module], *, temperature: float = 1.0,
                 offset: float = 0.0, prior_shift: float = 0.0):
        super().__init__()
        if not nets:
            raise InputError("a fold ensemble needs at least one network")
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        self.nets = nn.ModuleList(nets)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.register_buffer("prior_shift", torch.tensor(float(prior_shift)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated rim logits, shape (N, 1)."""
        sh = shared_shell_features(self.nets, x)
        logits = torch.stack([net(x, sh)[:, 0] if sh is not None else net(x)[:, 0]
                              for net in self.nets], dim=0).mean(dim=0)
        return ((logits + self.offset) / self.temperature + self.prior_shift)[:, None]


def common_shells(nets: Sequence[nn.Module]):
    """The shell-feature module every net of ``nets`` has with identical settings, or None."""
    first = getattr(nets[0], "shells", None) if nets else None
    if first is None:
        return None
    key = (first.qsm_channel, first.lesion_channel, first.others_channel, first.clip,
           first.positive)
    for net in nets:
        sh = getattr(net, "shells", None)
        if sh is None or (sh.qsm_channel, sh.lesion_channel, sh.others_channel, sh.clip,
                          sh.positive) != key:
            return None
    return first


def shared_shell_features(nets: Sequence[nn.Module], x: torch.Tensor):
    """Shell features of ``x`` to share among ``nets``, or None.

    ``nets[0].shells(x)`` when every net is a :class:`RimNet` with identical shell settings
    (then all can reuse it, :func:`common_shells`); None otherwise.
    """
    shells = common_shells(nets)
    return None if shells is None else shells(x)


def build_ensemble(*, n_folds: int, temperature: float = 1.0, offset: float = 0.0,
                   prior_shift: float = 0.0, **network_kwargs) -> FoldEnsemble:
    """A :class:`FoldEnsemble` of ``n_folds`` networks from :func:`build_network`."""
    if n_folds < 1:
        raise InputError(f"n_folds must be >= 1, got {n_folds}")
    return FoldEnsemble([build_network(**network_kwargs) for _ in range(n_folds)],
                        temperature=temperature, offset=offset, prior_shift=prior_shift)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
