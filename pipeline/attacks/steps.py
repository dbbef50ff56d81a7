"""PGD's step rules: how one row starts and how it moves, given the loss gradient at its iterate.

A rule is small and knows its norm; the engine (:mod:`pipeline.attacks.engine`) knows only this interface:

- ``rule.start(x0, seed, example, restarts)``: the random starts of some restarts of one example, and their per-row
  state (a :class:`RowState`), drawn from the attack's own streams (:func:`seed_sequence`);
- ``rule.loss_grad(z, y, state)``: the loss the rule ascends, at the logits ``z`` of every row: its gradient
  w.r.t. ``z`` (the engine backpropagates it through the model) and its value per row;
- ``rule.step(x, grad, state, t, loss)``: the next iterate of every row in flight, from ``x_t``, the gradient there
  and the loss value there (APGD's step-size schedule reads it; PGD ignores it).

Per-row state (the L-inf box, the L2 centre; APGD's step size, momentum and target class) travels with its rows:
the engine filters and joins it along with the iterates, so a rule never sees a row that left or misses one that
joined. APGD's rule lives in :mod:`pipeline.attacks.apgd`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar, Literal, Protocol, TypeVar

import numpy as np
import torch

from pipeline.threat import ThreatModel

Loss = Literal["ce", "margin"]
S = TypeVar("S", bound="RowState")


@dataclass
class RowState:
    """Tensors with one entry per row (first dimension), or nested :class:`RowState`: kept and joined together."""

    def keep(self: S, mask: torch.Tensor) -> S:
        """The rows where ``mask`` (bool, one per row) is true, in order."""
        kept = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kept[f.name] = value[mask] if isinstance(value, torch.Tensor) else value.keep(mask)
        return type(self)(**kept)

    @staticmethod
    def cat(parts: Sequence[S]) -> S:
        """The rows of all ``parts``, in order (one ``torch.cat`` per field, however many parts)."""
        first = parts[0]
        joined = {}
        for f in fields(first):
            values = [getattr(p, f.name) for p in parts]
            joined[f.name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else RowState.cat(values)
        return type(first)(**joined)


class StepRule(Protocol):
    """What the engine asks of an attack's update (see the module doc)."""

    threat: ThreatModel
    # x_{t+1} depends on x_t alone (PGD with a constant step): a repeated iterate means a cycle, and the engine may
    # end the row. False for rules with memory (APGD's momentum and step-size schedule).
    fixed_map: bool

    def start(self, x0: torch.Tensor, seed: int, example: int, restarts: range) -> tuple[torch.Tensor, RowState]: ...

    def loss_grad(self, z: torch.Tensor, y: torch.Tensor, state: RowState) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step(self, x: torch.Tensor, grad: torch.Tensor, state: RowState, t: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor: ...


# Each attack draws from its own random streams: the constant joins (seed, example, restart) in the seed sequence, so
# PGD's, APGD's and Square's draws for the same (seed, example, restart) are independent of each other (with a shared
# stream, APGD's first starts were PGD's, rescaled to the sphere: within 0.003 of them).
STREAM = {"pgd": 1, "apgd": 2, "square": 3}


def seed_sequence(seed: int, example: int, restart: int, attack: str) -> np.random.SeedSequence:
    """The random stream of one restart of one example (``example``: its place in the whole set) for ``attack``.

    One stream per (example, restart): a random start does not depend on which rows share a batch, so early exits,
    batch sizes, verification and the number of restarts never change any row's trajectory."""
    return np.random.SeedSequence([seed, example, restart, STREAM[attack]])


def _start_seed(seed: int, example: int, restart: int, attack: str) -> int:
    """A torch generator's seed drawn from :func:`seed_sequence`."""
    return int(seed_sequence(seed, example, restart, attack).generate_state(1, np.uint64)[0] >> 1)


def random_starts(x0: torch.Tensor, threat: ThreatModel, seed: int, example: int, restarts: range,
                  draw: Callable[[torch.Generator], torch.Tensor], attack: str) -> torch.Tensor:
    """``x0 + delta_r`` clipped to the input range, one ``delta_r = draw(generator)`` per restart ``r``, the
    generator seeded from ``attack``'s stream of ``(seed, example, r)``."""
    delta = torch.stack([draw(torch.Generator().manual_seed(_start_seed(seed, example, r, attack)))
                         for r in restarts])
    delta = delta.to(x0.device, x0.dtype)
    # clipping to the range only shrinks |delta_i|, so the start stays in the ball
    return (x0.unsqueeze(0) + delta).clamp(threat.lo, threat.hi)


@dataclass
class Box(RowState):
    lo: torch.Tensor  # the threat model's box around the row's example: the L-inf ball within the range
    hi: torch.Tensor


@dataclass(frozen=True)
class LinfStep:
    """PGD on L-inf (Madry et al., ICLR 2018): ``x_{t+1} = clip_box(x_t + alpha * sign(grad))``, started uniformly
    in the box, ascending ``loss`` (:func:`logit_grad`)."""

    threat: ThreatModel
    alpha: float
    loss: Loss = "margin"
    fixed_map: ClassVar[bool] = True

    def start(self, x0: torch.Tensor, seed: int, example: int, restarts: range) -> tuple[torch.Tensor, Box]:
        eps = self.threat.eps
        xs = random_starts(x0, self.threat, seed, example, restarts,
                           lambda g: (torch.rand(x0.shape, generator=g) * 2 - 1) * eps, "pgd")
        return xs, Box(*self.threat.box(x0.expand_as(xs)))

    def loss_grad(self, z: torch.Tensor, y: torch.Tensor, state: Box) -> tuple[torch.Tensor, torch.Tensor]:
        return logit_grad(z, y, self.loss)

    def step(self, x: torch.Tensor, grad: torch.Tensor, state: Box, t: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + self.alpha * grad.sign(), state.lo, state.hi)


@dataclass
class Centre(RowState):
    x0: torch.Tensor  # the row's clean example: the centre of its ball


@dataclass(frozen=True)
class L2Step:
    """PGD on L2 (Madry et al., ICLR 2018): ``x_{t+1} = Proj(x_t + alpha * grad / |grad|_2)``, the projection
    rescaling ``x - x0`` onto the ball, then clipping to the range; started uniformly in the ball, ascending
    ``loss`` (:func:`logit_grad`)."""

    threat: ThreatModel
    alpha: float
    loss: Loss = "margin"
    fixed_map: ClassVar[bool] = True

    def start(self, x0: torch.Tensor, seed: int, example: int, restarts: range) -> tuple[torch.Tensor, Centre]:
        eps = self.threat.eps

        def draw(g: torch.Generator) -> torch.Tensor:
            # uniform in the ball: a uniform direction, and a radius with P(r <= s) = (s / eps)^d
            direction = torch.randn(x0.shape, generator=g)
            radius = eps * float(torch.rand(1, generator=g)) ** (1.0 / x0.numel())
            return direction * (radius / float(direction.norm().clamp_min(1e-12)))

        xs = random_starts(x0, self.threat, seed, example, restarts, draw, "pgd")
        return xs, Centre(x0.expand_as(xs))

    def loss_grad(self, z: torch.Tensor, y: torch.Tensor, state: Centre) -> tuple[torch.Tensor, torch.Tensor]:
        return logit_grad(z, y, self.loss)

    def step(self, x: torch.Tensor, grad: torch.Tensor, state: Centre, t: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        return l2_project(x + self.alpha * grad / l2_norm(grad), state.x0, self.threat)


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """``|v_i|_2`` of every row, shaped to broadcast against ``v`` (never below 1e-12)."""
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.ndim - 1))


