"""Branch and bound on unstable ReLUs (complete verification): alpha-CROWN on the whole box first, then the
domains it leaves unverified are split on one ReLU at a time and each subdomain is bounded with its split
constraints enforced, in the spirit of beta-CROWN (Wang et al., "Beta-CROWN: Efficient Bound Propagation with
Per-neuron Split Constraints for Neural Network Robustness Verification", NeurIPS 2021) on the BaB framework of
Bunel et al. ("Branch and Bound for Piecewise Linear Neural Network Verification", JMLR 2020) and Xu et al.
("Fast and Complete", ICLR 2021).

A domain is the input box with some ReLU inputs ``z_i`` constrained to ``z_i >= 0`` (active) or ``z_i <= 0``
(inactive). On an int8 graph the inputs of a QuantizeLinear whose clip floor is its zero point are split the same
way (:func:`floors_at_zero`: onnxruntime fuses a Conv's ReLU into its U8 activation's quantization, leaving no Relu
node): below zero the output is the floor, above it the staircase is not clipped there. On the oracle CNN quantized
by plain onnxruntime (450 digits test images, eps 0.05, ``benchmarks/int8_bounds.py``) that took its int8 graph
from 67.6% to 74.2% verified (float graph 83.1%), the shipped default model's from 88.0% to 88.7% (float 91.1%).

A domain's bound (:func:`pipeline.bounds.alpha.optimized_bounds`): a child's intermediate boxes are its parent's
(sound, since a child is a subset of its parent) with the new split's neuron clamped by its constraint and the clamp
carried forward by interval arithmetic (:func:`pipeline.bounds.alpha.inherited_boxes`; no backward pass per
intermediate layer, which CROWN on the clamped boxes would take: 4-5x more domains per second on the Fashion-MNIST
CNN-small, see :func:`bab_margins`), and the constraints enter the final bound, whose slopes are optimised, with
optimised multipliers ``beta`` (beta-CROWN); ``intermediate=True`` re-optimises the intermediate bounds per domain
too. Each round takes the ``batch`` domains with the lowest bounds (fewer only where the domain budget has less
left), splits each on the unstable neuron with the best *intercept* score (how much the chord's intercept costs the
bound, BaBSR's main term, Bunel et al. 2020) and bounds all children in one call. A domain whose margin rows are all
above the example's slack (:func:`pipeline.bounds.spec.margin_slack`, the deployed model's float32 rounding) is
dropped (proved); the example is verified when none is left. At each bound the corner of the box minimising the
final linear bound is run through the network: a misclassified corner is a counterexample. The domain budget
(``max_domains``) ends the search undecided; examples whose root bound is far from a proof (:data:`BAB_SHORTFALL`)
are not searched.

Budgets are counted in domains, never in measured time: the size of every round and the number of domains an
example may bound depend on the budget and the problem only, so a verdict does not depend on the machine's speed or
load. The time budget (``time_budget_s``) is a safety net: checked before each round, a search still running past it
stops and its example is reported ``timed_out`` (neither proved nor out of domain budget), never silently undecided.

Soundness: every bound is a sound lower bound of the margins over its domain, and the domains of an example always
cover its box, so the minimum over the leaves of a row's bound is a sound bound of that row over the box.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.bounds.alpha import Optimized, Splits, inherited_boxes, initial_boxes, optimized_bounds, shortfall
from pipeline.bounds.box import Box
from pipeline.bounds.crown import DEFAULT_MAX_ELEMENTS, relaxed_consumers
from pipeline.bounds.spec import margin_slack, margin_spec, precise, proved
from pipeline.errors import HydraPipeError
from pipeline.graph import GraphModule, Quantize, as_graph
from pipeline.runtime import sound_numerics
from pipeline.threat import ThreatModel


BAB_SHORTFALL = 0.25
"""Branch and bound searches only the examples whose root bound is within reach: a
:func:`pipeline.bounds.alpha.shortfall` of at most this. On the Fashion-MNIST benchmark model (the 41 examples
CROWN, alpha-CROWN and APGD left undecided at eps 0.1; 2 s and 50 domains each) all 11 it proved had shortfalls of
at most 0.19 at the root; the 23 above 0.25 took 59 of the 87 s and none was proved. Tested on one model only:
the gate trades completeness for time; ``max_shortfall=None`` (the audit: ``audit.bab_shortfall: null``)
searches every example."""


@dataclass
class BabResult:
    """The verdicts of :func:`branch_and_bound`, one entry per example."""

    verified: Tensor
    """bool [N]: every margin is positive over the whole box (proved)."""
    falsified: Tensor
    """bool [N]: a point of the box (a corner found by the bounds) is misclassified."""
    undecided: Tensor
    """bool [N]: neither, when the domain budget ran out (or every neuron was split, or the search was skipped as
    out of reach): a verdict that depends on the budget and the problem only."""
    timed_out: Tensor
    """bool [N]: neither, because the search stopped on the time budget (the safety net) with domain budget left;
    disjoint from ``undecided``. Such a verdict depends on the machine's speed."""
    domains: Tensor
    """long [N]: domains bounded (1: alpha-CROWN's root alone)."""
    lower: Tensor
    """[N, K-1]: sound lower bounds of the margins ``logit[y] - logit[j]`` (the minimum over the leaves)."""
    seconds: Tensor
    """float [N]: time spent on the example (its share of the batched root bound, then its own search)."""


