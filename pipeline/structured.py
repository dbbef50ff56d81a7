"""Structured (filter) pruning, HYDRA-style (Sehwag et al., NeurIPS 2020, appendix: structured pruning).

Every filter gets one importance score, initialised from the filter's L1 norm and scaled like the weight scores
(``s_o = sqrt(6 / fan_in) * ||w_o||_1 / max_o ||w_o||_1``, so the first mask is the L1 mask), the mask keeps the
top-k filter scores of each layer (:class:`pipeline.masking.GetSubnet`, straight-through gradient), and the scores
are trained with the robust objective by the same loop as weight-level HYDRA (``train(..., what="scores")``). The
baseline is LWM filter pruning: keep the filters of largest L1 norm (Li et al., "Pruning Filters for Efficient
ConvNets", ICLR 2017), and ``random``. Which channels may be cut at all is :func:`pipeline.channels.channel_groups`.

A pruned channel must be *exactly zero* (not a BatchNorm constant) so that removing it changes nothing
(:func:`pipeline.channels.narrow`): during score training the channel is gated after its BatchNorm, and when the
mask is frozen the channel's bias and BatchNorm affine parameters and running mean are zeroed (as network slimming
does). A zero channel followed by a ReLU stays zero through finetuning: every gradient reaching it passes
``relu'(0) = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.channels import ChannelGroup, prunable_groups
from pipeline.config import ComputeParams, PruneParams
from pipeline.errors import HydraPipeError
from pipeline.masking import GetSubnet, LearnedRates, Masked, keep_counts
from pipeline.training import resume_label, train

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
        if not isinstance(layer, Masked):
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
        producer.drop(outputs=dead)
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
            if isinstance(layer, Masked):
                layer.drop(inputs=dead.repeat_interleave(c.per_channel))


def channel_keep(model: nn.Module, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Per group, which output channels the producer's current mask keeps (bool)."""
    out = []
    for layer in _layers(model, groups):
        m = layer.mask().detach() if layer.mode != "dense" else torch.ones_like(layer.weight)
        out.append(m.expand_as(layer.weight).flatten(1).any(1))
    return out


def prune_filters(model: nn.Module, data: Dataset, p: PruneParams, resume_dir: Path | None = None,
                  resume_key: str = "", compute: ComputeParams | None = None) -> list[dict[str, float]]:
    """Filter-prune ``model`` in place, keeping ``p.keep_ratio`` of each group's filters with ``p.method``
    (``p.rates``: of each group, under one threshold, or learned per group with the scores, exactly ``keep_ratio`` of
    all filters).

    ``hydra``: filter scores (scaled L1 init) trained with ``p.objective`` through ``train(..., what="scores")``,
    for ``p.epochs`` at each keep ratio of ``p.schedule_keep`` and then at ``p.keep_ratio``. ``lwm``: the filters
    of largest L1 norm. ``random``: seeded random filters. Returns HYDRA's per-epoch history (empty otherwise).
    ``resume_dir``: each score training keeps its resume state in its own subfolder (:func:`pipeline.training.train`).
    """
    groups = prunable_groups(model, p.skip_first, p.skip_last)
    _check_masked(model, groups)
    layers = _layers(model, groups)
    g = torch.Generator().manual_seed(p.seed)
    if p.method in ("lwm", "random"):
        importance = [filter_norms(l) if p.method == "lwm" else torch.rand(l.weight.shape[0], generator=g)
                      for l in layers]
        counts = keep_counts(importance, p.keep_ratio, p.rates)  # type: ignore[arg-type]
        keep = [GetSubnet.apply(imp, max(k, 1)).bool() for imp, k in zip(importance, counts)]
        fold_channel_masks(model, groups, keep)
        return []

    history: list[dict[str, float]] = []
    for layer in layers:
        layer.use_scores(init_filter_scores(layer, p.score_init, g))
    gates = _ChannelGates(model, groups)
    learned: LearnedRates | None = None
    try:
        for step, ratio in enumerate([*p.schedule_keep, p.keep_ratio]):
            if p.rates == "learned":  # per-layer filter rates train with the filter scores (LearnedRates)
                if learned is None:
                    start = (keep_counts([filter_norms(l) for l in layers], ratio, "global")
                             if p.rate_start == "global" else None)
                    learned = LearnedRates(layers, ratio, p.rate_min, start)
                else:
                    learned.set_budget(ratio)
            else:
                # global: one threshold over the filters' L1 norms, as LWM (the scaled scores are per-layer scales)
                counts = keep_counts([filter_norms(l) for l in layers], ratio, p.rates)  # type: ignore[arg-type]
                for layer, k in zip(layers, counts):
                    layer.set_keep(max(k, 1))
            label = f"prune filters to keep {ratio:g}"
            state = resume_dir / f"{step}-{resume_label(label)}" if resume_dir is not None else None
            for row in train(model, data, p, what="scores", bn=p.bn, label=label, resume_dir=state,
                             resume_key=resume_key, compute=compute):
                history.append({**row, "keep_ratio": ratio})
        keep = channel_keep(model, groups)
        fold_channel_masks(model, groups, keep)
    finally:
        gates.remove()
        if learned is not None:
            learned.release()
        for layer in layers:
            layer.reset_scores()
    return history

