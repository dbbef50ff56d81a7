"""APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"): AutoAttack's gradient attacks, as a step rule on the batched row scheduler.

APGD is PGD with momentum and a step size that needs no tuning: it starts at ``2 eps`` and halves at checkpoints
``w_j = ceil(p_j N)`` (``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) when, since
the last checkpoint, the loss rose in at most ``rho = 0.75`` of the steps (condition 1) or the step size was not
halved at the last checkpoint and the best loss has not risen since (condition 2); a halving also moves the row back
to its best point. Every quantity of that schedule is per row (:class:`APGDState`), so rows join and leave the
batch with their own schedule and the engine's early exits apply as they do to PGD. The iterates are not a fixed
map (momentum, step size), so the cycle exit does not apply. The checkpoint arithmetic is AutoAttack's
(``autopgd_base.py``): intervals ``max(int(0.22 N), 1)`` shrinking by ``max(int(0.03 N), 1)`` down to
``max(int(0.06 N), 1)``, condition 1 as "at most", not "below"; condition 1 compares each step's loss with the one
before it from the starting point's on (AutoAttack compares its first step with 0).

Losses: cross-entropy (APGD-CE), the difference of logits ratio DLR ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``
and its targeted form (APGD-T) ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (``pi``: the classes by decreasing
logit), invariant to shifting and scaling the logits. APGD-T's rows are ``targets x restarts`` per example: row
``r`` targets the ``r // restarts``-th most likely other class on the clean input, from its own random start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from pipeline.attacks.engine import AttackResult, attack_threat, clean_logits, run_rows
from pipeline.attacks.options import AttackOptions
from pipeline.attacks.steps import Box, Centre, RowState, l2_norm, l2_project, logit_grad, random_starts
from pipeline.errors import HydraPipeError
from pipeline.runtime import attack_mode
from pipeline.threat import Norm, ThreatModel

APGDLoss = Literal["ce", "dlr", "dlr-targeted"]
LOSSES = ("ce", "dlr", "dlr-targeted")
MIN_CLASSES = {"ce": 2, "dlr": 3, "dlr-targeted": 4}  # DLR reads the 3rd (targeted: 4th) largest logit
RHO = 0.75  # condition 1: halve when the loss rose in at most this fraction of the steps since the last checkpoint
MOMENTUM = 0.75  # weight of the new gradient step against the last move


def dlr_grad(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient w.r.t. the logits and value per row of the DLR loss (``target`` None) or the targeted DLR loss
    (module doc), written by hand as :func:`pipeline.attacks.steps.logit_grad` is."""
    z = z.detach()
    rows = torch.arange(len(y), device=z.device)
    top, order = z.sort(1, descending=True)
    if target is None:
        other = z.clone()
        other[rows, y] = -torch.inf
        target = other.argmax(1)
        below = [(2, 1.0)]  # the denominator's subtracted logits and their weights
    else:
        below = [(2, 0.5), (3, 0.5)]
    num = z[rows, y] - z[rows, target]
    den = top[:, 0] - sum(w * top[:, k] for k, w in below) + 1e-12
    g = torch.zeros_like(z)
    # value = -num / den: d/dz_y = -1 / den, d/dz_t = 1 / den, d/d(den) = num / den^2
    g.index_put_((rows, y), -1 / den, accumulate=True)
    g.index_put_((rows, target), 1 / den, accumulate=True)
    g.index_put_((rows, order[:, 0]), num / den ** 2, accumulate=True)
    for k, w in below:
        g.index_put_((rows, order[:, k]), -w * num / den ** 2, accumulate=True)
    return g, -num / den