@dataclass
class _Domains:
    """A batch of domains of one example: bounds [D, M], split constraints and reference boxes per value."""

    lower: Tensor
    splits: Splits
    boxes: dict[str, Box]
    record: dict[str, Tensor]

    def __len__(self) -> int:
        return self.lower.shape[0]

    def take(self, idx: Tensor) -> _Domains:
        return _Domains(self.lower[idx], {k: s[idx] for k, s in self.splits.items()},
                        {k: Box(lo=b.lo[idx], hi=b.hi[idx]) for k, b in self.boxes.items()},
                        {k: r[idx] for k, r in self.record.items()})

    @staticmethod
    def cat(parts: list[_Domains]) -> _Domains:
        first = parts[0]
        return _Domains(torch.cat([p.lower for p in parts]),
                        {k: torch.cat([p.splits[k] for p in parts]) for k in first.splits},
                        {k: Box(lo=torch.cat([p.boxes[k].lo for p in parts]),
                                hi=torch.cat([p.boxes[k].hi for p in parts])) for k in first.boxes},
                        {k: torch.cat([p.record[k] for p in parts]) for k in first.record})


class Kink(NamedTuple):
    """A layer of neurons branch and bound may split at zero: its input and output value names, and the
    QuantizeLinear for such a layer (None for a ReLU)."""

    z: str
    out: str
    quant: Quantize | None


def floors_at_zero(m: Quantize) -> bool:
    """Whether a QuantizeLinear's clip floor is its zero point (onnxruntime's U8 activations after a fused
    Conv-Relu, zero point 0): then ``q(x) = qmin`` wherever ``x <= 0`` and ``q`` is not clipped at its floor
    wherever ``x >= 0``, so splitting its input at zero removes the kink as a ReLU split does."""
    return bool((m.zero_point == m.qmin).all())


def find_kinks(graph: GraphModule) -> list[Kink]:
    """The layers branch and bound splits: every Relu, and every QuantizeLinear whose clip floor is its zero point
    (:func:`floors_at_zero`; onnxruntime fuses a Conv's ReLU into it, so without it an int8 graph has little or
    nothing to split)."""
    out = []
    for node in graph.nodes:
        if node.op == "Relu":
            out.append(Kink(node.inputs[0], node.output, None))
        elif node.op == "QuantizeLinear" and floors_at_zero(node.module):
            out.append(Kink(node.inputs[0], node.output, node.module))
    return out


def _branch(dom: _Domains, kinks: list[Kink]) -> tuple[list[tuple[int, int]], Tensor]:
    """For each domain the unstable neuron to split, as (index into ``kinks``, flat neuron index), chosen by the
    intercept score ``sum_j max(-A_j, 0) * (-l u / (u - l))`` over the rows j still negative (``A``: the final
    rows' coefficients at the layer's output, the intercept in the output's units), plus a small share of
    ``|A| min(u, -l)`` (the lower slope's gap) to break ties; and which domains have no unstable neuron left
    (bool [D])."""
    d = len(dom)
    weight = (dom.lower <= 0).to(dom.lower.dtype)  # [D, M]
    scores = []
    for z, out, quant in kinks:
        box = dom.boxes[z]
        lo, hi = box.lo.reshape(d, -1), box.hi.reshape(d, -1)
        units = torch.ones_like(box.lo[:1])  # the output's units per unit of input (quanta for a QuantizeLinear)
        units = (units if quant is None else units / quant.params(box.lo.dim())[0]).reshape(1, -1)
        unstable = (lo < 0) & (hi > 0)
        a = dom.record[out].reshape(d, weight.shape[1], -1) if out in dom.record else \
            lo.new_zeros(d, weight.shape[1], lo.shape[1])  # behind a cut: no coefficient reaches it
        intercept = -lo * hi / (hi - lo).clamp_min(1e-12) * units
        gap = torch.minimum(hi, -lo) * units
        s = torch.einsum("dm,dmk->dk", weight, a.clamp(max=0).neg()) * intercept \
            + 1e-3 * torch.einsum("dm,dmk->dk", weight, a.abs()) * gap + 1e-9 * gap  # every unstable neuron > 0
        scores.append(torch.where(unstable, s, torch.full_like(s, -1.0)))
    flat = torch.cat(scores, 1)
    best = flat.argmax(1)
    stuck = flat.gather(1, best.unsqueeze(1)).squeeze(1) < 0
    sizes = [s.shape[1] for s in scores]
    choice = []
    for i in best.tolist():
        layer = 0
        while i >= sizes[layer]:
            i -= sizes[layer]
            layer += 1
        choice.append((layer, i))
    return choice, stuck


