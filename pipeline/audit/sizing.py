"""The verifiers sized to the network before they start (issue 27: a small audit request is a small audit).

Each verifier's cost per example is estimated in multiply-adds from the network and the audited inputs alone, with
no timing (so the decision is the same on any machine): the forward pass's work per node (its output's size times
its largest weight's fan-in, as :func:`pipeline.bounds.crown.crown_boxes` counts it), and CROWN's tightening, which
back-substitutes two rows per IBP-unstable neuron through every node before it (capped, per example, at
:data:`pipeline.bounds.crown.DEFAULT_MAX_WORK` as CROWN itself is). alpha-CROWN and branch and bound add their
gradient iterations on the final margin rows. The attacks' requested work per example is counted in the same unit:
3 forward passes per gradient step (forward and backward) of APGD-CE, APGD-T (per target, twice on an int8 graph:
the float twin too) and the card's PGD, one per Square query.

A verifier whose estimate exceeds ``audit.verifier_share`` times that requested work (and :data:`FLOOR`, a fraction
of a second) is skipped: the report's
``skipped_verifiers`` and a console line say which and why. IBP (two forward passes) always runs. Branch and bound
builds on alpha-CROWN's bounds: with alpha-CROWN off it is skipped unless asked for explicitly (``bab_alone``).
Without an attack (``--steps 0``) the verifiers are the request and are not sized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.audit.report import SkippedVerifier
from pipeline.bounds.crown import (DEFAULT_MAX_WORK, ibp_boxes, ibp_exact_values, relaxed_consumers, unstable_neurons,
                                   upstream_values)
from pipeline.config import AuditParams

SAMPLE = 64
"""Examples the IBP-unstable counts are averaged over (the first ones CROWN would bound): cheap on any network."""

ALPHA_ITERATIONS = 20
"""alpha-CROWN's slope iterations (:func:`pipeline.bounds.alpha.alpha_crown_bounds`; branch and bound's root)."""
BAB_ITERATIONS = 10
"""Each branch-and-bound domain's iterations (:func:`pipeline.bounds.bab.bab_margins`)."""
GRADIENT_STEP = 3
"""A gradient step's work in forward passes (forward, then backward at about twice the cost)."""
FLOOR = 1e9
"""Work per example (multiply-adds) below which a verifier always runs, whatever the request: a fraction of a second
on one core, never worth a gap in the report (every verifier of a small network, e.g. the pipeline's CNN-small's
CROWN and alpha-CROWN)."""


@dataclass(frozen=True)
class NetworkCost:
    """Per example, in multiply-adds: a forward pass, CROWN's tightening of the IBP-unstable neurons (capped as
    CROWN caps it) and one backward pass of the final rows (classes - 1 margins)."""

    forward: float
    tighten: float
    final: float
    classes: int


def node_work(node, shape: torch.Size) -> int:
    """Multiply-adds of ``node`` per example, about: its output's size times the fan-in of its largest weight
    (1 for an op without one), as :func:`pipeline.bounds.crown.crown_boxes` counts them."""
    weights = [t for t in (*node.module.parameters(), *node.module.buffers()) if t.dim() >= 2]
    fan_in = max(weights, key=lambda t: t.numel())[0].numel() if weights else 1
    return math.prod(shape[1:]) * fan_in


