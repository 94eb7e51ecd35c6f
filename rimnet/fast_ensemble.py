"""Fast inference of a fold ensemble: the K fold networks evaluated as one batched network.

A :class:`rimnet.model.RimCNN` averages the logits of K fold networks that share one
architecture and one input. Called one after the other, each network runs small
convolutions (8-64 channels) that use a CPU poorly, and MONAI's ResNet stem spends more time
in PyTorch's CPU max pooling than in its convolution. :class:`StackedEnsemble` evaluates the
K networks together, with the same results to float rounding:

1. each network is copied in eval mode with every convolution + batch-norm pair folded into
   one convolution (:func:`torch.fx.experimental.optimization.fuse`; skipped, with a debug
   log, for a network that ``torch.fx`` cannot trace) and every ``MaxPool3d(3, stride=2,
   padding=1)`` replaced by :func:`max_pool3d_k3s2p1`, an exact separable version that is
   ~5x faster on CPU, moved before the bias and ReLU of the convolution feeding it (exact:
   they commute), which then act on 1/8 of the values;
2. the K copies' parameters are stacked and the network is run once under
   :func:`torch.vmap`: the first convolution, which sees the shared input, becomes one
   convolution with K times the output channels, and the later ones grouped convolutions.

With ``precision="bf16"`` the grouped network runs in bfloat16 with channels-last weights,
which oneDNN maps onto the AMX tile units of recent x86 CPUs (Sapphire Rapids and later):
on such a CPU about 2.5x faster than float32 (29 patches, 2 threads), with logits that
differ by a few hundredths (docs/benchmarks.md, session 14, has the held-out figures). On
a CPU without AMX or AVX512-BF16 it is slower than float32 (session 5 measured the stem
convolution 2.8x slower there).

The networks must be in eval mode and are not modified; a later change to their weights is
not seen by an ensemble built before it (build a new one).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence

import torch
from torch import nn

from rimnet.network import common_shells
from rimnet.shells import fast_shell_features

__all__ = ["PRECISIONS", "max_pool3d_k3s2p1", "prepare_for_inference", "StackedEnsemble",
           "GroupedEnsemble"]

PRECISIONS = ("fp32", "bf16")
"""Arithmetic of the CPU fold ensemble: float32, or bfloat16 (fast on CPUs with AMX)."""

log = logging.getLogger(__name__)


def _max_pool_k3s2p1_impl(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """3-wide, stride-2, 1-padded max pooling along ``dims``, one axis at a time."""
    for d in dims:
        n = x.shape[d]
        o = (n - 1) // 2 + 1  # output length (padding 1, floor mode)
        k = n // 2  # odd samples
        step = (slice(None),) * d + (slice(None, None, 2),)
        even = x.narrow(d, 0, 2 * o - 1)[step]  # samples 2i, i < o
        if k == 0:
            x = even.clone()
            continue
        odd = x.narrow(d, 1, 2 * k - 1)[step]  # samples 2i + 1, i < k
        if o > k:  # odd n: the last window holds only its centre sample (and the one before)
            m = even.clone()
            head = m.narrow(d, 0, k)
            torch.maximum(head, odd, out=head)
        else:
            m = torch.maximum(even, odd)
        if o > 1:  # samples 2i - 1
            rest = m.narrow(d, 1, o - 1)
            torch.maximum(rest, odd.narrow(d, 0, o - 1), out=rest)
        x = m
    return x


@torch.library.custom_op("qsmrim::max_pool3d_k3s2p1", mutates_args=())
def _max_pool_op(x: torch.Tensor) -> torch.Tensor:
    return _max_pool_k3s2p1_impl(x, range(x.ndim - 3, x.ndim))


@_max_pool_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-3], *[(s - 1) // 2 + 1 for s in x.shape[-3:]]))


@_max_pool_op.register_vmap
def _(info, in_dims, x):
    # pooling acts on the last three axes only: any batch axis in front of them is fine
    bdim = in_dims[0]
    if bdim is not None and bdim >= x.ndim - 3:
        x, bdim = x.movedim(bdim, 0), 0
    return _max_pool_k3s2p1_impl(x, range(x.ndim - 3, x.ndim)), bdim


def max_pool3d_k3s2p1(x: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.max_pool3d(x, 3, stride=2, padding=1)``, exactly, faster on CPU.

    Parameters
    ----------
    x : Tensor, shape (..., D, H, W)

    Returns
    -------
    Tensor, shape (..., (D - 1) // 2 + 1, (H - 1) // 2 + 1, (W - 1) // 2 + 1)

    Examples
    --------
    >>> x = torch.arange(5.0).reshape(1, 1, 1, 1, 5)
    >>> max_pool3d_k3s2p1(x).flatten().tolist()
    [1.0, 3.0, 4.0]
    """
    return _max_pool_op(x)


