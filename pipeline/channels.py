"""Which output channels can be removed from a network, and a copy of it with the dead ones physically removed.

Unstructured sparsity saves nothing in onnxruntime's dense kernels; removing whole output channels of a layer
gives a narrower network whose convolutions are genuinely cheaper. Filter pruning (:mod:`pipeline.structured`)
decides which channels die; this module knows where a channel can be cut and does the cutting:

1. **Channel groups** (:func:`channel_groups`): an output channel of a Conv2d / Linear can be removed when, between
   that layer (the *producer*) and the layers reading it (the *consumers*: Conv2d, or Linear after a Flatten),
   the tensor only passes through channel-wise ops (BatchNorm, ReLU, pooling, Identity) and at least one ReLU.
   A channel feeding a residual ``Add`` (ResNet's ``conv2`` and shortcuts) or the network output is not in any
   group, so in a ResNet only the inner channels of each block are pruned (Li et al., 2017, Sec. 4.2).
2. **Narrowing** (:func:`narrow`): a copy of the network with the dead channels physically removed (producer rows,
   BatchNorm entries, consumer input slices), which computes the same function as the masked network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import HydraPipeError
from pipeline.graph import affine_weight, as_graph
from pipeline.masking import Masked, MaskedConv2d, MaskedLinear, masked_layers



# ops that act on each channel separately and map a zero channel to a zero channel
_CHANNELWISE = {"BatchNormalization", "Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "Identity"}


@dataclass(frozen=True)
class Consumer:
    """A layer reading the group's channels: channel ``o`` is its input slice ``[o * per_channel, (o+1) * per_channel)``."""

    name: str
    per_channel: int


@dataclass(frozen=True)
class ChannelGroup:
    """The output channels of ``producer`` and everything that must shrink with them."""

    producer: str
    chain: tuple[str, ...]  # channel-wise modules between the producer and its consumers, in order ("" if unnamed)
    ops: tuple[str, ...]  # their ONNX op types
    batchnorms: tuple[str, ...]  # the BatchNorm modules among them
    consumers: tuple[Consumer, ...]

    @property
    def gate(self) -> str:
        """The module whose output is the channel as the consumers see it, up to ops with f(0) = 0."""
        return self.batchnorms[-1] if self.batchnorms else self.producer


# ----------------------------------------------------------------------------------------------------------------
# Which channels can be removed
# ----------------------------------------------------------------------------------------------------------------

def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The removable channel groups of ``model``, in graph order (see the module docstring for the rule)."""
    graph = as_graph(model)
    names = {id(m): n for n, m in model.named_modules()}
    consumers: dict[str, list] = {}
    for node in graph.nodes:
        for i in node.inputs:
            consumers.setdefault(i, []).append(node)
    uses: dict[int, int] = {}
    for node in graph.nodes:
        uses[id(node.module)] = uses.get(id(node.module), 0) + 1

    groups = []
    for node in graph.nodes:
        m = node.module
        if not _is_plain_affine(m) or uses[id(m)] != 1 or id(m) not in names:
            continue
        chain: list[nn.Module] = []
        ops: list[str] = []
        cur = node.output
        while len(consumers.get(cur, [])) == 1 and consumers[cur][0].op in _CHANNELWISE:
            nxt = consumers[cur][0]
            chain.append(nxt.module)
            ops.append(nxt.op)
            cur = nxt.output
        if cur == graph.output_name or "Relu" not in ops:
            continue
        if any(isinstance(c, nn.modules.batchnorm._BatchNorm) and (uses[id(c)] != 1 or id(c) not in names)
               for c in chain):
            continue
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        found = _consumers_of(cur, consumers, width, uses, names)
        if found:
            bns = tuple(names[id(c)] for c in chain if isinstance(c, nn.modules.batchnorm._BatchNorm))
            groups.append(ChannelGroup(names[id(m)], tuple(names.get(id(c), "") for c in chain), tuple(ops), bns,
                                      tuple(found)))
    return groups


def _is_plain_affine(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear)


def _consumers_of(tensor: str, consumers: dict, width: int, uses: dict, names: dict) -> list[Consumer] | None:
    """Conv2d readers, or Flatten -> Linear readers, of ``tensor``; None when any reader is something else."""
    found = []
    for c in consumers.get(tensor, []):
        m = c.module
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == width:
            target = m
            per_channel = 1
        elif isinstance(m, nn.Linear) and m.in_features == width:
            target, per_channel = m, 1
        elif c.op == "Flatten" and len(consumers.get(c.output, [])) == 1 and \
                isinstance(consumers[c.output][0].module, nn.Linear) and \
                consumers[c.output][0].module.in_features % width == 0:
            target = consumers[c.output][0].module
            per_channel = target.in_features // width  # NCHW flattening: channel o is a contiguous block
        else:
            return None
        if uses[id(target)] != 1 or id(target) not in names:
            return None
        found.append(Consumer(names[id(target)], per_channel))
    return found or None


def prunable_groups(model: nn.Module, skip_first: bool = False, skip_last: bool = False) -> list[ChannelGroup]:
    """The channel groups a filter-pruning method may touch, after the first/last-layer policy."""
    layers = [n for n, _ in masked_layers(model)]
    excluded = set(layers[:1] if skip_first else []) | set(layers[-1:] if skip_last else [])
    chosen = [g for g in channel_groups(model) if g.producer not in excluded]
    if not chosen:
        raise HydraPipeError("prune: granularity 'filter' found no removable channels in this architecture "
                             "(every layer feeds a residual sum or the output)")
    return chosen



# ----------------------------------------------------------------------------------------------------------------
# Physical removal
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def dead_channels(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Bool per output channel: the producer's filter is all zero and the channel is exactly 0 after the chain.

    A zero filter still emits its bias, then BatchNorm's shift; the channel is removable only when the constant
    that reaches the consumers (inference-mode BatchNorm, then ReLU) is exactly zero.
    """
    layer = model.get_submodule(group.producer)
    w = affine_weight(layer)
    zero_filter = ~w.detach().flatten(1).ne(0).any(1)
    c = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(w.shape[0], device=w.device)
    for name, op in zip(group.chain, group.ops):
        m = model.get_submodule(name) if name else None
        if op == "Relu":
            c = c.clamp_min(0)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            mean = m.running_mean if m.running_mean is not None else torch.zeros_like(c)
            var = m.running_var if m.running_var is not None else torch.ones_like(c)
            c = (c - mean) / torch.sqrt(var + m.eps)
            if m.affine:
                c = c * m.weight + m.bias
        elif isinstance(m, nn.LeakyReLU):
            c = torch.where(c > 0, c, c * m.negative_slope)
        # pooling and identity map a constant channel to the same constant (0 stays 0)
    return zero_filter & (c == 0)


