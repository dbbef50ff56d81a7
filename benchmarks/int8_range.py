"""What 7-bit int8 weights (``quantize.reduce_range``) cost and what full-range ones break, on one trained model.

    .venv/bin/python benchmarks/int8_range.py [--run runs/fashion] [--n 1000] [--threads 2]
                                              [--out benchmarks/results/int8_range.json]

The run's finetuned fp32 graph (``<run>/models/finetuned.onnx``, after ``make repro-fashion``) is quantized twice
exactly as the quantize stage does (the run's params: calibration split and size, per channel), once with full-range
int8 weights and once with 7-bit ones. For each: the largest weight magnitude, the layers that can saturate
onnxruntime's u8 x s8 kernels on an x86 CPU without VNNI (:func:`pipeline.quantization.saturating_layers`), the
fraction of logits where onnxruntime differs from the graph form's exact integer arithmetic by more than float32
rounding (the audit's parity tolerance; the logits layer computes in float) on the first ``--n`` test images (0
wherever the CPU computes exact integers) and the largest difference, clean accuracy and agreement with fp32, and the audit's
attack part (APGD-CE, APGD-T, PGD 50 x 2, the run's eps; confirmed on onnxruntime) with its verified figures (IBP /
CROWN, refused when the graph form is off onnxruntime). One process, the same images, back to back.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.audit.deployed import graph_logits  # noqa: E402
from pipeline.config import AuditParams, load_params  # noqa: E402
from pipeline.data import as_arrays, load_dataset  # noqa: E402
from pipeline.onnx_io import ort_logits, ort_session  # noqa: E402
from pipeline.onnx_load import load_onnx  # noqa: E402
from pipeline.quantization import cpu_has_vnni, int8_weight_range, quantize_int8, saturating_layers  # noqa: E402
from pipeline.reporting import atomic_write_bytes  # noqa: E402


def measure(path: Path, x: np.ndarray, y: np.ndarray, fp32_pred: np.ndarray, eps: float, threads: int) -> dict:
    from pipeline.audit.run import run_audit

    t = time.perf_counter()
    audit = run_audit(path, x, y, AuditParams(eps=eps, steps=50, restarts=2, n_examples=None, alpha_crown=False,
                                              bab=False, sweep_eps=[], threads=threads,
                                              attacks=["apgd-ce", "apgd-t", "pgd"]), progress=False)
    seconds = time.perf_counter() - t
    # the audit's parity check on the same images gives the tolerance and the largest difference; the share of
    # logits beyond it is this benchmark's own figure
    ort = ort_logits(ort_session(path, threads=threads), x)
    exact = graph_logits(load_onnx(path).eval(), x)
    parity = audit.parity
    return {"weight_range": int8_weight_range(path), "saturating_layers": saturating_layers(path),
            "logits_off_exact": float((np.abs(ort - exact) > parity.tolerance).mean()),
            "parity_tolerance": parity.tolerance, "max_logit_difference": parity.max_logit_difference,
            "parity_ok": parity.ok,
            "clean_accuracy": float((ort.argmax(1) == y).mean()),
            "agreement_with_fp32": float((ort.argmax(1) == fp32_pred).mean()),
            "robust_accuracy": audit.robust_accuracy, "verified_accuracy": audit.verified_accuracy,
            "verification_refused": audit.verification_refused, "audit_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "fashion")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int8_range.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(args.run / "params.yaml")
    data = load_dataset(params.data)
    x, y = as_arrays(data.test, limit=args.n, seed=0)
    calibration = data.val if data.val is not None else data.train
    x_cal, _ = as_arrays(calibration, limit=params.quantize.calibration_size, seed=0)
    fp32 = args.run / "models" / "finetuned.onnx"
    fp32_pred = ort_logits(ort_session(fp32, threads=args.threads), x).argmax(1)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="hydra-int8-range-") as tmp:
        for name, reduce in (("full-range", False), ("7-bit", True)):
            q8 = Path(tmp) / f"{name}.onnx"
            quantize_int8(fp32, q8, x_cal, per_channel=params.quantize.per_channel,
                          method=params.quantize.calibration_method, reduce_range=reduce)
            rows[name] = measure(q8, x, y, fp32_pred, params.audit.eps, args.threads)
            r = rows[name]
            print(f"{name:>10}: weights up to {r['weight_range']}, {len(r['saturating_layers'])} layers can saturate, "
                  f"logits off exact {100 * r['logits_off_exact']:.1f}% (max {r['max_logit_difference']:.3g}), clean {100 * r['clean_accuracy']:.1f}%, "
                  f"agreement {100 * r['agreement_with_fp32']:.1f}%, robust {100 * r['robust_accuracy']:.1f}%, "
                  f"verified {r['verified_accuracy']}", flush=True)
    result = {"run": str(args.run.relative_to(ROOT) if args.run.is_absolute() else args.run), "n": len(x),
              "eps": params.audit.eps, "cpu": platform.processor() or platform.machine(), "vnni": cpu_has_vnni(),
              "fp32_clean_accuracy": float((fp32_pred == y).mean()), "rows": rows}
    atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