@dataclass
class APGDState(RowState):
    """One APGD row's memory (module doc)."""

    ball: RowState  # Box (L-inf) or Centre (L2): the row's threat set
    target: torch.Tensor  # long: the targeted loss's class (-1 for the untargeted losses)
    eta: torch.Tensor  # step size
    prev: torch.Tensor  # x_{t-1}: the momentum's last move is x_t - x_{t-1}
    prev_loss: torch.Tensor
    best_x: torch.Tensor  # the highest-loss iterate so far, its gradient and loss
    best_grad: torch.Tensor
    best_loss: torch.Tensor
    best_at_check: torch.Tensor  # best_loss at the last checkpoint (condition 2)
    reduced: torch.Tensor  # bool: the step size was halved at the last checkpoint
    rises: torch.Tensor  # long: steps since the last checkpoint whose loss rose (condition 1)
    since: torch.Tensor  # long: steps since the last checkpoint
    interval: torch.Tensor  # long: steps from the last checkpoint to the next


@dataclass(frozen=True)
class APGDStep:
    """APGD's rule (module doc) for ``steps`` steps on ``threat``'s norm, ascending ``loss``. ``targets`` maps an
    example's index to its target classes (targeted loss only), ``restarts`` is the number of rows per target."""

    threat: ThreatModel
    steps: int
    loss: APGDLoss = "ce"
    restarts: int = 1
    targets: dict[int, list[int]] | None = None
    fixed_map: ClassVar[bool] = False

    def start(self, x0: torch.Tensor, seed: int, example: int, restarts: range) -> tuple[torch.Tensor, APGDState]:
        eps = self.threat.eps
        if self.threat.norm == "linf":  # AutoAttack's starts: a random corner-ward point of the sphere
            def draw(g: torch.Generator) -> torch.Tensor:
                t = torch.rand(x0.shape, generator=g) * 2 - 1
                return t * (eps / float(t.abs().max().clamp_min(1e-12)))
        else:
            def draw(g: torch.Generator) -> torch.Tensor:
                t = torch.randn(x0.shape, generator=g)
                return t * (eps / float(t.norm().clamp_min(1e-12)))
        xs = random_starts(x0, self.threat, seed, example, restarts, draw, "apgd")
        k, dev = len(xs), xs.device
        ball = Box(*self.threat.box(x0.expand_as(xs))) if self.threat.norm == "linf" else Centre(x0.expand_as(xs))
        goal = [self.targets[example][r // self.restarts] for r in restarts] if self.targets is not None else [-1] * k
        lowest = torch.full((k,), -torch.inf, device=dev)
        return xs, APGDState(
            ball=ball, target=torch.tensor(goal, dtype=torch.long, device=dev),
            eta=torch.full((k,), 2.0 * eps, device=dev), prev=xs.clone(), prev_loss=lowest.clone(),
            best_x=xs.clone(), best_grad=torch.zeros_like(xs), best_loss=lowest.clone(), best_at_check=lowest,
            reduced=torch.ones(k, dtype=torch.bool, device=dev), rises=torch.zeros(k, dtype=torch.long, device=dev),
            since=torch.zeros(k, dtype=torch.long, device=dev),
            interval=torch.full((k,), max(int(0.22 * self.steps), 1), dtype=torch.long, device=dev))

    def loss_grad(self, z: torch.Tensor, y: torch.Tensor, state: APGDState) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loss == "ce":
            return logit_grad(z, y, "ce")
        return dlr_grad(z, y, state.target if self.loss == "dlr-targeted" else None)

    def _project(self, x: torch.Tensor, ball: RowState) -> torch.Tensor:
        if self.threat.norm == "linf":
            return torch.clamp(x, ball.lo, ball.hi)
        return l2_project(x, ball.x0, self.threat)

    def step(self, x: torch.Tensor, grad: torch.Tensor, state: APGDState, t: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        s = state
        first = t == 0
        s.best_at_check = torch.where(first, loss, s.best_at_check)
        better = loss > s.best_loss
        s.best_x[better], s.best_grad[better] = x[better], grad[better]
        s.best_loss = torch.where(better, loss, s.best_loss)
        s.rises += ~first & (loss > s.prev_loss)
        s.prev_loss = loss
        s.since += ~first
        check = s.since == s.interval
        if check.any():
            stalled = s.rises <= RHO * s.interval  # condition 1
            flat = ~s.reduced & (s.best_at_check >= s.best_loss)  # condition 2
            halve = check & (stalled | flat)
            s.reduced = torch.where(check, halve, s.reduced)
            s.best_at_check = torch.where(check, s.best_loss, s.best_at_check)
            s.eta = torch.where(halve, s.eta / 2, s.eta)
            x, grad = x.clone(), grad.clone()
            x[halve], grad[halve] = s.best_x[halve], s.best_grad[halve]
            shorter = (s.interval - max(int(0.03 * self.steps), 1)).clamp_min(max(int(0.06 * self.steps), 1))
            s.interval = torch.where(check, shorter, s.interval)
            s.since = torch.where(check, 0, s.since)
            s.rises = torch.where(check, 0, s.rises)
        shape = (-1,) + (1,) * (x.ndim - 1)
        direction = grad.sign() if self.threat.norm == "linf" else grad / l2_norm(grad)
        z = self._project(x + s.eta.view(shape) * direction, s.ball)
        a = torch.where(first, 1.0, MOMENTUM).view(shape)
        new = self._project(x + a * (z - x) + (1 - a) * (x - s.prev), s.ball)
        s.prev = x
        return new


def apgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: Norm = "linf",
                steps: int = 100, restarts: int = 1, loss: APGDLoss = "ce", targets: int = 9,
                options: AttackOptions = AttackOptions()) -> AttackResult:
    """APGD (Croce & Hein, ICML 2020; module doc) with ``restarts`` random starts per example (per target class
    with ``loss="dlr-targeted"``: ``targets`` classes, capped at classes - 1), worst case per example.

    ``loss``: "ce" (APGD-CE), "dlr" or "dlr-targeted" (APGD-T). ``norm``: "linf" or "l2". ``options`` and the
    result are :func:`pipeline.attacks.pgd_attack`'s; a result's "restarts" are its rows (``targets x restarts``
    for APGD-T, target-major), and ``break_step`` counts APGD steps. ``exact_curves`` is off unless ``options``
    turns it on, as AutoAttack stops attacking an example once it is broken: ``robust_by_restart`` is then an upper
    bound of what fewer rows would report, and the verdicts are exact either way. The cycle exit does not apply.

    Example::

        ce = apgd_attack(model, x, y, eps=8 / 255)                                     # APGD-CE, 100 steps
        t = apgd_attack(model, x, y, eps=8 / 255, loss="dlr-targeted",
                        options=AttackOptions(index=ids))                              # APGD-T, 9 targets
    """
    threat = attack_threat(x, y, eps, norm)
    if loss not in LOSSES:
        raise HydraPipeError(f"apgd: unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if targets < 1:
        raise HydraPipeError(f"apgd: need targets >= 1, got {targets}")
    ids = options.example_ids(len(x))
    if len(set(ids)) != len(ids):
        raise HydraPipeError("apgd: index has repeated entries")
    rows, goals = restarts, None
    if loss != "ce":
        with attack_mode(model, options.threads):
            z = clean_logits(model, x.detach(), options.batch_size)
        classes = z.shape[1]
        if classes < MIN_CLASSES[loss]:
            raise HydraPipeError(f"apgd: the {loss} loss needs at least {MIN_CLASSES[loss]} classes, "
                                 f"the model has {classes}")
        if loss == "dlr-targeted":
            # the most likely other classes on the clean input, most likely first
            z[torch.arange(len(y), device=z.device), y.to(z.device, torch.long)] = -torch.inf
            ranked = z.argsort(1, descending=True)[:, :min(targets, classes - 1)]
            goals = dict(zip(ids, ranked.tolist()))
            rows = restarts * ranked.shape[1]
    rule = APGDStep(threat, steps, loss, restarts, goals)
    exact = options.exact_curves if options.exact_curves is not None else False
    return run_rows(model, x, y, rule, steps=steps, restarts=rows, options=options, exact_curves=exact)
