"""The threat model: which inputs an adversary may choose. Built and validated once; everything else asks it.

An example ``x`` may be replaced by any ``x'`` with ``|x' - x|_p <= eps`` (``norm`` "linf" or "l2") that stays in
the valid input range ``[lo, hi]`` (``[0, 1]``: every dataset and exported model here takes pixels in [0, 1]).
Attacks project onto that set; the verifier bounds the network over :meth:`ThreatModel.box`, the L-inf box
intersected with the range, which contains the L2 ball of the same radius, so one proof serves both norms.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.errors import HydraPipeError

if TYPE_CHECKING:  # only tensors' own methods are used: the params (and the CLI) load without torch
    import torch

Norm = Literal["linf", "l2"]

PGD_STEP_CAP = 100
"""The default PGD step crosses the ball in at most this many steps, however long the run (see :meth:`step_size`)."""


def whole_box_radius(eps: float, norm: str = "linf", lo: float = 0.0, hi: float = 1.0) -> str | None:
    """Why an L-inf ``eps`` cannot be meant (None when it can): at ``hi - lo`` or more the ball is the whole input
    range, every image may become every other, and robust accuracy is that of a constant. The usual slip is a
    radius on the 0-255 pixel scale (8 for 8/255)."""
    if norm != "linf" or not eps >= hi - lo:
        return None
    levels = f"{eps:g} pixel levels is {eps:g}/255 = {eps / 255:.4g}" if 1 <= eps <= 255 else \
        "8 pixel levels is 8/255 = 0.03137"
    return (f"an L-inf eps of {eps:g} covers the whole input range [{lo:g}, {hi:g}]: eps is on the scale of the "
            f"inputs, not of 0-255 pixels ({levels})")


@dataclass(frozen=True)
class ThreatModel:
    eps: float
    norm: Norm = "linf"
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not math.isfinite(self.eps) \
                or self.eps < 0:
            raise HydraPipeError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.norm not in ("linf", "l2"):
            raise HydraPipeError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if not self.lo < self.hi:
            raise HydraPipeError(f"input range must have lo < hi, got [{self.lo}, {self.hi}]")
        object.__setattr__(self, "eps", float(self.eps))

    def box(self, x: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[x - eps, x + eps]`` intersected with ``[lo, hi]`` elementwise (``eps`` overrides the radius, as the
        verified objectives' ramp does). Sound for both norms: the box contains the L2 ball."""
        e = self.eps if eps is None else eps
        return (x - e).clamp(self.lo, self.hi), (x + e).clamp(self.lo, self.hi)

    def step_size(self, steps: int) -> float:
        """PGD's constant step ``2.5 eps / min(steps, 100)``: Madry et al.'s ``2.5 eps / steps``, capped so a long
        run still crosses the ball in 40 steps. Constant on purpose: a fixed step makes PGD a fixed map, whose
        cycles let the audit's rows end early."""
        return 2.5 * self.eps / max(1, min(steps, PGD_STEP_CAP))

    def check_inputs(self, x: torch.Tensor, what: str = "x") -> None:
        """Inputs must lie in the range the threat model is defined on."""
        if len(x) and (x.min() < self.lo or x.max() > self.hi):
            raise HydraPipeError(f"{what} must lie in [{self.lo:g}, {self.hi:g}]")
