"""One training loop for pretrain, prune and finetune: *what* trains (weights or HYDRA scores) is a parameter."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.attacks import pgd_perturb
from pipeline.config import TrainParams
from pipeline.data import loader
from pipeline.masking import score_parameters, weight_parameters
from pipeline.objectives import get_objective
from pipeline.reporting import progress_bar
from pipeline.runtime import device_of, eval_mode, frozen, seed_everything
from pipeline.threat import ThreatModel

Trainable = Literal["weights", "scores"]


def trainable_parameters(model: nn.Module, what: Trainable) -> list[nn.Parameter]:
    """Weights and biases (scores excluded), or only the importance scores of scored layers; everything else is
    frozen for the stage."""
    chosen = list(score_parameters(model)) if what == "scores" else [p for _, p in weight_parameters(model)]
    ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return chosen


def _release(model: nn.Module) -> None:
    """After a stage: weights trainable again, scores frozen (the state a checkpoint is saved and loaded in)."""
    weights = {id(p) for _, p in weight_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in weights)


def _optimizer(params: Iterable[nn.Parameter], p: TrainParams) -> torch.optim.Optimizer:
    if p.optimizer == "adam":
        return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, nesterov=p.momentum > 0)


def _set_bn(model: nn.Module, mode: Literal["train", "eval"]) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(mode == "train")


def train(model: nn.Module, data: Dataset, p: TrainParams, what: Trainable = "weights",
          bn: Literal["train", "eval"] = "train", label: str = "train") -> list[dict[str, float]]:
    """Minimise ``p.objective`` over ``data`` for ``p.epochs`` epochs; returns one row per epoch.

    ``what="scores"`` is HYDRA's pruning step: weights and biases are frozen and only the importance scores of
    layers in ``scores`` mode move. ``bn`` chooses whether BatchNorm statistics update during training.
    """
    history: list[dict[str, float]] = []
    if p.epochs == 0:
        return history
    seed_everything(p.seed)
    params = trainable_parameters(model, what)
    if not params:
        raise ValueError(f"{label}: nothing to train ({what})")
    loss_fn = get_objective(p.objective)
    opt = _optimizer(params, p)
    batches = loader(data, p.batch_size, shuffle=True, seed=p.seed)
    total = p.epochs * len(batches)
    sched = None
    if p.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    dev = device_of(model)
    step = 0
    with progress_bar() as bar:
        task = bar.add_task(f"{label} ({p.objective}, {what})", total=total)
        for epoch in range(p.epochs):
            model.train()
            if bn == "eval":
                _set_bn(model, "eval")
            seen, loss_sum = 0, 0.0
            for x, y in batches:
                x, y = x.to(dev), y.to(dev)
                loss = loss_fn(model, x, y, p, step / total)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                with torch.no_grad():
                    seen += len(y)
                    loss_sum += float(loss) * len(y)
                bar.advance(task)
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "lr": opt.param_groups[0]["lr"]})
    _release(model)
    return history


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    model.eval()
    dev = device_of(model)
    correct = total = 0
    for x, y in loader(data, batch_size, shuffle=False):
        correct += int((model(x.to(dev)).argmax(1) == y.to(dev)).sum())
        total += len(y)
    return correct / max(total, 1)


def pgd_accuracy(model: nn.Module, data: Dataset, eps: float, steps: int = 20, restarts: int = 1,
                 batch_size: int = 512, seed: int = 0) -> float:
    """Quick robust accuracy for stage metrics and benchmarks (the audit is the thorough measurement).

    An example counts as robust only if it survives every restart (worst case per example).
    """
    step_size = ThreatModel(eps).step_size(steps)
    dev = device_of(model)
    torch.manual_seed(seed)
    robust = total = 0
    with eval_mode(model), frozen(model):
        for x, y in loader(data, batch_size, shuffle=False):
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                alive = model(x).argmax(1) == y
            for _ in range(restarts):
                if not alive.any():
                    break
                xa = pgd_perturb(model, x[alive], y[alive], eps, step_size, steps)
                with torch.no_grad():
                    still = model(xa).argmax(1) == y[alive]
                alive[alive.clone()] = still
            robust += int(alive.sum())
            total += len(y)
    return robust / max(total, 1)
