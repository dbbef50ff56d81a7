"""Margins and verdicts: what the bounds are for.

An example is verified when every margin ``logit[y] - logit[j]`` has a lower bound over the threat model's box
above the slack that covers the deployed model's float32 rounding (:func:`pipeline.bounds.spec.margin_slack`).
The margin specification (:func:`pipeline.bounds.spec.margin_spec`) is folded into the trailing affine layers
(CROWN-IBP, Zhang et al., ICLR 2020), which is tighter than subtracting logit bounds; :func:`certify` is the one
batched loop that turns a threat model and a method into verdicts (and logit bounds), for :func:`verified`, the
audit and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.bounds.alpha import alpha_crown_bounds, shortfall
from pipeline.bounds.bab import bab_margins
from pipeline.bounds.box import concretize
from pipeline.bounds.crown import (DEFAULT_MAX_ELEMENTS, backward_bounds, check_box, crown_boxes, crown_bounds,
                                   ibp_boxes, interval_bounds)
from pipeline.bounds.spec import margin_slack, margin_spec, precise_box, precise_graph, proved
from pipeline.graph import GraphModule, as_graph
from pipeline.registry import Registry
from pipeline.runtime import sound_numerics
from pipeline.threat import ThreatModel

Method = Literal["ibp", "crown", "alpha-crown", "bab"]

MarginBounds = Callable[[GraphModule, Tensor, Tensor, Tensor, Literal["ibp", "crown"]], Tensor]
"""``(graph, x_lo, x_hi, y, intermediate) -> [N, K-1]`` lower bounds of the margins."""

BOUND_METHODS: Registry[MarginBounds] = Registry("bound method", "--method")


@BOUND_METHODS.register("ibp")
def _ibp_margins(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, y: Tensor,
                 intermediate: Literal["ibp", "crown"]) -> Tensor:
    """IBP boxes up to the last non-affine node, the margin folded into the affine tail (CROWN-IBP's bound)."""
    boxes = ibp_boxes(graph, x_lo, x_hi)
    out_box = boxes[graph.output_name]
    spec = margin_spec(y, out_box.shape[1]).to(x_lo.dtype)
    folded = backward_bounds(graph, graph.output_name, spec, boxes, linear_only=True)
    return torch.maximum(folded, concretize(spec, out_box))


@BOUND_METHODS.register("crown")
def _crown_margins(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, y: Tensor,
                   intermediate: Literal["ibp", "crown"]) -> Tensor:
    """CROWN with ``intermediate`` bounds, intersected with the folded interval bound on the same boxes."""
    boxes = crown_boxes(graph, x_lo, x_hi, intermediate, DEFAULT_MAX_ELEMENTS)
    spec = margin_spec(y, boxes[graph.output_name].shape[1]).to(x_lo.dtype)
    lo = backward_bounds(graph, graph.output_name, spec, boxes)
    folded = backward_bounds(graph, graph.output_name, spec, boxes, linear_only=True)
    return torch.maximum(lo, folded)


ALPHA_FULL_SHORTFALL = 0.1
"""alpha-CROWN runs in two stages: the last layer's slopes on CROWN's intermediate bounds for every example, then
every layer's slopes with re-optimised intermediate bounds (about 15x the cost) only for the examples the first
stage left within reach: whose worst margin's lower bound ``lb <= 0`` falls short of zero by at most this share of
its distance to the margin at the box's centre ``m`` (:func:`pipeline.bounds.alpha.shortfall`). On the Fashion-MNIST
benchmark model (51 examples CROWN and APGD left undecided) the first stage proves 7 in 19 s; the second stage on
all 44 others proves 3 more in about 220 s, with shortfalls of 0.047-0.056 after the first stage (the others range
up to 0.68): gated at 0.1 it runs on 5 of them, and the two stages prove 11 in 32 s."""


@BOUND_METHODS.register("alpha-crown")
def _alpha_crown_margins(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, y: Tensor,
                         intermediate: Literal["ibp", "crown"]) -> Tensor:
    """alpha-CROWN's optimised slopes (always on CROWN intermediate bounds), in the two stages of
    :data:`ALPHA_FULL_SHORTFALL`; lower bounds only."""
    spec = margin_spec(y, _num_classes(graph, x_lo)).to(x_lo.dtype)
    lower = alpha_crown_bounds(graph, x_lo, x_hi, spec, lower_only=True, target=0.0, intermediate=False)[0]
    gap = shortfall(graph, x_lo, x_hi, spec, lower)
    reach = (gap >= 0) & (gap <= ALPHA_FULL_SHORTFALL)
    if bool(reach.any()):
        idx = reach.nonzero().squeeze(1)
        full = alpha_crown_bounds(graph, x_lo[idx], x_hi[idx], spec[idx], lower_only=True, target=0.0)[0]
        lower = lower.clone()
        lower[idx] = torch.maximum(lower[idx], full)
    return lower


@BOUND_METHODS.register("bab")
def _bab_margins(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, y: Tensor,
                 intermediate: Literal["ibp", "crown"]) -> Tensor:
    """Branch and bound with beta-CROWN-style split constraints (:mod:`pipeline.bounds.bab`) with its default
    budgets (10 s and 2000 domains per example, examples within ``BAB_SHORTFALL`` of a proof): the minimum over
    its leaves of each margin's bound."""
    spec = margin_spec(y, _num_classes(graph, x_lo)).to(x_lo.dtype)
    return bab_margins(graph, x_lo, x_hi, spec)[0]


def _num_classes(graph: GraphModule, x: Tensor) -> int:
    with torch.no_grad():
        return int(graph(x[:1]).shape[1])


def margin_lower_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor, y: Tensor, method: Method = "ibp",
                        intermediate: Literal["ibp", "crown"] = "crown") -> Tensor:
    """Lower bounds on ``logit[y] - logit[j]`` for every ``j != y``: N x (K-1).

    The specification is folded into the trailing affine layers (CROWN-IBP, Zhang et al. 2020), which is tighter
    than subtracting logit bounds. ``ibp``: IBP boxes up to the last non-affine node; ``crown``: CROWN with
    ``intermediate`` bounds; ``alpha-crown``: optimised slopes; ``bab``: branch and bound. Differentiable for
    ``ibp`` and ``crown`` (the verified training objectives rely on it).
    """
    check_box(x_lo, x_hi)
    graph = as_graph(model)
    return BOUND_METHODS.get(method)(graph, x_lo, x_hi, y, intermediate)


