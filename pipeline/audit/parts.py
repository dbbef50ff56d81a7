"""The audit's parts: tasks any process computes alone, the journal they are kept in, and the worker pool.

A :class:`Task` is a block of one verifier's bounds or a chunk of one attack; it holds everything its verdicts
depend on (the examples by their index in the whole set, the params), so a worker gives the entry the audit's own
process would, and the blocks and chunks (:class:`Layout`) are the same however many processes share them.
:class:`Parts` reads each task's entry from the journal, or computes it with its ``compute`` (one process) or on
a :class:`Pool` of worker processes, each with the audit's own thread count: the same numerics as one process, so
the per-example verdicts and margins are bit for bit the one-process audit's.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rich.progress import ProgressColumn
from rich.text import Text

from pipeline.audit.deployed import Deployed, open_model
from pipeline.audit.journal import Entry, Journal
from pipeline.config import ATTACK_ORDER, AuditParams
from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.runtime import default_device

Tick = Callable[[int, int], None]
"""``tick(done, total)``: progress of one task or bar."""


@dataclass(frozen=True)
class Layout:
    """How the audit cuts its work into journaled parts; it changes no verdict, only what a resumed audit loses
    and how the work spreads over workers (it is part of the journal's key)."""

    chunk_batches: int = 4
    """An attack's chunk: this many attack batches' worth of rows (``chunk_batches * batch_size // rows per
    example`` examples, at least one). Each chunk ends on a draining batch (its slowest rows alone), so much
    smaller chunks cost speed; the pipeline's digits audit is one chunk."""
    bounds_work: int = 1 << 33
    """Work per bounds call, in examples x activation elements x weights: a rough, deterministic proxy of CROWN's
    cost (it tightens up to every activation, each backward pass crossing up to every weight). On networks with
    many unstable neurons small calls are faster per example: Fashion-MNIST's CNN-small gets calls of 4, a deep
    network calls of one image, the pipeline's digits network calls of 171."""
    bounds_batch: int = 256
    """Examples per bounds call at most: CROWN's memory grows with it."""
    bab_block: int = 4
    """Examples per branch-and-bound task (a resumed audit loses at most one block's search)."""


@dataclass(frozen=True)
class Task:
    """A part of the audit: a block of one verifier's bounds (``kind`` ibp, crown, alpha-crown or bab) or a chunk
    of one attack (``kind`` an attack's name, on ``model`` graph or twin)."""

    part: str  # its journal part
    kind: str
    params: AuditParams
    rows: np.ndarray  # long: the examples, by their index in the whole set
    batch: int = 0  # examples per bounds call
    want_bounds: bool = False  # keep the logit bounds (ibp, crown)
    model: str = "graph"  # what an attack runs on: "graph" or "twin" (the graph without rounding)

    @property
    def is_attack(self) -> bool:
        return self.kind in ATTACK_ORDER

    @property
    def keeps_bounds(self) -> bool:
        return self.want_bounds and self.kind in ("ibp", "crown")

    def shapes(self, classes: int) -> dict[str, tuple[int, ...]]:
        n = len(self.rows)
        if self.is_attack:
            return {"break_step": (n,), "break_restart": (n,), "margin": (n,)}
        if self.kind == "bab":
            return {"verified": (n,), "undecided": (n,), "skipped": (n,), "timed_out": (n,), "margin": (n,),
                    "seconds_each": (n,)}
        return {"verified": (n,), "margin": (n,),
                **({"lower": (n, classes), "upper": (n, classes)} if self.keeps_bounds else {})}

    @property
    def keys(self) -> tuple[str, ...]:
        if self.is_attack:
            return ("settled", "rejected", "rejected_examples", "row_steps", "near_boundary", "seconds")
        return ("seconds",)


class Compute(Protocol):
    """What computes a task's entry (:func:`pipeline.audit.compute.compute_task`; tests wrap it)."""

    def __call__(self, deployed: Deployed, xt: torch.Tensor, yt: torch.Tensor, task: Task, tick: Tick) -> Entry: ...


def eta_seconds(elapsed: float | None, done: float, left: float) -> float | None:
    """Seconds left at the average pace since the bar started: ``elapsed`` seconds for ``done`` units, ``left`` to
    go; None before the first unit (rich's own estimate averages over the last 30 s only, so a bar that advances
    less often than that, CROWN's or branch and bound's on a deep network, never showed a time)."""
    if left <= 0:
        return 0.0
    if elapsed is None or done <= 0:
        return None
    return elapsed / done * left


class EtaColumn(ProgressColumn):
    """The time left (:func:`eta_seconds`) of a bar, from when it started and what it had done then."""

    def render(self, task) -> Text:
        seconds = eta_seconds(task.elapsed, task.completed - task.fields.get("base", 0),
                              (task.total or 0) - task.completed)
        if seconds is None:
            return Text("-:--:--", style="progress.remaining")
        return Text(str(timedelta(seconds=int(seconds))), style="progress.remaining")


class Bars:
    """The audit's progress bars (rich, on stderr), or none: ``task(description, total)`` gives a bar's tick. A bar
    starts its clock at its first tick (a verifier's bar when its first block starts), and shows its total and the
    time left at the pace since then (:class:`EtaColumn`)."""

    def __init__(self, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)

            from pipeline.reporting import console

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), EtaColumn(), console=console, transient=False,
                                disable=os.environ.get("HYDRA_PIPE_QUIET") == "1")

    def __enter__(self) -> Bars:
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int) -> Tick:
        if not self.bar:
            return lambda done, total: None
        bar = self.bar
        task = bar.add_task(description, total=total, start=False, base=0)
        started: list[bool] = []

        def tick(done: int, total_: int) -> None:
            if not started:
                started.append(True)
                bar.update(task, base=done)
                bar.start_task(task)
            bar.update(task, completed=done, total=total_)
        return tick


