"""Adversarial attacks: PGD for training (Madry et al., 2018), the audit's batched PGD and the Square attack.

The audit's PGD (:func:`pgd_attack`) is the plain algorithm of Madry et al. run as one stream of rows: a row is one
random restart of one example, many rows share a forward/backward pass, and a row leaves the batch as soon as its
future cannot change the verdict:

- its example is broken (a misclassified iterate, confirmed on the deployed model when ``confirm`` is given);
- its iterate repeats one seen a few steps earlier: with a constant step size PGD is a deterministic map
  ``x_{t+1} = F(x_t)``, so from ``x_t == x_{t-P}`` on the row only revisits iterates already checked. On L-inf,
  sign steps and the box projection make almost every unbroken row settle into such a cycle (period 1, 2 or 4)
  after ~100-400 steps, which is where most of the audit's speed comes from;
- its example was proven robust beforehand by a sound verifier (``verified``): it is never attacked.

None of these changes the verdict of the full ``steps x restarts`` budget (up to the last bit of floating point:
a row's gradient may differ in its last bit with the batch it is computed in, as in any batched attack).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import HydraPipeError

Norm = Literal["linf", "l2"]
Loss = Literal["ce", "margin"]
Confirm = Callable[[np.ndarray], np.ndarray]

# x_t is compared with x_{t-CYCLE}: catches cycles of period 1, 2 and 4 (the ones PGD falls into, see module doc).
CYCLE = 4


def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
                random_start: bool = True, loss_fn=None) -> torch.Tensor:
    """L-inf PGD used inside training objectives: maximise ``loss_fn(model(x'), y)`` over the eps-ball in [0, 1].

    ``x`` in [0, 1]; returns a detached ``x'`` with ``|x' - x|_inf <= eps`` and ``0 <= x' <= 1``. The model's
    parameters receive no gradient from the attack. ``loss_fn`` defaults to cross-entropy (TRADES passes its KL).
    """
    if eps == 0 or steps == 0:
        return x.detach()
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))
    x0 = x.detach()
    delta = torch.empty_like(x0).uniform_(-eps, eps) if random_start else torch.zeros_like(x0)
    x_adv = (x0 + delta).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def default_step_size(eps: float, steps: int) -> float:
    """Constant step ``2.5 * eps / min(steps, 100)``: Madry's ``2.5 eps / steps``, capped so long runs still cross
    the ball in 40 steps. Constant on purpose: a fixed step makes PGD a fixed map, whose cycles end a row early."""
    return 2.5 * eps / max(1, min(steps, 100))


def step_checkpoints(steps: int) -> list[int]:
    """Step counts at which the robust accuracy is reported: 0 (random start), 1, 2, 5, 10, 20, 50, ... and ``steps``."""
    marks = [0] + [m * 10 ** k for k in range(12) for m in (1, 2, 5) if m * 10 ** k < steps]
    return sorted(set(marks + [steps]))


@dataclass
class AttackResult:
    """What an attack found on N examples. Fractions are over all N examples.

    ``break_step[i]``: first PGD step (0 = the random start; -1 = never) at which any restart misclassified
    example i (clean misclassification counts as step 0, restart 0); ``break_restart[i]``: the lowest restart that
    misclassifies it at any step (-1 = never). Both are exact, so the curves below are what a run with fewer
    restarts or fewer steps (same seed) would have reported.
    """

    robust: torch.Tensor  # bool [N]: correctly classified and nothing found misclassifies it
    clean_correct: torch.Tensor  # bool [N] (deployed numerics when confirm was given)
    adv_index: torch.Tensor  # long [M]: the broken examples
    adv_x: torch.Tensor  # [M, C, H, W]: one confirmed adversarial example each (the clean input if clean-wrong)
    break_step: torch.Tensor  # long [N]
    break_restart: torch.Tensor  # long [N]
    min_margin: torch.Tensor  # float [N]: lowest logit margin (true - best other) seen on the attacked model
    robust_by_restart: list[float]  # [k-1]: robust accuracy with restarts 1..k, full steps
    robust_by_step: dict[int, float]  # steps -> robust accuracy with all restarts
    settled: dict[str, int]  # examples settled by verification / clean_wrong / break / convergence / full_budget
    rejected: int = 0  # candidate iterates misclassified by the attacked model but not by the deployed one
    rejected_examples: int = 0
    row_steps: int = 0  # forward+backward passes of one row, the attack's work
    budget_row_steps: int = 0  # N x restarts x steps: the work of the plain algorithm
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if len(self.robust) else float("nan")


@contextlib.contextmanager
def attack_mode(model: nn.Module, threads: int | None = None) -> Iterator[nn.Module]:
    """Eval mode, no parameter gradients and a deliberate thread count, all restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    old_threads = torch.get_num_threads()
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield model
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _check_inputs(x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> None:
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise HydraPipeError(f"attack: expected x [N, ...] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if eps < 0 or not math.isfinite(eps):
        raise HydraPipeError(f"attack: eps must be a finite number >= 0, got {eps}")
    if norm not in ("linf", "l2"):
        raise HydraPipeError(f"attack: norm must be 'linf' or 'l2', got {norm!r}")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise HydraPipeError("attack: x must lie in [0, 1]")


def _start_seed(seed: int, example: int, restart: int) -> int:
    # one stream per (example, restart): a random start does not depend on which rows share a batch, so early
    # exits, batch sizes, verification and the number of restarts never change any row's trajectory
    return int(np.random.SeedSequence([seed, example, restart]).generate_state(1, np.uint64)[0] >> 1)


def _random_start(x0: torch.Tensor, eps: float, norm: str, seed: int, example: int, restarts: range) -> torch.Tensor:
    """One point per restart, uniform in the eps-ball around ``x0`` (one example), clipped to [0, 1]."""
    deltas = []
    for r in restarts:
        g = torch.Generator().manual_seed(_start_seed(seed, example, r))
        if norm == "linf":
            deltas.append((torch.rand(x0.shape, generator=g) * 2 - 1) * eps)
        else:
            direction = torch.randn(x0.shape, generator=g)
            radius = eps * float(torch.rand(1, generator=g)) ** (1.0 / x0.numel())
            deltas.append(direction * (radius / float(direction.norm().clamp_min(1e-12))))
    delta = torch.stack(deltas).to(x0.device, x0.dtype)
    # clipping to [0, 1] only shrinks |delta_i|, so the start stays in the ball
    return (x0.unsqueeze(0) + delta).clamp(0.0, 1.0)


def _logit_grad(z: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the loss to ascend w.r.t. the logits, and the margin ``z_y - max_{j != y} z_j`` per row.

    margin (CW) loss: ``max_{j != y} z_j - z_y``; ce: cross-entropy. Written by hand so the attack's backward
    starts at the logits (no loss graph).
    """
    rows = torch.arange(len(y), device=z.device)
    z_true = z[rows, y]
    other = z.detach().clone()
    other[rows, y] = -torch.inf
    best_other, j = other.max(1)
    margin = z_true.detach() - best_other
    if loss == "margin":
        g = torch.zeros_like(z)
        g[rows, j] = 1.0
        g[rows, y] = -1.0
    else:
        g = torch.softmax(z.detach(), 1)
        g[rows, y] -= 1.0
    return g, margin


def _deployed_wrong(confirm: Confirm | None, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    if confirm is None:
        return torch.ones(len(xs), dtype=torch.bool, device=xs.device)
    logits = confirm(xs.detach().cpu().numpy().astype(np.float32, copy=False))
    return torch.as_tensor(np.asarray(logits).argmax(1), device=ys.device) != ys


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]) if len(x) else \
        torch.zeros(0, dtype=torch.long, device=x.device)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: Norm = "linf",
               steps: int = 1000, restarts: int = 100, step_size: float | None = None, loss: Loss = "margin",
               batch_size: int = 4096, seed: int = 0, verified: torch.Tensor | None = None,
               confirm: Confirm | None = None, early_exit: bool = True, exact_curves: bool = True,
               cycle_exit: bool = True, threads: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> AttackResult:
    """Projected gradient descent with random restarts (Madry et al., ICLR 2018), worst case per example.

    For every example and each of ``restarts`` random starts in the ball ``{x' : |x' - x|_p <= eps, 0 <= x' <= 1}``
    (``norm`` "linf" or "l2"), iterate ``steps`` times::

        x_{t+1} = Proj(x_t + step_size * sign(grad))          # linf
        x_{t+1} = Proj(x_t + step_size * grad / |grad|_2)     # l2 (projection: rescale, then clip to [0, 1])

    with ``grad`` the gradient of the ``loss`` ("margin": ``max_{j != y} z_j - z_y`` as in Carlini & Wagner; "ce":
    cross-entropy). An example is robust only if it is correctly classified and *no* iterate of *any* restart is
    misclassified. Step size: constant, ``step_size`` or :func:`default_step_size`.

    Args:
        model: ``x -> logits``, inputs in [0, 1], on ``x``'s device. Put in eval mode with no parameter gradients
            for the call (restored after).
        x, y: ``[N, C, H, W]`` float in [0, 1] and ``[N]`` labels.
        batch_size: memory budget, rows (examples x restarts) per forward pass. Each row holds its iterate, its
            box and the last ``CYCLE`` iterates: about ``8 x batch_size x input size`` floats, plus the model's
            activations. On CPU, 1-4k rows run fastest per row for small models (cache); on GPU, larger is better.
        seed: random starts are drawn per (example, restart) from it: reproducible, and independent of batching.
        verified: bool ``[N]``, examples proven robust by a sound verifier: counted robust, never attacked.
        confirm: ``x (numpy) -> logits`` of the deployed model. A misclassified iterate counts only if the
            deployed model misclassifies it too; rejected candidates are counted and the example stays attacked.
        early_exit, exact_curves, cycle_exit: the exits described in the module doc (turn off to measure them).
            ``exact_curves`` keeps the lower restarts of a broken example running until they break or finish, so
            ``robust_by_restart`` is exact; without it the whole example leaves at its first break.
        progress: called as ``progress(settled_examples, n)``.

    Example::

        res = pgd_attack(model, x, y, eps=0.1, steps=1000, restarts=100)
        res.robust_accuracy, res.robust_by_restart[:5], res.settled
    """
    _check_inputs(x, y, eps, norm)
    if steps < 0 or restarts < 1 or batch_size < 1:
        raise HydraPipeError(f"attack: need steps >= 0, restarts >= 1, batch_size >= 1 (got {steps}, {restarts}, {batch_size})")
    t_start = time.perf_counter()
    n, dev = len(x), x.device
    x, y = x.detach(), y.detach().to(dev, torch.long)
    alpha = float(step_size) if step_size is not None else default_step_size(eps, steps)
    verified = torch.zeros(n, dtype=torch.bool, device=dev) if verified is None else verified.to(dev, torch.bool)
    break_step = torch.full((n,), -1, dtype=torch.long, device=dev)
    break_restart = torch.full((n,), -1, dtype=torch.long, device=dev)
    min_margin = torch.full((n,), torch.inf, device=dev)
    adv_x = torch.zeros_like(x)
    settled = dict(verification=int(verified.sum()), clean_wrong=0, broken=0, convergence=0, full_budget=0)
    rejected, rejected_ex = 0, torch.zeros(n, dtype=torch.bool, device=dev)
    # per example: restarts still running or queued, and whether any of its rows ran the whole budget
    open_rows = torch.zeros(n, dtype=torch.long, device=dev)
    ran_full = torch.zeros(n, dtype=torch.bool, device=dev)
    row_steps = 0

    with attack_mode(model, threads):
        # the clean input is in the ball: on the deployed numerics when we have them, as the audit's clean accuracy
        if confirm is not None:
            clean_correct = ~_deployed_wrong(confirm, x, y)
        else:
            clean_correct = _predict(model, x, batch_size) == y
        clean_wrong = ~clean_correct & ~verified
        break_step[clean_wrong], break_restart[clean_wrong] = 0, 0
        adv_x[clean_wrong] = x[clean_wrong]
        settled["clean_wrong"] = int(clean_wrong.sum())
        verified = verified & clean_correct

        todo = [i for i in range(n) if clean_correct[i] and not verified[i]] if steps > 0 and eps > 0 else []
        if not (steps > 0 and eps > 0):
            # no attack (steps = 0) or nothing to attack (eps = 0): the clean verdict is the verdict
            settled["full_budget"] = int((clean_correct & ~verified).sum())
        chunk = min(restarts, batch_size)
        queue = [(i, r0) for r0 in range(0, restarts, chunk) for i in todo]
        queue.reverse()  # pop() from the end = FIFO over (restart chunk, example)
        for i in todo:
            open_rows[i] = restarts
        flat = x[0].numel() if n else 0
        X = torch.empty(0, *x.shape[1:], device=dev)
        lo = hi = x0r = X
        ex = rs = ts = torch.empty(0, dtype=torch.long, device=dev)
        ring = torch.empty(CYCLE, 0, flat, device=dev)
        ptr = 0
        n_settled = n - len(todo)
        if progress:
            progress(n_settled, n)

        while queue or len(X):
            # admit queued (example, restart chunk) jobs while the memory budget allows
            new = []
            room = batch_size - len(X)
            while queue and room >= min(chunk, restarts - queue[-1][1]):
                i, r0 = queue.pop()
                k = min(chunk, restarts - r0)
                if break_restart[i] >= 0 and (not exact_curves or break_restart[i] <= r0) and early_exit:
                    open_rows[i] -= k  # already broken by a lower restart: these cannot change anything
                    continue
                new.append((i, r0, k))
                room -= k
            if new:
                starts = [_random_start(x[i], eps, norm, seed, i, range(r0, r0 + k)) for i, r0, k in new]
                idx = torch.cat([torch.full((k,), i, dtype=torch.long) for i, _, k in new]).to(dev)
                X = torch.cat([X, *starts])
                ex = torch.cat([ex, idx])
                rs = torch.cat([rs, torch.cat([torch.arange(r0, r0 + k) for _, r0, k in new]).to(dev)])
                ts = torch.cat([ts, torch.zeros(len(idx), dtype=torch.long, device=dev)])
                x0r = torch.cat([x0r, x[idx]])
                if norm == "linf":
                    lo = torch.cat([lo, (x[idx] - eps).clamp_min(0.0)])
                    hi = torch.cat([hi, (x[idx] + eps).clamp_max(1.0)])
                hist = torch.full((CYCLE, len(idx), flat), torch.nan, device=dev)
                hist[(ptr - 1) % CYCLE] = torch.cat(starts).flatten(1)
                ring = torch.cat([ring, hist], 1)
            if not len(X):
                continue

            # one PGD step for every row: forward (checks x_t), backward, projected update
            xr = X.requires_grad_(True)
            z = model(xr)
            g_z, margin = _logit_grad(z, y[ex], loss)
            min_margin.scatter_reduce_(0, ex, margin, "amin")
            wrong = z.detach().argmax(1) != y[ex]
            (g,) = torch.autograd.grad(z, xr, g_z)
            X = X.detach()
            row_steps += len(X)
            leave = torch.zeros(len(X), dtype=torch.bool, device=dev)

            if wrong.any():
                cand = wrong.nonzero().squeeze(1)
                ok = _deployed_wrong(confirm, X[cand], y[ex[cand]])
                rejected += int((~ok).sum())
                rejected_ex[ex[cand[~ok]]] = True
                hits = cand[ok]
                if len(hits):
                    e_hit, r_hit = ex[hits], rs[hits]
                    low = torch.full((n,), restarts, dtype=torch.long, device=dev)
                    low.scatter_reduce_(0, e_hit, r_hit, "amin")
                    best = hits[r_hit == low[e_hit]]  # one row per example: its lowest breaking restart
                    e_best = ex[best]
                    first = break_restart[e_best] < 0
                    lower = first | (rs[best] < break_restart[e_best])
                    break_step[e_best[first]] = ts[best[first]]
                    adv_x[e_best[lower]] = X[best[lower]]
                    break_restart[e_best[lower]] = rs[best[lower]]
                    n_first = int(first.sum())
                    settled["broken"] += n_first
                    n_settled += n_first
                    if early_exit:
                        hit = torch.zeros(n, dtype=torch.bool, device=dev)
                        hit[e_hit] = True
                        # rows at or above the lowest breaking restart cannot lower it; with exact curves the
                        # lower restarts keep going until they break or finish
                        leave |= hit[ex] & ((rs >= break_restart[ex]) if exact_curves else True)

            done = ts >= steps  # this forward checked the last iterate
            leave |= done
            ts += 1
            if norm == "linf":
                X = torch.clamp(X + alpha * g.sign(), lo, hi)
            else:
                gn = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (X.ndim - 1))
                X = X + alpha * g / gn
                delta = X - x0r
                dn = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(gn)
                X = (x0r + delta * (eps / dn).clamp(max=1.0)).clamp(0.0, 1.0)
            cycled = torch.zeros_like(leave)
            if cycle_exit:
                flatX = X.flatten(1)
                cycled = (flatX == ring[ptr]).all(1) & ~leave
                ring[ptr] = flatX
                ptr = (ptr + 1) % CYCLE
                leave |= cycled
            if leave.any():
                ran_full.scatter_(0, ex[done], True)
                gone = ex[leave]
                open_rows.scatter_add_(0, gone, torch.full_like(gone, -1))
                ended = gone.unique()
                ended = ended[(open_rows[ended] == 0) & (break_restart[ended] < 0)]
                n_full = int(ran_full[ended].sum())
                settled["full_budget"] += n_full
                settled["convergence"] += len(ended) - n_full
                n_settled += len(ended)
                keep = ~leave
                X, ex, rs, ts, x0r = X[keep], ex[keep], rs[keep], ts[keep], x0r[keep]
                ring = ring[:, keep]
                if norm == "linf":
                    lo, hi = lo[keep], hi[keep]
                if progress:
                    progress(n_settled, n)

    broken = break_restart >= 0
    robust = clean_correct & ~broken
    # fractions from counts, so reports show 0.98 rather than float32's 0.9800000190734863
    by_restart = [int((robust | (broken & (break_restart >= k))).sum()) / n if n else float("nan")
                  for k in range(1, restarts + 1)] if steps > 0 else []
    by_step = {s: int((robust | (broken & (break_step > s))).sum()) / n if n else float("nan")
               for s in step_checkpoints(steps)} if steps > 0 else {}
    adv_index = broken.nonzero().squeeze(1)
    return AttackResult(robust=robust, clean_correct=clean_correct, adv_index=adv_index, adv_x=adv_x[adv_index],
                        break_step=break_step, break_restart=break_restart, min_margin=min_margin,
                        robust_by_restart=by_restart, robust_by_step=by_step, settled=settled, rejected=rejected,
                        rejected_examples=int(rejected_ex.sum()), row_steps=row_steps,
                        budget_row_steps=n * restarts * steps, seconds=time.perf_counter() - t_start)


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    """Square attack's schedule of the fraction of pixels changed: halved at fixed points of a 10k-query run."""
    it = int(it / max(n_iters, 1) * 10000)
    for k, mark in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= mark:
            return p_init / 2 ** k
    return p_init / 2 ** 9


@dataclass
class SquareResult:
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
    ``model`` is any ``x -> logits`` callable; ``confirm`` as in :func:`pgd_attack`.
    """
    _check_inputs(x, y, eps, "linf")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    n, dev = len(x), x.device
    y = y.to(dev, torch.long)
    with contextlib.ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(attack_mode(model, threads))
        elif threads is not None:
            old_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, old_threads)

        def margin_of(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            z = model(xs)
            rows = torch.arange(len(ys), device=dev)
            other = z.clone()
            other[rows, ys] = -torch.inf
            return z[rows, ys] - other.max(1).values

        lo, hi = (x - eps).clamp_min(0.0), (x + eps).clamp_max(1.0)
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
                ok = _deployed_wrong(confirm, xs[wrong], y[idx[wrong]])
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