# ----------------------------------------------------------------------------------------------------------------
# Logit bounds alongside the margins, for the methods that give both from one bound computation
# ----------------------------------------------------------------------------------------------------------------

LogitAndMarginBounds = Callable[[GraphModule, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _ibp_logits_and_margins(graph: GraphModule, xb: Tensor, x_lo: Tensor, x_hi: Tensor, y: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor]:
    lo, hi = interval_bounds(graph, x_lo, x_hi)
    return lo, hi, margin_lower_bounds(graph, x_lo, x_hi, y, "ibp")


def _crown_logits_and_margins(graph: GraphModule, xb: Tensor, x_lo: Tensor, x_hi: Tensor, y: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor]:
    # logits and margins in one backward pass: C = [identity; e_y - e_j]
    k = int(graph(xb[:1]).shape[1])
    eye = torch.eye(k, device=xb.device).expand(len(xb), k, k)
    both_lo, both_hi = crown_bounds(graph, x_lo, x_hi, C=torch.cat([eye, margin_spec(y, k)], 1))
    return both_lo[:, :k], both_hi[:, :k], both_lo[:, k:]


_LOGIT_BOUNDS: dict[str, LogitAndMarginBounds] = {"ibp": _ibp_logits_and_margins, "crown": _crown_logits_and_margins}
"""alpha-CROWN and branch and bound are absent: they optimise per margin row, so logit bounds would be a second run."""


@dataclass
class Certificate:
    """The verdicts of one :func:`certify` run, and the logit bounds when asked for and available."""

    verified: Tensor
    """bool [N]: every margin lower bound above the example's slack (:func:`pipeline.bounds.spec.margin_slack`)."""
    lower: Tensor | None
    """[N, classes] logit lower bounds (None for alpha-crown, ``logit_bounds=False`` or no examples)."""
    upper: Tensor | None
    margin: Tensor | None = None
    """[N]: the lower bound of the worst margin ``min_j logit[y] - logit[j]`` (the audit's per-example records)."""


def certify(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, method: str, *, batch_size: int = 256,
            logit_bounds: bool = True, progress: Callable[[int, int], None] | None = None,
            dtype: torch.dtype = torch.float32) -> Certificate:
    """Verify each example over ``threat.box(x)`` with ``method``, in batches of ``batch_size`` (memory grows
    with it, CROWN's most). The box contains the L2 ball of the same radius, so the verdict is sound for both
    norms. ``progress(done, total)`` after each batch. No gradients: alpha-CROWN optimises its slopes inside.
    An example is verified when every margin's lower bound exceeds its slack
    (:func:`pipeline.bounds.spec.margin_slack`: the deployed float32 computation's rounding, also in float64).

    Runs under :func:`pipeline.runtime.sound_numerics` (fp32 without TF32, deterministic). ``dtype=torch.float64``
    bounds a float64 copy of the model on the float64 box widened outward to contain the float32 one (the logit
    bounds then come back in float64), so the bounds' own rounding errors shrink by about nine orders of magnitude.
    """
    BOUND_METHODS.get(method)  # an unknown method fails before any work
    graph = precise_graph(as_graph(model), dtype)
    joint = _LOGIT_BOUNDS.get(method) if logit_bounds else None
    n = x.shape[0]
    lows, highs, ver, worst = [], [], [], []
    with torch.no_grad(), sound_numerics():  # a bound in lower precision is no bound
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_lo, x_hi = precise_box(threat, xb, dtype)
            xb = xb.to(dtype)
            if joint is not None:
                lo, hi, margin = joint(graph, xb, x_lo, x_hi, yb)
                lows.append(lo)
                highs.append(hi)
            else:
                margin = margin_lower_bounds(graph, x_lo, x_hi, yb, method)  # type: ignore[arg-type]
            ver.append(proved(margin, margin_slack(graph, x_lo, x_hi)))
            worst.append(margin.min(1).values)
            if progress is not None:
                progress(min(i + batch_size, n), n)
    if not ver:
        return Certificate(torch.zeros(0, dtype=torch.bool, device=x.device), None, None,
                           torch.zeros(0, dtype=dtype, device=x.device))
    return Certificate(torch.cat(ver), torch.cat(lows) if lows else None, torch.cat(highs) if highs else None,
                       torch.cat(worst))


def verified(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: Method = "ibp", lo: float = 0.0,
             hi: float = 1.0, batch_size: int = 256) -> Tensor:
    """Which examples are provably robust: every margin's lower bound above its slack
    (:func:`pipeline.bounds.spec.margin_slack`) over the L-inf ball of radius ``eps`` around ``x`` intersected with
    ``[lo, hi]``. Batched by ``batch_size`` to bound memory. BoolTensor [N]."""
    threat = ThreatModel(eps, lo=lo, hi=hi)
    return certify(model, x, y, threat, method, batch_size=batch_size, logit_bounds=False).verified