class _MaxPoolK3S2P1(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool3d_k3s2p1(x)


class _PlainMaxPoolK3S2P1(_MaxPoolK3S2P1):
    """The same pooling without the custom operator, for the grouped form (no vmap).

    The first call of a ``torch.library`` custom operator imports torch's tracing
    machinery (about 800 modules, sympy among them: 1.5-3 s), once per process; a
    one-scan ``qsmrim predict`` paid it at every run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _max_pool_k3s2p1_impl(x, range(x.ndim - 3, x.ndim))


def _is_k3s2p1(m: nn.Module) -> bool:
    def triple(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)

    return (isinstance(m, nn.MaxPool3d) and triple(m.kernel_size) == (3, 3, 3)
            and triple(m.stride) == (2, 2, 2) and triple(m.padding) == (1, 1, 1)
            and triple(m.dilation) == (1, 1, 1) and not m.ceil_mode
            and not m.return_indices)


class _BiasReLU(nn.Module):
    """``relu(x + bias)`` per channel (axis 1)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bias.reshape(1, -1, *([1] * (x.ndim - 2))))


def _pool_before_bias(gm) -> None:
    """Rewrite ``maxpool(relu(conv(x) + b))`` as ``relu(maxpool(conv(x)) + b)`` in place.

    Max pooling commutes exactly with a per-channel constant added before it (rounding is
    monotone) and with ReLU, so the bias and ReLU then touch 1/8 of the values.
    """
    graph = gm.graph
    for pool in list(graph.nodes):
        if pool.op != "call_module" or not isinstance(gm.get_submodule(pool.target),
                                                      _MaxPoolK3S2P1):
            continue
        act = pool.args[0]
        if (not isinstance(act, torch.fx.Node) or act.op != "call_module"
                or not isinstance(gm.get_submodule(act.target), nn.ReLU)
                or len(act.users) != 1):
            continue
        conv_node = act.args[0]
        if (not isinstance(conv_node, torch.fx.Node) or conv_node.op != "call_module"
                or len(conv_node.users) != 1):
            continue
        conv = gm.get_submodule(conv_node.target)
        if not isinstance(conv, nn.Conv3d) or conv.bias is None:
            continue
        name = f"{pool.target.replace('.', '_')}_bias_relu"
        gm.add_submodule(name, _BiasReLU(conv.bias))
        conv.bias = None
        pool.args = (conv_node,)
        users = list(pool.users)
        with graph.inserting_after(pool):
            biased = graph.call_module(name, (pool,))
        for user in users:
            user.replace_input_with(pool, biased)
        graph.erase_node(act)
    graph.lint()
    gm.recompile()