class GroupTick:
    """Progress of a list of tasks on bars, one per group of tasks (their ``kind``): ``tick(i, done)`` says task
    ``i`` has ``done`` of its examples done; a bar ``(update, base, total)`` shows ``base`` + the group's sum."""

    def __init__(self, tasks: list[Task], bars: dict[str, tuple[Tick, int, int]]) -> None:
        self.tasks, self.bars = tasks, bars
        self.done, self.sums = [0] * len(tasks), dict.fromkeys(bars, 0)
        self.shown = {group: base for group, (_, base, _) in bars.items()}  # the caller has shown the base
        self.started: set[str] = set()

    def __call__(self, i: int, done: int) -> None:
        group = self.tasks[i].kind
        if group not in self.bars:
            return
        self.sums[group] += done - self.done[i]
        self.done[i] = done
        update, base, total = self.bars[group]
        if group not in self.started or self.shown.get(group) != base + self.sums[group]:  # the first starts it
            self.started.add(group)
            self.shown[group] = base + self.sums[group]
            update(base + self.sums[group], total)


_WORKER: dict = {}
"""A worker process's model, data, journal and compute (:func:`_worker_init`)."""


def _worker_init(model_path: str, x: np.ndarray, y: np.ndarray, clean_correct: np.ndarray, classes: int,
                 threads: int, ort_threads: int | None, folder: str, key: str, compute: Compute, counter) -> None:
    """Start a worker: the audit's torch thread count (its numerics), an onnxruntime session and a device (on
    CUDA, the next device in turn), the model loaded once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends its workers
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        with counter.get_lock():
            index, counter.value = counter.value, counter.value + 1
        torch.cuda.set_device(index % torch.cuda.device_count())
    dev = default_device()
    session, graph = open_model(Path(model_path), ort_threads)
    _WORKER.update(deployed=Deployed(Path(model_path), session, graph, classes,
                                     torch.as_tensor(clean_correct, device=dev)),
                   xt=torch.as_tensor(x, device=dev), yt=torch.as_tensor(y, device=dev),
                   book=Journal(Path(folder), key), compute=compute)


def _work(task: Task) -> tuple:
    """A worker computes ``task`` and journals its entry (the parent reads it there): ``("ok",)``, or the one-line
    error the parent raises."""
    w = _WORKER
    try:
        arrays, meta = w["compute"](w["deployed"], w["xt"], w["yt"], task, lambda done, total: None)
    except UnsupportedOpError as exc:  # rebuilt in the parent: verification turns it into verification_blocked_by
        return ("unsupported", exc.op_type, exc.node_name)
    except HydraPipeError as exc:
        return ("error", str(exc))
    w["book"].put(task.part, arrays, meta)
    return ("ok",)


class Pool:
    """``workers`` processes (spawned) that compute tasks into the journal ``book``. Each runs with the audit's own
    torch thread count (``params.threads``, else this process's): torch's float sums depend on it, so fewer
    threads per worker would change borderline verdicts. Spread the cores with ``threads=1`` and more workers."""

    def __init__(self, workers: int, model_path: Path, x: np.ndarray, y: np.ndarray, deployed: Deployed,
                 params: AuditParams, book: Journal, compute: Compute) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        self.threads = params.threads or torch.get_num_threads()
        self.executor = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init,
            initargs=(str(model_path), x, y, deployed.clean_correct.cpu().numpy(), deployed.classes, self.threads,
                      params.threads, str(book.folder), book.key, compute, ctx.Value("i", 0)))

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


class Parts:
    """The audit's tasks, each a part of the journal ``book``: read from it when there, else computed, here one
    after another with ``compute`` or on the workers of ``pool`` (which journal their entries; this process
    reads them back)."""

    def __init__(self, book: Journal, deployed: Deployed, xt: torch.Tensor, yt: torch.Tensor, compute: Compute,
                 layout: Layout, pool: Pool | None = None) -> None:
        self.book, self.deployed, self.xt, self.yt, self.pool = book, deployed, xt, yt, pool
        self.compute, self.layout = compute, layout

    def map(self, tasks: list[Task], tick: Callable[[int, int], None]) -> list[Entry]:
        """Each task's entry, in order; ``tick(i, done)`` as task ``i`` progresses."""
        classes = self.deployed.classes
        results: list = [self.book.get(t.part, t.shapes(classes), t.keys) for t in tasks]
        missing = [i for i, got in enumerate(results) if got is None]
        for i, got in enumerate(results):
            if got is not None:
                tick(i, len(tasks[i].rows))
        if self.pool is None:
            for i in missing:
                tick(i, 0)  # its bar's clock starts with its first task
                results[i] = self.compute(self.deployed, self.xt, self.yt, tasks[i],
                                          lambda done, total, i=i: tick(i, done))
                self.book.put(tasks[i].part, *results[i])
                tick(i, len(tasks[i].rows))
            return results
        return self._on_pool(tasks, results, missing, tick)

    def _on_pool(self, tasks: list[Task], results: list, missing: list[int], tick: Callable[[int, int], None]
                 ) -> list[Entry]:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        classes = self.deployed.classes
        futures = {self.pool.executor.submit(_work, tasks[i]): i for i in missing}
        for i in missing:
            tick(i, 0)
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

