"""Pruning methods by name, one code path: ``hydra`` (scores trained with the robust objective), and the
baselines ``lwm`` (least weight magnitude, one shot) and ``random``.

HYDRA (Sehwag et al., NeurIPS 2020, Alg. 1): with the pretrained weights frozen, give every connection an
importance score initialised from the weights (``scaled`` init), keep the top-k scores of each layer in the
forward pass, pass gradients straight through to all scores, and minimise the robust loss with SGD on the scores
alone. The resulting mask is then frozen and the kept weights are finetuned (the finetune stage).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config import PruneParams
from pipeline.masking import apply_fixed_masks, freeze_masks, prunable_layers, set_score_keep, start_score_pruning
from pipeline.structured import prune_filters
from pipeline.training import train


def prune(model: nn.Module, data: Dataset, p: PruneParams) -> list[dict[str, float]]:
    """Prune ``model`` in place to ``p.keep_ratio`` with ``p.method``; returns HYDRA's per-epoch history.

    Multi-step pruning (``p.schedule_keep``) trains the scores for ``p.epochs`` at each keep ratio of the schedule
    before the final one, starting each step from the previous step's scores.
    """
    if p.granularity == "filter":  # whole output channels, removable from the deployed graph
        return prune_filters(model, data, p)
    layers = prunable_layers(model, p.skip_first, p.skip_last)
    if p.method == "lwm":
        apply_fixed_masks(layers, [layer.weight.detach().abs() for _, layer in layers], p.keep_ratio, p.scope)
        return []
    if p.method == "random":
        g = torch.Generator().manual_seed(p.seed)
        apply_fixed_masks(layers, [torch.rand(layer.weight.shape, generator=g) for _, layer in layers],
                          p.keep_ratio, p.scope)
        return []
    history: list[dict[str, float]] = []
    g = torch.Generator().manual_seed(p.seed)
    for step, keep in enumerate([*p.schedule_keep, p.keep_ratio]):
        if step == 0:
            start_score_pruning(layers, keep, p.score_init, p.scope, generator=g)
        else:
            set_score_keep(layers, keep, p.scope)
        for row in train(model, data, p, what="scores", bn=p.bn, label=f"prune to keep {keep:g}"):
            history.append({**row, "keep_ratio": keep})
    freeze_masks(model)
    return history
