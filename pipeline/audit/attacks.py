"""The audit's attacks: one registry of attack specs and the attack phase that runs them.

Each :class:`AttackSpec` says everything the audit needs of an attack: its name and label, the rows one example
takes (restarts, targets), its budget in words, whether it is a gradient attack (the gradient attacks' figure is
``pgd_robust_accuracy``; an example only the gradient-free Square breaks points at gradient masking), whether it
runs late (after alpha-CROWN and branch and bound, on the fewest examples), whether it also attacks an int8
graph's float twin, and ``run``, which attacks a chunk and returns :class:`~pipeline.attacks.AttackResult`.
Adding an attack is one entry here and its rule in :mod:`pipeline.attacks` (plus its name in
:data:`pipeline.config.ATTACK_ORDER`, the params' vocabulary; a check below keeps the two the same).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from pipeline.attacks import AttackOptions, AttackResult, apgd_attack, pgd_attack, robustness_curves, square_attack
from pipeline.attacks.square import deployed_model, queries_deployed
from pipeline.audit.deployed import Deployed
from pipeline.audit.journal import Entry
from pipeline.audit.parts import Bars, GroupTick, Parts, Task, Tick
from pipeline.audit.records import Ledger
from pipeline.audit.report import AttackSummary, Settled, SquareSummary
from pipeline.config import ATTACK_ORDER, AuditParams

Run = Callable[[nn.Module, torch.Tensor, torch.Tensor, AuditParams, AttackOptions], AttackResult]


@dataclass(frozen=True)
class AttackSpec:
    name: str
    label: str
    rows: Callable[[AuditParams], int]  # rows (restarts x targets) one example takes
    budget: Callable[[AuditParams], str]
    run: Run
    gradient: bool = True
    late: bool = False
    twin: bool = False  # also on an int8 graph's float twin (params.float_twin)
    applies: Callable[[AuditParams, int], bool] = lambda p, classes: True  # (params, classes) -> runs at all


def _pgd(model, x, y, p: AuditParams, opts: AttackOptions) -> AttackResult:
    return pgd_attack(model, x, y, p.threat.eps, norm=p.norm, steps=p.steps, restarts=p.restarts,
                      step_size=p.step_size, loss=p.loss, options=opts)


def _apgd(loss: str) -> Run:
    def run(model, x, y, p: AuditParams, opts: AttackOptions) -> AttackResult:
        return apgd_attack(model, x, y, p.threat.eps, norm=p.norm, steps=p.apgd_steps, restarts=p.apgd_restarts,
                           targets=p.apgd_targets, loss=loss, options=opts)
    return run


def _square(model, x, y, p: AuditParams, opts: AttackOptions) -> AttackResult:
    if queries_deployed(model, opts.confirm):  # onnxruntime answers the queries: faster on a CPU, its own judge
        model, opts = deployed_model(opts.confirm, x.device), replace(opts, confirm=None)
    return square_attack(model, x, y, p.threat.eps, norm=p.norm, queries=p.square_queries,
                         restarts=p.square_restarts, options=opts)


ATTACK_SPECS: dict[str, AttackSpec] = {s.name: s for s in (
    AttackSpec("apgd-ce", "APGD-CE", lambda p: p.apgd_restarts,
               lambda p: f"{p.apgd_steps} steps x {p.apgd_restarts} restarts", _apgd("ce"), twin=True),
    AttackSpec("apgd-t", "APGD-T", lambda p: p.apgd_restarts * p.apgd_targets,
               lambda p: f"{p.apgd_steps} steps x {p.apgd_restarts} restarts x {p.apgd_targets} targets",
               _apgd("dlr-targeted"), twin=True, applies=lambda p, classes: classes >= 4),  # AutoAttack's DLR-T
    AttackSpec("pgd", "PGD", lambda p: p.restarts, lambda p: f"{p.steps} steps x {p.restarts} restarts", _pgd,
               late=True),
    AttackSpec("square", "Square", lambda p: p.square_restarts,
               lambda p: f"{p.square_queries} queries x {p.square_restarts} restarts", _square, gradient=False,
               late=True, applies=lambda p, classes: p.square_queries > 0),
)}
"""The audit's attacks, in the order they run: the cheap gradient attacks, the card's PGD on what they and the
costly verifiers left, then the gradient-free Square."""
if tuple(ATTACK_SPECS) != ATTACK_ORDER:  # the params' vocabulary (config) and the registry are one list
    raise RuntimeError(f"pipeline.config.ATTACK_ORDER {ATTACK_ORDER} != the audit's attacks {tuple(ATTACK_SPECS)}")


def attack_chunk(deployed: Deployed, xt: torch.Tensor, yt: torch.Tensor, task: Task, tick: Tick) -> Entry:
    """One chunk of attack ``task.kind``: per example ``break_step``, ``break_restart`` (-1 = never) and
    the margin at the confirmed adversarial point (:meth:`Deployed.margin`; +inf where none), one example per run,
    so it is the same whichever examples share a chunk or a worker."""
    t, p = time.perf_counter(), task.params
    ids = torch.as_tensor(task.rows, dtype=torch.long, device=xt.device)
    model = deployed.graph if task.model == "graph" else deployed.twin
    x, y = xt[ids], yt[ids]
    opts = AttackOptions(batch_size=p.batch_size, seed=p.seed, confirm=deployed.logits,
                         confirm_margin=p.confirm_margin, threads=p.threads, index=ids, progress=tick)
    res = ATTACK_SPECS[task.kind].run(model, x, y, p, opts)
    margin = np.full(len(ids), np.inf)
    labels = y.cpu().numpy()
    for i, adv in zip(res.adv_index.tolist(), res.adv_x.cpu().numpy()):
        margin[i] = deployed.margin(adv[None], labels[i:i + 1])[0]
    return ({"break_step": res.break_step.cpu().numpy(), "break_restart": res.break_restart.cpu().numpy(),
             "margin": margin},
            {"settled": res.settled, "rejected": res.rejected, "rejected_examples": res.rejected_examples,
             "row_steps": res.row_steps, "near_boundary": res.near_boundary_checked,
             "seconds": time.perf_counter() - t})


@dataclass
class Verdicts:
    """An attack's per-example verdicts over all N examples, merged from its chunks."""

    robust: torch.Tensor  # bool [N]: clean-correct and never broken (verified examples included)
    break_step: torch.Tensor  # long [N]: -1 never; 0 for examples settled before
    break_restart: torch.Tensor  # long [N]
    settled: dict[str, int]
    rejected: int = 0
    rejected_examples: int = 0
    row_steps: int = 0
    near_boundary: int = 0
    seconds: float = 0.0


