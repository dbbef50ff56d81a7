"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), L-inf and L2: the audit's
gradient-free check for gradient masking.

Random search on the margin ``z_y - max_{j != y} z_j``: from a structured start (vertical stripes of +-eps on
L-inf; a grid of the paper's square patterns on L2), each query changes the current best point inside one random
square window (L2: moves mass from a second window into the first) and keeps the change when the margin drops. The
window's side follows the paper's schedule of ``p``, the fraction of pixels changed, halving at fixed points of a
10000-query run (rescaled to ``queries``). The updates are AutoAttack's (``square.py``), with one difference: a
window's corner is drawn uniformly among all its positions (AutoAttack never draws the last row and column).

Every example draws from its own random stream, one per (seed, example index, restart), Square's own
(:func:`pipeline.attacks.steps.seed_sequence`), and gets its own window and signs at every query: its verdict and its
adversarial point do not depend on which examples share the batch, or on their order (up to the last bit of a
batched forward pass). The draws are made for a block of ``QUERY_BLOCK`` queries at a time, one generator call per
example and block, and the windows are built for the whole batch at once as index masks. On L-inf a window may
already sit at the drawn signs (late in the run, when a window is a pixel or two of one channel, half the draws
would): as in the paper's code (``square_attack_linf``: "while the window does not change, redraw the signs"), the
signs are redrawn, up to ``REDRAWS`` times from the example's own draws, until the window changes. A candidate that
still equals the current point (or an L2 update that changes nothing) is not evaluated and spends no query; it keeps
its place in the schedule. Examples leave once broken; ``restarts`` reruns the search from a new start on the
examples still standing.

The audit's Square queries the deployed model itself where it can (:func:`queries_deployed`, :func:`deployed_model`):
a gradient-free attack needs no torch graph, onnxruntime's forward pass is 1.4-6x faster than the graph form's
on a CPU (ResNet-18 at 32x32, one thread: 19 against 28 ms for 30 rows, 1.1 against 6.8 ms for one), and every
margin it reads is then the deployed model's own, so no break needs confirming.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipeline.attacks.engine import AttackResult, attack_threat, clean_correct, clean_logits, deployed_wrong, \
    robustness_curves
from pipeline.attacks.options import AttackOptions, Confirm
from pipeline.attacks.steps import margins, seed_sequence
from pipeline.errors import HydraPipeError
from pipeline.runtime import attack_mode, device_of, num_threads
from pipeline.threat import Norm, ThreatModel

QUERY_BLOCK = 100  # queries whose random numbers an example draws at once
REDRAWS = 8  # L-inf: redraws of a window's signs that would leave it unchanged (P(all fail) <= 2^-9 on one channel)


def deployed_model(confirm: Confirm, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """The deployed model (``confirm``: numpy ``x -> logits``, onnxruntime in the audit) as a torch ``x -> logits``
    callable Square can query: pass it as the model, with no ``confirm`` (it is its own judge)."""
    def query(xs: torch.Tensor) -> torch.Tensor:
        logits = confirm(xs.detach().cpu().numpy().astype(np.float32, copy=False))
        return torch.as_tensor(np.asarray(logits, dtype=np.float32), device=device)
    return query


def queries_deployed(model: object, confirm: Confirm | None) -> bool:
    """Whether Square should query the deployed model ``confirm`` instead of the attacked ``model`` (the audit's
    choice, see the module doc): on a CPU (on a GPU the graph form is the faster one), when the graph form computes
    the deployed model's logits (no final Softmax stripped: the deployed outputs would be probabilities, another
    margin) and takes any batch (a fixed-batch export runs onnxruntime one slice at a time)."""
    if confirm is None or not isinstance(model, nn.Module):
        return False
    if getattr(model, "stripped_output_ops", None) or getattr(model, "fixed_batch", None) is not None:
        return False
    return device_of(model).type == "cpu"


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    """Square attack's schedule of the fraction of pixels changed: halved at fixed points of a 10k-query run."""
    it = int(it / max(n_iters, 1) * 10000)
    for k, mark in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= mark:
            return p_init / 2 ** k
    return p_init / 2 ** 9


def _side(p: float, h: int, w: int, norm: Norm) -> int:
    """The window's side at fraction ``p``: ``sqrt(p h w)``, at least 1 (L2: odd and at least 3), at most the
    image's."""
    s = int(round(math.sqrt(p * h * w)))
    if norm == "l2":
        s = max(s, 3)
        s += 1 - s % 2
    return min(max(s, 1), h, w)


def _rectangles(a: int, b: int) -> torch.Tensor:
    """The paper's L2 pattern on an ``a x b`` block: nested rectangles around its centre, ring ``k`` weighted
    ``1 / (k + 1)^2``, unit L2 norm (empty when ``a`` is 0)."""
    out = torch.zeros(a, b)
    r, c = a // 2, b // 2
    for k in range(max(r, c) + 1):
        out[max(r - k, 0):min(r + k + 1, a), max(c - k, 0):min(c + k + 1, b)] += 1.0 / (k + 1) ** 2
    return out / out.norm().clamp_min(1e-12)


def _eta(s: int) -> torch.Tensor:
    """The L2 update's ``s x s`` pattern (unit L2 norm): the rectangles on the top half, minus on the bottom."""
    eta = torch.cat([_rectangles(s // 2, s), -_rectangles(s - s // 2, s)])
    return eta / eta.norm()


def _corner(u: torch.Tensor, s: int, size: int) -> torch.Tensor:
    """A window's first row (column) from uniforms in [0, 1): uniform over the ``size - s + 1`` positions."""
    return (u * (size - s + 1)).long().clamp(max=size - s)


def _window(top: torch.Tensor, left: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """bool ``[k, 1, h, w]``: the ``s x s`` window at each row's corner ``(top, left)``."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_r = (rows >= top[:, None]) & (rows < top[:, None] + s)
    in_c = (cols >= left[:, None]) & (cols < left[:, None] + s)
    return (in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1)


def _place(pattern: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, h: int,
           w: int) -> torch.Tensor:
    """``[k, 1, h, w]``: the ``s x s`` ``pattern`` (transposed where ``flip``) at each row's corner, zero elsewhere."""
    s = len(pattern)
    i = (torch.arange(h, device=top.device) - top[:, None])[:, :, None]  # [k, h, 1]: row inside the window
    j = (torch.arange(w, device=top.device) - left[:, None])[:, None, :]  # [k, 1, w]
    inside = (i >= 0) & (i < s) & (j >= 0) & (j < s)
    i, j = i.clamp(0, s - 1), j.clamp(0, s - 1)
    f = flip[:, None, None]
    flat = torch.where(f, j * s + i, i * s + j)
    return (pattern.to(top.device).flatten()[flat] * inside).unsqueeze(1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Every row of ``v`` scaled to L2 norm 1 (AutoAttack's ``normalize``)."""
    return v / (v.flatten(1).norm(dim=1).view(-1, *[1] * (v.ndim - 1)) + 1e-12)


class _Search:
    """One restart of the search on some examples: their current points and margins, and what they found."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], threat: ThreatModel, x: torch.Tensor,
                 y: torch.Tensor, batch_size: int, confirm: Confirm | None, near: float) -> None:
        self.model, self.threat, self.x, self.y = model, threat, x, y
        self.batch_size, self.confirm, self.near = batch_size, confirm, near
        self.lo, self.hi = threat.box(x)
        n = len(x)
        self.best = x.clone()
        self.cur = torch.full((n,), torch.inf, device=x.device)  # margin of self.best
        self.low = self.cur.clone()  # lowest margin seen
        self.alive = torch.ones(n, dtype=torch.bool, device=x.device)
        self.adv = torch.zeros_like(x)
        self.broken = ~self.alive
        self.rejected = self.near_checked = 0
        self.rejected_ex = ~self.alive
        self.when = torch.full((n,), -1, dtype=torch.long, device=x.device)  # the query that broke it
        self.spent = torch.zeros(n, dtype=torch.long, device=x.device)  # queries evaluated
        self.version = 0  # counts the changes of ``alive``

    def offer(self, idx: torch.Tensor, xs: torch.Tensor, query: int) -> None:
        """Candidates ``xs`` for the examples ``idx`` at their ``query``-th query (0: the start): keep the
        improvements, record the (confirmed) breaks."""
        z = clean_logits(self.model, xs, self.batch_size)
        self.spent[idx] += 1
        ys = self.y[idx]
        m = margins(z, ys)
        wrong = z.argmax(1) != ys
        self.low[idx] = torch.minimum(self.low[idx], m)
        check = wrong | (m < self.near)
        better = m < self.cur[idx]
        hit = None
        if check.any():  # most queries have nothing near the boundary: nothing to confirm
            ok = torch.zeros_like(check)
            ok[check] = deployed_wrong(self.confirm, xs[check], ys[check])
            refused = wrong & ~ok
            self.rejected += int(refused.sum())
            self.near_checked += int((check & ~wrong).sum())
            self.rejected_ex[idx[refused]] = True
            hit = check & ok
            better = hit | (better & ~refused)  # a refused point is no improvement
        self.best[idx[better]] = xs[better]
        self.cur[idx[better]] = m[better]
        if hit is not None and hit.any():
            self.adv[idx[hit]] = xs[hit]
            self.when[idx[hit]] = query
            self.broken[idx[hit]] = True
            self.alive[idx[hit]] = False
            self.version += 1


def _linf_start(x: torch.Tensor, eps: float, rngs: list[np.random.Generator], search: _Search) -> torch.Tensor:
    """Vertical stripes of +-eps, one sign per column and channel."""
    c, w = x.shape[1], x.shape[-1]
    signs = torch.as_tensor(np.stack([g.integers(0, 2, (c, 1, w)) for g in rngs]), dtype=x.dtype, device=x.device)
    return torch.clamp(x + eps * (2 * signs - 1), search.lo, search.hi)


def _l2_start(x: torch.Tensor, eps: float, rngs: list[np.random.Generator], threat: ThreatModel) -> torch.Tensor:
    """A grid of the paper's ``h // 5``-sided patterns, each with a random sign per channel and orientation,
    scaled to the sphere of radius eps."""
    c, h, w = x.shape[1], x.shape[-2], x.shape[-1]
    s = max(h // 5, 1)
    top0, left0 = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)
    nh, nw = (h - top0) // s, (w - left0) // s  # the windows that fit
    draws = np.stack([np.concatenate([g.integers(0, 2, (nh, nw, c)), g.integers(0, 2, (nh, nw, 1))], -1)
                      for g in rngs])
    draws = torch.as_tensor(draws, device=x.device)
    eta = _eta(s).to(x.device, x.dtype)
    delta = torch.zeros_like(x)
    for a in range(nh):
        for b in range(nw):
            r, q = top0 + a * s, left0 + b * s
            flip = draws[:, a, b, c].bool().view(-1, 1, 1, 1)
            pattern = torch.where(flip, eta.T, eta)  # [k, 1, s, s]
            delta[:, :, r:r + s, q:q + s] += pattern * (2 * draws[:, a, b, :c] - 1).to(x.dtype).view(-1, c, 1, 1)
    return (x + eps * _unit(delta)).clamp(threat.lo, threat.hi)


def _linf_candidates(search: _Search, live: torch.Tensor, u: torch.Tensor, bits: torch.Tensor, s: int,
                     lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each live example's best point with one random window set to ``x +- eps`` (one sign per channel), clipped
    to the box: the box's upper corner ``hi`` where the sign is +, ``lo`` where it is - (``lo``, ``hi``: the live
    rows' box). ``bits``: ``[k, 1 + REDRAWS, c]`` sign draws; the first that changes the window is used (the paper's
    redraw), the last if none does. Also whether the candidate differs from the best point. Only the windows' pixels
    are read and written (``[k, s, s, c]``; most of a run's windows are a few pixels wide)."""
    h, w = lo.shape[-2], lo.shape[-1]
    k = len(live)
    top, left = _corner(u[:, 0], s, h), _corner(u[:, 1], s, w)
    span = torch.arange(s, device=live.device)
    at = (torch.arange(k, device=live.device)[:, None, None], slice(None), (top[:, None] + span)[:, :, None],
          (left[:, None] + span)[:, None, :])  # indexes each row's window: [k, s, s, c]
    best = search.best[live]
    win, win_hi, win_lo = best[at], hi[at], lo[at]
    # per channel: is the window already all at the upper (lower) corner? A sign draw leaves the window unchanged
    # iff every channel is already at the corner its sign picks
    at_hi = (win == win_hi).flatten(1, 2).all(1)  # [k, c]
    at_lo = (win == win_lo).flatten(1, 2).all(1)
    up = bits.bool()  # [k, tries, c]
    still = torch.where(up, at_hi[:, None], at_lo[:, None]).all(2)  # [k, tries]
    tries = still.shape[1]
    pick = torch.where(still.all(1), tries - 1, (~still).int().argmax(1))
    rows = torch.arange(k, device=live.device)
    best[at] = torch.where(up[rows, pick][:, None, None, :], win_hi, win_lo)  # best is a copy: the candidates
    return best, ~still[rows, pick]


def _l2_candidates(search: _Search, live: torch.Tensor, u: torch.Tensor, bits: torch.Tensor,
                   s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAttack's L2 update: the perturbation's mass in two random windows moves into the first, redrawn as the
    paper's pattern (random sign per channel, ``bits[:, 0]``, random orientation) plus the window's old content, and
    the total is scaled back to the sphere of radius eps. Also whether each differs from the best point."""
    eps = search.threat.eps
    x = search.x[live]
    c, h, w = x.shape[1], x.shape[-2], x.shape[-1]
    delta = search.best[live] - x
    top, left = _corner(u[:, 0], s, h), _corner(u[:, 1], s, w)
    top2, left2 = _corner(u[:, 2], s, h), _corner(u[:, 3], s, w)
    m1 = _window(top, left, s, h, w).to(x.dtype)
    m2 = _window(top2, left2, s, h, w).to(x.dtype)
    norm_1 = (delta ** 2 * m1).sum((-2, -1), keepdim=True).sqrt()  # [k, c, 1, 1]
    norm_img = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    norm_both = (delta ** 2 * torch.maximum(m1, m2)).sum((-2, -1), keepdim=True).sqrt()
    signs = (2 * bits[:, 0] - 1).to(x.dtype).view(len(live), c, 1, 1)
    new = _place(_eta(s).to(x.dtype), top, left, u[:, 4] > 0.5, h, w) * signs + delta * m1 / (norm_1 + 1e-12)
    new = new / ((new ** 2).sum((-2, -1), keepdim=True).sqrt() + 1e-12)
    new = new * ((eps ** 2 - norm_img ** 2).clamp_min(0) / c + norm_both ** 2).sqrt()
    delta = torch.where(m1 > 0, new, delta * (1 - m2))
    cand = (x + eps * _unit(delta)).clamp(search.threat.lo, search.threat.hi)
    return cand, (cand != search.best[live]).flatten(1).any(1)


@torch.no_grad()
def square_attack(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float, *,
                  norm: Norm = "linf", queries: int = 1000, restarts: int = 1, p_init: float = 0.8,
                  options: AttackOptions = AttackOptions()) -> AttackResult:
    """Square attack (Andriushchenko et al., ECCV 2020; module doc), L-inf or L2, ``queries`` queries per restart
    after its start, worst case per example.

    Needs no gradient, so it is the audit's check for gradient masking: examples it breaks but the gradient
    attacks did not point at a flawed gradient, not at robustness. ``model`` is any ``x -> logits`` callable.
    ``p_init``: the starting fraction of pixels a window covers (AutoAttack's 0.8). ``options`` as in
    :func:`pipeline.attacks.pgd_attack` (``batch_size``: candidates per forward pass); its exits do not apply.

    The result is the gradient attacks' :class:`~pipeline.attacks.AttackResult`, a query standing for a step:
    ``break_step`` is the query of its restart that broke the example (0: the start, or a clean mistake; up to
    ``queries``; -1: never), ``break_restart`` the restart that broke it (restarts run only on the examples still
    standing, so it is the lowest, and ``robust_by_restart`` is exact), ``row_steps`` the queries evaluated (each
    start counts one; a candidate equal to the current point counts none), ``settled`` counts ``clean_wrong``,
    ``broken`` and ``full_budget`` (and ``verification``).

    Example::

        sq = square_attack(model, x, y, eps=8 / 255, queries=5000, options=AttackOptions(confirm=onnx_logits))
        sq.robust_accuracy, sq.break_step[sq.adv_index]
    """
    threat = attack_threat(x, y, eps, norm)
    if x.ndim != 4:
        raise HydraPipeError(f"square: expected images x [N, C, H, W], got shape {tuple(x.shape)}")
    if queries < 0 or restarts < 1 or not 0 < p_init <= 1:
        raise HydraPipeError(f"square: need queries >= 0, restarts >= 1, 0 < p_init <= 1 "
                             f"(got {queries}, {restarts}, {p_init})")
    o = options
    n, dev = len(x), x.device
    ids = o.example_ids(n)
    t0 = time.perf_counter()
    x, y = x.detach(), y.detach().to(dev, torch.long)
    verified = o.verified_mask(n, dev)
    h, w, c = x.shape[-2], x.shape[-1], x.shape[1]
    break_step = torch.full((n,), -1, dtype=torch.long, device=dev)
    break_restart = break_step.clone()
    adv, low = torch.zeros_like(x), torch.full((n,), torch.inf, device=dev)
    row_steps = rejected = near_checked = 0
    rejected_ex = torch.zeros(n, dtype=torch.bool, device=dev)
    need = 2 if norm == "linf" else 5  # uniforms per query: the window's corner (L2: two corners, orientation)
    tries = 1 + REDRAWS if norm == "linf" else 1  # sign draws per query
    near = o.confirm_margin if o.confirm is not None else 0.0  # without confirm the attacked model is the judge
    with attack_mode(model, o.threads) if isinstance(model, nn.Module) else num_threads(o.threads):
        # the clean input is in the ball: on the deployed numerics when we have them, as the gradient attacks
        correct = clean_correct(model, x, y, o.confirm, o.batch_size)
        clean_wrong = ~correct & ~verified
        break_step[clean_wrong], break_restart[clean_wrong] = 0, 0
        adv[clean_wrong] = x[clean_wrong]
        todo = correct & ~verified
        standing = todo.clone() if queries > 0 and eps > 0 else torch.zeros_like(todo)
        settled_before = n - int(standing.sum())
        if o.progress:
            o.progress(settled_before, n)
        for restart in range(restarts):
            act = standing.nonzero().squeeze(1)
            if not len(act):
                break
            rngs = [np.random.default_rng(seed_sequence(o.seed, ids[i], restart, "square")) for i in act.tolist()]
            search = _Search(model, threat, x[act], y[act], o.batch_size, o.confirm, near)
            every = torch.arange(len(act), device=dev)
            start = _linf_start(x[act], eps, rngs, search) if norm == "linf" else _l2_start(x[act], eps, rngs, threat)
            search.offer(every, start, 0)
            u = torch.zeros(len(act), QUERY_BLOCK, need, dtype=torch.float64, device=dev)
            bits = torch.zeros(len(act), QUERY_BLOCK, tries, c, dtype=torch.long, device=dev)
            version = -1  # the live rows' gathered state is rebuilt when ``alive`` changes
            for q in range(queries):
                if search.version != version:
                    version = search.version
                    live = search.alive.nonzero().squeeze(1)
                    if not len(live):
                        break
                    lo, hi, u_live = search.lo[live], search.hi[live], None
                if q % QUERY_BLOCK == 0:
                    # each live example's draws for the next block, from its own stream (one copy to the device)
                    order = live.tolist()
                    u[live] = torch.as_tensor(np.stack([rngs[i].random((QUERY_BLOCK, need)) for i in order]),
                                              device=dev)
                    bits[live] = torch.as_tensor(np.stack([rngs[i].integers(0, 2, (QUERY_BLOCK, tries, c))
                                                           for i in order]), device=dev)
                    if o.progress:
                        o.progress(settled_before + int(search.broken.sum()), n)
                    u_live = None
                if u_live is None:  # the live rows' draws of this block
                    u_live, bits_live = u[live], bits[live]
                s = _side(_square_p(p_init, q, queries), h, w, norm)
                k = q % QUERY_BLOCK
                if norm == "linf":
                    cand, moved = _linf_candidates(search, live, u_live[:, k], bits_live[:, k], s, lo, hi)
                else:
                    cand, moved = _l2_candidates(search, live, u_live[:, k], bits_live[:, k], s)
                if moved.all():  # the usual case: no copy of the candidates
                    search.offer(live, cand, q + 1)
                elif moved.any():
                    search.offer(live[moved], cand[moved], q + 1)
            hit = act[search.broken]
            break_step[hit], break_restart[hit] = search.when[search.broken], restart
            adv[hit] = search.adv[search.broken]
            standing[hit] = False
            settled_before += len(hit)
            low[act] = torch.minimum(low[act], search.low)
            row_steps += int(search.spent.sum())
            rejected += search.rejected
            near_checked += search.near_checked
            rejected_ex[act[search.rejected_ex]] = True
    if o.progress:
        o.progress(n, n)
    broken = break_restart >= 0
    robust = correct & ~broken
    n_clean_wrong = int(clean_wrong.sum())
    settled = dict(verification=int(verified.sum()), clean_wrong=n_clean_wrong,
                   broken=int(broken.sum()) - n_clean_wrong, convergence=0, full_budget=int((todo & ~broken).sum()))
    by_restart, by_step = robustness_curves(robust, break_restart, break_step, queries, restarts)
    adv_index = broken.nonzero().squeeze(1)
    return AttackResult(robust=robust, clean_correct=correct, adv_index=adv_index, adv_x=adv[adv_index],
                        break_step=break_step, break_restart=break_restart, min_margin=low,
                        robust_by_restart=by_restart, robust_by_step=by_step, settled=settled, rejected=rejected,
                        rejected_examples=int(rejected_ex.sum()), near_boundary_checked=near_checked,
                        row_steps=row_steps, budget_row_steps=n * restarts * queries,
                        seconds=time.perf_counter() - t0)
