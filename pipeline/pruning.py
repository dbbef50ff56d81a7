"""Pruning methods by name, one code path: ``hydra`` (scores trained with the robust objective), and the
baselines ``lwm`` (least weight magnitude, one shot), ``random`` and ``admm`` (weights trained towards a sparse
copy with the robust objective, Ye et al. 2019).

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

ADMM (Ye et al., "Adversarial Robustness vs. Model Compression, or Both?", ICCV 2019; their code's
``admm.py``): the *weights* train, with the robust objective plus ``rho/2 sum_l ||W_l - Z_l + U_l||^2``
(:func:`pipeline.objectives.added_penalty`), in the same training loop as every stage (resume, NaN checks, workers).
``Z_l`` starts as the top-k projection of ``W_l``, ``U_l`` at zero; every ``admm_update_every`` epochs
``Z = top-k(W + U)`` per layer (the keep ratio), ``U += W - Z`` and ``rho`` grows ``admm_rho_growth``-fold. At the
end ``W`` is hard-pruned to its own top-k ``|W|`` (the authors' ``masking()``: ``weight_pruning`` of ``W`` alone,
not of ``W + U``, whose ``U`` grows exactly on the weights ADMM pushed to zero); the finetune stage retrains the
kept weights with that mask frozen. ``Z``, ``U`` and the update count are buffers of the pruned layers while ADMM
runs, so the training loop's resume states carry them (a killed run continues bit for bit), and are removed
afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config import ComputeParams, PruneParams
from pipeline.errors import HydraPipeError
from pipeline.masking import (LearnedRates, MaskedLayer, apply_fixed_masks, freeze_masks, keep_counts,
                              prunable_layers, set_score_keep, start_score_pruning, topk_masks)
from pipeline.objectives import added_penalty
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
    apply_fixed_masks(layers, [layer.weight.detach().abs() for _, layer in layers], p.keep_ratio, p.rates)
    return []


@PRUNE_METHODS.register("random")
def random_mask(model: nn.Module, layers: list[tuple[str, MaskedLayer]], data: Dataset, p: PruneParams,
                **_resume: object) -> list:
    """A seeded random mask with the same per-layer (or global) counts."""
    g = torch.Generator().manual_seed(p.seed)
    apply_fixed_masks(layers, [torch.rand(layer.weight.shape, generator=g) for _, layer in layers],
                      p.keep_ratio, p.rates)
    return []


@PRUNE_METHODS.register("hydra")
def hydra(model: nn.Module, layers: list[tuple[str, MaskedLayer]], data: Dataset, p: PruneParams,
          resume_dir: Path | None = None, resume_key: str = "",
          compute: ComputeParams | None = None) -> list[dict[str, float]]:
    """HYDRA (Alg. 1): scores from ``p.score_init``, trained with ``p.objective`` while the weights stay frozen.

    Multi-step pruning (``p.schedule_keep``) trains the scores for ``p.epochs`` at each keep ratio of the schedule
    before the final one, starting each step from the previous step's scores. ``p.rates: learned``: per-layer rates
    train with the scores, the whole model on exactly each step's keep ratio (:class:`pipeline.masking.LearnedRates`).
    """
    history: list[dict[str, float]] = []
    g = torch.Generator().manual_seed(p.seed)
    fixed = "uniform" if p.rates == "learned" else p.rates
    learned: LearnedRates | None = None
    for step, keep in enumerate([*p.schedule_keep, p.keep_ratio]):
        if step == 0:
            start_score_pruning(layers, keep, p.score_init, fixed, generator=g)
            if p.rates == "learned":
                start = (keep_counts([l.weight.detach() for _, l in layers], keep, "global")
                         if p.rate_start == "global" else None)
                learned = LearnedRates([layer for _, layer in layers], keep, p.rate_min, start)
        elif learned is not None:
            learned.set_budget(keep)
        else:
            set_score_keep(layers, keep, p.rates)
        label = f"prune to keep {keep:g}"
        # one resume folder per step: the step index keeps a schedule that repeats a ratio apart
        state = resume_dir / f"{step}-{resume_label(label)}" if resume_dir is not None else None
        for row in train(model, data, p, what="scores", bn=p.bn, label=label, resume_dir=state, resume_key=resume_key,
                         compute=compute):
            history.append({**row, "keep_ratio": keep})
    freeze_masks(model)
    return history


ADMM_BUFFERS = ("admm_z", "admm_u", "admm_updates")


@torch.no_grad()
def admm_project(tensors: list[torch.Tensor], keep_ratio: float, rates: str = "uniform") -> list[torch.Tensor]:
    """ADMM's Z-step: each tensor with all but its top-k ``|entries|`` set to zero (the keep ratio, per layer or
    under one global threshold); exactly ``ceil(keep_ratio * n)`` entries stay per layer."""
    counts = keep_counts(tensors, keep_ratio, rates)  # type: ignore[arg-type]
    out = []
    for t, k in zip(tensors, counts):
        mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        mask[t.detach().abs().flatten().topk(min(k, t.numel()), sorted=False).indices] = 1
        out.append(t * mask.view_as(t))
    return out


def admm_rho(p: PruneParams, updates: int) -> float:
    """rho after ``updates`` Z, U updates: ``admm_rho * admm_rho_growth ** updates``."""
    return p.admm_rho * p.admm_rho_growth ** updates


def admm_penalty(layers: list[tuple[str, MaskedLayer]], rho: float) -> torch.Tensor:
    """``rho/2 sum_l ||W_l - Z_l + U_l||^2`` over the pruned layers (their ADMM buffers)."""
    return rho / 2 * sum(((layer.weight - layer.admm_z + layer.admm_u) ** 2).sum() for _, layer in layers)


@torch.no_grad()
def _admm_update(layers: list[tuple[str, MaskedLayer]], p: PruneParams) -> None:
    """``Z = top-k(W + U)``, ``U += W - Z`` for every pruned layer, and one more update counted."""
    zs = admm_project([layer.weight + layer.admm_u for _, layer in layers], p.keep_ratio, p.rates)
    for (_, layer), z in zip(layers, zs):
        layer.admm_u.add_(layer.weight - z)
        layer.admm_z.copy_(z)
        layer.admm_updates.add_(1)


def admm_hard_prune(layers: list[tuple[str, MaskedLayer]], p: PruneParams) -> None:
    """ADMM's final hard prune as the authors' ``masking()`` does it: each layer keeps its largest ``|W|`` (their
    ``weight_pruning`` of the weight alone); ``U`` plays no part."""
    apply_fixed_masks(layers, [layer.weight.detach().abs() for _, layer in layers], p.keep_ratio, p.rates)


@PRUNE_METHODS.register("admm")
def admm(model: nn.Module, layers: list[tuple[str, MaskedLayer]], data: Dataset, p: PruneParams,
         resume_dir: Path | None = None, resume_key: str = "",
         compute: ComputeParams | None = None) -> list[dict[str, float]]:
    """ADMM pruning with the robust objective (module docstring): ``p.epochs`` epochs of weight training with the
    penalty, then the hard prune by ``|W|`` to ``p.keep_ratio`` (``p.rates``: uniform or global). Returns the
    per-epoch history (its loss includes the penalty) with each epoch's ``rho``."""
    if p.schedule_keep:
        raise HydraPipeError("prune.schedule_keep: multi-step schedules are HYDRA's; method admm prunes to "
                             "prune.keep_ratio in one ADMM run")
    zs = admm_project([layer.weight.detach() for _, layer in layers], p.keep_ratio, p.rates)
    for (_, layer), z in zip(layers, zs):  # Z0 = projection of W0, U0 = 0 (the authors' admm_initialization)
        layer.register_buffer("admm_z", z.clone())
        layer.register_buffer("admm_u", torch.zeros_like(layer.weight, requires_grad=False))
        layer.register_buffer("admm_updates", torch.zeros((), dtype=torch.long, device=layer.weight.device))
    counter = layers[0][1].admm_updates

    def penalty(progress: float) -> torch.Tensor:
        # the epoch this step is in (progress = step / steps of the stage); a Z, U update opens every period
        epoch = math.floor(progress * p.epochs + 1e-6)
        due = epoch // p.admm_update_every
        while int(counter) < due:  # after a resume the buffers already hold the updates done
            _admm_update(layers, p)
        return admm_penalty(layers, admm_rho(p, int(counter)))

    try:
        with added_penalty(penalty):
            history = train(model, data, p, what="weights", bn=p.bn, label=f"admm to keep {p.keep_ratio:g}",
                            resume_dir=resume_dir, resume_key=resume_key, compute=compute)
        for row in history:
            row["rho"] = admm_rho(p, (int(row["epoch"]) - 1) // p.admm_update_every)
        admm_hard_prune(layers, p)
    finally:
        for _, layer in layers:
            for name in ADMM_BUFFERS:
                if name in layer._buffers:
                    delattr(layer, name)
    return history


def lwm_kept_weights(weights: Mapping[str, np.ndarray], keep_ratio: float, rates: str = "uniform",
                     counts: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """The weights least-weight-magnitude pruning would keep (pruned entries zero), for comparison plots; ``counts``
    (layer -> kept) instead of ``rates`` keeps as many per layer as another mask (learned rates)."""
    if counts is not None:
        masks = [torch.from_numpy(np.abs(w)).flatten().argsort(descending=True, stable=True).argsort(stable=True)
                 .lt(counts[n]).view(w.shape) for n, w in weights.items()]
    else:
        masks = topk_masks([torch.from_numpy(np.abs(w)) for w in weights.values()], keep_ratio,
                           rates)  # type: ignore[arg-type]
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
