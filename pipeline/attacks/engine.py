"""The row scheduler the audit's gradient attacks run on: many restarts of many examples in one stream of rows.

A row is one random restart of one example; rows share one forward/backward pass per step, and a step rule
(:mod:`pipeline.attacks.steps`) moves them. A row leaves the batch as soon as its future cannot change the verdict:

- its example is broken (a misclassified iterate, confirmed on the deployed model when ``confirm`` is given);
  with ``confirm``, the iterates the attacked model classifies correctly but within ``confirm_margin`` of the
  boundary are put to the deployed model too (one call per step for all of them): its rounding can move the
  boundary, and a point it misclassifies is a break even where the attacked graph disagrees;
- its iterate repeats one seen a few steps earlier (rules with ``fixed_map``): with a constant step size PGD is
  a deterministic map ``x_{t+1} = F(x_t)``, so from ``x_t == x_{t-P}`` on the row only revisits iterates already
  checked. On L-inf, sign steps and the box projection make almost every unbroken row settle into such a cycle
  (period 1, 2 or 4) after ~100-400 steps, which is where most of the audit's speed comes from;
- its example was proven robust beforehand by a sound verifier (``verified``): it is never attacked.

None of these changes the verdict of the full ``steps x restarts`` budget (up to the last bit of floating point:
a row's gradient may differ in its last bit with the batch it is computed in, as in any batched attack).

The rule (:mod:`pipeline.attacks.steps`, :mod:`pipeline.attacks.apgd`) owns its loss: the engine asks it for the
gradient w.r.t. the logits and the loss value per row, backpropagates the gradient through the model, and hands
both to the rule's step. The margin ``z_y - max_{j != y} z_j`` the engine reports and confirms by is the same for
every rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.attacks.options import AttackOptions, Confirm
from pipeline.attacks.steps import RowState, StepRule, margins
from pipeline.errors import HydraPipeError
from pipeline.runtime import attack_mode
from pipeline.threat import Norm, ThreatModel

# x_t is compared with x_{t-CYCLE}: catches cycles of period 1, 2 and 4 (the ones PGD falls into, see module doc).
CYCLE = 4


def step_checkpoints(steps: int) -> list[int]:
    """Step counts at which the robust accuracy is reported: 0 (random start), 1, 2, 5, 10, 20, ... and ``steps``."""
    marks = [0] + [m * 10 ** k for k in range(12) for m in (1, 2, 5) if m * 10 ** k < steps]
    return sorted(set(marks + [steps]))


def robustness_curves(robust: torch.Tensor, break_restart: torch.Tensor, break_step: torch.Tensor, steps: int,
                      restarts: int) -> tuple[list[float], dict[int, float]]:
    """Robust accuracy with restarts 1..k and at each of :func:`step_checkpoints`, from the per-example verdicts
    (``AttackResult``'s fields): counts over examples, so verdicts attacked in separate calls merge exactly."""
    n, broken = len(robust), break_restart >= 0
    # fractions from counts, so reports show 0.98 rather than float32's 0.9800000190734863
    by_restart = [int((robust | (broken & (break_restart >= k))).sum()) / n if n else float("nan")
                  for k in range(1, restarts + 1)] if steps > 0 else []
    by_step = {s: int((robust | (broken & (break_step > s))).sum()) / n if n else float("nan")
               for s in step_checkpoints(steps)} if steps > 0 else {}
    return by_restart, by_step


@dataclass
class AttackResult:
    """What an attack (PGD, APGD, Square) found on N examples. Fractions are over all N examples.

    ``break_step[i]``: first step (0 = the random start; -1 = never) at which any restart misclassified
    example i (clean misclassification counts as step 0, restart 0); ``break_restart[i]``: the lowest restart that
    misclassifies it at any step (-1 = never). For PGD both are exact, so the curves below are what a run with fewer
    restarts or fewer steps (same seed) would have reported. Square's steps are its queries
    (:func:`pipeline.attacks.square.square_attack`).
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
    near_boundary_checked: int = 0  # iterates the attacked model classifies correctly, within confirm_margin,
    # put to the deployed model as well
    row_steps: int = 0  # forward+backward passes of one row, the attack's work (Square: queries, forward only)
    budget_row_steps: int = 0  # N x restarts x steps: the work of the plain algorithm
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean()) if len(self.robust) else float("nan")


def attack_threat(x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm) -> ThreatModel:
    """The attack's threat model, after checking the shapes and that ``x`` lies in its range (one-line errors)."""
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise HydraPipeError(f"attack: expected x [N, ...] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    try:
        threat = ThreatModel(eps, norm)
    except HydraPipeError as e:
        raise HydraPipeError(f"attack: {e}") from None
    threat.check_inputs(x, "attack: x")
    return threat


def deployed_wrong(confirm: Confirm | None, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Which candidates the deployed model misclassifies too (all of them without ``confirm``)."""
    if confirm is None:
        return torch.ones(len(xs), dtype=torch.bool, device=xs.device)
    logits = confirm(xs.detach().cpu().numpy().astype(np.float32, copy=False))
    return torch.as_tensor(np.asarray(logits).argmax(1), device=ys.device) != ys


def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, confirm: Confirm | None,
                  batch: int) -> torch.Tensor:
    """Which clean inputs are classified correctly: by the deployed model when we have it (the audit's clean
    accuracy), else by the attacked one (call inside ``attack_mode``)."""
    if confirm is not None:
        return ~deployed_wrong(confirm, x, y)
    return clean_logits(model, x, batch).argmax(1) == y


@torch.no_grad()
def clean_logits(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """The attacked model's logits at ``x``, ``batch`` examples per forward pass (call inside ``attack_mode``)."""
    if len(x) <= batch:  # one pass, no copy ([0, classes] if empty)
        return model(x)
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


@dataclass
class Rows(RowState):
    """The rows in flight, one entry each; every row leaves or joins with all of its state at once."""

    x: torch.Tensor  # the iterate x_t
    example: torch.Tensor  # long: which example it attacks
    restart: torch.Tensor  # long: which random start it began from
    step: torch.Tensor  # long: t
    ring: torch.Tensor  # [rows, CYCLE, input size]: its last CYCLE iterates, slot ptr holds x_{t-CYCLE}
    # ([rows, 0] when the cycle exit is off)
    rule: RowState  # the step rule's own per-row state


@dataclass
class Ledger:
    """Per example: what its rows found so far, and how it was settled."""

    break_step: torch.Tensor
    break_restart: torch.Tensor
    min_margin: torch.Tensor
    adv_x: torch.Tensor
    rejected_ex: torch.Tensor
    open_rows: torch.Tensor  # restarts still running or queued
    ran_full: torch.Tensor  # whether any of its rows ran the whole budget
    settled: dict[str, int]
    restarts: int
    rejected: int = 0
    near_checked: int = 0
    n_settled: int = 0

    @classmethod
    def new(cls, x: torch.Tensor, verified: torch.Tensor, restarts: int) -> Ledger:
        n, dev = len(x), x.device
        never = torch.full((n,), -1, dtype=torch.long, device=dev)
        no = torch.zeros(n, dtype=torch.bool, device=dev)
        return cls(break_step=never, break_restart=never.clone(), min_margin=torch.full((n,), torch.inf, device=dev),
                   adv_x=torch.zeros_like(x), rejected_ex=no, open_rows=torch.zeros(n, dtype=torch.long, device=dev),
                   ran_full=no.clone(), restarts=restarts, settled=dict(
                       verification=int(verified.sum()), clean_wrong=0, broken=0, convergence=0, full_budget=0))

    def is_moot(self, i: int, r0: int, exact_curves: bool) -> bool:
        """Restarts from ``r0`` on cannot change anything: a lower restart already broke example ``i``."""
        b = int(self.break_restart[i])
        return b >= 0 and (not exact_curves or b <= r0)

    def record(self, rows: Rows, cand: torch.Tensor, wrong: torch.Tensor, y: torch.Tensor, confirm: Confirm | None,
               early_exit: bool, exact_curves: bool) -> torch.Tensor:
        """Rows ``cand`` are candidates: ``wrong`` (one per candidate) where the attacked model misclassifies the
        iterate, the others near the boundary. Log the confirmed breaks; returns the rows that may leave."""
        ex, rs = rows.example, rows.restart
        ok = deployed_wrong(confirm, rows.x[cand], y[ex[cand]])
        rejected = wrong & ~ok
        self.rejected += int(rejected.sum())
        self.near_checked += int((~wrong).sum())
        self.rejected_ex[ex[cand[rejected]]] = True
        hits = cand[ok]
        leave = torch.zeros(len(ex), dtype=torch.bool, device=ex.device)
        if not len(hits):
            return leave
        n = len(self.break_restart)
        e_hit, r_hit = ex[hits], rs[hits]
        low = torch.full((n,), self.restarts, dtype=torch.long, device=ex.device)
        low.scatter_reduce_(0, e_hit, r_hit, "amin")
        best = hits[r_hit == low[e_hit]]  # one row per example: its lowest breaking restart
        e_best = ex[best]
        first = self.break_restart[e_best] < 0
        lower = first | (rs[best] < self.break_restart[e_best])
        self.break_step[e_best[first]] = rows.step[best[first]]
        self.adv_x[e_best[lower]] = rows.x[best[lower]]
        self.break_restart[e_best[lower]] = rs[best[lower]]
        n_first = int(first.sum())
        self.settled["broken"] += n_first
        self.n_settled += n_first
        if early_exit:
            hit = torch.zeros(n, dtype=torch.bool, device=ex.device)
            hit[e_hit] = True
            # rows at or above the lowest breaking restart cannot lower it; with exact curves the lower restarts
            # keep going until they break or finish
            leave |= hit[ex] & ((rs >= self.break_restart[ex]) if exact_curves else True)
        return leave

    def retire(self, rows: Rows, leave: torch.Tensor, done: torch.Tensor) -> None:
        """Rows ``leave`` the batch (``done``: they checked their last iterate): settle the examples they end."""
        ex = rows.example
        self.ran_full.scatter_(0, ex[done], True)
        gone = ex[leave]
        self.open_rows.scatter_add_(0, gone, torch.full_like(gone, -1))
        ended = gone.unique()
        ended = ended[(self.open_rows[ended] == 0) & (self.break_restart[ended] < 0)]
        n_full = int(self.ran_full[ended].sum())
        self.settled["full_budget"] += n_full
        self.settled["convergence"] += len(ended) - n_full
        self.n_settled += len(ended)


def _start_rows(rule: StepRule, x: torch.Tensor, seed: int, jobs: list[tuple[int, int, int]], ptr: int,
                index: list[int], cycles: bool) -> Rows:
    """Rows for the (example, first restart, count) ``jobs``, at their random starts (seeded by ``index[i]``, the
    example's place in the whole set); ``cycles``: whether they keep the ring of iterates for the cycle exit."""
    starts = [rule.start(x[i], seed, index[i], range(r0, r0 + k)) for i, r0, k in jobs]
    xs = torch.cat([s for s, _ in starts])
    dev = x.device
    # no history yet (NaN equals nothing) but x_0, in the slot that x_CYCLE will be compared with
    ring = torch.full((len(xs), CYCLE if cycles else 0, xs[0].numel()), torch.nan, device=dev)
    if cycles:
        ring[:, (ptr - 1) % CYCLE] = xs.flatten(1)
    return Rows(x=xs, example=torch.cat([torch.full((k,), i, dtype=torch.long) for i, _, k in jobs]).to(dev),
                restart=torch.cat([torch.arange(r0, r0 + k) for _, r0, k in jobs]).to(dev),
                step=torch.zeros(len(xs), dtype=torch.long, device=dev), ring=ring,
                rule=RowState.cat([st for _, st in starts]))


def run_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rule: StepRule, *, steps: int, restarts: int,
             options: AttackOptions, exact_curves: bool) -> AttackResult:
    """Run ``rule`` for ``steps`` steps from ``restarts`` random starts per example (rows), worst case per
    example, on the row scheduler (module doc); the arguments as in :func:`pipeline.attacks.pgd.pgd_attack`
    (``exact_curves``: the caller's default applied to ``options.exact_curves``)."""
    if steps < 0 or restarts < 1:
        raise HydraPipeError(f"attack: need steps >= 0 and restarts >= 1 (got {steps}, {restarts})")
    t_start = time.perf_counter()
    n, dev = len(x), x.device
    o = options
    batch_size, confirm, early_exit, progress = o.batch_size, o.confirm, o.early_exit, o.progress
    x, y = x.detach(), y.detach().to(dev, torch.long)
    verified = o.verified_mask(n, dev)
    book = Ledger.new(x, verified, restarts)
    row_steps = 0
    ids = o.example_ids(n)

    with attack_mode(model, o.threads):
        # the clean input is in the ball: on the deployed numerics when we have them, as the audit's clean accuracy
        correct = clean_correct(model, x, y, confirm, batch_size)
        clean_wrong = ~correct & ~verified
        book.break_step[clean_wrong], book.break_restart[clean_wrong] = 0, 0
        book.adv_x[clean_wrong] = x[clean_wrong]
        book.settled["clean_wrong"] = int(clean_wrong.sum())
        verified = verified & correct

        attack = steps > 0 and rule.threat.eps > 0
        todo = [i for i in range(n) if correct[i] and not verified[i]] if attack else []
        if not attack:
            # no attack (steps = 0) or nothing to attack (eps = 0): the clean verdict is the verdict
            book.settled["full_budget"] = int((correct & ~verified).sum())
        chunk = min(restarts, batch_size)
        queue = [(i, r0) for r0 in range(0, restarts, chunk) for i in todo]
        queue.reverse()  # pop() from the end = FIFO over (restart chunk, example)
        for i in todo:
            book.open_rows[i] = restarts
        rows: Rows | None = None
        cycles = o.cycle_exit and rule.fixed_map
        near = o.confirm_margin if confirm is not None else 0.0  # without confirm the attacked model is the judge
        ptr = 0  # the ring's slot of x_{t-CYCLE}, the same for every row
        book.n_settled = n - len(todo)
        if progress:
            progress(book.n_settled, n)

        while queue or (rows is not None and len(rows.x)):
            # admit queued (example, restart chunk) jobs while the memory budget allows
            jobs = []
            room = batch_size - (len(rows.x) if rows is not None else 0)
            while queue and room >= min(chunk, restarts - queue[-1][1]):
                i, r0 = queue.pop()
                k = min(chunk, restarts - r0)
                if early_exit and book.is_moot(i, r0, exact_curves):
                    book.open_rows[i] -= k  # already broken by a lower restart: these cannot change anything
                    continue
                jobs.append((i, r0, k))
                room -= k
            if jobs:
                new = _start_rows(rule, x, o.seed, jobs, ptr, ids, cycles)
                rows = new if rows is None else RowState.cat([rows, new])
            if rows is None or not len(rows.x):
                continue

            # one step for every row: forward (checks x_t), backward, the rule's update
            xr = rows.x.requires_grad_(True)
            z = model(xr)
            y_rows = y[rows.example]
            g_z, value = rule.loss_grad(z, y_rows, rows.rule)
            margin = margins(z, y_rows)
            book.min_margin.scatter_reduce_(0, rows.example, margin, "amin")
            wrong = z.detach().argmax(1) != y_rows
            (g,) = torch.autograd.grad(z, xr, g_z)
            rows.x = rows.x.detach()
            row_steps += len(rows.x)
            leave = torch.zeros(len(rows.x), dtype=torch.bool, device=dev)
            check = wrong | (margin < near)
            if check.any():
                cand = check.nonzero().squeeze(1)
                leave |= book.record(rows, cand, wrong[cand], y, confirm, early_exit, exact_curves)

            done = rows.step >= steps  # this forward checked the last iterate
            leave |= done
            rows.x = rule.step(rows.x, g, rows.rule, rows.step, value)
            rows.step += 1
            if cycles:
                flat_x = rows.x.flatten(1)
                leave |= (flat_x == rows.ring[:, ptr]).all(1) & ~leave
                rows.ring[:, ptr] = flat_x
                ptr = (ptr + 1) % CYCLE
            if leave.any():
                book.retire(rows, leave, done)
                rows = rows.keep(~leave)
                if progress:
                    progress(book.n_settled, n)

    return _result(book, correct, x, steps, restarts, row_steps, time.perf_counter() - t_start)


def _result(book: Ledger, correct: torch.Tensor, x: torch.Tensor, steps: int, restarts: int, row_steps: int,
            seconds: float) -> AttackResult:
    n = len(x)
    broken = book.break_restart >= 0
    robust = correct & ~broken
    by_restart, by_step = robustness_curves(robust, book.break_restart, book.break_step, steps, restarts)
    adv_index = broken.nonzero().squeeze(1)
    return AttackResult(robust=robust, clean_correct=correct, adv_index=adv_index, adv_x=book.adv_x[adv_index],
                        break_step=book.break_step, break_restart=book.break_restart, min_margin=book.min_margin,
                        robust_by_restart=by_restart, robust_by_step=by_step, settled=book.settled,
                        rejected=book.rejected, rejected_examples=int(book.rejected_ex.sum()),
                        near_boundary_checked=book.near_checked, row_steps=row_steps,
                        budget_row_steps=n * restarts * steps, seconds=seconds)