def _children(dom: _Domains, choice: list[tuple[int, int]], kinks: list[Kink]
              ) -> tuple[Splits, dict[str, Box], Tensor]:
    """The two children of each domain (first all the active ones, then the inactive ones): their split
    constraints, reference boxes (the parent's, clamped by the new split) and the parent's bounds."""
    d = len(dom)
    splits = {k: torch.cat([s, s]).clone() for k, s in dom.splits.items()}
    for j, (layer, idx) in enumerate(choice):
        z = kinks[layer].z
        splits[z].view(2 * d, -1)[j, idx] = 1
        splits[z].view(2 * d, -1)[d + j, idx] = -1
    boxes = {k: Box(lo=torch.cat([b.lo, b.lo]), hi=torch.cat([b.hi, b.hi])) for k, b in dom.boxes.items()}
    return splits, boxes, torch.cat([dom.lower, dom.lower])


EMPTY_RTOL = 1e-5
"""Relative tolerance of :func:`empty_domains`: a bound must cross its opposite bound by more than this share of
their magnitude (at least 1) before a domain counts as empty."""


def empty_domains(boxes: dict[str, Box]) -> Tensor:
    """Domains proved empty: a bound (sound over the domain) crosses its opposite bound somewhere by more than the
    float error of the two (``EMPTY_RTOL * max(1, |lo|, |hi|)``: rounding errors grow with the magnitudes compared,
    so an absolute tolerance would take a non-empty domain with large bounds for empty and drop it unproved).
    Outward: a non-finite bound never makes a domain empty. bool [D]."""
    first = next(iter(boxes.values()))
    out = torch.zeros(first.shape[0], dtype=torch.bool, device=first.lo.device)
    for b in boxes.values():
        tol = EMPTY_RTOL * torch.maximum(b.lo.abs(), b.hi.abs()).clamp_min(1.0)
        out |= (b.lo > b.hi + tol).flatten(1).any(1)
    return out


def _falsified(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, spec: Tensor, opt: Optimized) -> bool:
    """Whether the corner of the box minimising the final linear bound of some domain's worst row is
    misclassified (a margin below zero)."""
    a_in = opt.record.get(graph.input_name)
    if a_in is None:
        return False
    worst = opt.lower.argmin(1)
    a = a_in[torch.arange(a_in.shape[0]), worst]
    corner = torch.where(a >= 0, x_lo.expand_as(a), x_hi.expand_as(a))
    margins = torch.einsum("mk,dk->dm", spec[0], graph(corner))
    return bool((margins < 0).any())


def _keys(graph: GraphModule) -> list[str]:
    """The values whose boxes a domain keeps as its children's reference: the inputs of relaxed nodes."""
    return list(relaxed_consumers(graph))


VERIFIED, FALSIFIED, UNDECIDED, TIMED_OUT = 1, -1, 0, 2
"""The statuses :func:`bab_margins` returns per example (see :class:`BabResult`)."""


