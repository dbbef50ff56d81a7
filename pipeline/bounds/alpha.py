"""alpha-CROWN (Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
Massively Parallel Incomplete Verifiers", ICLR 2021): CROWN whose lower ReLU slopes are optimised, and the split
multipliers of beta-CROWN (Wang et al., "Beta-CROWN: Efficient Bound Propagation with Per-neuron Split Constraints
for Neural Network Robustness Verification", NeurIPS 2021) for the domains of branch and bound.

Any lower slope in [0, 1] gives a sound relaxation of a ReLU, so the slopes are free parameters of the bound;
gradient steps on them tighten it where CROWN's fixed adaptive choice is loose. As in auto_LiRPA's
``optimized_bounds``, every bound computed by a backward pass has its own slopes: the final rows and each
intermediate layer whose unstable neurons CROWN tightens (the *start* values, inputs of a ReLU or QuantizeLinear),
one slope per (example, row of that start, neuron of each ReLU before it). Each iteration recomputes the
intermediate bounds from their slopes, front to back, and the final bound from those boxes; the gradient of the
final bound reaches the intermediate slopes through the boxes (the ReLU chords depend on them). Every iterate is
sound, so each intermediate bound is intersected with the best seen so far and the final rows keep their best.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.bounds.box import Box, Boxes
from pipeline.bounds.crown import (DEFAULT_MAX_ELEMENTS, backward_bounds, check_box, crown_boxes, ibp_boxes,
                                   ibp_exact_values, interval_spec_bounds, merge_bounds, relaxed_consumers, row_spec,
                                   select_neurons, spec_or_identity, unstable_neurons, upstream_values)
from pipeline.bounds.ops import rule_for
from pipeline.bounds.relax import relu_relaxation
from pipeline.graph import GraphModule, Node, as_graph
from pipeline.runtime import frozen, sound_numerics

Splits = dict[str, Tensor]
"""Branch-and-bound split constraints by ReLU input value: int8 [N, *shape], +1 where the neuron is split active
(``z >= 0``), -1 where split inactive (``z <= 0``), 0 elsewhere."""


@dataclass
class _Start:
    """A value whose selected neurons are rebounded each iteration: :func:`pipeline.bounds.crown.row_spec`'s
    spec and rows, and the selection to merge the result back."""

    spec: Tensor
    rows: Tensor
    order: Tensor
    valid: Tensor


@dataclass
class Optimized:
    """What :func:`optimized_bounds` returns: sound lower bounds and the boxes they were computed on."""

    lower: Tensor
    """[N, R]: the best lower bound of each row over the iterations (never below CROWN's on ``boxes0``)."""
    boxes: dict[str, Box]
    """The tightest boxes seen (detached), split constraints applied."""
    record: dict[str, Tensor]
    """Coefficients [N, R, *shape] of the final rows at each Relu output and at the input, from the last pass."""


def _clamp(box: Box, sign: Tensor) -> Box:
    """``box`` with the split constraints ``sign`` (see :data:`Splits`) applied."""
    return Box(lo=torch.where(sign > 0, box.lo.clamp(min=0), box.lo),
               hi=torch.where(sign < 0, box.hi.clamp(max=0), box.hi))


def _intersect(box: Box, ref: Box) -> Box:
    return Box(lo=torch.maximum(box.lo, ref.lo), hi=torch.minimum(box.hi, ref.hi))


def _refiner(splits: Splits | None, reference: dict[str, Box] | None) -> Callable[[Node, Box], Box]:
    """The sound narrowings of a node's box: the reference bound of its value, then the split constraints."""

    def refine(node: Node, box: Box) -> Box:
        if reference is not None and node.output in reference:
            box = _intersect(box, reference[node.output])
        if splits is not None and node.output in splits:
            box = _clamp(box, splits[node.output])
        return box

    return refine


def initial_boxes(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, splits: Splits | None = None,
                  reference: dict[str, Box] | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Boxes:
    """CROWN's boxes (no gradients), narrowed by ``reference`` and the split constraints ``splits``."""
    with torch.no_grad():
        boxes = crown_boxes(graph, x_lo, x_hi, "crown", max_elements, _refiner(splits, reference))
    out = Boxes({k: Box(lo=b.lo.detach(), hi=b.hi.detach()) for k, b in boxes.items()})
    out.dense = getattr(boxes, "dense", {})
    out.tightened = getattr(boxes, "tightened", {})
    return out


def inherited_boxes(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, splits: Splits, reference: dict[str, Box],
                    dense: dict[str, Tensor | None] | None = None) -> Boxes:
    """A branch-and-bound child's boxes without a backward pass: IBP front to back, each box intersected with the
    parent's (``reference``: sound on the parent domain, which contains the child) and clamped by the split
    constraints, so a split narrows the boxes after it as far as interval arithmetic carries it. ``dense``: the
    convolutions' dense forms cached by an earlier bound of the same graph (see :class:`Boxes`)."""
    with torch.no_grad():
        boxes = ibp_boxes(graph, x_lo, x_hi, _refiner(splits, reference))
    out = Boxes({k: Box(lo=b.lo.detach(), hi=b.hi.detach()) for k, b in boxes.items()})
    out.dense = dense if dense is not None else {}
    return out


def _slopes(graph: GraphModule, boxes: dict[str, Box], before: set[str], rows: int) -> dict[str, Tensor]:
    """One lower slope per (example, row, neuron) of each ReLU in ``before`` with an unstable neuron, starting at
    CROWN's adaptive slope."""
    out = {}
    for node in graph.nodes:
        if node.op != "Relu" or node.output not in before:
            continue
        box = boxes[node.inputs[0]]
        if not bool(((box.lo < 0) & (box.hi > 0)).any()):
            continue
        init = relu_relaxation(box.lo, box.hi)[0]
        out[node.output] = init.unsqueeze(1).expand(init.shape[0], rows, *init.shape[1:]).clone()
    return out


def _example_cost(graph: GraphModule, boxes: dict[str, Box], rows: int, intermediate: bool) -> int:
    """Tensor elements one example's optimisation holds, about (coefficients and slopes of every start)."""
    consumers, exact, up = relaxed_consumers(graph), ibp_exact_values(graph), upstream_values(graph)
    size = {k: math.prod(b.shape[1:]) for k, b in boxes.items()}
    cost = rows * sum(size.values())
    for name, cons in consumers.items():
        if name in exact or not intermediate:
            continue
        k = int(unstable_neurons(cons, boxes[name]).flatten(1).sum(1).max())
        cost += 2 * k * sum(size[v] for v in up[name])
    return cost


def optimized_bounds(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, rows: Tensor, boxes0: Boxes, *,
                     iterations: int = 20, lr: float = 0.1, lr_beta: float = 0.05, splits: Splits | None = None,
                     target: float | Tensor | None = None, record: bool = False, intermediate: bool = True
                     ) -> Optimized:
    """Lower bounds [N, R] of ``rows`` ([N or 1, R, classes]) . logits over the box, by alpha-CROWN on every
    ReLU (and beta-CROWN's multipliers for ``splits``), starting from the CROWN boxes ``boxes0``
    (:func:`initial_boxes`, with the same splits).

    Adam (by hand: torch.optim's first use imports the compiler stack, seconds on a small CPU) ascends the sum of
    the final rows' bounds over the slopes of every start, projected to [0, 1], and over the multipliers
    ``beta >= 0`` of the split constraints: with ``s z >= 0`` on the domain (``s`` the split's sign),
    ``f - beta s z <= f`` there, so a lower bound of ``f - beta s z`` over the box, computed with relaxations
    valid on the domain, is one of ``f`` on the domain (beta-CROWN). ``target`` (a number, or [N, 1] per example):
    stop once every row is above it.
    ``intermediate=False`` keeps the intermediate bounds of ``boxes0`` and optimises the final rows' slopes only
    (several times faster). Gradients are taken inside; the graph's parameters are frozen meanwhile.
    """
    n, r = x_lo.shape[0], rows.shape[1]
    consumers, exact, up = relaxed_consumers(graph), ibp_exact_values(graph), upstream_values(graph)
    starts: dict[str, _Start] = {}
    for node in graph.nodes:
        name = node.output
        if intermediate and name in consumers and name not in exact:
            chosen = unstable_neurons(consumers[name], boxes0[name])
            if name in boxes0.tightened:  # CROWN's work budget left some neurons at their IBP bounds: so do we
                chosen = chosen & boxes0.tightened[name]
            order, valid = select_neurons(chosen)
            if order.shape[1]:
                spec, start_rows = row_spec(order, valid, boxes0[name])
                starts[name] = _Start(spec, start_rows, order, valid)
    alphas = {name: _slopes(graph, boxes0, up[name], st.rows.shape[1]) for name, st in starts.items()}
    alphas[graph.output_name] = _slopes(graph, boxes0, up[graph.output_name], r)
    betas = {name: torch.zeros(n, r, *s.shape[1:], dtype=x_lo.dtype, device=x_lo.device)
             for name, s in (splits or {}).items() if bool(s.any())}
    signs = {name: splits[name].unsqueeze(1).to(x_lo.dtype) for name in betas}  # type: ignore[index]
    # (parameter, learning rate, projection's upper end): slopes in [0, 1], multipliers >= 0
    params = [(p, lr, 1.0) for d in alphas.values() for p in d.values()] + \
        [(b, lr_beta, math.inf) for b in betas.values()]
    for p, _, _ in params:
        p.requires_grad_(True)
    best: dict[str, Box] = dict(boxes0)
    refine = _refiner(splits, best)
    with torch.no_grad():
        rec: dict[str, Tensor] = {}
        lower = backward_bounds(graph, graph.output_name, rows, boxes0, record=rec if record else None)

    def bound_pass(want_record: bool) -> tuple[Tensor, Boxes]:
        boxes = Boxes({graph.input_name: Box(lo=x_lo, hi=x_hi)})
        boxes.dense = boxes0.dense
        for node in graph.nodes:
            box = refine(node, rule_for(node).ibp(node, [boxes[i] for i in node.inputs]))
            st = starts.get(node.output)
            if st is not None:
                res = backward_bounds(graph, node.output, st.spec, boxes, rows=st.rows, alphas=alphas[node.output])
                k = st.rows.shape[1] // 2
                box = merge_bounds(box, st.order, st.valid, res[:, :k], -res[:, k:])
            boxes[node.output] = box
        lagrange = {name: -beta * signs[name] for name, beta in betas.items()}
        if want_record:
            rec.clear()
        bound = backward_bounds(graph, graph.output_name, rows, boxes, alphas=alphas[graph.output_name],
                          lagrange=lagrange, record=rec if want_record else None)
        return bound, boxes

    def keep(bound: Tensor, boxes: Boxes) -> None:
        nonlocal lower
        lower = torch.where(bound > lower, bound, lower)  # a NaN row keeps its previous bound
        for name, box in boxes.items():
            if name in best:
                best[name] = _intersect(Box(lo=box.lo.detach(), hi=box.hi.detach()), best[name])

    if params and iterations > 0:
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p, _, _ in params]
        beta1, beta2 = 0.9, 0.999
        with frozen(graph):
            for step in range(1, iterations + 1):
                with torch.enable_grad():
                    bound, boxes = bound_pass(False)
                    if not bound.requires_grad:  # no slope or multiplier reaches the bound (every ReLU behind
                        break  # a cut, e.g. a MaxPool before the head): it is CROWN's, nothing to optimise
                    grads = torch.autograd.grad(-bound.sum(), [p for p, _, _ in params], allow_unused=True)
                with torch.no_grad():
                    keep(bound.detach(), boxes)
                    if target is not None and bool((lower > target).all()):
                        break
                    for (p, rate, top), g, (m1, m2) in zip(params, grads, moments):
                        if g is None:  # a slope the backward pass never reaches (behind a cut)
                            continue
                        m1.mul_(beta1).add_(g, alpha=1 - beta1)
                        m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                        denom = (m2 / (1 - beta2 ** step)).sqrt_().add_(1e-8)
                        p.addcdiv_(m1, denom, value=-rate * 0.98 ** step / (1 - beta1 ** step)).clamp_(0.0, top)
            with torch.no_grad():
                bound, boxes = bound_pass(record)
                keep(bound, boxes)
    boxes_out = Boxes(best)
    boxes_out.dense, boxes_out.tightened = boxes0.dense, boxes0.tightened
    return Optimized(lower, boxes_out, {k: v.detach().expand(n, *v.shape[1:]) for k, v in rec.items()})


def alpha_crown_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor, C: Tensor | None = None,
                       iterations: int = 20, lr: float = 0.1, lower_only: bool = False,
                       max_elements: int = DEFAULT_MAX_ELEMENTS, target: float | None = None,
                       intermediate: bool = True) -> tuple[Tensor, Tensor]:
    """alpha-CROWN (Xu et al. 2021): bounds on ``C @ logits`` (``C``: N x m x classes) or on the logits, with the
    lower ReLU slopes of every layer optimised (see :func:`optimized_bounds`) and the intermediate bounds
    recomputed from their own slopes each iteration.

    The result is intersected with CROWN's bound and the folded interval bound, so it is never looser than either.
    With ``lower_only`` the upper bounds are CROWN's (for margins). Examples are optimised in groups whose slopes
    and coefficients stay about within ``max_elements``; ``target`` stops a group early once every lower bound of
    it exceeds ``target`` (0 for margins: nothing more to prove). ``intermediate=False``: the final rows' slopes
    only, on CROWN's intermediate bounds (the earlier, faster alpha-CROWN). Runs under :func:`sound_numerics`.
    """
    check_box(x_lo, x_hi)
    graph = as_graph(model)
    with sound_numerics(), torch.no_grad():
        x_lo, x_hi = x_lo.detach(), x_hi.detach()
        boxes = initial_boxes(graph, x_lo, x_hi, max_elements=max_elements)
        out_box = boxes[graph.output_name]
        n, classes = out_box.shape[0], out_box.shape[1]
        spec = spec_or_identity(C, n, classes, x_lo).detach()
        m = spec.shape[1]
        rows = spec if lower_only else torch.cat([spec, -spec], 1)
        group = max(1, max_elements // max(1, _example_cost(graph, boxes, rows.shape[1], intermediate)))
        best = []
        for i in range(0, n, group):
            part = slice(i, i + group)
            sub = Boxes({k: Box(lo=b.lo[part], hi=b.hi[part]) for k, b in boxes.items()})
            sub.dense, sub.tightened = boxes.dense, {k: t[part] for k, t in boxes.tightened.items()}
            best.append(optimized_bounds(graph, x_lo[part], x_hi[part], rows if rows.shape[0] == 1 else rows[part],
                                         sub, iterations=iterations, lr=lr, target=target,
                                         intermediate=intermediate).lower)
        best_rows = torch.cat(best) if best else torch.zeros(0, rows.shape[1], dtype=x_lo.dtype, device=x_lo.device)
        ibp_lo, ibp_hi = interval_spec_bounds(graph, spec, boxes)
        lo = torch.maximum(best_rows[:, :m], ibp_lo)
        hi = -backward_bounds(graph, graph.output_name, -spec, boxes) if lower_only else -best_rows[:, m:]
        return lo, torch.minimum(hi, ibp_hi)


def shortfall(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, spec: Tensor, lower: Tensor) -> Tensor:
    """How far each example's worst row is from being proved, scale-free: ``-lb / (m - lb)`` for the row with the
    lowest lower bound ``lb`` ([N, M] ``lower`` of ``spec`` [N or 1, M, K] . logits) and ``m`` its value at the box's
    centre, which no lower bound can pass. Below 0: proved; 1: the bound is as far below zero as the centre is
    above it (or the centre is not above zero at all). The two-stage alpha-CROWN and branch and bound spend their
    costly work only on examples within reach by this measure."""
    worst = lower.min(1)
    with torch.no_grad():
        logits = graph((x_lo + x_hi) / 2).to(spec.dtype)
    centre = torch.einsum("nmk,nk->nm", spec.expand(len(lower), *spec.shape[1:]), logits)
    centre = centre.gather(1, worst.indices.unsqueeze(1)).squeeze(1)
    return torch.where(centre > 0, -worst.values / (centre - worst.values).clamp_min(1e-12),
                       torch.ones_like(centre))

