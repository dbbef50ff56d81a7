"""The engine: an IBP pass and CROWN's backward pass over the graph form, knowing no op (see
:mod:`pipeline.bounds.ops` for the rules).

IBP is Gowal et al. 2018; the backward pass and its intermediate bounds are CROWN (Zhang et al. 2018), with IBP
intermediate bounds CROWN-IBP (Zhang et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.bounds.box import Box, Boxes, concretize
from pipeline.bounds.ops import Window, rule_for
from pipeline.errors import HydraPipeError
from pipeline.graph import GraphModule, Node, as_graph
from pipeline.runtime import sound_numerics

DEFAULT_MAX_ELEMENTS = 1 << 25
"""Budget, in tensor elements, for one batch of CROWN coefficients (128 MiB in float32)."""
DEFAULT_MAX_WORK = 1e12
"""Budget per example, in multiply-adds (estimated with :func:`_node_work`), for CROWN's intermediate bounds.
Tightening a layer costs two backward passes per unstable neuron through every node before it: about 9e8 per
example for CNN-small on 28 x 28 Fashion-MNIST at eps 0.1, 1.7e11 for CNN-large at eps 0.004 (16 s on one core),
9e11 for torchvision's ResNet-18 at 32 x 32 (about 100 s), far more for a 32 x 32 VGG-16 at eps 8/255. Layers are
tightened front to back while the example's budget lasts; a layer that does not fit keeps its IBP bound (sound,
but much looser: at 4e10, CNN-large's bounds lost every proof), and the final bound is CROWN's backward pass all
the same (CROWN-IBP's bound where nothing was tightened). The budget caps CROWN at a minute or two per example on
one core. The estimate counts passes over whole values: on a chain of convolutions from the input
(:func:`window_chain`) the rows run on their windows at a fraction of it, but the budget decides as it always did,
so which neurons are tightened does not depend on how."""


# ----------------------------------------------------------------------------------------------------------------
# IBP
# ----------------------------------------------------------------------------------------------------------------

def ibp_boxes(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, refine: Callable[[Node, Box], Box] | None = None
         ) -> dict[str, Box]:
    boxes = Boxes({graph.input_name: Box(lo=x_lo, hi=x_hi)})
    for node in graph.nodes:
        box = rule_for(node).ibp(node, [boxes[i] for i in node.inputs])
        boxes[node.output] = refine(node, box) if refine is not None else box
    return boxes


def check_box(x_lo: Tensor, x_hi: Tensor) -> None:
    if x_lo.shape != x_hi.shape:
        raise HydraPipeError(f"bounds: x_lo has shape {tuple(x_lo.shape)} but x_hi {tuple(x_hi.shape)}")
    if bool((x_lo > x_hi).any()):
        raise HydraPipeError("bounds: x_lo > x_hi somewhere; expected a non-empty box")


def interval_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor) -> tuple[Tensor, Tensor]:
    """IBP (Gowal et al. 2018): elementwise ``lo <= logits(x) <= hi`` for every ``x`` in ``[x_lo, x_hi]``.

    Affine layers in centre/radius form ``c' = W c + b, r' = |W| r``; monotone ops (ReLU, MaxPool, Clip, rounding
    and clipping of QuantizeLinear) on the endpoints. Differentiable.
    """
    check_box(x_lo, x_hi)
    graph = as_graph(model)
    box = ibp_boxes(graph, x_lo, x_hi)[graph.output_name]
    return box.lo, box.hi


# ----------------------------------------------------------------------------------------------------------------
# Backward linear bound propagation (CROWN). A linear bound is a coefficient tensor ``A`` of shape
# [N or 1, M, *value_shape] per graph value plus a bias [N, M]; the engine computes lower bounds of
# ``sum(A * value)`` for each of the M rows. Upper bounds are lower bounds of the negated rows.
# ----------------------------------------------------------------------------------------------------------------

def backward_bounds(graph: GraphModule, target: str, spec: Tensor, boxes: dict[str, Box], *, linear_only: bool = False,
              alphas: dict[str, Tensor] | None = None, rows: Tensor | None = None,
              lagrange: dict[str, Tensor] | None = None, record: dict[str, Tensor] | None = None) -> Tensor:
    """Lower bounds [N, M] of ``sum(spec[:, j] * value(target))``: CROWN's backward pass from ``target``.

    ``linear_only`` stops at the first non-affine node (bounded by its box): the specification folded into the
    trailing affine layers, as CROWN-IBP does for the margins.

    ``lagrange`` ({value: [N, M, *shape]}) is added to a value's coefficients once they are complete (beta-CROWN's
    split multipliers, Wang et al. 2021: the bound becomes one of ``spec . target + sum(lagrange * value)``).
    ``record``: when given, filled with the (complete) coefficients of the Relu and QuantizeLinear outputs and of
    the input.

    ``rows`` ([N, R] indices into the rows of a batch-shared ``spec`` [1, U, ...]): the rows are pulled back
    once for the whole batch through the affine ops next to ``target`` and only split per example (row
    ``rows[n, j]`` for example n) at the first op whose relaxation depends on the example. The result is [N, R].
    """
    coeffs: dict[str, Tensor] = {target: spec}
    shared = {target} if rows is not None else set()
    shared_bias: Tensor | float = 0.0  # [1, U] while rows are shared
    bias: Tensor | float = 0.0
    n = boxes[graph.input_name].shape[0]

    def split(a: Tensor) -> Tensor:
        return a[0][rows]

    started = False
    for node in reversed(graph.nodes):
        if node.output == target:
            started = True
        if not started or node.output not in coeffs:
            continue
        a = coeffs.pop(node.output)
        is_shared = node.output in shared
        shared.discard(node.output)
        if lagrange is not None and node.output in lagrange:
            a = (split(a) if is_shared else a) + lagrange[node.output]
            is_shared = False
        rule = rule_for(node)
        relaxed = rule.relaxed and not linear_only
        linear = rule.is_linear(node)
        if is_shared and not linear:
            a, is_shared = split(a), False
        if record is not None and node.op in ("Relu", "QuantizeLinear"):
            record[node.output] = a
        if not (linear or relaxed):  # a cut: bound this node's contribution by its box
            bias = bias + concretize(a, boxes[node.output])
            continue
        pulled, b = rule.backward(node, a, boxes, alphas)
        if is_shared:
            shared_bias = shared_bias + b
        else:
            bias = bias + b
        for name, pa in zip(node.inputs, pulled):
            if pa is None:
                continue
            if name not in coeffs:
                coeffs[name] = pa
                if is_shared:
                    shared.add(name)
                continue
            if (name in shared) != is_shared:  # one shared, one per-example contribution: split the shared one
                if is_shared:
                    pa = split(pa)
                else:
                    coeffs[name] = split(coeffs[name])
                    shared.discard(name)
            coeffs[name] = coeffs[name] + pa
    width = spec.shape[1] if rows is None else rows.shape[1]
    out = torch.zeros(n, width, dtype=spec.dtype, device=spec.device) + bias
    if rows is not None and isinstance(shared_bias, Tensor):
        out = out + shared_bias.expand(n, -1).gather(1, rows)
    for name, a in coeffs.items():  # the input, or values upstream of a cut that nothing else reads
        if record is not None and name == graph.input_name:
            record[name] = split(a) if name in shared else a
        bound = concretize(a, boxes[name])
        out = out + (bound.gather(1, rows) if name in shared else bound)
    return out


# ----------------------------------------------------------------------------------------------------------------
# CROWN with CROWN or IBP intermediate bounds
# ----------------------------------------------------------------------------------------------------------------

def ibp_exact_values(graph: GraphModule) -> set[str]:
    """Values on which IBP is already exact: reached from the input through diagonal affine ops and at most one
    general affine op (a single linear map of a box is bounded exactly by centre/radius)."""
    general = {graph.input_name: False}
    for node in graph.nodes:
        if len(node.inputs) != 1 or node.inputs[0] not in general:
            continue
        g, exactness = general[node.inputs[0]], rule_for(node).ibp_exactness(node)
        if exactness == "diagonal":
            general[node.output] = g
        elif exactness == "general" and not g:
            general[node.output] = True
    return set(general)


def relaxed_consumers(graph: GraphModule) -> dict[str, list[Node]]:
    """The relaxed nodes (ReLU, QuantizeLinear) reading each value, by the value's name."""
    consumers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if rule_for(node).relaxed:
            consumers.setdefault(node.inputs[0], []).append(node)
    return consumers


