"""The robustness audit of a deployed ONNX classifier: clean accuracy, verified accuracy, robust accuracy.

One function, :func:`run_audit`, behind both ``hydra-pipe audit MODEL.onnx`` and the pipeline's audit stage. Each
step runs only on what the steps before it left undecided (neither proven robust nor broken), cheapest first:

1. clean accuracy on the deployed numerics (onnxruntime);
2. IBP and CROWN (Gowal et al. 2018; Zhang et al. 2018) on the same graph loaded into torch, and the logit
   bounds; when an op of the graph has no bound rule (LRN, a Softmax inside the network, ...) verification is
   skipped and the report names the ops (``verification_blocked_by``), the attacks still run;
3. APGD-CE and APGD-T (Croce & Hein 2020, AutoAttack's pair), on an int8 graph on its float twin too;
4. alpha-CROWN (Xu et al. 2021), then branch and bound (beta-CROWN's idea, Wang et al. 2021);
5. the card's PGD (Madry et al. 2018, ``steps`` x ``restarts``), gradients straight through the graph's rounding;
6. the Square attack (Andriushchenko et al. 2020): gradient-free, so an example it breaks after every gradient
   attack failed is a sign of gradient masking. The report says so;
7. optionally, the verifiers and a smaller PGD at each radius of ``sweep_eps`` (robust accuracy vs eps).

Every candidate an attack finds is confirmed by onnxruntime, and so is every iterate whose torch margin is within
``confirm_margin`` of the boundary: an example counts as robust only if onnxruntime classifies it correctly and no
attack found a point of the ball that onnxruntime misclassifies; a verified example is robust (the bounds are
sound), so it is not attacked. The report keeps, per attack, how many examples it broke first, the verified /
broken / undecided counts, and each accuracy's 95% Clopper-Pearson interval.

With a journal folder, each finished part's per-example verdicts are kept on disk (:class:`_Journal`), so an audit
killed after ten minutes resumes where it stopped and reports exactly what an uninterrupted run reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.attacks import apgd_attack, pgd_attack, robustness_curves, square_attack
from pipeline.audit_report import (AttackSummary, AuditReport, BabSummary, EpsPoint, SmoothingSummary, SquareSummary,
                                   clopper_pearson)
from pipeline.bounds import branch_and_bound, certify
from pipeline.bounds.ops import verification_blockers
from pipeline.config import ATTACK_ORDER, AuditParams
from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.onnx_io import ort_logits, ort_session
from pipeline.graph import float_twin
from pipeline.onnx_load import load_onnx
from pipeline.reporting import atomic_write_bytes, progress_bar
from pipeline.runtime import default_device, num_threads
from pipeline.smoothing import certify_report

BOUNDS_BATCH = 256  # examples per bounds call at most: CROWN's memory grows with it
BOUNDS_WORK = 1 << 33
"""Work per bounds call, in examples x activation elements x weights: CROWN tightens up to every activation and
each of its backward passes crosses up to every weight, so their product is a rough (deterministic) proxy of its
cost. Each example's rows are padded to the most any example of the call has, and one call's examples share the
union of their unstable neurons, so on a network with many unstable neurons small calls are faster per example:
the 28 x 28 Fashion-MNIST CNN-small (2.1e9 per example) gets calls of 4 (0.16 s per example against 0.19 in calls
of 64), a deep network calls of one image, and the pipeline's digits network (5e7) calls of 171."""
PGD_CHUNK_BATCHES = 4
"""PGD attacks the undecided examples in chunks of this many attack batches' worth of rows (``4 * batch_size //
restarts`` examples, at least one) and journals each chunk's verdicts. The chunks are the same with or without a
journal, so a resumed audit equals an uninterrupted one bit for bit. Each chunk ends on a draining batch (its
slowest rows alone), so much smaller chunks would cost speed; the pipeline's digits audit (90 undecided examples,
163 per chunk) is one chunk. The chunks are also what ``workers`` processes share (:class:`_Pool`): they do not
depend on the number of workers, so neither do the verdicts."""
BAB_BLOCK = 4
"""Examples per branch-and-bound task: each gets ``audit.bab_seconds`` at most, so a block is a journal entry of
a few of them (a resumed audit loses at most one block's work)."""
JOURNAL_FORMAT = 3
"""Bump when what a journal entry holds, or how a part is computed, changes: older entries then no longer match."""


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


