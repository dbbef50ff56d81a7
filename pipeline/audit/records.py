"""The audit's per-example results: one record per example that every phase writes into, and the results files.

In the spirit of VNN-COMP's results: each example gets a status (``proven``, ``broken``, ``undecided``, ``timeout``,
``clean-wrong`` or ``error``), the phase that decided it, its margin bounds and the seconds each phase spent on it.
The margin is ``logit[label] - max_other logit``: ``margin_lower`` is the best sound lower bound of its minimum over
the ball (a verifier's; > 0 proves the example), ``margin_upper`` the smallest margin seen on a point of the ball
(onnxruntime's at the clean input and at a confirmed adversarial point, the attacked graph's elsewhere; <= 0 on
onnxruntime breaks it). A phase that works on a batch of examples gives each its equal share of the batch's time;
branch and bound's seconds are each example's own. ``error`` (a bound or an attack gave a non-finite value) is
never folded into ``undecided``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.reporting import atomic_write_bytes

Status = Literal["proven", "broken", "undecided", "timeout", "clean-wrong", "error"]
STATUSES: tuple[Status, ...] = ("proven", "broken", "undecided", "timeout", "clean-wrong", "error")


@dataclass(frozen=True)
class ExampleRecord:
    """One example's verdict (a row of the results file)."""

    index: int
    label: int
    status: Status
    phase: str  # what decided it ("clean", "ibp", "crown", "alpha-crown", "bab", an attack's name), "" for none
    margin_lower: float | None
    margin_upper: float | None
    seconds: dict[str, float]

    def as_json(self) -> dict:
        return {"index": self.index, "label": self.label, "status": self.status, "phase": self.phase,
                "margin_lower": self.margin_lower, "margin_upper": self.margin_upper, "seconds": self.seconds}


@dataclass
class Ledger:
    """The per-example state the phases fill in, in place (examples by their index in the audited set)."""

    labels: np.ndarray
    clean_correct: np.ndarray  # bool [N], onnxruntime on the clean inputs
    margin_upper: np.ndarray  # float64 [N]
    margin_lower: np.ndarray = field(init=False)
    proven_by: np.ndarray = field(init=False)  # object [N]: "" or the verifier that proved it first
    broken_by: np.ndarray = field(init=False)  # object [N]: "" or the attack that broke it first
    timed_out: np.ndarray = field(init=False)
    error: np.ndarray = field(init=False)
    seconds: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        self.margin_lower = np.full(n, np.nan)
        self.proven_by = np.full(n, "", dtype=object)
        self.broken_by = np.where(self.clean_correct, "", "clean").astype(object)
        self.timed_out = np.zeros(n, dtype=bool)
        self.error = np.zeros(n, dtype=bool)

    def spend(self, phase: str, rows: np.ndarray, seconds: float | np.ndarray) -> None:
        """Charge ``seconds`` (a batch's total, shared equally, or one value per row) to ``rows`` for ``phase``."""
        if not len(rows):
            return
        each = np.asarray(seconds, dtype=np.float64)
        each = each if each.ndim else np.full(len(rows), float(each) / len(rows))
        self.seconds.setdefault(phase, np.zeros(len(self.labels)))[rows] += each

    def bound(self, phase: str, rows: np.ndarray, margin: np.ndarray, proven: np.ndarray) -> None:
        """A verifier's margin lower bounds on ``rows`` and which of them it proved."""
        margin = np.asarray(margin, dtype=np.float64)
        self.error[rows] |= np.isnan(margin)
        self.margin_lower[rows] = np.fmax(self.margin_lower[rows], margin)  # the best bound; NaN only where none
        new = rows[np.asarray(proven, dtype=bool) & (self.proven_by[rows] == "")]
        self.proven_by[new] = phase

    def attacked(self, phase: str, rows: np.ndarray, margin: np.ndarray, broken: np.ndarray) -> None:
        """An attack's smallest margins seen on ``rows`` and which of them it broke (on onnxruntime)."""
        margin = np.asarray(margin, dtype=np.float64)
        self.error[rows] |= np.isnan(margin)
        self.margin_upper[rows] = np.fmin(self.margin_upper[rows], margin)
        new = rows[np.asarray(broken, dtype=bool) & (self.broken_by[rows] == "")]
        self.broken_by[new] = phase

    def status(self) -> np.ndarray:
        """Each example's status (object [N])."""
        out = np.full(len(self.labels), "undecided", dtype=object)
        out[self.timed_out] = "timeout"
        out[self.error] = "error"
        out[self.broken_by != ""] = "broken"
        out[self.proven_by != ""] = "proven"
        out[~self.clean_correct] = "clean-wrong"
        return out

    def records(self) -> list[ExampleRecord]:
        status = self.status()
        phase = np.where(status == "proven", self.proven_by, np.where(
            (status == "broken") | (status == "clean-wrong"), self.broken_by, ""))

        def num(v: float) -> float | None:
            return None if not np.isfinite(v) else float(v)

        return [ExampleRecord(index=i, label=int(self.labels[i]), status=str(status[i]), phase=str(phase[i]),
                              margin_lower=num(self.margin_lower[i]), margin_upper=num(self.margin_upper[i]),
                              seconds={k: round(float(v[i]), 6) for k, v in self.seconds.items()})
                for i in range(len(self.labels))]