def chunks(kind: str, params: AuditParams, todo: np.ndarray, part: str, chunk_batches: int,
           model: str = "graph") -> list[Task]:
    """An attack's tasks: the ``todo`` examples in chunks of ``chunk_batches`` attack batches of rows."""
    chunk = max(1, chunk_batches * params.batch_size // ATTACK_SPECS[kind].rows(params))
    return [Task(f"{part}-{c}", kind, params, todo[start:start + chunk], model=model)
            for c, start in enumerate(range(0, len(todo), chunk))]


def merge(clean_correct: torch.Tensor, settled_before: torch.Tensor, tasks: list[Task], results: list[Entry],
          ledger: Ledger | None = None, phase: str = "") -> Verdicts:
    """The chunks' verdicts over all N examples; the examples none of them attacked are robust unless
    ``settled_before`` (broken earlier, clean mistakes included) says otherwise (broken at step 0, restart 0).
    With a ``ledger``, each example's margin, break and seconds go to its record as ``phase``."""
    n, dev = len(clean_correct), clean_correct.device
    break_step = torch.full((n,), -1, dtype=torch.long, device=dev)
    break_step[settled_before] = 0
    break_restart = break_step.clone()
    out = Verdicts(clean_correct, break_step, break_restart,
                   dict(clean_wrong=int((~clean_correct).sum()), broken=0, convergence=0, full_budget=0))
    for task, (arrays, meta) in zip(tasks, results):
        ids = torch.as_tensor(task.rows, dtype=torch.long, device=dev)
        break_step[ids] = torch.as_tensor(arrays["break_step"], device=dev)
        break_restart[ids] = torch.as_tensor(arrays["break_restart"], device=dev)
        for key in ("broken", "convergence", "full_budget"):
            out.settled[key] += meta["settled"].get(key, 0)
        out.rejected += meta["rejected"]
        out.rejected_examples += meta["rejected_examples"]
        out.row_steps += meta["row_steps"]
        out.near_boundary += meta["near_boundary"]
        out.seconds += meta["seconds"]
        if ledger is not None:
            ledger.attacked(phase, task.rows, arrays["margin"], arrays["break_restart"] >= 0)
            ledger.spend(phase, task.rows, meta["seconds"])
    out.robust = clean_correct & (break_restart < 0)
    return out


@dataclass
class PGDFigures:
    """The card's PGD: its step, its curves and how it settled the examples."""

    step_size: float
    by_restart: list[float]
    by_step: dict[str, float]
    settled: Settled
    rejected_examples: int
    attack_work: float


@dataclass
class AttackPhase:
    """What the attacks found: per attack a summary, the figures, and the mask of examples still robust."""

    robust: torch.Tensor
    summaries: list[AttackSummary] = field(default_factory=list)
    pgd_robust_accuracy: float | None = None
    robust_accuracy: float | None = None
    square: SquareSummary | None = None
    pgd: PGDFigures | None = None
    rejected_candidates: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def fraction(flags: torch.Tensor) -> float:
    """Share of True flags, from counts, so the JSON shows 0.98, not float32's 0.9800000190734863."""
    return int(flags.sum()) / max(flags.numel(), 1)


def run_attacks(deployed: Deployed, params: AuditParams, verified: torch.Tensor, bars: Bars, parts: Parts,
                ledger: Ledger, before_late: Callable[[torch.Tensor], None]) -> AttackPhase:
    """The attacks of ``params.attacks`` in registry order, each on what the verifiers and the attacks before it
    left undecided, every break confirmed on onnxruntime. ``before_late(still_robust)`` runs once before the first
    late attack (alpha-CROWN and branch and bound: the costliest attack then runs on the fewest examples; it
    updates ``verified`` in place). Every example's verdict depends on it alone (its random streams are seeded by
    its index in the whole set), so chunks, workers and batch sizes change nothing."""
    n, clean_correct = len(verified), deployed.clean_correct
    broken = ~clean_correct
    chosen = [s for s in ATTACK_SPECS.values() if s.name in params.attacks and s.applies(params, deployed.classes)]
    out = AttackPhase(robust=clean_correct.clone())
    pgd_res, late_done = None, False
    twin = deployed.twin if params.float_twin else None
    for spec in chosen:
        if spec.late and not late_done:
            before_late(clean_correct & ~broken)
            late_done = True
        for model in ("graph", "twin") if spec.twin and twin is not None else ("graph",):
            todo = (clean_correct & ~broken & ~verified).nonzero().squeeze(1).cpu().numpy()
            suffix = "" if model == "graph" else " float twin"
            key = spec.name + ("" if model == "graph" else "-twin")
            tasks = chunks(spec.name, params, todo, key, parts.layout.chunk_batches, model)
            bar = bars.task(f"{spec.label}{suffix} (examples settled)", n)
            base = n - len(todo)
            bar(base, n)
            results = parts.map(tasks, GroupTick(tasks, {spec.name: (bar, base, n)}))
            res = merge(clean_correct, broken, tasks, results, ledger, key)
            newly = res.break_restart.ge(0) & ~broken
            summary = AttackSummary(name=spec.name, model="float twin" if model == "twin" else "graph",
                                    budget=spec.budget(params), attacked=len(todo), broken=int(newly.sum()),
                                    rejected_candidates=res.rejected, near_boundary_checked=res.near_boundary)
            out.summaries.append(summary)
            out.seconds[summary.key] = res.seconds
            if spec.name == "pgd":
                pgd_res = res
            if not spec.gradient:
                out.square = SquareSummary(queries=params.square_queries, attacked=len(todo),
                                           broken_beyond_pgd=int(newly.sum()),
                                           gradient_masking_suspected=bool(newly.any()),
                                           rejected_candidates=res.rejected)
            broken |= newly
        if spec.gradient:  # the gradient-free attacks run last: before them, the gradient attacks' figure
            out.pgd_robust_accuracy = fraction(clean_correct & ~broken)
    if not late_done:
        before_late(clean_correct & ~broken)
    out.robust = clean_correct & ~broken
    if out.pgd_robust_accuracy is None:  # no gradient attack ran
        out.pgd_robust_accuracy = fraction(clean_correct)
    out.robust_accuracy = fraction(out.robust)
    out.rejected_candidates = sum(a.rejected_candidates for a in out.summaries)
    if pgd_res is not None:
        # PGD's curves: examples broken before it (or clean mistakes) count as broken at step 0, restart 0
        by_restart, by_step = robustness_curves(pgd_res.robust, pgd_res.break_restart, pgd_res.break_step,
                                                params.steps, params.restarts)
        earlier = sum(a.broken for a in out.summaries if ATTACK_SPECS[a.name].gradient and a.name != "pgd")
        out.pgd = PGDFigures(
            step_size=params.step_size or params.threat.step_size(params.steps), by_restart=by_restart,
            by_step={str(k): v for k, v in by_step.items()},
            settled=Settled(verification=int(verified.sum()), earlier_attacks=earlier, **pgd_res.settled),
            rejected_examples=pgd_res.rejected_examples,
            attack_work=pgd_res.row_steps / max(n * params.restarts * params.steps, 1))
    return out