def l2_project(x: torch.Tensor, x0: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """``x`` onto the L2 ball around ``x0`` (rescaling ``x - x0``), then clipped to the range: the result stays in
    the ball, since clipping towards ``x0``'s range only shrinks each coordinate of the offset."""
    delta = x - x0
    return (x0 + delta * (threat.eps / l2_norm(delta)).clamp(max=1.0)).clamp(threat.lo, threat.hi)


PGD_RULES: dict[str, type[LinfStep] | type[L2Step]] = {"linf": LinfStep, "l2": L2Step}


def pgd_rule(threat: ThreatModel, alpha: float, loss: Loss = "margin") -> StepRule:
    """PGD's rule for the threat model's norm, with constant step ``alpha``, ascending ``loss``."""
    return PGD_RULES[threat.norm](threat, alpha, loss)


def margins(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The margin ``z_y - max_{j != y} z_j`` of every row (negative: misclassified)."""
    z, y = z.detach(), y[:, None]
    return z.gather(1, y).squeeze(1) - z.scatter(1, y, -torch.inf).max(1).values


def logit_grad(z: torch.Tensor, y: torch.Tensor, loss: Loss) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the loss to ascend w.r.t. the logits, and its value per row.

    margin (CW) loss: ``max_{j != y} z_j - z_y``; ce: cross-entropy. Written by hand so the attack's backward
    starts at the logits (no loss graph).
    """
    z = z.detach()
    rows = torch.arange(len(y), device=z.device)
    if loss == "margin":
        other = z.clone()
        other[rows, y] = -torch.inf
        best_other, j = other.max(1)
        g = torch.zeros_like(z)
        g[rows, j] = 1.0
        g[rows, y] = -1.0
        return g, best_other - z[rows, y]
    g = torch.softmax(z, 1)
    g[rows, y] -= 1.0
    return g, torch.logsumexp(z, 1) - z[rows, y]