class _LeafTracer(torch.fx.Tracer):
    """torch.fx tracer keeping rimnet's global pooling (shape-dependent code) as a module."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from rimnet.network import _Pool

        return isinstance(m, _Pool) or super().is_leaf_module(m, qualname)


def prepare_for_inference(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with conv+BN folded and fast max pooling (see module doc).

    ``net`` itself is left unchanged. The copy computes the same function to float rounding.
    """
    net = copy.deepcopy(net).eval()
    traced = False
    try:
        from torch.fx.experimental.optimization import fuse

        graph = _LeafTracer().trace(net)
        net = fuse(torch.fx.GraphModule(net, graph), no_trace=True)
        traced = True
    except Exception as exc:  # a network torch.fx cannot trace keeps its batch norms
        log.debug("conv+BN folding skipped (%s: %s)", type(exc).__name__, exc)
    for name, mod in list(net.named_modules()):
        if name and _is_k3s2p1(mod):
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, _MaxPoolK3S2P1())
    if traced:
        _pool_before_bias(net)
    return net


class StackedEnsemble:
    """K networks of one architecture evaluated as one batched network (see module doc).

    Parameters
    ----------
    nets : sequence of nn.Module
        The fold networks, in eval mode, with identical parameter names and shapes.

    Raises
    ------
    ValueError
        If the networks differ in structure or one is in training mode.
    """

    def __init__(self, nets: Sequence[nn.Module]):
        from torch.func import functional_call

        if not nets:
            raise ValueError("StackedEnsemble needs at least one network")
        if any(net.training for net in nets):
            raise ValueError("StackedEnsemble needs networks in eval mode")
        prepared = [prepare_for_inference(net) for net in nets]
        states = [dict(net.named_parameters()) | dict(net.named_buffers()) for net in prepared]
        keys = list(states[0])
        for st in states[1:]:
            if list(st) != keys or any(st[k].shape != states[0][k].shape for k in keys):
                raise ValueError("the networks of a StackedEnsemble must share one structure")
        with torch.no_grad():
            self.state = {k: torch.stack([st[k].detach() for st in states]) for k in keys}
        self.n_nets = len(prepared)
        base = prepared[0]

        def one(state, args):
            return functional_call(base, state, args)

        self._batched = torch.vmap(one, in_dims=(0, None))
        self._shells = common_shells(nets)

    def shell_features(self, x: torch.Tensor):
        """The networks' shared shell features of ``x`` (``(features, reference)``), or None.

        What :func:`rimnet.network.shared_shell_features` returns, computed by the compiled
        kernel :func:`rimnet._kernels.shell_features` for a CPU float32 batch of patches
        (equal to float32 rounding, ~10x faster), else by the networks' own module.
        """
        return None if self._shells is None else fast_shell_features(self._shells, x)

    def __call__(self, *inputs) -> torch.Tensor:
        """Outputs of every network, shape (K, *output shape); ``inputs`` are shared."""
        return self._batched(self.state, inputs)

    def sum(self, *inputs) -> torch.Tensor:
        """Sum of the networks' outputs over the K networks."""
        return self(*inputs).sum(dim=0)


# ----------------------------------------------------------------------------- grouped
# The K fold networks as ONE ordinary network on channel-stacked tensors: a per-network
# tensor of shape (N, C, ...) becomes block k of a (N, K * C, ...) tensor. Convolutions
# become grouped convolutions (the first, on the shared input, one convolution with K times
# the output channels), per-channel modules get the concatenated parameters, and
# element-wise and spatial modules act unchanged. Unlike torch.vmap, nothing is rewritten
# at each call: oneDNN sees plain (grouped) convolutions with their bias.

_CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d,
                nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d,
                nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, _MaxPoolK3S2P1)
"""Parameter-free modules acting on each channel alone: the same on stacked tensors."""

_ELEMENTWISE_FUNCS = {
    "add", "sub", "mul", "truediv", "relu", "relu_", "sigmoid", "tanh", "gelu", "silu",
    "leaky_relu", "elu", "dropout", "neg", "iadd", "imul", "isub"}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "float", "add",
                        "sub", "mul", "add_", "mul_", "sub_", "clamp", "clamp_min"}


