"""The audit's PGD: Madry et al.'s algorithm, its L-inf or L2 rule run on the batched row scheduler."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.engine import AttackResult, attack_threat, run_rows
from pipeline.attacks.options import AttackOptions
from pipeline.attacks.steps import Loss, pgd_rule
from pipeline.threat import Norm, ThreatModel


def default_step_size(eps: float, steps: int) -> float:
    """PGD's default constant step: :meth:`pipeline.threat.ThreatModel.step_size` (``2.5 eps / min(steps, 100)``)."""
    return ThreatModel(eps).step_size(steps)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: Norm = "linf",
               steps: int = 1000, restarts: int = 100, step_size: float | None = None, loss: Loss = "margin",
               options: AttackOptions = AttackOptions()) -> AttackResult:
    """Projected gradient descent with random restarts (Madry et al., ICLR 2018), worst case per example.

    For every example and each of ``restarts`` random starts in the ball ``{x' : |x' - x|_p <= eps, 0 <= x' <= 1}``
    (``norm`` "linf" or "l2"), iterate ``steps`` times::

        x_{t+1} = Proj(x_t + step_size * sign(grad))          # linf
        x_{t+1} = Proj(x_t + step_size * grad / |grad|_2)     # l2 (projection: rescale, then clip to [0, 1])

    with ``grad`` the gradient of the ``loss`` ("margin": ``max_{j != y} z_j - z_y`` as in Carlini & Wagner; "ce":
    cross-entropy). An example is robust only if it is correctly classified and *no* iterate of *any* restart is
    misclassified. Step size: constant, ``step_size`` or the threat model's :meth:`~ThreatModel.step_size`.

    Args:
        model: ``x -> logits``, inputs in [0, 1], on ``x``'s device. Put in eval mode with no parameter gradients
            for the call (restored after).
        x, y: ``[N, C, H, W]`` float in [0, 1] and ``[N]`` labels.
        options: what every attack shares (:class:`~pipeline.attacks.AttackOptions`: memory budget, seed, verified
            examples, the deployed model to confirm on, the examples' places in the whole set, the exits, threads,
            progress). ``exact_curves`` is on unless ``options`` turns it off.

    Example::

        res = pgd_attack(model, x, y, eps=0.1, steps=1000, restarts=100, options=AttackOptions(seed=1))
        res.robust_accuracy, res.robust_by_restart[:5], res.settled
    """
    threat = attack_threat(x, y, eps, norm)
    alpha = float(step_size) if step_size is not None else threat.step_size(steps)
    exact = options.exact_curves if options.exact_curves is not None else True
    return run_rows(model, x, y, pgd_rule(threat, alpha, loss), steps=steps, restarts=restarts, options=options,
                    exact_curves=exact)
