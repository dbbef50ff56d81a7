"""The robustness audit of a deployed ONNX classifier: clean accuracy, verified accuracy, PGD robust accuracy.

One function, :func:`run_audit`, behind both ``hydra-pipe audit MODEL.onnx`` and the pipeline's audit stage:

1. clean accuracy on the deployed numerics (onnxruntime);
2. IBP and CROWN verified accuracy (Gowal et al. 2018; Zhang et al. 2018) on the same graph loaded into torch,
   and the logit bounds;
3. PGD with restarts (Madry et al. 2018, :func:`pipeline.attacks.pgd_attack`) on the examples not verified, with
   gradients straight through the graph's rounding and every adversarial example confirmed by onnxruntime;
4. the Square attack (Andriushchenko et al. 2020) on what PGD left robust: gradient-free, so an example it
   breaks and PGD did not is a sign of gradient masking. The report says so.

An example counts as robust only if onnxruntime classifies it correctly and no attack found a point of the ball
that onnxruntime misclassifies; a verified example is robust (the bounds are sound), so it is not attacked.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.attacks import pgd_attack, square_attack
from pipeline.audit_report import AuditReport, SmoothingSummary, SquareSummary
from pipeline.bounds import certify
from pipeline.config import AuditParams
from pipeline.errors import HydraPipeError
from pipeline.onnx_io import ort_logits, ort_session
from pipeline.onnx_load import load_onnx
from pipeline.reporting import atomic_write_bytes, progress_bar
from pipeline.runtime import default_device, num_threads
from pipeline.smoothing import certify_report

BOUNDS_BATCH = 256  # examples per bounds call: CROWN's memory grows with it


def _validate(x: object, y: object, source: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """The audit's data: ``x`` float N x C x H x W in [0, 1], ``y`` integer N; one-line errors."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise HydraPipeError(f"{source}: x and y must be numpy arrays")
    if x.ndim != 4:
        raise HydraPipeError(f"{source}: x must be N x C x H x W, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise HydraPipeError(f"{source}: x must be float32 in [0, 1], got dtype {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise HydraPipeError(f"{source}: y must be a 1-D integer (int64) array, got dtype {y.dtype} and shape {y.shape}")
    if len(x) != len(y):
        raise HydraPipeError(f"{source}: x has {len(x)} examples but y has {len(y)}")
    if len(x) == 0:
        raise HydraPipeError(f"{source}: no examples")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise HydraPipeError(f"{source}: x contains NaN or infinite values")
    if x.min() < 0.0 or x.max() > 1.0:
        raise HydraPipeError(f"{source}: x values must lie in [0, 1], found [{x.min():.4g}, {x.max():.4g}]")
    return np.ascontiguousarray(x), y.astype(np.int64, copy=False)


def _fraction(flags: torch.Tensor) -> float:
    """Share of True flags, computed from counts so the JSON shows 0.98, not float32's 0.9800000190734863."""
    return int(flags.sum()) / max(flags.numel(), 1)


def _savez_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


class _Progress:
    """The project's rich progress bar (stderr), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.bar = progress_bar() if enabled else None

    def __enter__(self) -> "_Progress":
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int) -> Callable[[int, int], None]:
        if not self.bar:
            return lambda done, total: None
        task = self.bar.add_task(description, total=total)
        return lambda done, total_: self.bar.update(task, completed=done, total=total_)


@dataclass
class _Deployed:
    """The model as onnxruntime runs it, its torch twin (the graph form, for gradients and bounds) and its verdict
    on the clean inputs."""

    path: Path
    session: object
    graph: torch.nn.Module
    classes: int
    clean_correct: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)

    def logits(self, xs: np.ndarray) -> np.ndarray:
        return ort_logits(self.session, xs)


def _load(model_path: Path, x: np.ndarray, y: np.ndarray, threads: int | None, source: str) -> _Deployed:
    t = time.perf_counter()
    graph = load_onnx(Path(model_path))
    session = ort_session(Path(model_path), threads=threads)
    graph = graph.to(default_device()).eval()
    load_seconds = time.perf_counter() - t
    t = time.perf_counter()
    try:
        logits = ort_logits(session, x)
    except Exception as exc:  # onnxruntime's own errors (shape, type) as one line
        shape = session.get_inputs()[0].shape
        raise HydraPipeError(f"{model_path}: cannot run on x of shape {x.shape} (model input {shape}): "
                             f"{type(exc).__name__}") from None
    if logits.ndim != 2:
        raise HydraPipeError(f"{model_path}: expected logits N x classes, got shape {logits.shape}")
    classes = logits.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise HydraPipeError(f"{source}: labels must lie in [0, {classes - 1}] for this model, found [{y.min()}, {y.max()}]")
    clean_correct = torch.as_tensor(logits.argmax(1) == y, device=default_device())
    return _Deployed(Path(model_path), session, graph, classes, clean_correct,
                     {"load": load_seconds, "clean": time.perf_counter() - t})


def run_audit(model_path: Path, x: np.ndarray, y: np.ndarray, params: AuditParams, bounds_out: Path | None = None,
              progress: bool = True, source: str = "data") -> AuditReport:
    """Audit the ONNX classifier at ``model_path`` on ``(x, y)`` within the ``params.norm`` ball of radius
    ``params.eps`` (intersected with [0, 1]). Returns the typed report; writes the IBP / CROWN logit bounds to
    ``bounds_out`` (.npz) if given. Bad input raises :class:`HydraPipeError`, before anything is written.
    """
    t_total = time.perf_counter()
    x, y = _validate(x, y, source)
    threat = params.threat  # validates eps and norm once
    with num_threads(params.threads):  # the bounds too
        deployed = _load(model_path, x, y, params.threads, source)
        seconds = deployed.seconds
        xt, yt = torch.as_tensor(x, device=default_device()), torch.as_tensor(y, device=default_device())
        fields: dict = {}
        arrays: dict[str, np.ndarray] = {}
        with _Progress(progress) as bars:
            verified = _verify(deployed, xt, yt, params, bars, fields, arrays, seconds)
            if params.steps > 0:
                _attack(deployed, xt, yt, params, verified, bars, fields, seconds)
        if params.smoothing_sigma is not None:
            # randomized-smoothing certificate: CERTIFY on the deployed numerics, see pipeline/smoothing.py
            t = time.perf_counter()
            fields["smoothing"] = SmoothingSummary(**certify_report(
                lambda b: torch.as_tensor(deployed.logits(b.cpu().numpy())), torch.as_tensor(x), y,
                params.smoothing_sigma, params.smoothing_radii, n0=params.smoothing_n0, n=params.smoothing_n,
                alpha=params.smoothing_alpha, seed=params.seed))
            seconds["smoothing"] = time.perf_counter() - t
    if bounds_out is not None and arrays:
        _savez_atomic(Path(bounds_out), arrays)
    seconds["total"] = time.perf_counter() - t_total
    return AuditReport(model=str(model_path), n=len(x), classes=deployed.classes, eps=threat.eps, norm=threat.norm,
                       steps=params.steps, restarts=params.restarts, loss=params.loss, seed=params.seed,
                       batch_size=params.batch_size, clean_accuracy=_fraction(deployed.clean_correct), **fields,
                       seconds={k: round(v, 3) for k, v in seconds.items()})


def _verify(deployed: _Deployed, xt: torch.Tensor, yt: torch.Tensor, params: AuditParams, bars: _Progress,
            fields: dict, arrays: dict[str, np.ndarray], seconds: dict[str, float]) -> torch.Tensor:
    """IBP, CROWN, then alpha-CROWN on what they left; returns the verified mask, fills the figures and bounds."""
    n, clean_correct = len(xt), deployed.clean_correct
    verified = torch.zeros(n, dtype=torch.bool, device=xt.device)
    for method, on in (("ibp", params.ibp), ("crown", params.crown)):
        if not on:
            continue
        t = time.perf_counter()
        cert = certify(deployed.graph, xt, yt, params.threat, method, batch_size=BOUNDS_BATCH,
                       progress=bars.task(f"{method.upper()} bounds", n))
        # sound bounds and onnxruntime agree; the AND guards against a disagreement
        ver = cert.verified & clean_correct
        verified |= ver
        arrays[f"{method}_lower"], arrays[f"{method}_upper"] = cert.lower.cpu().numpy(), cert.upper.cpu().numpy()
        fields[f"{method}_verified_accuracy"] = _fraction(ver)
        seconds[method] = time.perf_counter() - t
    if params.alpha_crown:
        # only where CROWN did not already verify: alpha-CROWN is never looser, so the rest are verified anyway
        t = time.perf_counter()
        todo = (clean_correct & ~verified).nonzero().squeeze(1)
        alpha = verified & clean_correct
        if len(todo):
            alpha[todo] = certify(deployed.graph, xt[todo], yt[todo], params.threat, "alpha-crown",
                                  batch_size=BOUNDS_BATCH).verified
        verified |= alpha
        fields["alpha_crown_verified_accuracy"] = _fraction(alpha)
        seconds["alpha_crown"] = time.perf_counter() - t
    fields["verified_accuracy"] = _fraction(verified) if (arrays or params.alpha_crown) else None
    return verified


def _attack(deployed: _Deployed, xt: torch.Tensor, yt: torch.Tensor, params: AuditParams, verified: torch.Tensor,
            bars: _Progress, fields: dict, seconds: dict[str, float]) -> None:
    """PGD on what is not verified, then Square on what PGD left robust; every break confirmed by onnxruntime."""
    n, clean_correct, eps = len(xt), deployed.clean_correct, params.threat.eps
    t = time.perf_counter()
    res = pgd_attack(deployed.graph, xt, yt, eps, norm=params.norm, steps=params.steps, restarts=params.restarts,
                     step_size=params.step_size, loss=params.loss, batch_size=params.batch_size, seed=params.seed,
                     verified=verified, confirm=deployed.logits, threads=params.threads,
                     progress=bars.task("PGD (examples settled)", n))
    seconds["pgd"] = time.perf_counter() - t
    # the attack's clean check ran on onnxruntime too; the audit's own clean verdict is the reference
    robust = clean_correct & res.robust
    fields.update(
        pgd_robust_accuracy=_fraction(robust),
        step_size=params.step_size or params.threat.step_size(params.steps),
        robust_accuracy_by_restart=res.robust_by_restart,
        robust_accuracy_by_step={str(k): v for k, v in res.robust_by_step.items()},
        settled=res.settled, rejected_candidates=res.rejected, rejected_examples=res.rejected_examples,
        attack_work=res.row_steps / max(res.budget_row_steps, 1),
    )
    todo = (robust & ~verified).nonzero().squeeze(1)
    if params.square_queries > 0 and params.norm == "linf" and len(todo):
        t = time.perf_counter()
        sq = square_attack(deployed.graph, xt[todo], yt[todo], eps, queries=params.square_queries, seed=params.seed,
                           confirm=deployed.logits, threads=params.threads)
        seconds["square"] = time.perf_counter() - t
        extra = int(sq.broken.sum())
        robust[todo[sq.broken]] = False
        fields["square"] = SquareSummary(queries=params.square_queries, attacked=len(todo), broken_beyond_pgd=extra,
                                         gradient_masking_suspected=extra > 0, rejected_candidates=sq.rejected)
    fields["robust_accuracy"] = _fraction(robust)