class _GroupingError(Exception):
    """A network the grouped form does not handle (the caller falls back to vmap)."""


def _as_stacked(x, k: int):
    """A shared tensor in the stacked layout (channel axis repeated ``k`` times).

    Tensors without a channel axis, or with one of size 1, broadcast as they are.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[1] == 1:
        return x
    return x.repeat(1, k, *([1] * (x.ndim - 2)))


def _stacked_cat(tensors, stacked, k: int):
    """Per-network concatenation along the channel axis of stacked/shared tensors."""
    parts = []
    for t, s in zip(tensors, stacked):
        n, rest = t.shape[0], t.shape[2:]
        if s:
            parts.append(t.reshape(n, k, t.shape[1] // k, *rest))
        else:
            parts.append(t.reshape(n, 1, t.shape[1], *rest).expand(n, k, t.shape[1], *rest))
    out = torch.cat(parts, dim=2)
    return out.reshape(out.shape[0], -1, *out.shape[3:])


def _stacked_sum(x, k: int):
    """(N, K * C) outputs -> (K, N, C)."""
    return x.reshape(x.shape[0], k, -1).transpose(0, 1)


def _repeated(x, k: int):
    """An output shared by the K networks -> (K, *x.shape)."""
    return x.unsqueeze(0).expand(k, *x.shape)


class _StackedLinear(nn.Module):
    """K linear layers applied to the K blocks of a (N, K * F) tensor."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.k = len(layers)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]),
                                   requires_grad=False)  # (K, O, F)
        bias = [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features)
                for m in layers]
        self.bias = nn.Parameter(torch.stack(bias), requires_grad=False)  # (K, O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("nkf,kof->nko", x.reshape(x.shape[0], self.k, -1), self.weight)
        return (y + self.bias).reshape(x.shape[0], -1)


def _cat_params(mods, name):
    vals = [getattr(m, name) for m in mods]
    if all(v is None for v in vals):
        return None
    if any(v is None for v in vals):
        raise _GroupingError(f"{name} present in some networks only")
    return torch.cat([v.detach() for v in vals])


def _grouped_module(mods: Sequence[nn.Module], stacked_in: bool) -> nn.Module:
    """The module replacing ``mods`` (one per network) on stacked tensors."""
    k = len(mods)
    m0 = mods[0]
    if any(type(m) is not type(m0) for m in mods):
        raise _GroupingError("networks differ in module types")
    if isinstance(m0, nn.modules.conv._ConvNd) and not m0.transposed:
        if m0.padding_mode != "zeros" or (not stacked_in and m0.groups != 1):
            raise _GroupingError("unsupported convolution")
        new = copy.deepcopy(m0)
        new.weight = nn.Parameter(torch.cat([m.weight.detach() for m in mods]),
                                  requires_grad=False)
        b = _cat_params(mods, "bias")
        new.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        new.out_channels = k * m0.out_channels
        if stacked_in:
            new.in_channels = k * m0.in_channels
            new.groups = k * m0.groups
        return new
    if isinstance(m0, _BiasReLU):
        return _BiasReLU(torch.cat([m.bias.detach() for m in mods]))
    if isinstance(m0, _MaxPoolK3S2P1):
        return _PlainMaxPoolK3S2P1()
    if isinstance(m0, nn.modules.batchnorm._BatchNorm):
        if m0.training or not m0.track_running_stats:
            raise _GroupingError("batch norm without running statistics")
        new = copy.deepcopy(m0)
        new.num_features = k * m0.num_features
        for name in ("weight", "bias"):
            v = _cat_params(mods, name)
            setattr(new, name, None if v is None else nn.Parameter(v, requires_grad=False))
        new.running_mean = torch.cat([m.running_mean for m in mods])
        new.running_var = torch.cat([m.running_var for m in mods])
        return new
    if isinstance(m0, nn.Linear):
        if stacked_in:
            return _StackedLinear(mods)
        new = nn.Linear(m0.in_features, k * m0.out_features, bias=m0.bias is not None)
        new.weight = nn.Parameter(torch.cat([m.weight.detach() for m in mods]),
                                  requires_grad=False)
        if m0.bias is not None:
            new.bias = nn.Parameter(_cat_params(mods, "bias"), requires_grad=False)
        return new
    if isinstance(m0, _CHANNELWISE) or (isinstance(m0, nn.Flatten) and m0.start_dim == 1
                                       and m0.end_dim == -1) or type(m0).__name__ == "_Pool":
        if list(m0.parameters()) or list(m0.buffers()):
            raise _GroupingError(f"{type(m0).__name__} with parameters")
        return m0
    raise _GroupingError(f"module {type(m0).__name__} not supported")


