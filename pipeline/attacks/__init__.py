"""Adversarial attacks: the audit's batched PGD and Square attack, and the PGD that training objectives run.

- :mod:`pipeline.attacks.engine`: the row scheduler gradient attacks run on (restarts x examples as rows, exits);
- :mod:`pipeline.attacks.steps`: the step rules it runs (PGD L-inf, PGD L2), each with its random start;
- :mod:`pipeline.attacks.pgd`, :mod:`pipeline.attacks.square`: the audit's attacks, also in :data:`ATTACKS`;
- :mod:`pipeline.attacks.training`: :func:`pgd_perturb`, for adversarial training.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.attacks.engine import CYCLE, AttackResult, Confirm, robustness_curves, step_checkpoints
from pipeline.attacks.pgd import default_step_size, pgd_attack
from pipeline.attacks.square import SquareResult, square_attack
from pipeline.attacks.training import pgd_perturb
from pipeline.registry import Registry

ATTACKS: Registry[Callable[..., object]] = Registry("attack", "--attacks")
"""The audit's attacks by name: ``ATTACKS.get("pgd")(model, x, y, eps, ...)``."""
ATTACKS.register("pgd")(pgd_attack)
ATTACKS.register("square")(square_attack)

__all__ = ["ATTACKS", "CYCLE", "AttackResult", "Confirm", "SquareResult", "default_step_size", "pgd_attack",
           "pgd_perturb", "robustness_curves", "square_attack", "step_checkpoints"]
