"""Adversarial attacks: the audit's batched PGD, APGD and Square attack, and the PGD that training objectives run.

- :mod:`pipeline.attacks.options`: :class:`AttackOptions`, what every attack takes besides its own parameters;
- :mod:`pipeline.attacks.engine`: the row scheduler gradient attacks run on (restarts x examples as rows, exits,
  confirmation on the deployed model) and :class:`AttackResult`, what every attack returns;
- :mod:`pipeline.attacks.steps`: PGD's step rules (L-inf, L2), each with its random start and loss, and every
  attack's random streams;
- :mod:`pipeline.attacks.apgd`: APGD's step rule (per-row step size, momentum, target) and :func:`apgd_attack`;
- :mod:`pipeline.attacks.pgd`, :mod:`pipeline.attacks.square`: PGD and the Square attack (L-inf, L2). The audit's
  attacks are also in :data:`ATTACKS`;
- :mod:`pipeline.attacks.training`: :func:`pgd_perturb`, for adversarial training.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from pipeline.attacks.apgd import apgd_attack
from pipeline.attacks.engine import CYCLE, AttackResult, robustness_curves, step_checkpoints
from pipeline.attacks.options import CONFIRM_MARGIN, AttackOptions, Confirm, Progress
from pipeline.attacks.pgd import default_step_size, pgd_attack
from pipeline.attacks.square import square_attack
from pipeline.attacks.training import pgd_perturb
from pipeline.registry import Registry

ATTACKS: Registry[Callable[..., AttackResult]] = Registry("attack", "--attacks")
"""The audit's attacks by name, one call signature and one result: ``ATTACKS.get("pgd")(model, x, y, eps, *,
<the attack's own parameters>, options=AttackOptions(...)) -> AttackResult``."""
ATTACKS.register("pgd")(pgd_attack)
ATTACKS.register("apgd-ce")(partial(apgd_attack, loss="ce"))
ATTACKS.register("apgd-t")(partial(apgd_attack, loss="dlr-targeted"))
ATTACKS.register("square")(square_attack)

__all__ = ["ATTACKS", "CONFIRM_MARGIN", "CYCLE", "AttackOptions", "AttackResult", "Confirm", "Progress",
           "apgd_attack", "default_step_size", "pgd_attack", "pgd_perturb", "robustness_curves", "square_attack",
           "step_checkpoints"]