def unstable_neurons(consumers: list[Node], box: Box) -> Tensor:
    """The neurons of ``box`` whose relaxation, in any of ``consumers``, depends on their bounds."""
    chosen = torch.zeros_like(box.lo, dtype=torch.bool)
    for consumer in consumers:
        chosen |= rule_for(consumer).unstable(consumer, box)
    return chosen


def upstream_values(graph: GraphModule) -> dict[str, set[str]]:
    """For each value, the values it is computed from (itself included)."""
    up: dict[str, set[str]] = {graph.input_name: {graph.input_name}}
    for node in graph.nodes:
        up[node.output] = {node.output}.union(*(up[i] for i in node.inputs))
    return up


def _node_work(node: Node, out: Box) -> int:
    """Multiply-adds of ``node`` per example, about: its output's size times the fan-in of its largest weight
    (a convolution's ``C_in k k``, a dense layer's inputs), 1 for an op without one. A backward pass of one
    coefficient row through the node costs about as much."""
    weights = [t for t in (*node.module.parameters(), *node.module.buffers()) if t.dim() >= 2]
    fan_in = max(weights, key=lambda t: t.numel())[0].numel() if weights else 1
    return math.prod(out.shape[1:]) * fan_in


def crown_boxes(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, intermediate: Literal["ibp", "crown"],
                 max_elements: int, refine: Callable[[Node, Box], Box] | None = None,
                 max_work: float | None = DEFAULT_MAX_WORK) -> Boxes:
    """IBP boxes, with the inputs of relaxed nodes (ReLU, QuantizeLinear) tightened by CROWN when asked.

    Each tightened bound is intersected with its IBP bound (both are sound). Only neurons whose relaxation
    depends on their bounds are recomputed, per example: for a ReLU input the unstable neurons (a stable
    neuron's relaxation is exact whatever its bounds), for a QuantizeLinear input those whose box does not
    round to a single level and is narrow or near a clip edge (:data:`pipeline.bounds.relax.QUANT_WIDE`).
    ``refine(node, box)`` narrows each IBP box before (sound narrowings only: a reference bound, the split
    constraints of a branch-and-bound domain).

    ``max_work``: each example's budget of multiply-adds for the tightening (:data:`DEFAULT_MAX_WORK`; None: no
    limit). A layer whose tightening would overrun an example's remaining budget keeps its IBP bound for that
    example; the decision is the example's own, so its bounds do not depend on the batch. The boxes record,
    per tightened value, which neurons were tightened (``tightened``), so alpha-CROWN optimises the same ones.
    """
    if intermediate == "ibp":
        return ibp_boxes(graph, x_lo, x_hi, refine)
    consumers = relaxed_consumers(graph)
    exact = ibp_exact_values(graph)
    boxes = Boxes({graph.input_name: Box(lo=x_lo, hi=x_hi)})
    spent = torch.zeros(x_lo.shape[0], dtype=torch.float64, device=x_lo.device)
    up = upstream_values(graph) if max_work is not None else {}
    own = {graph.input_name: 0}  # each node's multiply-adds per example
    for node in graph.nodes:
        box = rule_for(node).ibp(node, [boxes[i] for i in node.inputs])
        if refine is not None:
            box = refine(node, box)
        boxes[node.output] = box
        if max_work is not None:
            own[node.output] = _node_work(node, box)
        if node.output in consumers and node.output not in exact:
            chosen = unstable_neurons(consumers[node.output], box)
            if max_work is not None:  # a backward row from here crosses every node it is computed by, once
                per_row = sum(own[a] for a in up[node.output])
                cost = 2.0 * chosen.flatten(1).sum(1).to(spent.dtype) * per_row
                fits = spent + cost <= max_work
                spent = torch.where(fits, spent + cost, spent)
                chosen = chosen & fits.view(-1, *([1] * (chosen.dim() - 1)))
            boxes.tightened[node.output] = chosen
            boxes[node.output] = _tighten(graph, node.output, box, boxes, chosen, max_elements)
    return boxes


