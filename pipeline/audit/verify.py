"""The audit's verification phase: IBP and CROWN first, alpha-CROWN and branch and bound on what the cheap attacks
left (see :mod:`pipeline.audit.run`).

Each verifier runs in blocks of rows, each block a part of the journal. Examples onnxruntime already
misclassifies can never count as verified, so they are skipped unless the logit bounds are wanted. A proof is only
claimed when the graph form computes what onnxruntime computes (:func:`pipeline.audit.deployed.check_parity`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.audit.deployed import Deployed
from pipeline.audit.journal import Entry
from pipeline.audit.parts import Bars, GroupTick, Parts, Task, Tick
from pipeline.audit.records import Ledger
from pipeline.audit.report import BabSummary
from pipeline.bounds import branch_and_bound, certify
from pipeline.bounds.ops import verification_blockers
from pipeline.config import AuditParams
from pipeline.errors import UnsupportedOpError
from pipeline.quantization import saturation_hint

BARS = {"ibp": "IBP bounds", "crown": "CROWN bounds", "alpha-crown": "alpha-CROWN bounds",
        "bab": "branch and bound"}


@dataclass
class Verification:
    """What the verifiers proved: the mask, each method's figure (by it or a method before it), the bounds."""

    verified: torch.Tensor  # bool [N], updated in place by the late verifiers
    ran: bool = False  # a verifier ran (the figures below mean something)
    ibp: float | None = None
    crown: float | None = None
    alpha_crown: float | None = None
    bab: float | None = None
    bab_summary: BabSummary | None = None
    blocked_by: list[str] = field(default_factory=list)
    refused: str | None = None
    bounds: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        """The verified accuracy (the best proof), None when no verifier ran."""
        return int(self.verified.sum()) / max(len(self.verified), 1) if self.ran else None


def verify_block(deployed: Deployed, xt: torch.Tensor, yt: torch.Tensor, task: Task, tick: Tick) -> Entry:
    """The entry of a verifier's block: per example ``verified`` and the margin lower bound (``margin``), and
    for branch and bound whether it ran out of domains (``undecided``) or time (``timed_out``)."""
    t, p = time.perf_counter(), task.params
    ids = torch.as_tensor(task.rows, dtype=torch.long, device=xt.device)
    dtype = torch.float64 if p.float64 else torch.float32
    clean = deployed.clean_correct[ids]
    if task.kind == "bab":
        res = branch_and_bound(deployed.graph, xt[ids], yt[ids], p.threat, time_budget_s=p.bab_seconds,
                               max_domains=p.bab_domains, dtype=dtype, progress=tick, max_shortfall=p.bab_shortfall)
        verified = (res.verified & clean).cpu().numpy()
        undecided = res.undecided.cpu().numpy() & ~verified
        return ({"verified": verified, "undecided": undecided, "skipped": undecided & (res.domains.cpu().numpy() <= 1),
                 "timed_out": res.timed_out.cpu().numpy() & ~verified,
                 "margin": res.lower.min(1).values.double().cpu().numpy(),
                 "seconds_each": res.seconds.double().cpu().numpy()},
                {"seconds": time.perf_counter() - t})
    cert = certify(deployed.graph, xt[ids], yt[ids], p.threat, task.kind, batch_size=task.batch,
                   logit_bounds=task.keeps_bounds, progress=tick, dtype=dtype)
    # sound bounds and onnxruntime agree; the AND guards against a disagreement
    out = {"verified": (cert.verified & clean).cpu().numpy(), "margin": cert.margin.double().cpu().numpy()}
    if task.keeps_bounds:
        out["lower"], out["upper"] = cert.lower.cpu().numpy(), cert.upper.cpu().numpy()
    return out, {"seconds": time.perf_counter() - t}


