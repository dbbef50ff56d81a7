"""The PGD that training objectives run on each batch (Madry et al., 2018): plain L-inf, one start, no restarts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
                random_start: bool = True,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """L-inf PGD (Madry et al., ICLR 2018) used inside training objectives: maximise ``loss_fn(model(x'), y)``
    over the eps-ball in [0, 1].

    ``x`` in [0, 1]; returns a detached ``x'`` with ``|x' - x|_inf <= eps`` and ``0 <= x' <= 1``. The model's
    parameters receive no gradient from the attack. ``loss_fn`` defaults to cross-entropy (TRADES passes its KL).
    """
    if eps == 0 or steps == 0:
        return x.detach()
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))
    x0 = x.detach()
    delta = torch.empty_like(x0).uniform_(-eps, eps) if random_start else torch.zeros_like(x0)
    x_adv = (x0 + delta).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return x_adv.detach()
