"""What a verdict is about: the margin specification, the precision the bounds run in, and the slack a proof keeps
for the deployed model's float32 rounding. :mod:`pipeline.bounds.verify` (the certificate) and
:mod:`pipeline.bounds.bab` (branch and bound) both decide with these, so the two verdicts mean the same.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from pipeline.bounds.crown import ibp_boxes
from pipeline.errors import HydraPipeError
from pipeline.graph import GraphModule
from pipeline.threat import ThreatModel


def margin_spec(y: Tensor, classes: int) -> Tensor:
    """``C`` of shape N x (K-1) x K: row j is ``e_y - e_j`` for each wrong class j in increasing order."""
    n = y.shape[0]
    eye = torch.eye(classes, device=y.device)
    others = torch.arange(classes, device=y.device).expand(n, classes)
    others = others[others != y.unsqueeze(1)].view(n, classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


# ----------------------------------------------------------------------------------------------------------------
# Precision of the bounds
# ----------------------------------------------------------------------------------------------------------------

def precise_graph(graph: GraphModule, dtype: torch.dtype) -> GraphModule:
    """``graph`` itself in float32, else a copy with its parameters and floating buffers cast to ``dtype``."""
    if dtype == torch.float32:
        return graph
    if dtype != torch.float64:
        raise HydraPipeError(f"bounds: dtype must be torch.float32 or torch.float64, got {dtype}")
    return copy.deepcopy(graph).to(dtype)


def precise_box(threat: ThreatModel, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``threat.box(x)`` in ``dtype``; in float64 computed from the float64 input and widened outward (one ulp and
    to the float32 box) so that it contains the float32 box the deployed model is attacked in."""
    lo32, hi32 = threat.box(x.float())
    if dtype == torch.float32:
        return lo32, hi32
    lo, hi = threat.box(x.to(dtype))
    lo = torch.minimum(lo, lo32.to(dtype))
    hi = torch.maximum(hi, hi32.to(dtype))
    return torch.nextafter(lo, torch.full_like(lo, -torch.inf)), torch.nextafter(hi, torch.full_like(hi, torch.inf))


def precise(graph: GraphModule, threat: ThreatModel, x: Tensor, dtype: torch.dtype
            ) -> tuple[GraphModule, Tensor, Tensor]:
    """:func:`precise_graph` and :func:`precise_box` together."""
    graph = precise_graph(graph, dtype)
    return (graph, *precise_box(threat, x, dtype))


# ----------------------------------------------------------------------------------------------------------------
# The slack of a proof
# ----------------------------------------------------------------------------------------------------------------

DEPLOYED_ULPS_PER_NODE = 4
"""Float32 unit roundoffs ``u`` (``torch.finfo(torch.float32).eps``) per graph node that :func:`margin_slack`
allows for the deployed model's rounding, relative to the magnitude of its logits: a node rounds each output once
after a product and a sum (about ``2 u`` of the magnitudes it combines), these errors add along the network's depth
(``2 L u``), and a margin is the difference of two logits (``4 L u``)."""


def margin_slack(graph: GraphModule, x_lo: Tensor, x_hi: Tensor) -> Tensor:
    """The margin lower bound [N] an example must exceed to be verified:
    ``DEPLOYED_ULPS_PER_NODE * L * u * (1 + M)``, ``u = torch.finfo(torch.float32).eps``.

    The bounds are sound for the exact (real-valued) network, but the deployed model computes in float32, so a
    margin bounded just above zero may still come out negative at some input of the box. ``L`` is the number of
    nodes of the graph (at least its depth); ``M`` the largest ``|logit|`` over the box by interval arithmetic (a
    sound bound of the logits' magnitude, one IBP pass); the ``1 +`` covers hidden values of order one where the
    logits are small (inputs in [0, 1], normalisation inside the graph). This is the usual first-order estimate
    (``L u`` relative error for a depth-``L`` forward, bounded by the logits' magnitude), not a rigorous
    floating-point analysis: heavy cancellation inside a layer (``|W||h| >> |W h|``) can exceed it. Always for the
    deployed float32 computation, also when the bounds run in float64 (``dtype=torch.float64``). On the two-input
    network of the tests, about 3e-6."""
    with torch.no_grad():
        out = ibp_boxes(graph, x_lo, x_hi)[graph.output_name]
        magnitude = torch.maximum(out.lo.abs(), out.hi.abs()).flatten(1).amax(1).to(torch.float64)
    u = torch.finfo(torch.float32).eps
    slack = DEPLOYED_ULPS_PER_NODE * len(graph.nodes) * u * (1.0 + magnitude)
    return slack.to(x_lo.dtype)


def proved(lower: Tensor, slack: Tensor) -> Tensor:
    """Which examples are verified: every margin lower bound of ``lower`` [N, M] above its ``slack`` [N]."""
    return (lower > slack.unsqueeze(1)).all(1)
