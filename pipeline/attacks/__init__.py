"""Adversarial attacks: the audit's batched PGD, APGD and Square attack, and the PGD that training objectives run.

- :mod:`pipeline.attacks.engine`: the row scheduler gradient attacks run on (restarts x examples as rows, exits,
  confirmation on the deployed model);
- :mod:`pipeline.attacks.steps`: PGD's step rules (L-inf, L2), each with its random start and loss;
- :mod:`pipeline.attacks.apgd`: APGD's step rule (per-row step size, momentum, target) and :func:`apgd_attack`;
- :mod:`pipeline.attacks.pgd`, :mod:`pipeline.attacks.square`: PGD and the Square attack (L-inf, L2). The audit's
  attacks are also in :data:`ATTACKS`;
- :mod:`pipeline.attacks.training`: :func:`pgd_perturb`, for adversarial training.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from pipeline.attacks.apgd import apgd_attack
from pipeline.attacks.engine import CONFIRM_MARGIN, CYCLE, AttackResult, Confirm, robustness_curves, step_checkpoints
from pipeline.attacks.pgd import default_step_size, pgd_attack
from pipeline.attacks.square import SquareResult, square_attack
from pipeline.attacks.training import pgd_perturb
from pipeline.registry import Registry

ATTACKS: Registry[Callable[..., object]] = Registry("attack", "--attacks")
"""The audit's attacks by name: ``ATTACKS.get("pgd")(model, x, y, eps, ...)``."""
ATTACKS.register("pgd")(pgd_attack)
ATTACKS.register("apgd-ce")(partial(apgd_attack, loss="ce"))
ATTACKS.register("apgd-t")(partial(apgd_attack, loss="dlr-targeted"))
ATTACKS.register("square")(square_attack)

__all__ = ["ATTACKS", "CONFIRM_MARGIN", "CYCLE", "AttackResult", "Confirm", "SquareResult", "apgd_attack",
           "default_step_size", "pgd_attack", "pgd_perturb", "robustness_curves", "square_attack",
           "step_checkpoints"]
