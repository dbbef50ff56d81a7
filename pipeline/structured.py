"""Structured (filter / channel) pruning and the physical removal of pruned channels.

Unstructured sparsity saves nothing in onnxruntime's dense kernels; removing whole output channels of a layer
gives a narrower network whose convolutions are genuinely cheaper. This module does three things:

1. **Channel groups** (:func:`channel_groups`): an output channel of a Conv2d / Linear can be removed when, between
   that layer (the *producer*) and the layers reading it (the *consumers*: Conv2d, or Linear after a Flatten),
   the tensor only passes through channel-wise ops (BatchNorm, ReLU, pooling, Identity) and at least one ReLU.
   A channel feeding a residual ``Add`` (ResNet's ``conv2`` and shortcuts) or the network output is not in any
   group, so in a ResNet only the inner channels of each block are pruned (Li et al., 2017, Sec. 4.2).
2. **Filter pruning**, HYDRA-style (Sehwag et al., NeurIPS 2020, appendix: structured pruning): every filter gets
   one importance score, initialised from the filter's L1 norm and scaled like the weight scores
   (``s_o = sqrt(6 / fan_in) * ||w_o||_1 / max_o ||w_o||_1``, so the first mask is the L1 mask), the mask keeps
   the top-k filter scores of each layer (:class:`pipeline.masking.GetSubnet`, straight-through gradient), and
   the scores are trained with the robust objective by the same loop as weight-level HYDRA
   (``train(..., what="scores")``). The baseline is LWM filter pruning: keep the filters of largest L1 norm
   (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017), and ``random``.
   A pruned channel must be *exactly zero* (not a BatchNorm constant) so that removing it changes nothing: during
   score training the channel is gated after its BatchNorm, and when the mask is frozen the channel's bias and
   BatchNorm affine parameters and running mean are zeroed (as network slimming does). A zero channel followed by
   a ReLU stays zero through finetuning: every gradient reaching it passes ``relu'(0) = 0``.
3. **Narrowing** (:func:`narrow`): a copy of the network with the dead channels physically removed (producer rows,
   BatchNorm entries, consumer input slices), which computes the same function as the masked network.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config import PruneParams
from pipeline.errors import HydraPipeError
from pipeline.masking import GetSubnet, MaskedConv2d, MaskedLinear, _Masked, keep_counts, masked_layers
from pipeline.onnx_io import as_graph
from pipeline.training import train

Granularity = Literal["weight", "filter"]

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
# Filter importance and masks
# ----------------------------------------------------------------------------------------------------------------

def filter_norms(layer: nn.Module) -> torch.Tensor:
    """L1 norm of each output filter ``||w_o||_1`` (Li et al., 2017), one entry per output channel."""
    return layer.weight.detach().flatten(1).abs().sum(1)


def _filter_shape(layer: nn.Module) -> tuple[int, ...]:
    """Shape of a per-filter tensor that broadcasts against the weight: (out, 1, 1, 1) or (out, 1)."""
    w = layer.weight
    return (w.shape[0],) + (1,) * (w.dim() - 1)


@torch.no_grad()
def init_filter_scores(layer: nn.Module, how: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """HYDRA's scaled initialisation at filter level: ``sqrt(6 / fan_in) * ||w_o||_1 / max ||w||_1``.

    ``kaiming`` (the ablation) draws the filter scores uniformly in ``[-sqrt(6 / fan_in), sqrt(6 / fan_in)]``.
    """
    bound = math.sqrt(6.0 / layer.weight[0].numel())
    if how == "scaled":
        norms = filter_norms(layer)
        s = bound * norms / norms.max().clamp_min(1e-12)
    elif how == "kaiming":
        s = torch.empty(layer.weight.shape[0], device=layer.weight.device).uniform_(-bound, bound, generator=generator)
    else:
        raise HydraPipeError(f"prune.score_init: {how!r} is not available for filter pruning; expected scaled or kaiming")
    return s.view(_filter_shape(layer))


def _layers(model: nn.Module, groups: list[ChannelGroup]) -> list:
    return [model.get_submodule(g.producer) for g in groups]


def _check_masked(model: nn.Module, groups: list[ChannelGroup]) -> None:
    for g, layer in zip(groups, _layers(model, groups)):
        if not isinstance(layer, _Masked):
            raise HydraPipeError(f"prune: layer {g.producer!r} is not a masked layer; build the model from the registry")


class _ChannelGates:
    """Forward hooks multiplying each group's channel (after its BatchNorm) by the producer's filter mask.

    Masking the weight alone leaves the BatchNorm shift (or the bias) in a pruned channel; the gate makes the
    channel exactly zero while the scores train, which is what the narrowed network computes.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.handles = []
        for g in groups:
            layer = model.get_submodule(g.producer)
            self.handles.append(model.get_submodule(g.gate).register_forward_hook(self._hook(layer)))

    @staticmethod
    def _hook(layer) -> Callable:
        def gate(module, inputs, out):
            mask = layer.mask().reshape(1, -1, *([1] * (out.dim() - 2)))
            return out * mask
        return gate

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def fold_channel_masks(model: nn.Module, groups: list[ChannelGroup], keep: list[torch.Tensor]) -> None:
    """Freeze the filter masks ``keep`` (bool per output channel) and make every pruned channel exactly zero.

    The producer's mask drops whole filters and their bias; each BatchNorm in the chain gets weight, bias and
    running mean zero for pruned channels, so BN(0) = 0 in training and inference mode; each consumer's mask drops
    the input slices that read pruned channels (dead weights, counted in the sparsity).
    """
    for g, k in zip(groups, keep):
        producer = model.get_submodule(g.producer)
        dead = ~k.to(torch.bool)
        _fix_mask(producer)
        producer.weight_mask[dead] = 0
        if producer.bias is not None:
            producer.bias[dead] = 0
        for name in g.batchnorms:
            bn = model.get_submodule(name)
            if bn.affine:
                bn.weight[dead] = 0
                bn.bias[dead] = 0
            if bn.running_mean is not None:
                bn.running_mean[dead] = 0
        for c in g.consumers:
            layer = model.get_submodule(c.name)
            if isinstance(layer, _Masked):
                _fix_mask(layer)
                cols = dead.repeat_interleave(c.per_channel)
                layer.weight_mask[:, cols] = 0
    for _, layer in masked_layers(model):
        if layer.mode == "fixed":
            layer.keep = int(layer.weight_mask.count_nonzero())


