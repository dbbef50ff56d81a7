"""The audit's PGD: Madry et al.'s algorithm, its L-inf or L2 rule run on the batched row scheduler."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.engine import CONFIRM_MARGIN, AttackResult, Confirm, Progress, attack_threat, run_rows
from pipeline.attacks.steps import Loss, pgd_rule
from pipeline.threat import Norm, ThreatModel


def default_step_size(eps: float, steps: int) -> float:
    """PGD's default constant step: :meth:`pipeline.threat.ThreatModel.step_size` (``2.5 eps / min(steps, 100)``)."""
    return ThreatModel(eps).step_size(steps)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: Norm = "linf",
               steps: int = 1000, restarts: int = 100, step_size: float | None = None, loss: Loss = "margin",
               batch_size: int = 4096, seed: int = 0, verified: torch.Tensor | None = None,
               confirm: Confirm | None = None, early_exit: bool = True, exact_curves: bool = True,
               cycle_exit: bool = True, threads: int | None = None, progress: Progress | None = None,
               index: torch.Tensor | None = None, confirm_margin: float = CONFIRM_MARGIN) -> AttackResult:
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
        batch_size: memory budget, rows (examples x restarts) per forward pass. Each row holds its iterate, its
            box (L-inf) or centre (L2), its gradient and the last ``CYCLE`` iterates: about ``8 x batch_size x
            input size`` floats, plus the model's activations. On CPU, 1-4k rows run fastest per row for small
            models (cache); on GPU, larger is better.
        seed: random starts are drawn per (example, restart) from it: reproducible, and independent of batching.
        verified: bool ``[N]``, examples proven robust by a sound verifier: counted robust, never attacked.
        confirm: ``x (numpy) -> logits`` of the deployed model. A misclassified iterate counts only if the
            deployed model misclassifies it too; rejected candidates are counted and the example stays attacked.
        confirm_margin: with ``confirm``, iterates the attacked model classifies correctly by a margin below this
            are put to the deployed model too, and count as breaks where it misclassifies them
            (``near_boundary_checked`` counts them; 0 turns this off). Default: ``engine.CONFIRM_MARGIN``.
        early_exit, exact_curves, cycle_exit: the exits described in :mod:`pipeline.attacks.engine` (turn off to
            measure them). ``exact_curves`` keeps the lower restarts of a broken example running until they break
            or finish, so ``robust_by_restart`` is exact; without it the whole example leaves at its first break.
        progress: called as ``progress(settled_examples, n)``.
        index: long ``[N]``, each example's place in a larger set the caller attacks in parts (default
            ``0..N-1``). It seeds the example's random starts, so a part gives exactly the verdicts the whole set
            would (the audit attacks in chunks it can journal).

    Example::

        res = pgd_attack(model, x, y, eps=0.1, steps=1000, restarts=100)
        res.robust_accuracy, res.robust_by_restart[:5], res.settled
    """
    threat = attack_threat(x, y, eps, norm)
    alpha = float(step_size) if step_size is not None else threat.step_size(steps)
    return run_rows(model, x, y, pgd_rule(threat, alpha, loss), steps=steps, restarts=restarts,
                    batch_size=batch_size, seed=seed, verified=verified, confirm=confirm, early_exit=early_exit,
                    exact_curves=exact_curves, cycle_exit=cycle_exit, threads=threads, progress=progress,
                    index=index, confirm_margin=confirm_margin)
