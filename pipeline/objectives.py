"""Training losses by name. Each is ``loss(model, x, y, params, progress) -> scalar``.

``progress`` in [0, 1] is how far training has come (for ramped objectives such as IBP's eps schedule). The same
objectives train weights (pretrain, finetune) and HYDRA's importance scores (prune): the loop decides what trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import pgd_perturb
from pipeline.config import TrainParams

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, TrainParams, float], torch.Tensor]
_REGISTRY: dict[str, Loss] = {}


def register_objective(name: str):
    def deco(fn: Loss) -> Loss:
        _REGISTRY[name] = fn
        return fn

    return deco


def get_objective(name: str) -> Loss:
    if name not in _REGISTRY:
        from pipeline.errors import HydraPipeError

        raise HydraPipeError(f"objective: {name!r} is not implemented; expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def objective_names() -> list[str]:
    return sorted(_REGISTRY)


@register_objective("benign")
def benign(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    # Restores each module's own mode, not model.train(): the prune stage may hold BatchNorm in eval (prune.bn)
    # while the rest of the model trains, and that choice must survive the attack.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, loss_fn=None) -> torch.Tensor:
    # The attack runs with the model in eval mode so BatchNorm statistics are not updated by adversarial
    # iterates (as in the HYDRA and TRADES code), then the previous modes are restored for the loss.
    with _eval_mode(model):
        return pgd_perturb(model, x, y, p.eps, p.step_size, p.attack_steps, loss_fn=loss_fn)


@register_objective("pgd")
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    """Madry et al. (2018): cross-entropy on the L-inf PGD adversarial example."""
    return F.cross_entropy(model(_attack(model, x, y, p)), y)


@register_objective("trades")
def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    """Zhang et al. (2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL (HYDRA's default)."""
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)

    def kl(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="batchmean")

    with _eval_mode(model):
        # TRADES starts from a small Gaussian perturbation rather than the uniform ball
        x_start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        x_adv = pgd_perturb(model, x_start, y, p.eps, p.step_size, p.attack_steps, random_start=False, loss_fn=kl)
        x_adv = torch.min(torch.max(x_adv, x - p.eps), x + p.eps).clamp(0, 1)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + p.trades_beta * robust