def _tighten(graph: GraphModule, name: str, box: Box, boxes: dict[str, Box], chosen: Tensor,
             max_elements: int) -> Box:
    """Recompute the bounds of value ``name`` by CROWN, one row per (example, neuron) where ``chosen``.

    Rows are chosen per example (an example's unstable neurons), not as the union over the batch: in a trained
    network each example has few unstable neurons but the union covers most of the layer. Each example's rows
    are padded to the most any example of its group has, so the examples are grouped by their number of rows
    (:data:`GROUP_FILL`): on the Fashion-MNIST CNN at eps 0.1 the counts range from 545 to 1310 in a batch.
    A value computed from the input by a chain of convolutions and elementwise ops is tightened on windows instead
    (:func:`window_chain`, :func:`_tighten_windows`), every row on its own, without padding.
    """
    n = box.shape[0]
    chain = window_chain(graph, name)
    if chain is not None and windows_fit(chain, boxes, max_elements):
        return _tighten_windows(graph, chain, box, boxes, chosen, max_elements)
    counts = chosen.flatten(1).sum(1)
    groups = _groups(counts)
    if len(groups) > 1:
        lo, hi = box.lo.clone(), box.hi.clone()
        for idx in groups:
            sub = Boxes({k: b.map(lambda t, idx=idx: t[idx] if t.shape[0] == n else t) for k, b in boxes.items()})
            sub.dense = getattr(boxes, "dense", {})
            got = _tighten(graph, name, sub[name], sub, chosen[idx], max_elements)
            lo[idx], hi[idx] = got.lo, got.hi
        return Box(lo=lo, hi=hi)
    order, valid = select_neurons(chosen)
    k_max = order.shape[1]
    if k_max == 0:
        return box
    largest = max(math.prod(b.shape[1:]) for b in boxes.values())
    # rows per chunk so that one coefficient tensor [N, 2 * rows, largest value] stays under max_elements
    chunk = max(1, max_elements // max(1, n * largest * 2))
    new_lo, new_hi = [], []
    for start in range(0, k_max, chunk):
        spec, rows = row_spec(order[:, start:start + chunk], valid[:, start:start + chunk], box)
        res = backward_bounds(graph, name, spec, boxes, rows=rows)
        k = rows.shape[1] // 2
        new_lo.append(res[:, :k])
        new_hi.append(-res[:, k:])
    return merge_bounds(box, order, valid, torch.cat(new_lo, 1), torch.cat(new_hi, 1))


WINDOW_START: Window = ((1, 1), (1, 1), (0, 0))
"""The window of one neuron of the bounded value: itself."""


def window_chain(graph: GraphModule, name: str) -> list[tuple[Node, Window, Window]] | None:
    """The nodes computing value ``name`` from the input, last first, each with the windows of its output and of
    its input (:data:`pipeline.bounds.ops.Window`) that one neuron of ``name`` reads, when they form a chain of
    single-input ops whose backward rules act on local windows (convolutions, ``OpRule.input_window``, and
    elementwise ops with at most per-channel constants, ``OpRule.elementwise``) and contain a convolution;
    else None.

    Then a row of an intermediate bound, one neuron at output position ``(i, j)``, has coefficients only on the
    window of each value that the neuron's receptive field covers, and :func:`_tighten_windows` pulls it back on
    those windows (auto_LiRPA's "patches" mode, Xu et al. 2020) instead of on whole values."""
    producer = {node.output: node for node in graph.nodes}
    chain, value, window, conv = [], name, WINDOW_START, False
    while value != graph.input_name:
        node = producer.get(value)
        if node is None or len(node.inputs) != 1:
            return None
        rule = rule_for(node)
        wider = rule.input_window(node, window)
        if wider is None and not rule.elementwise(node):
            return None
        conv |= wider is not None
        chain.append((node, window, wider or window))
        window = wider or window
        value = node.inputs[0]
    return chain if conv else None


def windows_fit(chain: list[tuple[Node, Window, Window]], boxes: dict[str, Box], max_elements: int) -> bool:
    """Whether the windows pay on ``chain`` (then :func:`crown_boxes` tightens on them): every value is
    [N, C, H, W], each window is smaller than half its value (else whole values are as cheap; deep stacks of
    stride-1 convolutions grow windows past the image), and the windows of all positions (``F.unfold``) of the
    batch stay within ``max_elements``."""
    for node, _, window in chain:
        shape = boxes[node.inputs[0]].shape
        (kh, kw), (sh, sw), (ph, pw) = window
        if len(shape) != 4 or kh * kw * 2 > shape[2] * shape[3]:
            return False
        positions = ((shape[2] + 2 * ph - kh) // sh + 1) * ((shape[3] + 2 * pw - kw) // sw + 1)
        if shape[0] * shape[1] * kh * kw * positions > max_elements:
            return False
    return True


def _windows(t: Tensor, window: Window, at: Tensor, rows: Tensor) -> Tensor:
    """Each row's window of ``t`` [N, C, H, W] (zero outside ``t``): [R, C, kh, kw] for the rows of examples
    ``rows`` [R] at output positions ``at`` [R, 2]."""
    (kh, kw), stride, pad = window
    cols = F.unfold(t, (kh, kw), padding=pad, stride=stride)  # [N, C kh kw, L]
    lw = (t.shape[3] + 2 * pad[1] - kw) // stride[1] + 1
    picked = cols.transpose(1, 2).contiguous()[rows, at[:, 0] * lw + at[:, 1]]  # whole rows: a fast gather
    return picked.view(len(rows), t.shape[1], kh, kw)


def _tighten_windows(graph: GraphModule, chain: list[tuple[Node, Window, Window]], box: Box, boxes: dict[str, Box],
                     chosen: Tensor, max_elements: int) -> Box:
    """:func:`_tighten` on a :func:`window_chain`: the chosen neurons of every example as rows (``+e_i`` for the
    lower bound, ``-e_i`` for the upper), each pulled back on its own windows by the same rules as on whole values,
    so the bounds are the same up to float rounding. On CNN-small's second conv (28 x 28 Fashion-MNIST) a row's
    windows are [16, 4, 4] and [1, 10, 10] instead of 16 x 14 x 14 and 28 x 28: CROWN on 425 test images at eps
    0.1 took 9 instead of 34 s of CPU."""
    n = box.shape[0]
    order, valid = select_neurons(chosen)
    if order.shape[1] == 0:
        return box
    example = torch.arange(n, device=order.device).unsqueeze(1).expand_as(order)[valid]
    flat = order[valid]  # the chosen neurons, example after example
    _, c, h, w = box.shape
    channel, at = flat // (h * w), torch.stack([(flat % (h * w)) // w, flat % w], 1)
    input_name = graph.input_name
    largest = max(boxes[node.inputs[0]].shape[1] * math.prod(window[0]) for node, _, window in chain)
    chunk = max(1, max_elements // max(1, 4 * largest))  # rows (of both signs) per pass
    new_lo, new_hi = [], []
    for start in range(0, flat.numel(), chunk):
        ex, ch, pos = example[start:start + chunk], channel[start:start + chunk], at[start:start + chunk]
        r = ex.numel()
        rows, pos = torch.cat([ex, ex]), torch.cat([pos, pos])
        a = torch.zeros(2 * r, c, 1, 1, dtype=box.lo.dtype, device=box.lo.device)
        a[torch.arange(r), ch] = 1.0
        a[torch.arange(r, 2 * r), ch] = -1.0
        out = torch.zeros(2 * r, dtype=a.dtype, device=a.device)
        for node, window, wider in chain:
            rule, src = rule_for(node), node.inputs[0]
            if wider != window:  # a convolution
                a, b = rule.window_backward(node, a, window)
                out = out + b
                ones = torch.ones(1, 1, *boxes[src].shape[2:], dtype=a.dtype, device=a.device)
                a = a * _windows(ones, wider, pos, torch.zeros_like(rows))  # its padding: no coefficient
                continue
            local = Boxes({input_name: boxes[input_name]})
            src_box = boxes[src]
            local[src] = Box(lo=_windows(src_box.lo, window, pos, rows), hi=_windows(src_box.hi, window, pos, rows))
            pulled, b = rule.backward(node, a.unsqueeze(1), local, None)
            out = out + (b.squeeze(1) if isinstance(b, Tensor) else b)
            if pulled[0] is None:  # bounded on its own box (a QuantizeLinear of the input)
                a = None
                break
            a = pulled[0].squeeze(1)
        if a is not None:
            x_box, window = boxes[input_name], chain[-1][2]
            x_win = Box(c=_windows(x_box.c, window, pos, rows), r=_windows(x_box.r, window, pos, rows))
            out = out + concretize(a.unsqueeze(1), x_win).squeeze(1)
        new_lo.append(out[:r])
        new_hi.append(-out[r:])
    zeros = torch.zeros(order.shape, dtype=box.lo.dtype, device=box.lo.device)
    return merge_bounds(box, order, valid, zeros.masked_scatter(valid, torch.cat(new_lo)),
                        zeros.masked_scatter(valid, torch.cat(new_hi)))


GROUP_FILL = 0.75
"""In a group of examples tightened together, each has at least this share of the rows of the group's largest."""


def _groups(counts: Tensor) -> list[Tensor]:
    """The examples (indices) in groups of similar ``counts``, largest first: a group takes the next examples in
    decreasing order while they have at least :data:`GROUP_FILL` of its first one's count. One group when all
    are alike (the common case of a batch of one)."""
    if counts.numel() <= 1 or int(counts.min()) >= GROUP_FILL * int(counts.max()):
        return [torch.arange(counts.numel(), device=counts.device)]
    ranked = torch.argsort(counts, descending=True, stable=True)
    values = counts[ranked].tolist()
    groups, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] < GROUP_FILL * values[start]:
            groups.append(ranked[start:i])
            start = i
    return groups


def select_neurons(chosen: Tensor) -> tuple[Tensor, Tensor]:
    """The chosen neurons of each example first (flat indices [N, k], k the most any example has; a stable sort
    keeps their order), padded with unchosen ones, and which of them are chosen ([N, k] bool)."""
    n = chosen.shape[0]
    chosen = chosen.reshape(n, -1)
    counts = chosen.sum(1)
    k_max = int(counts.max()) if n else 0
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :k_max]
    valid = torch.arange(k_max, device=chosen.device).unsqueeze(0) < counts.unsqueeze(1)
    return order, valid


def row_spec(order: Tensor, valid: Tensor, box: Box) -> tuple[Tensor, Tensor]:
    """The batch-shared spec of :func:`backward_bounds` bounding the selected neurons: the union of ``order``'s valid
    neurons over the batch as +e_i (lower) and -e_i (upper) rows [1, 2u, *shape], and each example's rows [N, 2k]
    (padding rows point at any valid row)."""
    lo = box.lo
    dim = math.prod(lo.shape[1:])
    union = torch.unique(order[valid])
    u = union.numel()
    position = torch.zeros(dim, dtype=torch.long, device=lo.device)
    position[union] = torch.arange(u, device=lo.device)
    spec = torch.zeros(1, 2 * u, dim, dtype=lo.dtype, device=lo.device)
    spec[0, torch.arange(u), union] = 1.0
    spec[0, torch.arange(u, 2 * u), union] = -1.0
    pos = torch.where(valid, position[order], 0)
    return spec.view(1, 2 * u, *lo.shape[1:]), torch.cat([pos, pos + u], 1)


def merge_bounds(box: Box, order: Tensor, valid: Tensor, new_lo: Tensor, new_hi: Tensor) -> Box:
    """``box`` intersected with new bounds [N, k] of the neurons ``order`` where ``valid`` (both are sound)."""
    lo, hi = box.lo, box.hi
    n = lo.shape[0]
    flat_lo, flat_hi = lo.reshape(n, -1), hi.reshape(n, -1)
    old_lo, old_hi = flat_lo.gather(1, order), flat_hi.gather(1, order)
    cl = torch.where(valid, torch.maximum(old_lo, new_lo), old_lo)
    ch = torch.where(valid, torch.minimum(old_hi, new_hi), old_hi)
    return Box(lo=flat_lo.scatter(1, order, cl).view_as(lo), hi=flat_hi.scatter(1, order, ch).view_as(hi))


def spec_or_identity(C: Tensor | None, n: int, classes: int, like: Tensor) -> Tensor:
    if C is None:
        return torch.eye(classes, dtype=like.dtype, device=like.device).unsqueeze(0)
    if C.dim() != 3 or C.shape[2] != classes or C.shape[0] not in (1, n):
        raise HydraPipeError(f"bounds: C must have shape (N, m, {classes}), got {tuple(C.shape)}")
    return C.to(like.dtype)


def interval_spec_bounds(graph: GraphModule, spec: Tensor, boxes: dict[str, Box]) -> tuple[Tensor, Tensor]:
    """Interval bounds of ``spec @ logits`` with the spec folded into the trailing affine layers (CROWN-IBP's
    margin bound) on the same boxes. CROWN results are intersected with it: on IBP-trained networks the folded
    interval bound can be the tighter one, and taking the better of two sound bounds is sound."""
    m = spec.shape[1]
    both = backward_bounds(graph, graph.output_name, torch.cat([spec, -spec], 1), boxes, linear_only=True)
    return both[:, :m], -both[:, m:]


def crown_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor, C: Tensor | None = None,
                 intermediate: Literal["ibp", "crown"] = "crown",
                 max_elements: int = DEFAULT_MAX_ELEMENTS,
                 max_work: float | None = DEFAULT_MAX_WORK) -> tuple[Tensor, Tensor]:
    """CROWN (Zhang et al. 2018): bounds on ``C @ logits`` (``C``: N x m x classes) or on the logits.

    Backward linear relaxation: ReLU upper bound = chord, lower slope 1 if ``u > -l`` else 0 (auto_LiRPA's
    "adaptive"). Intermediate pre-activation bounds from CROWN itself (within ``max_work`` multiply-adds per
    example, see :func:`crown_boxes`) or from IBP (CROWN-IBP). The result is
    intersected with the interval bound of ``C @ logits`` (spec folded into the trailing affine layers), so it is
    never looser than IBP. Runs under :func:`pipeline.runtime.sound_numerics`; differentiable.
    """
    check_box(x_lo, x_hi)
    graph = as_graph(model)
    with sound_numerics():
        boxes = crown_boxes(graph, x_lo, x_hi, intermediate, max_elements, max_work=max_work)
        out_box = boxes[graph.output_name]
        n, classes = out_box.shape[0], out_box.shape[1]
        spec = spec_or_identity(C, n, classes, x_lo)
        m = spec.shape[1]
        lower_upper = backward_bounds(graph, graph.output_name, torch.cat([spec, -spec], 1), boxes)
        lo, hi = lower_upper[:, :m], -lower_upper[:, m:]
        ibp_lo, ibp_hi = interval_spec_bounds(graph, spec, boxes)
        return torch.maximum(lo, ibp_lo), torch.minimum(hi, ibp_hi)
