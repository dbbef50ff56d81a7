"""alpha-CROWN (Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
Massively Parallel Incomplete Verifiers", ICLR 2021): CROWN whose lower ReLU slopes are optimised.

Any lower slope in [0, 1] gives a sound relaxation of a ReLU, so the slopes are free parameters of the bound;
gradient steps on them tighten it where CROWN's fixed adaptive choice is loose.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.bounds.box import Box, Boxes
from pipeline.bounds.crown import (DEFAULT_MAX_ELEMENTS, _backward, _check_box, _crown_boxes,
                                   _interval_spec_bounds, _spec_or_identity)
from pipeline.bounds.relax import _relu_relaxation
from pipeline.graph import as_graph


def alpha_crown_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor, C: Tensor | None = None,
                       iterations: int = 20, lr: float = 0.1, lower_only: bool = False,
                       max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[Tensor, Tensor]:
    """alpha-CROWN (Xu et al. 2021): CROWN whose lower ReLU slopes ``alpha`` in [0, 1] are optimised.

    Intermediate bounds are CROWN's (fixed); one ``alpha`` per (example, output row, neuron) starts at CROWN's
    adaptive slope and follows Adam on the sum of the bounds, projected back to [0, 1]. Any slope in [0, 1] gives
    a sound lower relaxation, so every iterate is a valid bound; the best per row is kept, hence the result is
    never looser than CROWN's. With ``lower_only`` the upper bounds are CROWN's (for margins).
    """
    _check_box(x_lo, x_hi)
    graph = as_graph(model)
    with torch.no_grad():
        boxes = _crown_boxes(graph, x_lo, x_hi, "crown", max_elements)
        boxes = Boxes({k: Box(lo=b.lo.detach(), hi=b.hi.detach()) for k, b in boxes.items()})
    out_box = boxes[graph.output_name]
    n, classes = out_box.shape[0], out_box.shape[1]
    spec = _spec_or_identity(C, n, classes, x_lo).detach()
    m = spec.shape[1]
    rows = spec if lower_only else torch.cat([spec, -spec], 1)
    relus = [nd for nd in graph.nodes if nd.op == "Relu"]
    alphas: dict[str, Tensor] = {}
    for nd in relus:
        box = boxes[nd.inputs[0]]
        init = _relu_relaxation(box.lo, box.hi)[0]
        alphas[nd.output] = init.unsqueeze(1).expand(n, rows.shape[1], *init.shape[1:]).clone().requires_grad_(True)
    # the ReLU rule looks alphas up by the ReLU's output name
    params = list(alphas.values())
    with torch.no_grad():
        best = _backward(graph, graph.output_name, rows, boxes)
    if params:
        # Adam by hand: torch.optim's first use imports the compiler stack, seconds on a small CPU
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        beta1, beta2 = 0.9, 0.999
        for step in range(1, iterations + 1):
            with torch.enable_grad():
                bound = _backward(graph, graph.output_name, rows, boxes, alphas=alphas)
                if not bound.requires_grad:  # no slope reaches the bound (every ReLU behind a cut, e.g. a
                    break  # MaxPool before the head): it is CROWN's, nothing to optimise
                # a slope can be unused (e.g. a ReLU whose output the backward pass never reaches)
                grads = torch.autograd.grad(-bound.sum(), params, allow_unused=True)
            with torch.no_grad():
                best = torch.maximum(best, bound.detach())
                for p, g, (m1, m2) in zip(params, grads, moments):
                    if g is None:
                        continue
                    m1.mul_(beta1).add_(g, alpha=1 - beta1)
                    m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (m2 / (1 - beta2 ** step)).sqrt_().add_(1e-8)
                    p.addcdiv_(m1, denom, value=-lr / (1 - beta1 ** step)).clamp_(0.0, 1.0)
        with torch.no_grad():
            best = torch.maximum(best, _backward(graph, graph.output_name, rows, boxes, alphas=alphas))
    ibp_lo, ibp_hi = _interval_spec_bounds(graph, spec, boxes)
    lo = torch.maximum(best[:, :m], ibp_lo)
    if lower_only:
        with torch.no_grad():
            hi = -_backward(graph, graph.output_name, -spec, boxes)
    else:
        hi = -best[:, m:]
    return lo, torch.minimum(hi, ibp_hi)