def _target_name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def group_networks(prepared: Sequence[nn.Module]) -> torch.fx.GraphModule:
    """One network computing the K ``prepared`` networks (torch.fx graphs of one structure).

    ``forward(*inputs)`` returns the K outputs stacked as (K, N, ...), as
    :class:`StackedEnsemble` does.

    Raises
    ------
    _GroupingError
        For a graph or module the grouped form does not handle.
    """
    k = len(prepared)
    base = prepared[0]
    if not isinstance(base, torch.fx.GraphModule) or any(
            not isinstance(p, torch.fx.GraphModule) for p in prepared):
        raise _GroupingError("networks are not torch.fx graphs")
    if any(len(p.graph.nodes) != len(base.graph.nodes) for p in prepared):
        raise _GroupingError("network graphs differ")
    holder = nn.Module()
    graph = torch.fx.Graph()
    env: dict = {}
    stacked: set = set()

    def arg(a):
        return torch.fx.node.map_arg(a, lambda n: env[n])

    def is_stacked(a) -> bool:
        found = []
        torch.fx.node.map_arg(a, lambda n: found.append(env[n] in stacked) or n)
        return any(found)

    def to_stacked(a):
        return torch.fx.node.map_arg(a, lambda n: env[n] if env[n] in stacked else
                                     graph.call_function(_as_stacked, (env[n], k)))

    for node in base.graph.nodes:
        any_stacked = is_stacked(node.args) or is_stacked(node.kwargs)
        if node.op == "placeholder":
            new = graph.placeholder(node.name, default_value=node.args[0] if node.args
                                    else inspect.Signature.empty)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node):
                raise _GroupingError("networks with several outputs")
            graph.output(graph.call_function(_stacked_sum if env[out] in stacked
                                             else _repeated, (env[out], k)))
            continue
        elif node.op == "call_module":
            mods = [p.get_submodule(node.target) for p in prepared]
            mod = _grouped_module(mods, any_stacked)
            per_net = mod is not mods[0]  # parameters of its own per network
            holder.add_module(node.name, mod)
            stack_args = per_net and not any_stacked and not isinstance(
                mod, (nn.modules.conv._ConvNd, nn.Linear))
            new = graph.call_module(node.name, to_stacked(node.args) if stack_args
                                    else arg(node.args), arg(node.kwargs))
            if any_stacked or per_net:
                stacked.add(new)
        elif node.op == "call_function":
            name = _target_name(node.target)
            if not any_stacked:
                new = graph.call_function(node.target, arg(node.args), arg(node.kwargs))
            elif name == "cat":
                tensors = node.args[0] if node.args else node.kwargs["tensors"]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if dim != 1:
                    raise _GroupingError("concatenation along a non-channel axis")
                flags = [env[t] in stacked for t in tensors]
                new = graph.call_function(_stacked_cat, ([env[t] for t in tensors], flags, k))
                stacked.add(new)
            elif name == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)):
                new = graph.call_function(node.target, arg(node.args), arg(node.kwargs))
                stacked.add(new)
            elif name in _ELEMENTWISE_FUNCS:
                new = graph.call_function(node.target, to_stacked(node.args),
                                          to_stacked(node.kwargs))
                stacked.add(new)
            else:
                raise _GroupingError(f"function {name} on stacked tensors")
        elif node.op == "call_method":
            name = node.target
            if not any_stacked:
                new = graph.call_method(name, arg(node.args), arg(node.kwargs))
            elif name == "size" and tuple(node.args[1:]) == (0,):
                new = graph.call_method(name, arg(node.args), arg(node.kwargs))
            elif name in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
                n0 = node.args[1]
                if not (isinstance(n0, torch.fx.Node) and n0.op == "call_method"
                        and n0.target == "size" and tuple(n0.args[1:]) == (0,)):
                    raise _GroupingError("reshape of stacked tensors")
                new = graph.call_method(name, arg(node.args), arg(node.kwargs))
                stacked.add(new)
            elif name == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)):
                new = graph.call_method(name, arg(node.args), arg(node.kwargs))
                stacked.add(new)
            elif name in _ELEMENTWISE_METHODS:
                new = graph.call_method(name, to_stacked(node.args), to_stacked(node.kwargs))
                stacked.add(new)
            else:
                raise _GroupingError(f"method {name} on stacked tensors")
        else:
            raise _GroupingError(f"graph node {node.op} not supported")
        env[node] = new
    graph.lint()
    return torch.fx.GraphModule(holder, graph)