def _fix_mask(layer) -> None:
    """Put a layer in ``fixed`` mode with its current mask (all ones when it was dense)."""
    if layer.mode == "scores":
        layer.weight_mask.copy_(layer.mask().detach().expand_as(layer.weight))
    elif layer.mode == "dense":
        layer.weight_mask.fill_(1)
    layer.mode = "fixed"


def channel_keep(model: nn.Module, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Per group, which output channels the producer's current mask keeps (bool)."""
    out = []
    for layer in _layers(model, groups):
        m = layer.mask().detach() if layer.mode != "dense" else torch.ones_like(layer.weight)
        out.append(m.expand_as(layer.weight).flatten(1).any(1))
    return out


def prune_filters(model: nn.Module, data: Dataset, p: PruneParams) -> list[dict[str, float]]:
    """Filter-prune ``model`` in place, keeping ``p.keep_ratio`` of each group's filters with ``p.method``.

    ``hydra``: filter scores (scaled L1 init) trained with ``p.objective`` through ``train(..., what="scores")``,
    for ``p.epochs`` at each keep ratio of ``p.schedule_keep`` and then at ``p.keep_ratio``. ``lwm``: the filters
    of largest L1 norm. ``random``: seeded random filters. Returns HYDRA's per-epoch history (empty otherwise).
    """
    groups = prunable_groups(model, p.skip_first, p.skip_last)
    _check_masked(model, groups)
    layers = _layers(model, groups)
    g = torch.Generator().manual_seed(p.seed)
    if p.method in ("lwm", "random"):
        importance = [filter_norms(l) if p.method == "lwm" else torch.rand(l.weight.shape[0], generator=g)
                      for l in layers]
        counts = keep_counts(importance, p.keep_ratio, p.scope)
        keep = [GetSubnet.apply(imp, max(k, 1)).bool() for imp, k in zip(importance, counts)]
        fold_channel_masks(model, groups, keep)
        return []

    history: list[dict[str, float]] = []
    for layer in layers:
        layer.scores = nn.Parameter(init_filter_scores(layer, p.score_init, g), requires_grad=True)
        layer.mode = "scores"
    gates = _ChannelGates(model, groups)
    try:
        for ratio in [*p.schedule_keep, p.keep_ratio]:
            for layer, k in zip(layers, keep_counts([l.scores for l in layers], ratio, p.scope)):
                layer.keep = max(k, 1)
            for row in train(model, data, p, what="scores", bn=p.bn, label=f"prune filters to keep {ratio:g}"):
                history.append({**row, "keep_ratio": ratio})
        keep = channel_keep(model, groups)
        fold_channel_masks(model, groups, keep)
    finally:
        gates.remove()
        for layer in layers:
            layer.scores = nn.Parameter(torch.zeros_like(layer.weight), requires_grad=False)
    return history


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
    w = layer.effective_weight() if isinstance(layer, _Masked) else layer.weight
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
    if isinstance(layer, _Masked):
        new.scores = nn.Parameter(torch.zeros_like(new.weight), requires_grad=False)
        if layer.mode != "dense":
            mask = layer.mask().detach().expand_as(w)
            new.weight_mask.copy_(mask[rows][:, cols])
            new.keep = int(new.weight_mask.count_nonzero())
            new.mode = "fixed"
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