def bounds_batch(graph: torch.nn.Module, x1: torch.Tensor, work: int, most: int) -> int:
    """Examples per bounds call: ``work`` over one example's work (activation elements x weights), at most
    ``most`` (see :class:`pipeline.audit.parts.Layout`)."""
    env, elements = {graph.input_name: x1}, 0
    with torch.no_grad():
        for node in graph.nodes:
            env[node.output] = out = node.module(*[env[i] for i in node.inputs])
            elements += out.numel()
    weights = sum(t.numel() for t in graph.state_dict().values())
    return max(1, min(most, work // max(elements * weights, 1)))


def _blocks(kind: str, name: str, params: AuditParams, rows: np.ndarray, batch: int, want_bounds: bool = False
            ) -> list[Task]:
    """A verifier's tasks: ``rows`` in blocks of one bounds call each (a block sees the rows it would see in one
    process, whichever process computes it)."""
    return [Task(f"{name}-{k}", kind, params, rows[i:i + batch], batch, want_bounds)
            for k, i in enumerate(range(0, len(rows), batch))]


def _bar(bars: Bars, kind: str, total: int) -> Tick:
    return bars.task(BARS[kind], total) if total else (lambda done, total_: None)


def _apply(v: Verification, kind: str, tasks: list[Task], results: list[Entry], ledger: Ledger | None) -> None:
    """Merge a verifier's blocks into ``v`` (and the records)."""
    dev = v.verified.device
    for t, (out, meta) in zip(tasks, results):
        v.verified[torch.as_tensor(t.rows, device=dev)] |= torch.as_tensor(out["verified"], device=dev)
        if ledger is not None:
            ledger.bound(kind, t.rows, out["margin"], out["verified"])
            ledger.spend(kind, t.rows, out["seconds_each"] if kind == "bab" else meta["seconds"])
            if kind == "bab":
                ledger.timed_out[t.rows] |= out["timed_out"]
    v.seconds[kind.replace("-", "_")] = sum(meta["seconds"] for _, meta in results)


def verify(deployed: Deployed, xt: torch.Tensor, params: AuditParams, bars: Bars, parts: Parts,
           want_bounds: bool, ledger: Ledger | None = None, part: str = "") -> Verification:
    """IBP and CROWN on every clean-correct example (every example with ``want_bounds``)."""
    n = len(xt)
    v = Verification(torch.zeros(n, dtype=torch.bool, device=xt.device))
    if not (params.ibp or params.crown or params.alpha_crown or params.bab):
        return v
    if deployed.parity is not None and not deployed.parity.ok:
        p = deployed.parity
        v.refused = (f"the graph form differs from onnxruntime by {p.max_logit_difference:.3g} on the clean inputs "
                     f"(tolerance {p.tolerance:.3g}): bounds of it would not be about the deployed model"
                     f"{saturation_hint(deployed.path)}")
        return v
    blocked = verification_blockers(deployed.graph.nodes)
    if blocked:
        v.blocked_by = blocked
        return v
    clean_correct = deployed.clean_correct
    batch = bounds_batch(deployed.graph, xt[:1], parts.layout.bounds_work, parts.layout.bounds_batch)
    rows = np.arange(n) if want_bounds else clean_correct.nonzero().squeeze(1).cpu().numpy()
    methods = [m for m, on in (("ibp", params.ibp), ("crown", params.crown)) if on]
    tasks = [t for m in methods for t in _blocks(m, part + m, params, rows, batch, want_bounds)]  # at once
    try:
        results = parts.map(tasks, GroupTick(tasks, {m: (_bar(bars, m, len(rows)), 0, len(rows)) for m in methods}))
    except UnsupportedOpError as exc:  # a form of an op its rule refuses (e.g. a convolution's padding mode)
        v.blocked_by = [exc.op_type]
        return v
    v.ran = True
    for method in methods:
        mine = [(t, r) for t, r in zip(tasks, results) if t.kind == method]
        alone = Verification(torch.zeros_like(v.verified), ran=True)
        _apply(alone, method, [t for t, _ in mine], [r for _, r in mine], ledger)
        v.verified |= alone.verified
        v.seconds.update(alone.seconds)
        if want_bounds:  # every row, in order
            for side in ("lower", "upper"):
                v.bounds[f"{method}_{side}"] = np.concatenate([out[side] for _, (out, _) in mine])
        setattr(v, method, alone.accuracy)
    return v


def verify_late(v: Verification, deployed: Deployed, xt: torch.Tensor, params: AuditParams, bars: Bars,
                parts: Parts, undecided: torch.Tensor, ledger: Ledger | None = None, part: str = "",
                bab: bool = True) -> None:
    """alpha-CROWN, then branch and bound, on the ``undecided`` examples only (what IBP and CROWN did not prove and
    the attacks before did not break): the costly verifiers run where nothing cheaper decided. An example an attack
    broke is never provable (the bounds are sound), so running them after the attacks changes no verified figure,
    only their cost. Updates ``v``."""
    if not v.ran:  # no verifier ran, the graph has an op without a bound rule, or parity failed
        return
    batch = bounds_batch(deployed.graph, xt[:1], parts.layout.bounds_work, parts.layout.bounds_batch)
    try:
        if params.alpha_crown:
            todo = (undecided & ~v.verified).nonzero().squeeze(1).cpu().numpy()
            tasks = _blocks("alpha-crown", part + "alpha_crown", params, todo, batch)
            results = parts.map(tasks, GroupTick(tasks, {"alpha-crown": (_bar(bars, "alpha-crown", len(todo)), 0,
                                                                         len(todo))}))
            _apply(v, "alpha-crown", tasks, results, ledger)
            v.alpha_crown = v.accuracy
        if bab and params.bab:
            todo = (undecided & ~v.verified).nonzero().squeeze(1).cpu().numpy()
            block = parts.layout.bab_block
            tasks = [Task(f"{part}bab-{k}", "bab", params, todo[i:i + block])
                     for k, i in enumerate(range(0, len(todo), block))]
            results = parts.map(tasks, GroupTick(tasks, {"bab": (_bar(bars, "bab", len(todo)), 0, len(todo))}))
            _apply(v, "bab", tasks, results, ledger)
            proven = sum(int(out["verified"].sum()) for out, _ in results)
            timed_out = sum(int(out["timed_out"].sum()) for out, _ in results)
            left = sum(int(out["undecided"].sum()) for out, _ in results)
            skipped = sum(int(out["skipped"].sum()) for out, _ in results)
            v.bab = v.accuracy
            v.bab_summary = BabSummary(attacked=len(todo), verified=proven, undecided=left, skipped=skipped,
                                       timed_out=timed_out, domains_per_example=params.bab_domains,
                                       seconds_per_example=params.bab_seconds)
    except UnsupportedOpError:  # IBP and CROWN ran, so every op has a rule; a refused form stops only these
        pass
