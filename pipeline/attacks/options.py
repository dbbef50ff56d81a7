"""What every attack of the audit takes besides its own algorithm's parameters: :class:`AttackOptions`.

PGD, APGD and Square each take their paper's parameters (norm, steps or queries, restarts, step size, loss ...) as
keywords and everything else (memory budget, seed, what is already decided, the deployed model, threads, progress,
the examples' places in the whole set, the exits) as one ``options`` object, so an ensemble passes the same object to
every attack of its list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import HydraPipeError

Confirm = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]

# Iterates the attacked model classifies correctly with a margin (z_y - max_{j != y} z_j) below this, in logits,
# are confirmed on the deployed model too. The torch graph and onnxruntime differ by the order of float sums (on the
# default digits int8 model: at most 2e-6 of a logit, at the clean points and at APGD's adversarial points) and
# could differ by more where an accumulation lands on a rounding tie of a requantization: one quantization step of
# an activation, times the weights after it. 0.1 leaves room for such a step and keeps the extra onnxruntime rows
# few (on that model, eps 0.1, 200 examples: ~100 for APGD-CE, ~250 for APGD-T, ~1000 for Square).
CONFIRM_MARGIN = 0.1


@dataclass(frozen=True)
class AttackOptions:
    """The options :func:`~pipeline.attacks.pgd_attack`, :func:`~pipeline.attacks.apgd_attack` and
    :func:`~pipeline.attacks.square_attack` share. None of them changes an example's verdict except ``seed``,
    ``verified``, ``confirm`` and ``confirm_margin``.

    Attributes:
        batch_size: memory budget. Gradient attacks: rows (examples x restarts) per forward pass; each row holds its
            iterate, its box (L-inf) or centre (L2), its gradient and the last ``CYCLE`` iterates, about
            ``8 x batch_size x input size`` floats plus the model's activations (on CPU 1-4k rows run fastest per
            row for small models; on GPU, larger is better). Square: candidates per forward pass.
        seed: every random draw of an attack is a function of ``(seed, example's index, restart)`` and of the
            attack (:data:`pipeline.attacks.steps.STREAM`): reproducible, and independent of batching.
        verified: bool ``[N]``, examples proven robust by a sound verifier: counted robust, never attacked.
        confirm: ``x (numpy) -> logits`` of the deployed model. A misclassified point counts only if the deployed
            model misclassifies it too; rejected candidates are counted and the example stays attacked. The clean
            accuracy is the deployed model's too.
        confirm_margin: with ``confirm``, points the attacked model classifies correctly by a margin below this are
            put to the deployed model too and count as breaks where it misclassifies them (``near_boundary_checked``
            counts them; 0 turns this off).
        index: long ``[N]``, each example's place in a larger set the caller attacks in parts (default
            ``0..N-1``). It seeds the example's random draws, so a part gives exactly the verdicts the whole set
            would (the audit attacks in chunks it can journal).
        early_exit, exact_curves, cycle_exit: the gradient attacks' exits (:mod:`pipeline.attacks.engine`; turn off
            to measure them). ``exact_curves`` keeps the lower restarts of a broken example running until they break
            or finish, so ``robust_by_restart`` is exact; ``None``: the attack's own default (PGD on; APGD off, as
            AutoAttack stops attacking a broken example). ``cycle_exit`` applies to PGD only (APGD's iterates are
            no fixed map). Square has none of them: a broken example leaves, and a restart runs only on the
            examples still standing, so its curves are exact anyway.
        threads: torch's intra-op thread count during the attack (``None``: leave it).
        progress: called as ``progress(settled_examples, n)``.
    """

    batch_size: int = 4096
    seed: int = 0
    verified: torch.Tensor | None = None
    confirm: Confirm | None = None
    confirm_margin: float = CONFIRM_MARGIN
    index: torch.Tensor | Sequence[int] | None = None
    early_exit: bool = True
    exact_curves: bool | None = None
    cycle_exit: bool = True
    threads: int | None = None
    progress: Progress | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seed < 0 or self.confirm_margin < 0 or \
                (self.threads is not None and self.threads < 1):
            raise HydraPipeError(f"attack options: need batch_size >= 1, seed >= 0, confirm_margin >= 0, threads >= 1 "
                                 f"or None (got {self.batch_size}, {self.seed}, {self.confirm_margin}, {self.threads})")

    def example_ids(self, n: int) -> list[int]:
        """Each of the ``n`` examples' place in the whole set: ``index``, or ``0..n-1``."""
        if self.index is None:
            return list(range(n))
        if len(self.index) != n:
            raise HydraPipeError(f"attack: index has {len(self.index)} entries for {n} examples")
        return [int(i) for i in self.index]

    def verified_mask(self, n: int, device: torch.device) -> torch.Tensor:
        """``verified`` as a bool ``[n]`` on ``device`` (all false when not given)."""
        if self.verified is None:
            return torch.zeros(n, dtype=torch.bool, device=device)
        if len(self.verified) != n:
            raise HydraPipeError(f"attack: verified has {len(self.verified)} entries for {n} examples")
        return self.verified.to(device, torch.bool)