class GroupedEnsemble:
    """K networks of one architecture evaluated as one grouped network (see above).

    The same interface as :class:`StackedEnsemble`, several times faster on CPU.

    Raises
    ------
    ValueError
        If the networks differ in structure, one is in training mode, or the grouped form
        does not handle them.
    """

    def __init__(self, nets: Sequence[nn.Module], *, batch_size: int = 32,
                 precision: str = "fp32"):
        if not nets:
            raise ValueError("GroupedEnsemble needs at least one network")
        if any(net.training for net in nets):
            raise ValueError("GroupedEnsemble needs networks in eval mode")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        try:
            with torch.no_grad():
                self.module = group_networks([prepare_for_inference(n) for n in nets]).eval()
        except (_GroupingError, AttributeError, KeyError, RuntimeError) as exc:
            raise ValueError(f"no grouped form: {exc}") from None
        self.precision = precision
        if precision == "bf16":
            # bfloat16 weights in channels-last order: oneDNN's AMX kernels
            self.module = self.module.to(torch.bfloat16).to(
                memory_format=torch.channels_last_3d)
        self.n_nets = len(nets)
        self.batch_size = int(batch_size)
        self._shells = common_shells(nets)

    def _cast(self, a):
        """An input as the module's precision expects it (tuples: shell features)."""
        if isinstance(a, (tuple, list)):
            return type(a)(self._cast(t) for t in a)
        if self.precision != "bf16" or not a.is_floating_point():
            return a
        # kept in NCDHW order: oneDNN reorders the 4-channel input inside the first
        # convolution faster than a channels-last copy (0.3 ms per lesion) would
        return a.to(torch.bfloat16)

    shell_features = StackedEnsemble.shell_features

    def __call__(self, *inputs) -> torch.Tensor:
        """Outputs of every network, shape (K, *output shape); ``inputs`` are shared.

        Evaluated in equal chunks of at most ``batch_size`` patches (their activations
        stay in cache); oneDNN keeps the kernels it builds for each chunk size, so after
        the first scans every size is compiled.
        """
        sizes = _chunk_sizes(inputs[0].shape[0], self.batch_size)
        outs = []
        s = 0
        for b in sizes:
            outs.append(self.module(*[self._cast(_rows(a, s, s + b)) for a in inputs]).float())
            s += b
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def sum(self, *inputs) -> torch.Tensor:
        """Sum of the networks' outputs over the K networks."""
        return self(*inputs).sum(dim=0)