def results_paths(report: Path) -> tuple[Path, Path]:
    """The per-example results files beside ``report`` (``audit.json`` -> ``audit.examples.csv``, ``.jsonl``)."""
    report = Path(report)
    stem = report.with_suffix("") if report.suffix == ".json" else report
    return stem.with_name(stem.name + ".examples.csv"), stem.with_name(stem.name + ".examples.jsonl")


def write_results(records: list[ExampleRecord], report: Path, seconds: bool = True) -> tuple[Path, Path]:
    """Write the results files beside ``report`` (each whole or not at all); returns their paths. ``seconds=False``
    leaves the per-phase times out (the audit stage writes them apart: :func:`write_timings`)."""
    csv_path, jsonl_path = results_paths(report)
    if not seconds:
        records = [replace(r, seconds={}) for r in records]
    phases = sorted({k for r in records for k in r.seconds})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "label", "status", "phase", "margin_lower", "margin_upper",
                     *(f"seconds_{p}" for p in phases)])
    for r in records:
        writer.writerow([r.index, r.label, r.status, r.phase, "" if r.margin_lower is None else repr(r.margin_lower),
                         "" if r.margin_upper is None else repr(r.margin_upper),
                         *(repr(r.seconds.get(p, 0.0)) for p in phases)])
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    atomic_write_bytes(jsonl_path, "".join(json.dumps(r.as_json()) + "\n" for r in records).encode())
    return csv_path, jsonl_path


def write_timings(report, path: Path) -> Path:
    """One machine's wall times of an audit (``report``: an :class:`pipeline.audit.report.AuditReport` with its
    records): the seconds of every part and of every example's phases. The audit stage keeps them out of the files
    git tracks, which a rerun on the same machine kind then reproduces byte for byte."""
    body = {"seconds": report.seconds.model_dump(mode="json"),
            "smoothing": report.smoothing.seconds if report.smoothing is not None else None,
            "examples": [{"index": r.index, "seconds": r.seconds} for r in report.examples]}
    atomic_write_bytes(Path(path), (json.dumps(body, indent=1) + "\n").encode())
    return Path(path)


def with_timings(records: list[ExampleRecord], timings: Path) -> list[ExampleRecord]:
    """``records`` with each example's seconds from a :func:`write_timings` file (unchanged when there is none)."""
    if not Path(timings).is_file():
        return records
    spent = {e["index"]: e["seconds"] for e in json.loads(Path(timings).read_text())["examples"]}
    return [replace(r, seconds=spent.get(r.index, r.seconds)) for r in records]


def read_results(path: Path) -> list[ExampleRecord]:
    """The records of a ``.examples.jsonl`` file (the report page's cactus plot reads them)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(ExampleRecord(**d))
    return out


def cactus(records: list[ExampleRecord]) -> list[tuple[float, int]]:
    """VNN-COMP's cactus curve: examples decided (proven, broken or clean-wrong) against the seconds each took,
    sorted: point k is (the k-th smallest time to a verdict, k)."""
    times = sorted(sum(r.seconds.values()) for r in records if r.status in ("proven", "broken", "clean-wrong"))
    total, out = 0.0, []
    for k, t in enumerate(times, 1):
        total += t
        out.append((round(total, 6), k))
    return out
