"""Stage 5: audit the quantized model as deployed (onnxruntime numerics) on a seeded subset of the test split.

The audit journals its finished parts in ``.resume/audit/`` (ignored by git and DVC), so a stage killed midway
resumes from them when rerun with the same params (:func:`pipeline.audit.run.run_audit`); the journal is removed once
every output is written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline.audit.journal import discard_journal
from pipeline.audit.records import write_results, write_timings
from pipeline.audit.report import AuditReport, render_report
from pipeline.audit.run import run_audit
from pipeline.data import as_arrays
from pipeline.reporting import atomic_write_bytes, show, write_csv, write_json
from stages.common import AUDIT_BOUNDS, AUDIT_REPORT, AUDIT_TIMINGS, INT8_ONNX, PLOTS, RESUME, setup, write_headline

JOURNAL = RESUME / "audit"  # beside the training stages' resume states
EPS_COLUMNS = ("eps", "clean", "pgd_robust", "ibp_verified", "crown_verified", "alpha_crown_verified")


def run(params_path: Path) -> AuditReport:
    params, data, _ = setup(params_path, needs=(INT8_ONNX,))
    a = params.audit
    x, y = as_arrays(data.test, limit=a.n_examples, seed=a.seed)
    report = run_audit(INT8_ONNX, x, y, a, bounds_out=AUDIT_BOUNDS, journal=JOURNAL)
    curve = report.robust_accuracy_by_restart
    write_csv(PLOTS / "audit_restarts.csv", [{"restarts": i + 1, "pgd_robust_accuracy": v} for i, v in enumerate(curve)])
    sweep = [{k: getattr(pt, k) for k in EPS_COLUMNS} for pt in report.eps_sweep]
    if sweep:
        write_csv(PLOTS / "audit_eps.csv", sweep)
    else:  # DVC wants the declared plot even without a sweep (audit.sweep_eps: []): the header alone
        atomic_write_bytes(PLOTS / "audit_eps.csv", (",".join(EPS_COLUMNS) + "\n").encode())
    # the tracked files are what a rerun on this machine kind reproduces byte for byte: this run's wall times go
    # to reports/audit.timing.json (ignored by git, not a DVC output)
    write_timings(report, AUDIT_TIMINGS)
    dump = report.without_timings().model_dump(mode="json")
    write_results(report.examples, AUDIT_REPORT, seconds=False)  # reports/audit.examples.csv, .jsonl: the verdicts
    write_json(AUDIT_REPORT, dump)
    write_headline("audit", dump)
    discard_journal(JOURNAL)  # only now: every output is written
    with contextlib.suppress(OSError):  # .resume itself, unless a training stage's state is still there
        RESUME.rmdir()
    show(render_report(report))
    return report