def network_cost(graph, x_lo: torch.Tensor, x_hi: torch.Tensor) -> NetworkCost:
    """The costs of :class:`NetworkCost` on the boxes ``[x_lo, x_hi]`` (their first :data:`SAMPLE` rows): a pure
    function of the network, the inputs and the radius."""
    x_lo, x_hi = x_lo[:SAMPLE], x_hi[:SAMPLE]
    with torch.no_grad():
        boxes = ibp_boxes(graph, x_lo, x_hi)
        consumers, exact, up = relaxed_consumers(graph), ibp_exact_values(graph), upstream_values(graph)
        own = {graph.input_name: 0}
        spent = torch.zeros(x_lo.shape[0], dtype=torch.float64)
        for node in graph.nodes:
            box = boxes[node.output]
            own[node.output] = node_work(node, box.lo.shape)
            if node.output in consumers and node.output not in exact:
                k = unstable_neurons(consumers[node.output], box).flatten(1).sum(1).double().cpu()
                cost = 2.0 * k * sum(own[a] for a in up[node.output])
                spent = torch.where(spent + cost <= DEFAULT_MAX_WORK, spent + cost, spent)
        forward = float(sum(own.values()))
        classes = int(boxes[graph.output_name].lo.shape[1])
    return NetworkCost(forward=forward, tighten=float(spent.mean()) if len(spent) else 0.0,
                       final=2.0 * max(classes - 1, 1) * forward, classes=classes)


def attack_work(cost: NetworkCost, params: AuditParams, twin: bool) -> float:
    """The attacks' requested work per example (multiply-adds): every attack of ``params.attacks`` at its full
    budget (0 without an attack)."""
    if params.steps <= 0 or not params.attacks:
        return 0.0
    copies = 2 if twin and params.float_twin else 1
    steps = 0.0
    if "apgd-ce" in params.attacks:
        steps += params.apgd_steps * params.apgd_restarts * copies
    if "apgd-t" in params.attacks and cost.classes >= 4:
        steps += params.apgd_steps * params.apgd_restarts * min(params.apgd_targets, cost.classes - 1) * copies
    if "pgd" in params.attacks:
        steps += params.steps * params.restarts
    queries = params.square_queries * params.square_restarts if "square" in params.attacks else 0
    return cost.forward * (GRADIENT_STEP * steps + queries)


def verifier_work(cost: NetworkCost, params: AuditParams) -> dict[str, float]:
    """Each costly verifier's estimated work per example (multiply-adds)."""
    gradient = GRADIENT_STEP * cost.final
    return {"crown": cost.tighten + cost.final,
            "alpha-crown": cost.tighten + ALPHA_ITERATIONS * gradient,
            "bab": cost.tighten + (ALPHA_ITERATIONS + BAB_ITERATIONS * params.bab_domains) * gradient}


_FIELDS = {"crown": "crown", "alpha-crown": "alpha_crown", "bab": "bab"}


def plan(cost: NetworkCost, params: AuditParams, twin: bool = False, floor: float | None = None
         ) -> list[SkippedVerifier]:
    """The verifiers that are on but will not run, and why: a pure function of the network's cost and the
    requested budgets (see the module's docstring). A verifier within ``floor`` (:data:`FLOOR`) always runs."""
    skipped = []
    if params.bab and not params.alpha_crown and not params.bab_alone:
        skipped.append(SkippedVerifier(name="bab", reason="alpha-CROWN is off and branch and bound builds on its "
                                                          "bounds (--bab asks for it all the same)"))
    budget = attack_work(cost, params, twin)
    if params.verifier_share is None or budget <= 0:
        return skipped
    allowed = max(params.verifier_share * budget, FLOOR if floor is None else floor)
    for name, work in verifier_work(cost, params).items():
        if not getattr(params, _FIELDS[name]) or any(s.name == name for s in skipped):
            continue
        if work > allowed:
            skipped.append(SkippedVerifier(
                name=name, work=work, budget=allowed,
                reason=f"about {work:.2g} multiply-adds per example, more than {params.verifier_share:g} x the "
                       f"attacks' requested {budget:.2g} (--verifier-share; 'none' runs it)"))
    return skipped


def apply(params: AuditParams, skipped: list[SkippedVerifier]) -> AuditParams:
    """``params`` with the skipped verifiers off."""
    return params.model_copy(update={_FIELDS[s.name]: False for s in skipped}) if skipped else params


def line(s: SkippedVerifier) -> str:
    """The console's line for a skipped verifier."""
    label = {"crown": "CROWN", "alpha-crown": "alpha-CROWN", "bab": "branch and bound"}[s.name]
    return f"audit: {label} skipped: {s.reason}"