def narrow(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every dead channel physically removed; ``model`` is unchanged.

    For each channel group, the producer loses the dead output filters (and bias entries), each BatchNorm in the
    chain the same entries, and each consumer the input slices that read them. Masked layers stay masked layers
    (mode ``fixed``, masks sliced the same way), so sparsity reports and the ONNX exporter work on the result.
    The copy computes what the masked network computes in inference mode (up to float summation order).
    """
    clone = copy.deepcopy(model).eval()
    groups = channel_groups(clone)
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}
    bn_keep: dict[str, torch.Tensor] = {}
    for g in groups:
        alive = ~dead_channels(clone, g)
        if not alive.any():
            alive[0] = True  # a zero-width tensor is not a valid ONNX graph; one zero channel is harmless
        if bool(alive.all()):
            continue
        idx = alive.nonzero().flatten()
        out_keep[g.producer] = idx
        for name in g.batchnorms:
            bn_keep[name] = idx
        for c in g.consumers:
            in_keep[c.name] = (idx[:, None] * c.per_channel + torch.arange(c.per_channel, device=idx.device)).flatten()
    for name in set(out_keep) | set(in_keep):
        _replace(clone, name, _slice_affine(clone.get_submodule(name), out_keep.get(name), in_keep.get(name)))
    for name, idx in bn_keep.items():
        _replace(clone, name, _slice_batchnorm(clone.get_submodule(name), idx))
    return clone


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def _slice_affine(layer: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    w = layer.weight.detach()
    rows = rows if rows is not None else torch.arange(w.shape[0], device=w.device)
    cols = cols if cols is not None else torch.arange(w.shape[1], device=w.device)
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        cls = MaskedConv2d if isinstance(layer, MaskedConv2d) else nn.Conv2d
        new = cls(len(cols), len(rows), layer.kernel_size, layer.stride, layer.padding, layer.dilation, 1, has_bias,
                  layer.padding_mode)
    else:
        cls = MaskedLinear if isinstance(layer, MaskedLinear) else nn.Linear
        new = cls(len(cols), len(rows), has_bias)
    new = new.to(device=w.device, dtype=w.dtype)
    new.weight.copy_(w[rows][:, cols])
    if has_bias:
        new.bias.copy_(layer.bias.detach()[rows])
    if isinstance(layer, Masked) and layer.mode != "dense":
        new.fix_mask(layer.mask().detach().expand_as(w)[rows][:, cols])
    new.train(layer.training)
    return new


@torch.no_grad()
def _slice_batchnorm(bn: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor) -> nn.Module:
    new = type(bn)(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new = new.to(device=idx.device)
    if bn.affine:
        new.weight.copy_(bn.weight[idx])
        new.bias.copy_(bn.bias[idx])
    if bn.track_running_stats:
        new.running_mean.copy_(bn.running_mean[idx])
        new.running_var.copy_(bn.running_var[idx])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def channel_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per channel group: output channels of the producer and how many are alive (not removable)."""
    return {g.producer: {"channels": int(g_dead.numel()), "kept": int((~g_dead).sum())}
            for g in channel_groups(model) for g_dead in [dead_channels(model, g)]}