class _Journal:
    """The audit's finished parts on disk, so a killed audit resumes where it stopped (see :func:`run_audit`).

    One file per finished part (a verifier, a chunk of PGD, Square, a swept eps, smoothing):
    ``<folder>/audit-<key>-<part>.npz``, its per-example verdicts as arrays and its figures as JSON (``__meta__``),
    written to a temporary file, flushed and renamed, so an entry is whole or absent whenever the process dies.
    ``key`` hashes everything a verdict depends on (:func:`_journal_key`): entries of another model, data set or
    params in the same folder (a stale journal) are never read. Without a folder it keeps nothing.
    """

    def __init__(self, folder: Path | None, key: str = "") -> None:
        self.folder, self.key = (Path(folder) if folder is not None else None), key

    def _path(self, part: str) -> Path:
        return self.folder / f"audit-{self.key}-{part}.npz"

    def get(self, part: str, shapes: dict[str, tuple[int, ...]], keys: tuple[str, ...]
            ) -> tuple[dict[str, np.ndarray], dict] | None:
        """The entry of ``part`` if it is whole and holds the arrays (of these shapes) and figures expected."""
        if self.folder is None:
            return None
        try:
            with np.load(self._path(part), allow_pickle=False) as f:  # zip CRCs catch flipped bits
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(str(arrays.pop("__meta__")))
        except Exception:  # missing, or damaged (disk fault, a hand edit): recomputed, never trusted or fatal
            return None
        if not isinstance(meta, dict) or any(k not in meta for k in keys) or \
                any(k not in arrays or arrays[k].shape != shape for k, shape in shapes.items()):
            return None
        return arrays, meta

    def run(self, part: str, compute: Callable[[], tuple[dict[str, np.ndarray], dict]],
            shapes: dict[str, tuple[int, ...]], keys: tuple[str, ...] = ("seconds",)
            ) -> tuple[dict[str, np.ndarray], dict]:
        """The part's ``(arrays, meta)`` from its entry, else from ``compute()``, then journaled; ``shapes`` and
        ``keys`` are what a usable entry holds."""
        got = self.get(part, shapes, keys)
        if got is None:
            got = compute()
            self.put(part, *got)
        return got

    def put(self, part: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Journal the entry of ``part`` (whole or not at all)."""
        if self.folder is not None:
            _savez_atomic(self._path(part), {**arrays, "__meta__": np.array(json.dumps(meta))})


def _journal_key(model_path: Path, x: np.ndarray, y: np.ndarray, params: AuditParams, want_bounds: bool) -> str:
    """What every verdict depends on, hashed: the model file's bytes, the data, every audit param, whether bounds
    are kept, and the numerics (device, torch's thread count, library versions: another float summation order can
    flip a borderline verdict). A model's external data files are not hashed: replace them, and discard the journal.
    """
    import onnxruntime

    h = hashlib.sha256()
    with open(model_path, "rb") as f:  # read_proto has checked its size; read in blocks all the same
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for a in (x, y):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    h.update(json.dumps({"format": JOURNAL_FORMAT, "params": params.model_dump(mode="json"), "bounds": want_bounds,
                         "device": str(default_device()), "threads": torch.get_num_threads(),
                         "versions": [np.__version__, torch.__version__, onnxruntime.__version__]},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


def discard_journal(folder: Path) -> None:
    """Remove the audit journal entries in ``folder`` (of any key, and temporary files of killed writers), then the
    folder once empty. Call it when the report is safely written: the journal has served its purpose."""
    folder = Path(folder)
    for pattern in ("audit-*.npz", ".audit-*.npz.*.tmp"):
        for entry in folder.glob(pattern):
            with contextlib.suppress(OSError):
                entry.unlink()
    with contextlib.suppress(OSError):  # not empty: someone else's files, left alone
        folder.rmdir()


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
    _twin: list = field(default_factory=list)  # the float twin, built once when first asked for

    def logits(self, xs: np.ndarray) -> np.ndarray:
        return ort_logits(self.session, xs)

    @property
    def twin(self) -> torch.nn.Module | None:
        """The graph without rounding (:func:`pipeline.graph.float_twin`), None when nothing in it rounds."""
        if not self._twin:
            self._twin.append(float_twin(self.graph))
        return self._twin[0]


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
    bad = int(np.isnan(logits).any(1).sum())
    if bad:  # argmax of NaN picks a class at random-looking; no verdict means anything (-inf is fine: LogSoftmax)
        raise HydraPipeError(f"{model_path}: onnxruntime gives NaN logits on {bad} of the {len(x)} examples "
                             "(e.g. a 0 / 0 in the graph)")
    classes = logits.shape[1]
    # The graph form must give what onnxruntime gives, in shape at least (its values: the parity tests), on a
    # batch of two: attacks and bounds run many examples at once even where onnxruntime runs one at a time (a
    # fixed-batch model), and a graph that mixes the examples of a batch (Flatten over axis 0) fails only there.
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
    clean_correct = torch.as_tensor(logits.argmax(1) == y, device=default_device())
    return _Deployed(Path(model_path), session, graph, classes, clean_correct,
                     {"load": load_seconds, "clean": time.perf_counter() - t})


ATTACK_NAMES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "pgd": "PGD", "square": "Square"}


@dataclass(frozen=True)
class _Task:
    """A part of the audit that any process computes alone and journals as one entry: a block of one verifier's
    bounds (``kind`` ibp, crown, alpha-crown or bab) or a chunk of one attack (``kind`` apgd-ce, apgd-t, pgd or
    square, on ``model`` graph or twin). It holds all its verdicts depend on (the examples by their index in the
    whole set, the params, the bounds batch), so a worker gives the entry the audit's own process would, and the
    blocks and chunks are the same however many processes share them."""

    part: str  # its journal part
    kind: str
    params: AuditParams
    rows: np.ndarray  # long: the examples, by their index in the whole set
    batch: int = 0  # examples per bounds call: a block is one or a few of the one-process audit's calls
    want_bounds: bool = False  # keep the logit bounds (ibp, crown)
    model: str = "graph"  # what an attack runs on: "graph" or "twin" (the graph without rounding)

    @property
    def is_attack(self) -> bool:
        return self.kind in ATTACK_NAMES

    @property
    def keeps_bounds(self) -> bool:
        return self.want_bounds and self.kind in ("ibp", "crown")

    def shapes(self, classes: int) -> dict[str, tuple[int, ...]]:
        n = len(self.rows)
        if self.is_attack:
            return {"break_step": (n,), "break_restart": (n,)}
        if self.kind == "bab":
            return {"verified": (n,), "undecided": (n,)}
        return {"verified": (n,), **({"lower": (n, classes), "upper": (n, classes)} if self.keeps_bounds else {})}

    @property
    def keys(self) -> tuple[str, ...]:
        if self.is_attack:
            return ("settled", "rejected", "rejected_examples", "row_steps", "near_boundary", "seconds")
        return ("seconds",)


def _attack_chunk(kind: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor,
                  p: AuditParams, confirm, progress) -> tuple[dict[str, np.ndarray], dict]:
    """One chunk of attack ``kind`` on ``model``, its breaks confirmed by ``confirm``: the per-example verdicts
    (``break_step``, ``break_restart``; -1 = never) and the figures."""
    eps, common = p.threat.eps, dict(seed=p.seed, confirm=confirm, threads=p.threads, index=ids,
                                     confirm_margin=p.confirm_margin)
    if kind == "square":
        sq = square_attack(model, x, y, eps, norm=p.norm, queries=p.square_queries, restarts=p.square_restarts,
                           progress=progress, **common)
        broken = sq.broken.cpu().numpy()
        never = np.full(len(x), -1, dtype=np.int64)
        return ({"break_step": np.where(broken, sq.queries_used.cpu().numpy(), never),
                 "break_restart": np.where(broken, 0, never)},
                {"settled": {}, "rejected": sq.rejected, "rejected_examples": int(sq.rejected_examples),
                 "row_steps": int(sq.queries_used.sum()), "near_boundary": sq.near_boundary_checked})
    if kind == "pgd":
        res = pgd_attack(model, x, y, eps, norm=p.norm, steps=p.steps, restarts=p.restarts, step_size=p.step_size,
                         loss=p.loss, batch_size=p.batch_size, progress=progress, **common)
    else:
        targeted = kind == "apgd-t"
        res = apgd_attack(model, x, y, eps, norm=p.norm, steps=p.apgd_steps, restarts=p.apgd_restarts,
                          targets=p.apgd_targets, loss="dlr-targeted" if targeted else "ce",
                          batch_size=p.batch_size, progress=progress, **common)
    return ({"break_step": res.break_step.cpu().numpy(), "break_restart": res.break_restart.cpu().numpy()},
            {"settled": res.settled, "rejected": res.rejected, "rejected_examples": res.rejected_examples,
             "row_steps": res.row_steps, "near_boundary": res.near_boundary_checked})


def _compute(deployed: _Deployed, xt: torch.Tensor, yt: torch.Tensor, task: _Task,
             progress: Callable[[int, int], None]) -> tuple[dict[str, np.ndarray], dict]:
    """The journal entry of ``task``: its per-example verdicts (arrays) and its figures (JSON)."""
    t, p = time.perf_counter(), task.params
    ids = torch.as_tensor(task.rows, dtype=torch.long, device=xt.device)
    if task.is_attack:
        model = deployed.graph if task.model == "graph" else deployed.twin
        out, meta = _attack_chunk(task.kind, model, xt[ids], yt[ids], ids, p, deployed.logits, progress)
        return out, {**meta, "seconds": time.perf_counter() - t}
    dtype = torch.float64 if p.float64 else torch.float32
    if task.kind == "bab":
        res = branch_and_bound(deployed.graph, xt[ids], yt[ids], p.threat, time_budget_s=p.bab_seconds,
                               max_domains=p.bab_domains, dtype=dtype, progress=progress,
                               max_shortfall=p.bab_shortfall)
        verified = (res.verified & deployed.clean_correct[ids]).cpu().numpy()
        return ({"verified": verified, "undecided": (res.undecided.cpu().numpy() & ~verified)},
                {"seconds": time.perf_counter() - t})
    cert = certify(deployed.graph, xt[ids], yt[ids], p.threat, task.kind, batch_size=task.batch,
                   logit_bounds=task.keeps_bounds, progress=progress, dtype=dtype)
    # sound bounds and onnxruntime agree; the AND guards against a disagreement
    out = {"verified": (cert.verified & deployed.clean_correct[ids]).cpu().numpy()}
    if task.keeps_bounds:
        out["lower"], out["upper"] = cert.lower.cpu().numpy(), cert.upper.cpu().numpy()
    return out, {"seconds": time.perf_counter() - t}


class _Tick:
    """Progress of a list of tasks on bars, one per group of tasks (their ``kind``): ``tick(i, done)`` says task
    ``i`` has ``done`` of its examples done; a bar ``(update, base, total)`` shows ``base`` + the group's sum."""

    def __init__(self, tasks: list[_Task], bars: dict[str, tuple[Callable[[int, int], None], int, int]]) -> None:
        self.tasks, self.bars = tasks, bars
        self.done, self.sums = [0] * len(tasks), dict.fromkeys(bars, 0)
        self.shown = {group: base for group, (_, base, _) in bars.items()}  # the caller has shown the base

    def __call__(self, i: int, done: int) -> None:
        group = self.tasks[i].kind
        if group not in self.bars:
            return
        self.sums[group] += done - self.done[i]
        self.done[i] = done
        update, base, total = self.bars[group]
        if self.shown.get(group) != base + self.sums[group]:
            self.shown[group] = base + self.sums[group]
            update(base + self.sums[group], total)


_WORKER: dict = {}
"""A worker process's model, data and journal (:func:`_worker_init`)."""


def _worker_init(model_path: str, x: np.ndarray, y: np.ndarray, clean_correct: np.ndarray, classes: int,
                 threads: int, folder: str, key: str, counter) -> None:
    """Start a worker of :class:`_Pool`: its own torch threads, onnxruntime session and device (on CUDA, the
    next device in turn), the model loaded once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends its workers
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        with counter.get_lock():
            index, counter.value = counter.value, counter.value + 1
        torch.cuda.set_device(index % torch.cuda.device_count())
    dev = default_device()
    graph = load_onnx(Path(model_path)).to(dev).eval()
    session = ort_session(Path(model_path), threads=threads)
    _WORKER.update(deployed=_Deployed(Path(model_path), session, graph, classes,
                                      torch.as_tensor(clean_correct, device=dev)),
                   xt=torch.as_tensor(x, device=dev), yt=torch.as_tensor(y, device=dev),
                   book=_Journal(Path(folder), key), threads=threads)


def _work(task: _Task) -> tuple:
    """A worker computes ``task`` and journals its entry (the parent reads it there): ``("ok",)``, or the one-line
    error the parent raises."""
    w = _WORKER
    task = replace(task, params=task.params.model_copy(update={"threads": w["threads"]}))
    try:
        arrays, meta = _compute(w["deployed"], w["xt"], w["yt"], task, lambda done, total: None)
    except UnsupportedOpError as exc:  # rebuilt in the parent: _verify turns it into verification_blocked_by
        return ("unsupported", exc.op_type, exc.node_name)
    except HydraPipeError as exc:
        return ("error", str(exc))
    w["book"].put(task.part, arrays, meta)
    return ("ok",)


class _Pool:
    """``workers`` processes (spawned) that compute tasks into the journal ``book``: each with
    ``max(1, threads // workers)`` torch and onnxruntime threads, on CUDA one device each in turn."""

    def __init__(self, workers: int, model_path: Path, x: np.ndarray, y: np.ndarray, deployed: _Deployed,
                 params: AuditParams, book: _Journal) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        self.threads = max(1, (params.threads or torch.get_num_threads()) // workers)
        self.executor = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init,
            initargs=(str(model_path), x, y, deployed.clean_correct.cpu().numpy(), deployed.classes, self.threads,
                      str(book.folder), book.key, ctx.Value("i", 0)))

    def close(self, abort: bool) -> None:
        """Wait for the workers to exit, or (``abort``) cancel what is queued and end them now."""
        if not abort:
            self.executor.shutdown(wait=True)
            return
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            with contextlib.suppress(Exception):
                proc.terminate()
        for proc in processes:
            with contextlib.suppress(Exception):
                proc.join(10)


class _Parts:
    """The audit's tasks, each a part of the journal ``book``: read from it when there, else computed, here one
    after another or on the workers of ``pool`` (which journal their entries; the parent reads them back)."""

    def __init__(self, book: _Journal, deployed: _Deployed, xt: torch.Tensor, yt: torch.Tensor,
                 pool: _Pool | None = None) -> None:
        self.book, self.deployed, self.xt, self.yt, self.pool = book, deployed, xt, yt, pool

    def map(self, tasks: list[_Task], tick: Callable[[int, int], None]) -> list[tuple[dict[str, np.ndarray], dict]]:
        """Each task's ``(arrays, meta)``, in order; ``tick(i, done)`` as task ``i`` progresses."""
        classes = self.deployed.classes
        results: list = [self.book.get(t.part, t.shapes(classes), t.keys) for t in tasks]
        missing = [i for i, got in enumerate(results) if got is None]
        for i, got in enumerate(results):
            if got is not None:
                tick(i, len(tasks[i].rows))
        if self.pool is None:
            for i in missing:
                results[i] = _compute(self.deployed, self.xt, self.yt, tasks[i],
                                      lambda done, total, i=i: tick(i, done))
                self.book.put(tasks[i].part, *results[i])
                tick(i, len(tasks[i].rows))
            return results
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        futures = {self.pool.executor.submit(_work, tasks[i]): i for i in missing}
        try:
            for future in as_completed(futures):
                i = futures[future]
                part = tasks[i].part
                try:
                    status = future.result()
                except BrokenProcessPool:
                    raise HydraPipeError(f"audit: a worker process died (killed, or out of memory?) while computing "
                                         f"{part}; no report written") from None
                except Exception as exc:  # a bug in a worker: one line all the same
                    raise HydraPipeError(f"audit: a worker failed on {part} ({type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())}); no report written") from None
                if status[0] == "unsupported":
                    raise UnsupportedOpError(status[1], status[2])
                if status[0] != "ok":
                    raise HydraPipeError(str(status[1]))
                results[i] = self.book.get(part, tasks[i].shapes(classes), tasks[i].keys)
                if results[i] is None:
                    raise HydraPipeError(f"audit: a worker computed {part} but its journal entry in "
                                         f"{self.book.folder} cannot be read back; no report written")
                tick(i, len(tasks[i].rows))
        finally:
            for future in futures:
                future.cancel()
        return results


def run_audit(model_path: Path, x: np.ndarray, y: np.ndarray, params: AuditParams, bounds_out: Path | None = None,
              progress: bool = True, source: str = "data", journal: Path | None = None) -> AuditReport:
    """Audit the ONNX classifier at ``model_path`` on ``(x, y)`` within the ``params.norm`` ball of radius
    ``params.eps`` (intersected with [0, 1]). Returns the typed report; writes the IBP / CROWN logit bounds to
    ``bounds_out`` (.npz) if given. Bad input raises :class:`HydraPipeError`, before anything is written.

    ``journal``: a folder for the finished parts' verdicts (:class:`_Journal`). Started again after a kill with the
    same model, data and params, the audit reuses them and computes only the rest; the report is then exactly an
    uninterrupted run's, but ``seconds`` (a reused part keeps the time it took when it ran). The caller removes
    the journal once the report is written (:func:`discard_journal`).

    ``params.workers`` > 1 shards the examples across that many worker processes (:class:`_Pool`): the blocks of
    bounds and the chunks of every attack are the one-process audit's, each computed by a worker into the journal
    (a temporary one without ``journal``), and this process merges them as it merges a resumed audit's entries.
    The report is the one-process report, but ``seconds``. A worker's failure is one :class:`HydraPipeError` line.
    """
    t_total = time.perf_counter()
    x, y = _validate(x, y, source)
    threat = params.threat  # validates eps and norm once
    scratch = pool = None
    with num_threads(params.threads):  # the bounds too
        deployed = _load(model_path, x, y, params.threads, source)
        seconds = deployed.seconds
        xt, yt = torch.as_tensor(x, device=default_device()), torch.as_tensor(y, device=default_device())
        fields: dict = {}
        arrays: dict[str, np.ndarray] = {}
        fields["stripped_output_ops"] = list(getattr(deployed.graph, "stripped_output_ops", []))
        want_bounds = bounds_out is not None
        sharded = params.workers > 1
        if sharded and journal is None:  # the workers hand their entries over in a journal: a temporary one
            journal = scratch = Path(tempfile.mkdtemp(prefix="hydra-pipe-audit-"))
        book = _Journal(journal, _journal_key(Path(model_path), x, y, params, want_bounds) if journal else "")
        aborted = True
        try:
            if sharded:
                pool = _Pool(params.workers, Path(model_path), x, y, deployed, params, book)
            parts = _Parts(book, deployed, xt, yt, pool)
            with _Progress(progress) as bars:
                verified = _verify(deployed, xt, yt, params, bars, fields, arrays, seconds, want_bounds, parts)
                attacked = params.steps > 0 and bool(params.attacks)
                if attacked:
                    _attack(deployed, xt, yt, params, verified, bars, fields, seconds, parts)
                else:
                    _late_verify(deployed, xt, params, bars, fields, seconds, parts, verified, deployed.clean_correct)
                _decided(deployed.clean_correct, verified, attacked, fields)
                if params.sweep_eps:
                    fields["eps_sweep"] = _sweep(deployed, xt, yt, params, bars, seconds, parts)
            aborted = False
        finally:
            if pool is not None:
                pool.close(abort=aborted)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        if params.smoothing_sigma is not None:
            # randomized-smoothing certificate: CERTIFY on the deployed numerics, see pipeline/smoothing.py
            def smoothing() -> tuple[dict, dict]:
                t = time.perf_counter()
                summary = certify_report(
                    lambda b: torch.as_tensor(deployed.logits(b.cpu().numpy())), torch.as_tensor(x), y,
                    params.smoothing_sigma, params.smoothing_radii, n0=params.smoothing_n0, n=params.smoothing_n,
                    alpha=params.smoothing_alpha, seed=params.seed)
                return {}, {"summary": summary, "seconds": time.perf_counter() - t}

            _, meta = (book if scratch is None else _Journal(None)).run("smoothing", smoothing, {},
                                                                        ("summary", "seconds"))
            fields["smoothing"] = SmoothingSummary(**meta["summary"])
            seconds["smoothing"] = meta["seconds"]
    if bounds_out is not None and arrays:
        _savez_atomic(Path(bounds_out), arrays)
    seconds["total"] = time.perf_counter() - t_total
    return AuditReport(model=str(model_path), n=len(x), classes=deployed.classes, eps=threat.eps, norm=threat.norm,
                       steps=params.steps, restarts=params.restarts, loss=params.loss, seed=params.seed,
                       batch_size=params.batch_size, clean_accuracy=_fraction(deployed.clean_correct), **fields,
                       seconds={k: round(v, 3) for k, v in seconds.items()})


def _decided(clean_correct: torch.Tensor, verified: torch.Tensor, attacked: bool, fields: dict) -> None:
    """Verified, broken and undecided counts, and each accuracy's 95% Clopper-Pearson interval over the n
    examples (the report's ``decided`` and ``confidence_intervals``)."""
    n = len(clean_correct)
    proven = int((verified & clean_correct).sum())
    robust = round(fields["robust_accuracy"] * n) if attacked and fields.get("robust_accuracy") is not None \
        else int(clean_correct.sum())
    fields["decided"] = {"verified": proven, "broken": n - robust, "undecided": robust - proven}
    figures = {"clean_accuracy": int(clean_correct.sum()) / n, **{
        k: fields[k] for k in ("pgd_robust_accuracy", "robust_accuracy", "verified_accuracy")
        if fields.get(k) is not None}}
    fields["confidence_intervals"] = {k: list(clopper_pearson(round(v * n), n)) for k, v in figures.items()}


def _verify(deployed: _Deployed, xt: torch.Tensor, yt: torch.Tensor, params: AuditParams, bars: _Progress,
            fields: dict, arrays: dict[str, np.ndarray], seconds: dict[str, float], want_bounds: bool,
            parts: _Parts, part: str = "") -> torch.Tensor:
    """IBP and CROWN (alpha-CROWN and branch and bound come later, on what the cheap attacks leave:
    :func:`_late_verify`); returns the verified mask, fills the figures and bounds.
    Each verifier runs in blocks of rows, each block a part of the journal (named ``part`` + its method + its
    block) computed by ``parts``.

    Examples onnxruntime already misclassifies can never count as verified, so they are skipped unless the
    logit bounds are wanted (``want_bounds``: then every row needs them). On a deep network most of an
    undefended model's examples are misclassified, and CROWN costs seconds per image there.
    """
    n = len(xt)
    verified = torch.zeros(n, dtype=torch.bool, device=xt.device)
    if not (params.ibp or params.crown or params.alpha_crown or params.bab):
        return verified
    blocked = verification_blockers(deployed.graph.nodes)
    if blocked:
        fields["verification_blocked_by"] = blocked
        return verified
    try:
        _run_verifiers(deployed, xt, yt, params, bars, fields, arrays, seconds, want_bounds, verified, parts, part)
    except UnsupportedOpError as exc:  # a form of an op its rule refuses (e.g. a convolution's padding mode)
        for key in ("ibp_verified_accuracy", "crown_verified_accuracy", "alpha_crown_verified_accuracy"):
            fields.pop(key, None)
        arrays.clear()
        fields["verification_blocked_by"] = [exc.op_type]
        return torch.zeros(n, dtype=torch.bool, device=xt.device)
    fields["verified_accuracy"] = _fraction(verified)
    return verified


def _bounds_batch(graph: torch.nn.Module, x1: torch.Tensor) -> int:
    """Examples per bounds call: ``BOUNDS_WORK`` over one example's work (see there), at most ``BOUNDS_BATCH``."""
    env, elements = {graph.input_name: x1}, 0
    with torch.no_grad():
        for node in graph.nodes:
            env[node.output] = out = node.module(*[env[i] for i in node.inputs])
            elements += out.numel()
    weights = sum(t.numel() for t in graph.state_dict().values())
    return max(1, min(BOUNDS_BATCH, BOUNDS_WORK // max(elements * weights, 1)))


_BAR = {"ibp": "IBP bounds", "crown": "CROWN bounds", "alpha-crown": "alpha-CROWN bounds"}


def _blocks(kind: str, name: str, params: AuditParams, rows: np.ndarray, batch: int, want_bounds: bool = False
            ) -> list[_Task]:
    """A verifier's tasks: ``rows`` in blocks of one bounds call each, so a block sees the rows it would see in
    one process whichever process computes it."""
    return [_Task(f"{name}-{k}", kind, params, rows[i:i + batch], batch, want_bounds)
            for k, i in enumerate(range(0, len(rows), batch))]


def _run_verifiers(deployed: _Deployed, xt: torch.Tensor, yt: torch.Tensor, params: AuditParams, bars: _Progress,
                   fields: dict, arrays: dict[str, np.ndarray], seconds: dict[str, float], want_bounds: bool,
                   verified: torch.Tensor, parts: _Parts, part: str) -> None:
    """The verifiers of :func:`_verify`, each on the rows it needs; ``verified`` is updated in place."""
    clean_correct, dev = deployed.clean_correct, xt.device
    batch = _bounds_batch(deployed.graph, xt[:1])
    rows = np.arange(len(xt)) if want_bounds else clean_correct.nonzero().squeeze(1).cpu().numpy()
    methods = [m for m, on in (("ibp", params.ibp), ("crown", params.crown)) if on]
    tasks = [t for m in methods for t in _blocks(m, part + m, params, rows, batch, want_bounds)]  # ibp, crown at once
    results = parts.map(tasks, _Tick(tasks, {m: (bars.task(_BAR[m], len(rows)), 0, len(rows)) for m in methods}))
    for method in methods:
        mine = [(t, out, meta) for t, (out, meta) in zip(tasks, results) if t.kind == method]
        ver = torch.zeros_like(verified)
        for t, out, _ in mine:
            ver[torch.as_tensor(t.rows, device=dev)] = torch.as_tensor(out["verified"], device=dev)
        verified |= ver
        if want_bounds:  # every row, in order
            for side in ("lower", "upper"):
                arrays[f"{method}_{side}"] = np.concatenate([out[side] for _, out, _ in mine])
        fields[f"{method}_verified_accuracy"] = _fraction(ver)
        seconds[method] = sum(meta["seconds"] for _, _, meta in mine)


def _late_verify(deployed: _Deployed, xt: torch.Tensor, params: AuditParams, bars: _Progress, fields: dict,
                 seconds: dict[str, float], parts: _Parts, verified: torch.Tensor, undecided: torch.Tensor,
                 part: str = "", bab: bool = True) -> None:
    """alpha-CROWN, then branch and bound, on the ``undecided`` examples only (what IBP and CROWN did not prove and
    the attacks before did not break): the costly verifiers run where nothing cheaper decided. ``verified`` is
    updated in place. An example an attack broke is never provable (the bounds are sound), so running them after
    the attacks changes no verified figure, only their cost."""
    if "verified_accuracy" not in fields:  # no verifier ran, or the graph has an op without a bound rule
        return
    dev, batch = xt.device, _bounds_batch(deployed.graph, xt[:1])
    try:
        if params.alpha_crown:
            todo = (undecided & ~verified).nonzero().squeeze(1).cpu().numpy()
            tasks = _blocks("alpha-crown", part + "alpha_crown", params, todo, batch)
            bar = bars.task(_BAR["alpha-crown"], len(todo)) if len(todo) else (lambda done, total: None)
            results = parts.map(tasks, _Tick(tasks, {"alpha-crown": (bar, 0, len(todo))}))
            for t, (out, _) in zip(tasks, results):
                verified[torch.as_tensor(t.rows, device=dev)] |= torch.as_tensor(out["verified"], device=dev)
            fields["alpha_crown_verified_accuracy"] = _fraction(verified)
            seconds["alpha_crown"] = sum(meta["seconds"] for _, meta in results)
        if bab and params.bab:
            todo = (undecided & ~verified).nonzero().squeeze(1).cpu().numpy()
            tasks = [_Task(f"{part}bab-{k}", "bab", params, todo[i:i + BAB_BLOCK])
                     for k, i in enumerate(range(0, len(todo), BAB_BLOCK))]
            bar = bars.task("branch and bound", len(todo)) if len(todo) else (lambda done, total: None)
            results = parts.map(tasks, _Tick(tasks, {"bab": (bar, 0, len(todo))}))
            proven = left = 0
            for t, (out, _) in zip(tasks, results):
                verified[torch.as_tensor(t.rows, device=dev)] |= torch.as_tensor(out["verified"], device=dev)
                proven += int(out["verified"].sum())
                left += int(out["undecided"].sum())
            spent = sum(meta["seconds"] for _, meta in results)
            fields["bab_verified_accuracy"] = _fraction(verified)
            fields["bab"] = BabSummary(attacked=len(todo), verified=proven, undecided=left,
                                       domains_per_example=params.bab_domains,
                                       seconds_per_example=params.bab_seconds)
            seconds["bab"] = spent
    except UnsupportedOpError:  # IBP and CROWN ran, so every op has a rule; a refused form stops only these
        pass
    fields["verified_accuracy"] = _fraction(verified)


@dataclass
class _PGDVerdicts:
    """An attack's per-example verdicts over all N examples, merged from its chunks (``AttackResult``'s fields)."""

    robust: torch.Tensor  # bool [N]: clean-correct and never broken (verified examples included)
    break_step: torch.Tensor  # long [N]: -1 never; 0 for clean mistakes
    break_restart: torch.Tensor  # long [N]
    settled: dict[str, int]
    rejected: int
    rejected_examples: int
    row_steps: int
    near_boundary: int
    seconds: float


def _chunks(kind: str, params: AuditParams, todo: np.ndarray, part: str, model: str = "graph") -> list[_Task]:
    """An attack's tasks: the ``todo`` examples in chunks of ``PGD_CHUNK_BATCHES`` attack batches of rows."""
    rows = {"pgd": params.restarts, "apgd-ce": params.apgd_restarts,
            "apgd-t": params.apgd_restarts * params.apgd_targets, "square": params.square_restarts}[kind]
    chunk = max(1, PGD_CHUNK_BATCHES * params.batch_size // rows)
    return [_Task(f"{part}-{c}", kind, params, todo[start:start + chunk], model=model)
            for c, start in enumerate(range(0, len(todo), chunk))]


def _pgd_chunks(deployed: _Deployed, params: AuditParams, verified: torch.Tensor, part: str) -> list[_Task]:
    """PGD's tasks (the eps sweep's): the clean-correct, unverified examples."""
    todo = (deployed.clean_correct & ~verified).nonzero().squeeze(1).cpu().numpy()
    return _chunks("pgd", params, todo, part)


def _merge(deployed: _Deployed, settled_before: torch.Tensor, tasks: list[_Task],
           results: list[tuple[dict[str, np.ndarray], dict]]) -> _PGDVerdicts:
    """The chunks' verdicts over all N examples; the examples none of them attacked are robust unless
    ``settled_before`` (broken earlier, clean mistakes included) says otherwise (broken at step 0, restart 0)."""
    clean_correct = deployed.clean_correct
    n, dev = len(clean_correct), clean_correct.device
    break_step = torch.full((n,), -1, dtype=torch.long, device=dev)
    break_step[settled_before] = 0  # the clean input is in the ball: a clean mistake breaks at step 0, restart 0
    break_restart = break_step.clone()
    settled = dict(clean_wrong=int((~clean_correct).sum()), broken=0, convergence=0, full_budget=0)
    totals = dict(rejected=0, rejected_examples=0, row_steps=0, near_boundary=0, seconds=0.0)
    for task, (out, meta) in zip(tasks, results):
        ids = torch.as_tensor(task.rows, dtype=torch.long, device=dev)
        break_step[ids] = torch.as_tensor(out["break_step"], device=dev)
        break_restart[ids] = torch.as_tensor(out["break_restart"], device=dev)
        # the chunk's own clean check (onnxruntime on the chunk) normally finds no mistake: todo is clean-correct
        for key in ("broken", "convergence", "full_budget"):
            settled[key] += meta["settled"].get(key, 0)
        for key in totals:
            totals[key] += meta[key]
    robust = clean_correct & (break_restart < 0)
    return _PGDVerdicts(robust, break_step, break_restart, settled, **totals)


def _pgd_merge(deployed: _Deployed, verified: torch.Tensor, tasks: list[_Task],
               results: list[tuple[dict[str, np.ndarray], dict]]) -> _PGDVerdicts:
    res = _merge(deployed, ~deployed.clean_correct, tasks, results)
    res.settled = {"verification": int(verified.sum()), **res.settled}
    return res


def _budget(kind: str, params: AuditParams) -> str:
    if kind == "pgd":
        return f"{params.steps} steps x {params.restarts} restarts"
    if kind == "apgd-ce":
        return f"{params.apgd_steps} steps x {params.apgd_restarts} restarts"
    if kind == "apgd-t":
        return f"{params.apgd_steps} steps x {params.apgd_restarts} restarts x {params.apgd_targets} targets"
    return f"{params.square_queries} queries x {params.square_restarts} restarts"  # square


def _attack(deployed: _Deployed, xt: torch.Tensor, yt: torch.Tensor, params: AuditParams, verified: torch.Tensor,
            bars: _Progress, fields: dict, seconds: dict[str, float], parts: _Parts) -> None:
    """The attacks of ``params.attacks`` in :data:`~pipeline.config.ATTACK_ORDER`, each on what the verifiers and
    the attacks before it left undecided, every break confirmed by onnxruntime; alpha-CROWN and branch and bound
    run on what the cheap attacks (APGD) left, before the card's PGD, so the costliest attack runs on the fewest
    examples. On an int8 graph the APGD attacks also run on its float twin (``params.float_twin``). Every
    example's verdict depends on it alone (its random streams are seeded by its index in the whole set), so
    chunks, workers and batch sizes change nothing."""
    n, dev = len(xt), xt.device
    clean_correct = deployed.clean_correct
    broken = ~clean_correct
    # APGD-T's targeted DLR loss needs 4 classes (AutoAttack's); Square needs queries
    chosen = [k for k in ATTACK_ORDER if k in params.attacks and (k != "square" or params.square_queries > 0)
              and (k != "apgd-t" or deployed.classes >= 4)]
    summaries: list[AttackSummary] = []
    pgd_res = None
    late_done = False
    twin = deployed.twin if params.float_twin else None
    for kind in chosen:
        if kind in ("pgd", "square") and not late_done:
            _late_verify(deployed, xt, params, bars, fields, seconds, parts, verified, clean_correct & ~broken)
            late_done = True
        for model in ("graph", "twin") if kind.startswith("apgd") and twin is not None else ("graph",):
            todo = (clean_correct & ~broken & ~verified).nonzero().squeeze(1).cpu().numpy()
            label = ATTACK_NAMES[kind] + (" float twin" if model == "twin" else "")
            tasks = _chunks(kind, params, todo, kind if model == "graph" else f"{kind}-twin", model)
            bar = bars.task(f"{label} (examples settled)", n)
            base = n - len(todo)
            bar(base, n)
            results = parts.map(tasks, _Tick(tasks, {kind: (bar, base, n)}))
            res = _merge(deployed, broken, tasks, results)
            newly = res.break_restart.ge(0) & ~broken
            summaries.append(AttackSummary(name=kind, model="float twin" if model == "twin" else "graph",
                                           budget=_budget(kind, params), attacked=len(todo), broken=int(newly.sum()),
                                           rejected_candidates=res.rejected, near_boundary_checked=res.near_boundary))
            seconds[kind + ("_twin" if model == "twin" else "")] = res.seconds
            if kind == "pgd":
                pgd_res = res
            elif kind == "square":
                fields["square"] = SquareSummary(queries=params.square_queries, attacked=len(todo),
                                                 broken_beyond_pgd=int(newly.sum()),
                                                 gradient_masking_suspected=bool(newly.any()),
                                                 rejected_candidates=res.rejected)
            broken |= newly
        if kind != "square":  # Square runs last: after it, robust_accuracy; before it, the gradient attacks'
            fields["pgd_robust_accuracy"] = _fraction(clean_correct & ~broken)
    if not late_done:
        _late_verify(deployed, xt, params, bars, fields, seconds, parts, verified, clean_correct & ~broken)
    robust = clean_correct & ~broken
    fields.setdefault("pgd_robust_accuracy", _fraction(clean_correct))  # Square alone: no gradient attack ran
    fields["attacks"] = summaries
    fields["robust_accuracy"] = _fraction(robust)
    if pgd_res is not None:
        # PGD's curves: examples broken before it (or clean mistakes) count as broken at step 0, restart 0
        by_restart, by_step = robustness_curves(pgd_res.robust, pgd_res.break_restart, pgd_res.break_step,
                                                params.steps, params.restarts)
        earlier = sum(a.broken for a in summaries if a.name.startswith("apgd"))
        fields.update(step_size=params.step_size or params.threat.step_size(params.steps),
                      robust_accuracy_by_restart=by_restart,
                      robust_accuracy_by_step={str(k): v for k, v in by_step.items()},
                      settled={"verification": int(verified.sum()), "earlier_attacks": earlier, **pgd_res.settled},
                      rejected_candidates=sum(a.rejected_candidates for a in summaries),
                      rejected_examples=pgd_res.rejected_examples,
                      attack_work=pgd_res.row_steps / max(n * params.restarts * params.steps, 1))
    else:
        fields["rejected_candidates"] = sum(a.rejected_candidates for a in summaries)


def _sweep(deployed: _Deployed, xt: torch.Tensor, yt: torch.Tensor, params: AuditParams, bars: _Progress,
           seconds: dict[str, float], parts: _Parts) -> list[EpsPoint]:
    """Robust accuracy vs eps: at each radius of ``params.sweep_eps``, the verifiers that are on and PGD at the
    sweep's smaller budget (``sweep_steps`` x ``sweep_restarts``, no Square) on the same examples. Each verifier
    block and PGD chunk of each radius is a part of the journal, as the main audit's are; the PGD chunks of every
    radius are computed together (with workers, side by side)."""
    total = len(params.sweep_eps)
    tick = bars.task("eps sweep", 2 * total)
    quiet, radii = _Progress(False), []
    tick(0, 2 * total)
    for i, eps in enumerate(params.sweep_eps):
        # the default step of each radius: a fixed audit.step_size is meant for audit.eps
        p = params.model_copy(update={"eps": eps, "steps": params.sweep_steps, "restarts": params.sweep_restarts,
                                      "step_size": None})
        figures: dict = {}
        times: dict[str, float] = {}
        verified = _verify(deployed, xt, yt, p, quiet, figures, {}, times, False, parts, f"sweep{i}-")
        _late_verify(deployed, xt, p, quiet, figures, times, parts, verified, deployed.clean_correct,
                     f"sweep{i}-", bab=False)
        radii.append((p, figures, times, verified, _pgd_chunks(deployed, p, verified, f"sweep{i}-pgd")
                      if p.steps > 0 else []))
        tick(i + 1, 2 * total)
    tasks = [t for *_, chunks in radii for t in chunks]
    radius_of = [i for i, (*_, chunks) in enumerate(radii) for _ in chunks]
    left = [len(chunks) for *_, chunks in radii]
    finished: set[int] = set()

    def chunk_done(j: int, done: int) -> None:  # the bar's second half: a radius whose PGD chunks all ended
        if done == len(tasks[j].rows) and j not in finished:
            finished.add(j)
            left[radius_of[j]] -= 1
            tick(total + sum(1 for k, (*_, c) in enumerate(radii) if c and left[k] == 0), 2 * total)

    results = iter(parts.map(tasks, chunk_done))
    points, spent = [], 0.0
    for p, figures, times, verified, chunks in radii:
        pgd_robust = None
        if p.steps > 0:
            res = _pgd_merge(deployed, verified, chunks, [next(results) for _ in chunks])
            pgd_robust, times["pgd"] = _fraction(res.robust), res.seconds
        spent += sum(times.values())
        points.append(EpsPoint(eps=p.threat.eps, clean=_fraction(deployed.clean_correct), pgd_robust=pgd_robust,
                               ibp_verified=figures.get("ibp_verified_accuracy"),
                               crown_verified=figures.get("crown_verified_accuracy"),
                               alpha_crown_verified=figures.get("alpha_crown_verified_accuracy"),
                               steps=p.steps, restarts=p.restarts))
    tick(2 * total, 2 * total)
    seconds["sweep"] = spent
    return points
