"""The model as deployed: the audit's input checks, the onnxruntime session and its torch graph form, their parity.

Attacks take gradients and the verifiers bound the graph form (:func:`pipeline.onnx_load.load_onnx`); every
verdict is about what onnxruntime computes. Attack verdicts are confirmed on onnxruntime one by one; a proof is
only about onnxruntime if the graph form computes what it computes, so :func:`load_deployed` measures both on the
audited clean inputs (:class:`~pipeline.audit.report.Parity`), and beyond float32's rounding no proof is claimed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.audit.report import Parity
from pipeline.bounds.crown import ibp_boxes
from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.graph import float_twin
from pipeline.onnx_io import ort_logits, ort_session
from pipeline.onnx_load import load_onnx
from pipeline.runtime import default_device, sound_numerics

PARITY_RTOL = 1e-4
"""The graph form may differ from onnxruntime by float32 rounding (another summation order, fused kernels): up to
``PARITY_RTOL * max(1, max |logit|)``, or by a rounding tie decided the other way (:func:`check_parity`). Beyond
that, the loader does not compute what onnxruntime computes for this model, and no proof is claimed (the attacks
still run: their verdicts are onnxruntime's own)."""


def validate(x: object, y: object, source: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """The audit's data: ``x`` float N x C x H x W in [0, 1], ``y`` integer N; one-line errors."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise HydraPipeError(f"{source}: x and y must be numpy arrays")
    if x.ndim != 4:
        raise HydraPipeError(f"{source}: x must be N x C x H x W, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        fix = ("divide by 255: x.astype(np.float32) / 255" if x.dtype == np.uint8 else
               "scale it into [0, 1] as the model's training data was")
        raise HydraPipeError(f"{source}: x must be float32 in [0, 1], got dtype {x.dtype}: {fix}")
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
        hint = "; pixel values 0..255? divide by 255" if x.min() >= 0.0 and 1.0 < x.max() <= 255.0 else ""
        raise HydraPipeError(f"{source}: x values must lie in [0, 1], found [{x.min():.4g}, {x.max():.4g}]{hint}")
    return np.ascontiguousarray(x), y.astype(np.int64, copy=False)


def margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``logit[y] - max_other logit`` per row (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(z))
    true = z[rows, y].copy()
    z = z.copy()
    z[rows, y] = -np.inf
    return true - z.max(1)


@dataclass
class Deployed:
    """The model as onnxruntime runs it, its torch twin (the graph form, for gradients and bounds) and its verdict
    on the clean inputs."""

    path: Path
    session: object
    graph: torch.nn.Module
    classes: int
    clean_correct: torch.Tensor
    clean_margin: np.ndarray | None = None  # onnxruntime's margins on the clean inputs (float64 [N])
    parity: Parity | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    _twin: list = field(default_factory=list)  # the float twin, built once when first asked for

    def logits(self, xs: np.ndarray) -> np.ndarray:
        return ort_logits(self.session, xs)

    def margin(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The records' margins at ``xs``, in the graph's logit space: onnxruntime's, or the graph form's when the
        loader stripped a final Softmax (onnxruntime's outputs are then probabilities; the sign is the same)."""
        if getattr(self.graph, "stripped_output_ops", []):
            return margins(graph_logits(self.graph, xs), ys)
        return margins(self.logits(xs), ys)

    @property
    def twin(self) -> torch.nn.Module | None:
        """The graph without rounding (:func:`pipeline.graph.float_twin`), None when nothing in it rounds."""
        if not self._twin:
            self._twin.append(float_twin(self.graph))
        return self._twin[0]


def open_model(model_path: Path, threads: int | None) -> tuple[object, torch.nn.Module]:
    """The onnxruntime session and the graph form of ``model_path`` (on the default device, eval mode)."""
    graph = load_onnx(Path(model_path))
    session = ort_session(Path(model_path), threads=threads)
    return session, graph.to(default_device()).eval()


def graph_logits(graph: torch.nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """The graph form's logits on ``x`` (float64, sound numerics: no TF32)."""
    with torch.no_grad(), sound_numerics():
        return np.concatenate([graph(torch.as_tensor(x[i:i + batch], device=default_device())).double().cpu().numpy()
                               for i in range(0, len(x), batch)])


def check_parity(graph: torch.nn.Module, x: np.ndarray, ort: np.ndarray, logits: np.ndarray) -> Parity:
    """The graph form's ``logits`` on ``x`` against onnxruntime's outputs ``ort`` (with the output ops the loader
    stripped, Softmax or LogSoftmax, applied again). An example whose outputs differ by more than float32's
    rounding (:data:`PARITY_RTOL`) still agrees when onnxruntime's logits lie within the graph form's sound bounds
    at that very input (interval bounds on the zero-radius box, widened by the same tolerance): an int8 graph's
    requantization can land on a rounding tie that a float sum in another order decides the other way (one quantum
    of an activation, times the weights after it), and the bounds' rounding relaxations cover exactly that
    (``QUANT_TOL``). A loader that computes something else fails both."""
    stripped = getattr(graph, "stripped_output_ops", [])
    ours = torch.from_numpy(logits)
    for op in stripped:
        ours = torch.softmax(ours, 1) if op == "Softmax" else torch.log_softmax(ours, 1)
    finite = np.isfinite(ort)  # -inf outputs (a LogSoftmax's) are compared by argmax
    diff = np.where(finite, np.abs(ours.numpy() - ort.astype(np.float64)), 0.0)
    tol = PARITY_RTOL * max(1.0, float(np.abs(np.where(finite, ort, 0.0)).max(initial=0.0)))
    off = np.flatnonzero(diff.max(1, initial=0.0) > tol)
    ties = 0
    if len(off) and not stripped:  # the bounds are of logits, not of probabilities
        try:
            with torch.no_grad(), sound_numerics():
                xs = torch.as_tensor(x[off], device=default_device())
                box = ibp_boxes(graph, xs, xs)[graph.output_name]
            lo, hi = box.lo.double().cpu().numpy(), box.hi.double().cpu().numpy()
            ties = int(((ort[off] >= lo - tol) & (ort[off] <= hi + tol)).all(1).sum())
        except UnsupportedOpError:  # an op without a bound rule: nothing is verified anyway
            pass
    return Parity(max_logit_difference=float(diff.max(initial=0.0)), tolerance=tol, rounding_ties=ties,
                  ok=bool(ties == len(off)))


def load_deployed(model_path: Path, x: np.ndarray, y: np.ndarray, threads: int | None, source: str) -> Deployed:
    """Load the model, run onnxruntime on the clean inputs and check the graph form against it (one-line errors)."""
    t = time.perf_counter()
    session, graph = open_model(model_path, threads)
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
    bad = int(np.isnan(logits).any(1).sum())
    if bad:  # argmax of NaN picks a class at random-looking; no verdict means anything (-inf is fine: LogSoftmax)
        raise HydraPipeError(f"{model_path}: onnxruntime gives NaN logits on {bad} of the {len(x)} examples "
                             "(e.g. a 0 / 0 in the graph)")
    classes = logits.shape[1]
    # attacks and bounds run many examples at once even where onnxruntime runs one at a time (a fixed-batch
    # model), and a graph that mixes the examples of a batch (Flatten over axis 0) fails only there
    try:
        with torch.no_grad():
            shape = tuple(graph(torch.as_tensor(np.concatenate([x[:1], x[:1]]), device=default_device())).shape)
    except Exception as exc:
        raise HydraPipeError(f"{model_path}: the torch form of the model cannot run on a batch of x of shape "
                             f"{x.shape[1:]} ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    if shape != (2, classes):
        raise HydraPipeError(f"{model_path}: the torch form gives shape {shape} for 2 examples, onnxruntime "
                             f"(2, {classes}): the model does not keep the examples of a batch apart")
    if y.min() < 0 or y.max() >= classes:
        raise HydraPipeError(f"{source}: labels must lie in [0, {classes - 1}] for this model, found [{y.min()}, {y.max()}]")
    clean_seconds = time.perf_counter() - t
    t = time.perf_counter()
    ours = graph_logits(graph, x)
    parity = check_parity(graph, x, logits, ours)
    clean_correct = torch.as_tensor(logits.argmax(1) == y, device=default_device())
    # the records' margins in logit space (Deployed.margin): onnxruntime's, or the graph's after a stripped Softmax
    clean_margin = margins(ours if getattr(graph, "stripped_output_ops", []) else logits, y)
    return Deployed(Path(model_path), session, graph, classes, clean_correct, clean_margin, parity,
                    {"load": load_seconds, "clean": clean_seconds, "parity": time.perf_counter() - t})
