"""The audit's orchestration: :func:`run_audit` runs the phases in order and assembles the typed report.

Each phase runs only on what the phases before it left undecided (neither proven robust nor broken), cheapest
first: the deployed model and its parity (:mod:`~pipeline.audit.deployed`), IBP and CROWN
(:mod:`~pipeline.audit.verify`), APGD-CE and APGD-T, alpha-CROWN and branch and bound, the card's PGD and Square
(:mod:`~pipeline.audit.attacks`), the eps sweep (:mod:`~pipeline.audit.sweep`), randomized smoothing. Every
phase returns a typed result and writes each example's record (:mod:`~pipeline.audit.records`).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.audit import sizing
from pipeline.audit.attacks import AttackPhase, fraction, run_attacks
from pipeline.audit.compute import compute_task
from pipeline.audit.deployed import Deployed, load_deployed, validate
from pipeline.audit.journal import Journal, journal_key, savez_atomic
from pipeline.audit.parts import Bars, Compute, Layout, Parts, Pool
from pipeline.audit.records import Ledger
from pipeline.audit.shards import Shard
from pipeline.audit.report import AuditReport, Decided, Seconds, SkippedVerifier, SmoothingSummary, intervals
from pipeline.audit.sweep import sweep
from pipeline.audit.verify import Verification, verify, verify_late
from pipeline.bounds.ops import verification_blockers
from pipeline.config import AuditParams
from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.onnx_io import export_onnx
from pipeline.runtime import default_device, num_threads
from pipeline.smoothing import certify_report


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass(frozen=True)
class AuditHooks:
    """The audit's seams: what computes a part (``compute``; tests wrap :func:`compute_task`), the progress bars
    (``bars(enabled)``), how the work is cut into parts (``layout``) and where one-line notices go (``say``)."""

    compute: Compute = compute_task
    bars: Callable[[bool], Bars] = Bars
    layout: Layout = field(default_factory=Layout)
    say: Callable[[str], None] = _stderr


def run_audit(model: Path | str | object, x: np.ndarray, y: np.ndarray, params: AuditParams,
              bounds_out: Path | None = None, progress: bool = True, source: str = "data",
              journal: Path | None = None, hooks: AuditHooks | None = None, shard: Shard | None = None
              ) -> AuditReport:
    """Audit an ONNX classifier on ``(x, y)`` within the ``params.norm`` ball of radius ``params.eps``: ``model`` is
    the path of an ONNX file, an in-memory ``onnx.ModelProto`` or a ``torch.nn.Module`` (exported with
    :func:`pipeline.onnx_io.export_onnx` for ``x``'s shape first, so the audit is of what onnxruntime computes), each
    written to a temporary file for the audit's time. See :func:`audit_file`."""
    with contextlib.ExitStack() as stack:
        path = _model_file(model, x, stack)
        report = audit_file(path, x, y, params, bounds_out, progress, source, journal, hooks, shard)
        if not isinstance(model, (str, Path)):
            report.model = f"<{type(model).__module__}.{type(model).__name__}>"
        return report


def _model_file(model: object, x: object, stack) -> Path:
    """A file path for ``model`` (see :func:`run_audit`); one line for anything else."""
    if isinstance(model, (str, Path)):
        return Path(model)
    import onnx

    if not isinstance(model, (onnx.ModelProto, torch.nn.Module)):
        raise HydraPipeError(f"run_audit: model must be the path of an ONNX file, an onnx.ModelProto or a "
                             f"torch.nn.Module, got {type(model).__name__}")
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hydra-pipe-model-"))) / "model.onnx"
    if isinstance(model, onnx.ModelProto):
        onnx.save(model, str(path))
        return path
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise HydraPipeError("run_audit: a torch model is exported for x's shape: x must be N x C x H x W")
    export_onnx(model, path, tuple(int(d) for d in x.shape[1:]))
    return path


def audit_file(model_path: Path, x: np.ndarray, y: np.ndarray, params: AuditParams, bounds_out: Path | None = None,
               progress: bool = True, source: str = "data", journal: Path | None = None,
               hooks: AuditHooks | None = None, shard: Shard | None = None) -> AuditReport:
    """Audit the ONNX classifier at ``model_path`` on ``(x, y)`` within the ``params.norm`` ball of radius
    ``params.eps`` (intersected with [0, 1]). Returns the typed report (each example's record in
    ``report.examples``); writes the IBP / CROWN logit bounds to ``bounds_out`` (.npz, without arrays when no
    bound ran: verification blocked, refused or off) if given. Bad input raises
    :class:`~pipeline.errors.HydraPipeError`, before anything is written.

    ``journal``: a folder for the finished parts (:class:`~pipeline.audit.journal.Journal`). Started again after a
    kill with the same model, data, params and code, the audit reuses them and computes only the rest; the report
    is then exactly an uninterrupted run's, but ``seconds``. The caller removes the journal once the report is
    written (:func:`~pipeline.audit.journal.discard_journal`).

    ``params.workers`` > 1 shards the parts across that many worker processes (:class:`~pipeline.audit.parts.Pool`),
    each with the audit's own thread count: the report and every record are the one-process audit's, but seconds.

    ``shard``: audit only the examples ``shard.index``, ``shard.index + shard.count``, ... (the model still runs on
    every example: clean pass, parity, sizing); the report's figures are then this shard's counts over the whole
    ``n`` and its records this shard's, for :func:`pipeline.audit.shards.merge_parts`.
    """
    hooks = hooks or AuditHooks()
    t_total = time.perf_counter()
    x, y = validate(x, y, source)
    threat = params.threat  # validates eps and norm once
    want_bounds = bounds_out is not None
    if shard is not None and want_bounds:
        raise HydraPipeError(f"--shard {shard}: the logit bounds file (--bounds-out) is not sharded; audit without "
                             "--shard to keep the bounds")
    if shard is not None and params.smoothing_sigma is not None:
        raise HydraPipeError(f"--shard {shard}: randomized smoothing (--smoothing-sigma) draws one noise stream over "
                             "all examples and is not sharded; certify it in one process")
    scratch = pool = None
    with num_threads(params.threads):  # the bounds too
        deployed = load_deployed(model_path, x, y, params.threads, source)
        seconds = dict(deployed.seconds)
        xt, yt = torch.as_tensor(x, device=default_device()), torch.as_tensor(y, device=default_device())
        ledger = Ledger(y, deployed.clean_correct.cpu().numpy(), deployed.clean_margin.copy())
        budgeted = params.what_runs()  # audit.budget: quick keeps AutoAttack's attacks and IBP + CROWN
        skipped = size_verifiers(deployed, xt, budgeted)
        for s_ in skipped:
            hooks.say(sizing.line(s_))
        sized = sizing.apply(budgeted, skipped)  # what runs; the journal's key stays the request's
        mine = np.ones(len(x), dtype=bool) if shard is None else shard.mask(len(x))
        if shard is not None:  # the others count as clean mistakes from here on: never verified, never robust
            deployed = replace(deployed, clean_correct=deployed.clean_correct & torch.as_tensor(
                mine, device=deployed.clean_correct.device))
        if params.workers > 1 and journal is None:  # the workers hand their entries over in a journal
            journal = scratch = Path(tempfile.mkdtemp(prefix="hydra-pipe-audit-"))
        book = Journal(None)
        if journal is not None:
            settings = {"params": params.model_dump(mode="json"), "bounds": want_bounds,
                        "layout": vars(hooks.layout), **({"shard": str(shard)} if shard is not None else {})}
            key, inputs = journal_key(Path(model_path), x, y, settings)
            book = Journal.open(journal, key, inputs, hooks.say)
        aborted = True
        try:
            if params.workers > 1:
                pool = Pool(params.workers, Path(model_path), x, y, deployed, params, book, hooks.compute)
            parts = Parts(book, deployed, xt, yt, hooks.compute, hooks.layout, pool)
            with hooks.bars(progress) as bars:
                v = verify(deployed, xt, sized, bars, parts, want_bounds, ledger)
                attacked = sized.steps > 0 and bool(sized.attacks)
                if attacked:
                    a = run_attacks(deployed, sized, v.verified, bars, parts, ledger,
                                    lambda undecided: verify_late(v, deployed, xt, sized, bars, parts, undecided,
                                                                  ledger))
                else:
                    verify_late(v, deployed, xt, sized, bars, parts, deployed.clean_correct, ledger)
                    a = None
                points, seconds["sweep"] = sweep(deployed, xt, sized, bars, parts) if sized.sweep_eps else ([], None)
            aborted = False
        finally:
            if pool is not None:
                pool.close(abort=aborted)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        smoothing = None
        if params.smoothing_sigma is not None:
            smoothing = _smoothing(deployed, x, y, params, book if scratch is None else Journal(None))
            seconds["smoothing"] = smoothing.seconds
    if bounds_out is not None:  # without arrays when no bound ran: a stage declares the file all the same
        savez_atomic(Path(bounds_out), v.bounds)
    seconds.update(v.seconds)
    if a is not None:
        seconds.update(a.seconds)
    seconds["total"] = time.perf_counter() - t_total
    report = _report(model_path, deployed, params, v, a, points, smoothing, ledger, seconds, mine)
    report.skipped_verifiers = skipped
    report.attach([r for r in ledger.records() if mine[r.index]])
    return report


def size_verifiers(deployed: Deployed, xt: torch.Tensor, params: AuditParams) -> list[SkippedVerifier]:
    """The verifiers that are on but will not run (:func:`pipeline.audit.sizing.plan`): none when no bound can run
    (parity failed, an op without a bound rule) or no example is clean-correct."""
    if not (params.crown or params.alpha_crown or params.bab):
        return []
    if (deployed.parity is not None and not deployed.parity.ok) or verification_blockers(deployed.graph.nodes):
        return []
    rows = deployed.clean_correct.nonzero().squeeze(1)
    if not len(rows):
        return []
    x_lo, x_hi = params.threat.box(xt[rows[:sizing.SAMPLE]].float())
    try:
        cost = sizing.network_cost(deployed.graph, x_lo, x_hi)
    except UnsupportedOpError:  # a refused form of an op: verification says so itself
        return []
    twin = params.float_twin and deployed.twin is not None and "apgd" in " ".join(params.attacks)
    return sizing.plan(cost, params, twin)


def _smoothing(deployed: Deployed, x: np.ndarray, y: np.ndarray, params: AuditParams, book: Journal
               ) -> SmoothingSummary:
    """Randomized smoothing's CERTIFY on the deployed numerics (see :mod:`pipeline.smoothing`), journaled."""
    def compute() -> tuple[dict, dict]:
        t = time.perf_counter()
        summary = certify_report(
            lambda b: torch.as_tensor(deployed.logits(b.cpu().numpy())), torch.as_tensor(x), y,
            params.smoothing_sigma, params.smoothing_radii, n0=params.smoothing_n0, n=params.smoothing_n,
            alpha=params.smoothing_alpha, seed=params.seed)
        return {}, {"summary": summary, "seconds": time.perf_counter() - t}

    _, meta = book.run("smoothing", compute, {}, ("summary", "seconds"))
    return SmoothingSummary(**meta["summary"])


def _report(model_path: Path, deployed: Deployed, params: AuditParams, v: Verification, a: AttackPhase | None,
            points: list, smoothing: SmoothingSummary | None, ledger: Ledger, seconds: dict[str, float],
            mine: np.ndarray) -> AuditReport:
    """The typed report from the phases' results, on the examples of ``mine`` (all of them but in a shard)."""
    n, clean_correct = len(ledger.labels), deployed.clean_correct
    status = ledger.status()[mine]
    count = {s: int((status == s).sum()) for s in ("proven", "broken", "undecided", "timeout", "clean-wrong",
                                                    "error")}
    decided = Decided(verified=count["proven"], broken=count["broken"] + count["clean-wrong"],
                      undecided=count["undecided"], timeout=count["timeout"], error=count["error"])
    figures = {"clean_accuracy": fraction(clean_correct),
               "pgd_robust_accuracy": a.pgd_robust_accuracy if a else None,
               "robust_accuracy": a.robust_accuracy if a else None, "verified_accuracy": v.accuracy}
    pgd = a.pgd if a else None
    if pgd is not None:  # a shard's own clean mistakes (its phases saw the other shards' examples as mistakes)
        pgd.settled.clean_wrong = int((~ledger.clean_correct[mine]).sum())
    report = AuditReport(
        model=str(model_path), n=n, classes=deployed.classes,
        stripped_output_ops=list(getattr(deployed.graph, "stripped_output_ops", [])), eps=params.threat.eps,
        norm=params.threat.norm, budget=params.budget, steps=params.steps, restarts=params.restarts,
        loss=params.loss, seed=params.seed,
        batch_size=params.batch_size, parity=deployed.parity, verification_refused=v.refused,
        verification_blocked_by=v.blocked_by, ibp_verified_accuracy=v.ibp, crown_verified_accuracy=v.crown,
        alpha_crown_verified_accuracy=v.alpha_crown, bab_verified_accuracy=v.bab, bab=v.bab_summary,
        attacks=a.summaries if a else [], square=a.square if a else None,
        rejected_candidates=a.rejected_candidates if a else None,
        step_size=pgd.step_size if pgd else None, robust_accuracy_by_restart=pgd.by_restart if pgd else [],
        robust_accuracy_by_step=pgd.by_step if pgd else {}, settled=pgd.settled if pgd else None,
        rejected_examples=pgd.rejected_examples if pgd else None, attack_work=pgd.attack_work if pgd else None,
        decided=decided, smoothing=smoothing, eps_sweep=points,
        seconds=Seconds(**{k.replace("-", "_"): round(s, 3) for k, s in seconds.items() if s is not None}),
        **figures)
    report.confidence_intervals = intervals(report)
    return report
