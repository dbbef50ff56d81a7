"""Pruning methods by name, one code path: ``hydra`` (scores trained with the robust objective), and the
baselines ``lwm`` (least weight magnitude, one shot) and ``random``.

HYDRA (Sehwag et al., NeurIPS 2020, Sec. 3, Alg. 1; the authors' ``train.py --exp-mode prune``): with the
pretrained weights frozen, give every connection an importance score initialised from the weights (``scaled``
init), keep the top-k ``|score|`` of each layer in the forward pass, pass gradients straight through to all scores,
and minimise the robust loss over the scores alone. The resulting mask is then frozen and the kept weights are
finetuned (the finetune stage).

BatchNorm during score training (``prune.bn``): ``train`` (default) normalises with batch statistics and lets the
running statistics follow the sub-network, as the authors' code does (the model is in train mode); ``eval`` keeps
the pretrained network's statistics. Either way BatchNorm's affine parameters stay frozen with the weights: only
scores train. (The authors' ``freeze_vars`` leaves BatchNorm's affine parameters trainable unless ``--freeze-bn``;
the paper's text freezes all weights, which is what we do.) The training attack always runs in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config import ComputeParams, PruneParams
from pipeline.masking import (MaskedLayer, apply_fixed_masks, freeze_masks, prunable_layers, set_score_keep,
                              start_score_pruning, topk_masks)
from pipeline.registry import Registry
from pipeline.structured import prune_filters
from pipeline.training import resume_label, train


# (model, layers, data, params, *, resume_dir, resume_key) -> HYDRA's per-epoch history
PruneMethod = Callable[..., list[dict[str, float]]]
PRUNE_METHODS: Registry[PruneMethod] = Registry("pruning method", "prune.method")


def prune(model: nn.Module, data: Dataset, p: PruneParams, resume_dir: Path | None = None,
          resume_key: str = "", compute: ComputeParams | None = None) -> list[dict[str, float]]:
    """Prune ``model`` in place to ``p.keep_ratio`` with ``p.method``; returns HYDRA's per-epoch history.

    ``p.granularity: filter`` prunes whole output channels instead (:func:`pipeline.structured.prune_filters`).
    ``resume_dir``: each score training of the schedule keeps its resume state in its own subfolder
    (:func:`pipeline.training.train`). ``compute``: workers, precision, memory format of the score training.
    """
    if p.granularity == "filter":  # whole output channels, removable from the deployed graph
        return prune_filters(model, data, p, resume_dir=resume_dir, resume_key=resume_key, compute=compute)
    method = PRUNE_METHODS.get(p.method)
    return method(model, prunable_layers(model, p.skip_first, p.skip_last), data, p, resume_dir=resume_dir,
                  resume_key=resume_key, compute=compute)


@PRUNE_METHODS.register("lwm")
def lwm(model: nn.Module, layers: list[tuple[str, MaskedLayer]], data: Dataset, p: PruneParams,
        **_resume: object) -> list:
    """Least weight magnitude, one shot: keep the largest ``|w|`` (Han et al. 2015; the paper's baseline)."""
    apply_fixed_masks(layers, [layer.weight.detach().abs() for _, layer in layers], p.keep_ratio, p.scope)
    return []


@PRUNE_METHODS.register("random")
def random_mask(model: nn.Module, layers: list[tuple[str, MaskedLayer]], data: Dataset, p: PruneParams,
                **_resume: object) -> list:
    """A seeded random mask with the same per-layer (or global) counts."""
    g = torch.Generator().manual_seed(p.seed)
    apply_fixed_masks(layers, [torch.rand(layer.weight.shape, generator=g) for _, layer in layers],
                      p.keep_ratio, p.scope)
    return []


@PRUNE_METHODS.register("hydra")
def hydra(model: nn.Module, layers: list[tuple[str, MaskedLayer]], data: Dataset, p: PruneParams,
          resume_dir: Path | None = None, resume_key: str = "",
          compute: ComputeParams | None = None) -> list[dict[str, float]]:
    """HYDRA (Alg. 1): scores from ``p.score_init``, trained with ``p.objective`` while the weights stay frozen.

    Multi-step pruning (``p.schedule_keep``) trains the scores for ``p.epochs`` at each keep ratio of the schedule
    before the final one, starting each step from the previous step's scores.
    """
    history: list[dict[str, float]] = []
    g = torch.Generator().manual_seed(p.seed)
    for step, keep in enumerate([*p.schedule_keep, p.keep_ratio]):
        if step == 0:
            start_score_pruning(layers, keep, p.score_init, p.scope, generator=g)
        else:
            set_score_keep(layers, keep, p.scope)
        label = f"prune to keep {keep:g}"
        # one resume folder per step: the step index keeps a schedule that repeats a ratio apart
        state = resume_dir / f"{step}-{resume_label(label)}" if resume_dir is not None else None
        for row in train(model, data, p, what="scores", bn=p.bn, label=label, resume_dir=state, resume_key=resume_key,
                         compute=compute):
            history.append({**row, "keep_ratio": keep})
    freeze_masks(model)
    return history


def lwm_kept_weights(weights: Mapping[str, np.ndarray], keep_ratio: float, scope: str = "layer") -> dict[str, np.ndarray]:
    """The weights least-weight-magnitude pruning would keep (pruned entries zero), for comparison plots."""
    masks = topk_masks([torch.from_numpy(np.abs(w)) for w in weights.values()], keep_ratio, scope)  # type: ignore[arg-type]
    return {name: w * m.numpy().astype(w.dtype) for (name, w), m in zip(weights.items(), masks)}


def kept_weight_histogram(pretrained: Mapping[str, np.ndarray], kept: Mapping[str, Mapping[str, np.ndarray]],
                          bins: int = 40) -> list[dict[str, float]]:
    """The paper's weight histogram (Sehwag et al. 2020, Fig. 3): |pretrained weights| against those each mask keeps.

    ``kept`` maps a column name (``"lwm"``, ``"mask"`` ...) to each layer's weights with pruned entries zero.
    Magnitudes are divided by their layer's largest |pretrained weight| so layers share one axis, and each column
    is a distribution (fractions summing to 1) so a 1%-dense mask compares in shape with the dense network:
    LWM keeps only the right tail; HYDRA keeps some small weights and drops some large ones.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    scale = {k: float(np.abs(w).max()) or 1.0 for k, w in pretrained.items()}

    def distribution(layers: Mapping[str, np.ndarray], nonzero_only: bool) -> np.ndarray:
        mags = np.concatenate([np.abs(w[w != 0] if nonzero_only else w).ravel() / scale[k] for k, w in layers.items()])
        h, _ = np.histogram(np.clip(mags, 0.0, 1.0), edges)
        return h / max(int(h.sum()), 1)

    columns = {"pretrained": distribution(pretrained, False)}
    columns |= {f"kept_{name}": distribution(layers, True) for name, layers in kept.items()}
    centres = (edges[:-1] + edges[1:]) / 2
    return [{"magnitude": round(float(c), 4), **{k: round(float(v[i]), 6) for k, v in columns.items()}}
            for i, c in enumerate(centres)]
