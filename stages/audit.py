"""Stage 5: audit the quantized model as deployed (onnxruntime numerics) on a seeded subset of the test split."""

from __future__ import annotations

from pathlib import Path

from pipeline.audit import run_audit
from pipeline.audit_report import AuditReport, render_report
from pipeline.data import as_arrays
from pipeline.reporting import show, write_csv, write_json
from stages.common import AUDIT_BOUNDS, AUDIT_REPORT, INT8_ONNX, PLOTS, setup


def run(params_path: Path) -> AuditReport:
    params, data, _ = setup(params_path)
    a = params.audit
    x, y = as_arrays(data.test, limit=a.n_examples, seed=a.seed)
    report = run_audit(INT8_ONNX, x, y, a, bounds_out=AUDIT_BOUNDS)
    curve = report.robust_accuracy_by_restart
    write_csv(PLOTS / "audit_restarts.csv", [{"restarts": i + 1, "pgd_robust_accuracy": v} for i, v in enumerate(curve)])
    write_json(AUDIT_REPORT, report.model_dump(mode="json"))
    show(render_report(report))
    return report