def _chunk_sizes(n: int, size: int) -> list[int]:
    """``n`` split into the fewest chunks of at most ``size``, their sizes within 1.

    Measured on the default model (2 threads, lesion counts of 3-60 per call): 0.85 ms per
    lesion against 1.00 for chunks of ``size`` followed by halving powers of two, whose
    small chunks run slowly (oneDNN falls back to a reference kernel for one patch).

    Examples
    --------
    >>> _chunk_sizes(29, 32)
    [29]
    >>> _chunk_sizes(70, 32)
    [24, 23, 23]
    """
    if n <= 0:
        return []
    k = -(-n // size)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _rows(a, lo: int, hi: int):
    """Rows ``lo:hi`` of a tensor, or of each tensor of a tuple (shell features)."""
    if isinstance(a, (tuple, list)):
        return type(a)(_rows(t, lo, hi) for t in a)
    return a[lo:hi]




def fingerprint(nets: Sequence[nn.Module]) -> tuple:
    """Identity and in-place-update counters of the networks' tensors (a cache key).

    Read from the parameters and buffers themselves (``state_dict`` would build detached
    copies of every tensor at each call, ~1 ms per ensemble).
    """
    return tuple((id(net), tuple((id(t), t._version) for t in net.parameters()),
                  tuple((id(t), t._version) for t in net.buffers())) for net in nets)


def checked_stacked_ensemble(nets: Sequence[nn.Module], example: torch.Tensor, *,
                             precision: str = "fp32", rtol: float | None = None,
                             atol: float | None = None):
    """The fastest batched form of ``nets`` that reproduces them on ``example``, or None.

    :class:`GroupedEnsemble` if the networks have a grouped form, else (float32 only)
    :class:`StackedEnsemble`. The check calls the networks as
    :func:`rimnet.model.ensemble_logits` does (with shared shell features when they have
    them) and compares the mean outputs, within ``rtol``/``atol`` (default 1e-4 for
    float32; 0.05/0.1 for bfloat16, whose 8-bit mantissa moves logits by a few
    hundredths); a form that fails or gives different outputs is reported in the log, and
    without any the caller keeps the per-network loop.
    """
    from rimnet.network import shared_shell_features

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    low = precision == "bf16"
    rtol = rtol if rtol is not None else (0.05 if low else 1e-4)
    atol = atol if atol is not None else (0.1 if low else 1e-4)

    try:
        with torch.inference_mode():
            sh = shared_shell_features(nets, example)
            args = (example,) if sh is None else (example, sh)
            ref = torch.stack([net(*args).float() for net in nets]).mean(dim=0)
    except Exception as exc:  # pragma: no cover - the networks themselves fail
        log.warning("fold networks fail on an example batch (%s: %s)", type(exc).__name__, exc)
        return None
    for kind in (GroupedEnsemble,) if low else (GroupedEnsemble, StackedEnsemble):
        try:
            fast = (GroupedEnsemble(nets, precision=precision) if kind is GroupedEnsemble
                    else StackedEnsemble(nets))
            with torch.inference_mode():
                fsh = fast.shell_features(example)
                got = fast.sum(*((example,) if fsh is None else (example, fsh))).float()
                got = got / len(nets)
        except Exception as exc:  # an architecture the form cannot handle
            log.log(logging.DEBUG if kind is GroupedEnsemble else logging.WARNING,
                    "%s of the fold networks unavailable (%s: %s)", kind.__name__,
                    type(exc).__name__, exc)
            continue
        if got.shape == ref.shape and torch.allclose(got, ref, rtol=rtol, atol=atol):
            return fast
        err = (got - ref).abs().max().item() if got.shape == ref.shape else got.shape
        log.warning("%s of the fold networks differs from them (%s)", kind.__name__, err)
    log.warning("no batched fold ensemble; using the per-network loop")
    return None