def _search(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, spec: Tensor, root: _Domains, *, slack: float,
            deadline: float, max_domains: int, batch: int, iterations: int, intermediate: bool,
            dense: dict[str, Tensor | None], kinks: list[Kink], keys: list[str]) -> tuple[int, Tensor, int]:
    """Branch and bound on one example (``x_lo``, ``x_hi`` [1, ...], ``spec`` [1, M, K]) from its root domain:
    (status: :data:`VERIFIED`, :data:`FALSIFIED`, :data:`UNDECIDED` or :data:`TIMED_OUT`, margin lower bounds [M],
    domains bounded). A domain is proved when every row is above ``slack``. Each round splits the ``batch`` domains
    with the lowest bounds, fewer only where the domain budget has less left, so the rounds and the domains bounded
    are a function of ``max_domains`` and the problem; ``deadline`` (a :func:`time.perf_counter` reading) is only
    checked before each round. ``kinks``, ``keys``: the graph's :func:`find_kinks` and :func:`_keys`, found once for
    all its examples."""
    leaves = torch.full_like(root.lower[0], float("inf"))  # the minimum over proved leaves, per row
    pool, bounded = root, 1
    while len(pool):
        if bounded >= max_domains:
            return UNDECIDED, torch.minimum(leaves, pool.lower.amin(0)), bounded
        if time.perf_counter() >= deadline:
            return TIMED_OUT, torch.minimum(leaves, pool.lower.amin(0)), bounded
        order = pool.lower.amin(1).argsort()
        k = min(batch, len(pool), max(1, (max_domains - bounded) // 2))  # each parent makes two children
        parents, rest = pool.take(order[:k]), pool.take(order[k:])
        choice, stuck = _branch(parents, kinks)
        if bool(stuck.any()):  # fully split and still not proved: the relaxation cannot go further
            return UNDECIDED, torch.minimum(leaves, pool.lower.amin(0)), bounded
        splits, ref, parent_lower = _children(parents, choice, kinks)
        n = splits[kinks[0].z].shape[0]
        xl, xh = x_lo.expand(n, *x_lo.shape[1:]), x_hi.expand(n, *x_hi.shape[1:])
        boxes0 = inherited_boxes(graph, xl, xh, splits, ref, dense)
        opt = optimized_bounds(graph, xl, xh, spec, boxes0, iterations=iterations, splits=splits, target=slack,
                               record=True, intermediate=intermediate)
        bounded += n
        if _falsified(graph, x_lo, x_hi, spec, opt):
            return FALSIFIED, torch.minimum(leaves, pool.lower.amin(0)), bounded
        lower = torch.maximum(opt.lower, parent_lower)  # a child is a subset of its parent
        lower = torch.where(empty_domains(opt.boxes).unsqueeze(1), torch.full_like(lower, float("inf")), lower)
        done = (lower > slack).all(1)
        leaves = torch.minimum(leaves, torch.where(done.unsqueeze(1), lower, torch.full_like(lower, float("inf")))
                               .amin(0))
        children = _Domains(lower, splits, {key: opt.boxes[key] for key in keys}, opt.record)
        pool = _Domains.cat([rest, children.take(torch.nonzero(~done).squeeze(1))])
    return VERIFIED, leaves, bounded


def bab_margins(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, spec: Tensor, *, time_budget_s: float = 10.0,
                max_domains: int = 2000, batch: int = 64, iterations: int = 20, bab_iterations: int = 10,
                max_elements: int = DEFAULT_MAX_ELEMENTS, progress: Callable[[int, int], None] | None = None,
                intermediate: bool = False, max_shortfall: float | None = BAB_SHORTFALL
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Branch and bound for each example of a box batch on the rows ``spec`` [N, M, K] (``e_y - e_j`` for
    margins): (lower bounds [N, M], status long [N]: :data:`VERIFIED` 1, :data:`FALSIFIED` -1, :data:`UNDECIDED`
    0, :data:`TIMED_OUT` 2, domains [N], seconds [N]). A row counts as proved above the example's
    :func:`pipeline.bounds.spec.margin_slack`. alpha-CROWN with ``iterations`` bounds every root at once; each
    search's bound calls run ``bab_iterations``. Each search bounds at most ``max_domains`` domains (its budget,
    which alone sizes its rounds) and stops at ``time_budget_s`` seconds only as a safety net (status
    :data:`TIMED_OUT`). ``progress(done, total)`` after the roots and after each search.

    The root's intermediate bounds are CROWN's; a child inherits its parent's, narrowed by its split
    (:func:`pipeline.bounds.alpha.inherited_boxes`). Recomputing them by CROWN for every domain instead (as this
    search did before) costs 4-5x per domain: on the Fashion-MNIST benchmark model (the 40 examples APGD and
    alpha-CROWN left at eps 0.1, 4 s each, 1 thread) inheriting bounded 3-5x more domains and proved 17 instead
    of 15, its bounds on the others higher; in the audit (shortfall gate on, ``benchmarks/bab_budget.py``) 50 domains
    per example prove the same 13 in 19-22 instead of 38 s, 100 (the audit's default) prove 14 in 24-26 s.
    ``intermediate`` optimises the intermediate slopes per domain too (alpha-CROWN on every layer, as the root of
    :func:`pipeline.bounds.alpha.alpha_crown_bounds`), which on a network with many unstable neurons costs some
    15x per domain, so the search explores far fewer domains in its time budget. Off by default.
    ``max_shortfall``: only the examples whose root bound has at most this
    :func:`~pipeline.bounds.alpha.shortfall` are searched (:data:`BAB_SHORTFALL`; None: all)."""
    n = x_lo.shape[0]
    kinks = find_kinks(graph)
    t0 = time.perf_counter()
    with sound_numerics(), torch.no_grad():
        slack = margin_slack(graph, x_lo, x_hi)
        boxes0 = initial_boxes(graph, x_lo, x_hi, max_elements=max_elements)
        root = optimized_bounds(graph, x_lo, x_hi, spec, boxes0, iterations=iterations, target=slack.unsqueeze(1),
                                record=True, intermediate=intermediate)
        keys = _keys(graph)
        splits = {k.z: torch.zeros(boxes0[k.z].shape, dtype=torch.int8, device=x_lo.device) for k in kinks}
        lower = root.lower.clone()
        status = torch.where(proved(lower, slack), VERIFIED, UNDECIDED)
        domains = torch.ones(n, dtype=torch.long)
        seconds = torch.full((n,), (time.perf_counter() - t0) / max(1, n), dtype=torch.float64)
        searched = status == UNDECIDED
        if max_shortfall is not None:
            searched &= shortfall(graph, x_lo, x_hi, spec, lower) <= max_shortfall
        todo = torch.nonzero(searched).squeeze(1).tolist() if kinks else []
        if progress is not None:
            progress(n - len(todo), n)
        for done, i in enumerate(todo, n - len(todo) + 1):
            t = time.perf_counter()
            one = slice(i, i + 1)
            dom = _Domains(root.lower[one], {z: s[one] for z, s in splits.items()},
                           {k: Box(lo=root.boxes[k].lo[one], hi=root.boxes[k].hi[one]) for k in keys},
                           {k: r[one] for k, r in root.record.items()})
            status[i], lower[i], domains[i] = _search(
                graph, x_lo[one], x_hi[one], spec[one] if spec.shape[0] > 1 else spec, dom, slack=float(slack[i]),
                deadline=t + time_budget_s, max_domains=max_domains, batch=batch, iterations=bab_iterations,
                intermediate=intermediate, dense=boxes0.dense, kinks=kinks, keys=keys)
            seconds[i] += time.perf_counter() - t
            if progress is not None:
                progress(done, n)
    return lower, status, domains, seconds


def branch_and_bound(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, time_budget_s: float = 10.0,
                     max_domains: int = 2000, batch: int = 64, iterations: int = 20, bab_iterations: int = 10,
                     dtype: torch.dtype = torch.float32, progress: Callable[[int, int], None] | None = None,
                     max_shortfall: float | None = BAB_SHORTFALL) -> BabResult:
    """Complete verification of each example over ``threat.box(x)`` by branch and bound (see the module): at most
    ``max_domains`` bounded domains per example, ``batch`` domains split per round (the verdicts depend on these
    and the problem only), and ``time_budget_s`` seconds per example as a safety net (``timed_out``).
    ``dtype`` float64 bounds a float64 copy of the model on an outward-rounded box (see
    :func:`pipeline.bounds.verify.certify`). The verdicts are sound for both norms (the box contains the L2 ball).
    ``progress(done, total)`` as examples finish. ``max_shortfall``: see :func:`bab_margins`.
    """
    if x.shape[0] != y.shape[0]:
        raise HydraPipeError(f"branch_and_bound: {x.shape[0]} inputs but {y.shape[0]} labels")
    if time_budget_s <= 0 or max_domains < 1 or batch < 1:
        raise HydraPipeError("branch_and_bound: time_budget_s must be > 0, max_domains and batch >= 1")
    graph, x_lo, x_hi = precise(as_graph(model), threat, x, dtype)
    with torch.no_grad():
        classes = int(graph(x_lo[:1]).shape[1]) if len(x) else 0
    spec = margin_spec(y, classes).to(x_lo.dtype)
    lower, status, domains, seconds = bab_margins(graph, x_lo, x_hi, spec, time_budget_s=time_budget_s,
                                                  max_domains=max_domains, batch=batch, iterations=iterations,
                                                  bab_iterations=bab_iterations, progress=progress,
                                                  max_shortfall=max_shortfall)
    return BabResult(status == VERIFIED, status == FALSIFIED, status == UNDECIDED, status == TIMED_OUT, domains,
                     lower, seconds)
