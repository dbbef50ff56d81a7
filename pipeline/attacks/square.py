"""The Square attack (Andriushchenko et al., ECCV 2020): the audit's gradient-free check for gradient masking."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.attacks.engine import Confirm, attack_threat, deployed_wrong
from pipeline.runtime import attack_mode, num_threads


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    """Square attack's schedule of the fraction of pixels changed: halved at fixed points of a 10k-query run."""
    it = int(it / max(n_iters, 1) * 10000)
    for k, mark in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= mark:
            return p_init / 2 ** k
    return p_init / 2 ** 9


@dataclass
class SquareResult:
    """What the Square attack found on N examples."""

    broken: torch.Tensor  # bool [N]: a confirmed misclassified point was found
    adv_x: torch.Tensor  # [N, C, H, W]: the best point per example (lowest margin)
    margin: torch.Tensor  # [N]: its margin on the attacked model
    queries: int
    rejected: int
    seconds: float


@torch.no_grad()
def square_attack(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float, *,
                  queries: int = 1000, p_init: float = 0.05, seed: int = 0, confirm: Confirm | None = None,
                  threads: int | None = None) -> SquareResult:
    """Square attack, L-inf (Andriushchenko et al., ECCV 2020): random search with no gradient.

    Starts from vertical stripes of +-eps, then each query redraws one random square window (side
    ``sqrt(p * H * W)``, ``p`` halving on the paper's schedule from ``p_init``) to +-eps per channel and keeps the
    change when the margin loss ``z_y - max_{j != y} z_j`` drops. It needs no gradient, so it is the audit's check
    for gradient masking: examples it breaks but PGD did not point at a flawed gradient, not at robustness.
    ``model`` is any ``x -> logits`` callable; ``confirm`` as in :func:`pipeline.attacks.pgd_attack`.
    """
    threat = attack_threat(x, y, eps, "linf")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    n, dev = len(x), x.device
    y = y.to(dev, torch.long)
    with attack_mode(model, threads) if isinstance(model, nn.Module) else num_threads(threads):

        def margin_of(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            z = model(xs)
            rows = torch.arange(len(ys), device=dev)
            other = z.clone()
            other[rows, ys] = -torch.inf
            return z[rows, ys] - other.max(1).values

        lo, hi = threat.box(x)
        nc, h, w = x.shape[1], x.shape[-2], x.shape[-1]
        stripes = (torch.randint(0, 2, (n, nc, 1, w), generator=g).float() * 2 - 1).to(dev) * eps
        best = x.clone()
        best_margin = torch.full((n,), torch.inf, device=dev)
        broken = torch.zeros(n, dtype=torch.bool, device=dev)
        rejected = 0

        def accept(idx: torch.Tensor, xs: torch.Tensor, m: torch.Tensor) -> None:
            """Keep improvements; a point misclassified by the model counts only once the deployed one agrees."""
            nonlocal rejected
            wrong = m < 0
            if wrong.any():
                ok = deployed_wrong(confirm, xs[wrong], y[idx[wrong]])
                rejected += int((~ok).sum())
                good = wrong.clone()
                good[wrong] = ok
                broken[idx[good]] = True
                m = torch.where(wrong & ~good, best_margin[idx], m)  # a rejected point is no improvement
            better = m < best_margin[idx]
            best[idx[better]] = xs[better]
            best_margin[idx[better]] = m[better]

        if n:
            start = torch.clamp(x + stripes, lo, hi)
            accept(torch.arange(n, device=dev), start, margin_of(start, y))
        for it in range(queries):
            idx = (~broken).nonzero().squeeze(1)
            if not len(idx):
                break
            p = _square_p(p_init, it, queries)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
            r0 = int(torch.randint(0, h - s + 1, (1,), generator=g))
            c0 = int(torch.randint(0, w - s + 1, (1,), generator=g))
            cand = best[idx].clone()
            signs = (torch.randint(0, 2, (len(idx), nc, 1, 1), generator=g).float() * 2 - 1).to(dev) * eps
            window = (slice(None), slice(None), slice(r0, r0 + s), slice(c0, c0 + s))
            cand[window] = x[idx][window] + signs
            cand = torch.clamp(cand, lo[idx], hi[idx])
            accept(idx, cand, margin_of(cand, y[idx]))
    return SquareResult(broken=broken, adv_x=best, margin=best_margin, queries=queries, rejected=rejected,
                        seconds=time.perf_counter() - t0)
