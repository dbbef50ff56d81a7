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
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.attacks import pgd_attack, square_attack
from pipeline.config import AuditParams
from pipeline.errors import HydraPipeError
from pipeline.reporting import atomic_write_bytes, progress_bar

BOUNDS_BATCH = 256  # examples per bounds call: CROWN's memory grows with it


def _validate(x: object, y: object, eps: float, source: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """The audit's inputs: ``x`` float N x C x H x W in [0, 1], ``y`` integer N, ``eps >= 0``; one-line errors."""
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
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise HydraPipeError(f"eps must be a finite number >= 0, got {eps}")
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


def _bounds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str,
            advance: Callable[[int, int], None]) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Logit bounds and verified mask over the L-inf box ``[x - eps, x + eps] ∩ [0, 1]``, in batches.

    The box contains the L2 ball of the same radius, so the verdict is sound for both norms.
    """
    from pipeline.bounds import crown_bounds, interval_bounds, margin_lower_bounds, margin_spec

    lows, highs, ver = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), BOUNDS_BATCH):
            xb, yb = x[i:i + BOUNDS_BATCH], y[i:i + BOUNDS_BATCH]
            x_lo, x_hi = (xb - eps).clamp(0.0, 1.0), (xb + eps).clamp(0.0, 1.0)
            if method == "ibp":
                lo, hi = interval_bounds(model, x_lo, x_hi)
                margin = margin_lower_bounds(model, x_lo, x_hi, yb, "ibp")
            else:
                # logits and margins in one backward pass: C = [identity; e_y - e_j]
                k = int(model(xb[:1]).shape[1])
                eye = torch.eye(k, device=x.device).expand(len(xb), k, k)
                both_lo, both_hi = crown_bounds(model, x_lo, x_hi, C=torch.cat([eye, margin_spec(yb, k)], 1))
                lo, hi, margin = both_lo[:, :k], both_hi[:, :k], both_lo[:, k:]
            lows.append(lo.cpu().numpy())
            highs.append(hi.cpu().numpy())
            ver.append((margin > 0).all(1))
            advance(min(i + BOUNDS_BATCH, len(x)), len(x))
    return np.concatenate(lows), np.concatenate(highs), torch.cat(ver)


def _alpha_crown_verified(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """alpha-CROWN margins (optimised ReLU lower slopes; :func:`pipeline.bounds.alpha_crown_bounds`), in batches."""
    from pipeline.bounds import margin_lower_bounds

    ver = []
    for i in range(0, len(x), BOUNDS_BATCH):
        xb, yb = x[i:i + BOUNDS_BATCH], y[i:i + BOUNDS_BATCH]
        x_lo, x_hi = (xb - eps).clamp(0.0, 1.0), (xb + eps).clamp(0.0, 1.0)
        with torch.enable_grad():  # the slopes are optimised by gradient; the model's buffers get none
            margin = margin_lower_bounds(model, x_lo, x_hi, yb, "alpha-crown")
        ver.append((margin.detach() > 0).all(1))
    return torch.cat(ver) if ver else torch.zeros(0, dtype=torch.bool, device=x.device)


def run_audit(model_path: Path, x: np.ndarray, y: np.ndarray, params: AuditParams, bounds_out: Path | None = None,
              progress: bool = True, source: str = "data") -> dict:
    """Audit the ONNX classifier at ``model_path`` on ``(x, y)`` within the ``params.norm`` ball of radius
    ``params.eps`` (intersected with [0, 1]). Returns the report (the contract's keys and more); writes the IBP /
    CROWN logit bounds to ``bounds_out`` (.npz) if given. Bad input raises :class:`HydraPipeError`, before
    anything is written.
    """
    t_total = time.perf_counter()
    x, y = _validate(x, y, params.eps, source)
    eps = float(params.eps)
    threads = params.threads
    square_queries = params.square_queries
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # the bounds too; restored on the way out
    try:
        return _audit(model_path, x, y, params, bounds_out, progress, threads, square_queries, eps, t_total, source)
    finally:
        torch.set_num_threads(old_threads)


def _audit(model_path: Path, x: np.ndarray, y: np.ndarray, params: AuditParams, bounds_out: Path | None,
           progress: bool, threads: int | None, square_queries: int, eps: float, t_total: float, source: str = "data") -> dict:
    from pipeline.onnx_io import load_onnx, ort_logits, ort_session

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model = load_onnx(Path(model_path))
    session = ort_session(Path(model_path), threads=threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    seconds["load"] = time.perf_counter() - t

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
    clean_correct = torch.as_tensor(logits.argmax(1) == y, device=device)
    seconds["clean"] = time.perf_counter() - t

    xt, yt = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)

    def confirm(xs: np.ndarray) -> np.ndarray:
        return ort_logits(session, xs)

    n = len(x)
    report: dict = dict(model=str(model_path), n=n, classes=classes, eps=eps, norm=params.norm, steps=params.steps,
                        restarts=params.restarts, loss=params.loss, seed=params.seed, batch_size=params.batch_size,
                        clean_accuracy=_fraction(clean_correct), ibp_verified_accuracy=None,
                        crown_verified_accuracy=None, alpha_crown_verified_accuracy=None, pgd_robust_accuracy=None, robust_accuracy=None)
    arrays: dict[str, np.ndarray] = {}
    verified = torch.zeros(n, dtype=torch.bool, device=device)
    with _Progress(progress) as bars:
        for method, on in (("ibp", params.ibp), ("crown", params.crown)):
            if not on:
                continue
            t = time.perf_counter()
            lo, hi, ver = _bounds(model, xt, yt, eps, method, bars.task(f"{method.upper()} bounds", n))
            ver = ver & clean_correct  # sound bounds and onnxruntime agree; the AND guards against a disagreement
            verified |= ver
            arrays[f"{method}_lower"], arrays[f"{method}_upper"] = lo, hi
            report[f"{method}_verified_accuracy"] = _fraction(ver)
            seconds[method] = time.perf_counter() - t
        if params.alpha_crown:
            # only where CROWN did not already verify: alpha-CROWN is never looser, so the rest are verified anyway
            t = time.perf_counter()
            todo = (clean_correct & ~verified).nonzero().squeeze(1)
            alpha = verified & clean_correct
            if len(todo):
                alpha[todo] = _alpha_crown_verified(model, xt[todo], yt[todo], eps)
            verified |= alpha
            report["alpha_crown_verified_accuracy"] = _fraction(alpha)
            seconds["alpha_crown"] = time.perf_counter() - t
        report["verified_accuracy"] = _fraction(verified) if (arrays or params.alpha_crown) else None

        robust = clean_correct.clone()
        if params.steps > 0:
            t = time.perf_counter()
            res = pgd_attack(model, xt, yt, eps, norm=params.norm, steps=params.steps, restarts=params.restarts,
                             step_size=params.step_size, loss=params.loss, batch_size=params.batch_size,
                             seed=params.seed, verified=verified, confirm=confirm, threads=threads,
                             progress=bars.task("PGD (examples settled)", n))
            seconds["pgd"] = time.perf_counter() - t
            # the attack's clean check ran on onnxruntime too; the audit's own clean verdict is the reference
            robust = clean_correct & res.robust
            report.update(
                pgd_robust_accuracy=_fraction(robust),
                step_size=params.step_size or (2.5 * eps / max(1, min(params.steps, 100))),
                robust_accuracy_by_restart=res.robust_by_restart,
                robust_accuracy_by_step={str(k): v for k, v in res.robust_by_step.items()},
                settled=res.settled, rejected_candidates=res.rejected, rejected_examples=res.rejected_examples,
                attack_work=res.row_steps / max(res.budget_row_steps, 1),
            )
            report["square"] = None
            todo = (robust & ~verified).nonzero().squeeze(1)
            if square_queries > 0 and params.norm == "linf" and len(todo):
                t = time.perf_counter()
                sq = square_attack(model, xt[todo], yt[todo], eps, queries=square_queries, seed=params.seed,
                                   confirm=confirm, threads=threads)
                seconds["square"] = time.perf_counter() - t
                extra = int(sq.broken.sum())
                robust[todo[sq.broken]] = False
                report["square"] = dict(queries=square_queries, attacked=len(todo), broken_beyond_pgd=extra,
                                        gradient_masking_suspected=extra > 0, rejected_candidates=sq.rejected)
            report["robust_accuracy"] = _fraction(robust)
    report["smoothing"] = None
    if params.smoothing_sigma is not None:
        # randomized-smoothing certificate (issue 6): CERTIFY on the deployed numerics, see pipeline/smoothing.py
        from pipeline.smoothing import certify_report

        t = time.perf_counter()
        report["smoothing"] = certify_report(
            lambda b: torch.as_tensor(ort_logits(session, b.cpu().numpy())), torch.as_tensor(x), y,
            params.smoothing_sigma, params.smoothing_radii, n0=params.smoothing_n0, n=params.smoothing_n,
            alpha=params.smoothing_alpha, seed=params.seed)
        seconds["smoothing"] = time.perf_counter() - t
    if bounds_out is not None and arrays:
        _savez_atomic(Path(bounds_out), arrays)
    seconds["total"] = time.perf_counter() - t_total
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_report(report: dict):
    """The audit report as a rich Table (the CLI prints it)."""
    from rich.table import Table

    table = Table(title=f"audit: {report.get('model', '')}  ({report['n']} examples, {report['norm']} eps={report['eps']:g})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("notes")
    sec = report.get("seconds", {})

    def s(k: str) -> str:
        return f"{sec[k]:.1f} s" if k in sec else ""

    table.add_row("clean accuracy", _pct(report["clean_accuracy"]), "onnxruntime")
    table.add_row("IBP verified", _pct(report["ibp_verified_accuracy"]), s("ibp"))
    table.add_row("CROWN verified", _pct(report["crown_verified_accuracy"]), s("crown"))
    if report.get("alpha_crown_verified_accuracy") is not None:
        table.add_row("alpha-CROWN verified", _pct(report["alpha_crown_verified_accuracy"]), s("alpha_crown"))
    if report.get("pgd_robust_accuracy") is not None:
        st = report.get("settled", {})
        table.add_row(f"PGD robust ({report['steps']} x {report['restarts']})", _pct(report["pgd_robust_accuracy"]),
                      f"{s('pgd')}; settled: {st.get('verification', 0)} verified, {st.get('clean_wrong', 0)} clean-wrong, "
                      f"{st.get('broken', 0)} broken, {st.get('convergence', 0)} converged, "
                      f"{st.get('full_budget', 0)} full budget; work {100 * report.get('attack_work', 0):.1f}% of plain PGD")
        curve = report.get("robust_accuracy_by_restart") or []
        if curve:
            marks = sorted({1, 10, len(curve)} & set(range(1, len(curve) + 1)))
            table.add_row("  by restarts", " / ".join(_pct(curve[k - 1]) for k in marks),
                          "after " + ", ".join(str(k) for k in marks) + " restarts")
        table.add_row("  rejected by onnxruntime", str(report.get("rejected_candidates", 0)),
                      f"candidates on {report.get('rejected_examples', 0)} examples")
        sq = report.get("square")
        if sq:
            flag = "[bold red]gradient masking suspected[/]" if sq["gradient_masking_suspected"] else "no sign of masking"
            table.add_row(f"Square attack ({sq['queries']} queries)", str(sq["broken_beyond_pgd"]),
                          f"broken beyond PGD, {flag}; {s('square')}")
        table.add_row("robust accuracy (all attacks)", _pct(report.get("robust_accuracy")), "")
    else:
        table.add_row("PGD robust", "-", "steps = 0: no attack")
    sm = report.get("smoothing")
    if sm:
        certified = ", ".join(f"{_pct(v)} at {r}" for r, v in sm["certified_accuracy"].items())
        table.add_row(f"smoothing certified (sigma {sm['sigma']:g})", _pct(sm["certified_accuracy"]["0"]),
                      f"L2 radius: {certified}; abstained {_pct(sm['abstain_rate'])}; n={sm['n']}; {s('smoothing')}")
    table.add_row("total time", s("total"), "")
    return table
