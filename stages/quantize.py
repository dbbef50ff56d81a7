"""Stage 4: export the finetuned network to fp32 ONNX, then int8 static quantization calibrated on the validation
split (``data.validation``), or on training images where the dataset has none; the test split stays the audit's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.checkpoint import load_checkpoint
from pipeline.data import as_arrays
from pipeline.errors import HydraPipeError
from pipeline.onnx_io import export_onnx, ort_logits, ort_session, torch_logits
from pipeline.quantization import int8_weight_zeros, quantize_int8
from pipeline.channels import narrow
from stages.common import FINETUNED, FP32_ONNX, INT8_ONNX, setup, write_figures


def run(params_path: Path) -> dict:
    params, data, _ = setup(params_path, needs=(FINETUNED,))
    q = params.quantize
    model, meta = load_checkpoint(FINETUNED)
    if params.prune.granularity == "filter":  # pruned channels leave the graph: a narrower, faster network
        model = narrow(model)
    info = data.info
    export_onnx(model, FP32_ONNX, (info.channels, info.size, info.size), {"stage": "finetuned", "bits": "32"},
                opset=params.export.opset, dynamo=params.export.exporter == "dynamo")
    x_test, y_test = as_arrays(data.test)
    torch_out = torch_logits(model, x_test)
    fp32_out = ort_logits(ort_session(FP32_ONNX), x_test)
    parity = float(np.abs(fp32_out - torch_out).max())
    if parity > params.export.parity_atol:
        raise HydraPipeError(f"{FP32_ONNX}: onnxruntime logits differ from PyTorch by {parity:.2e} "
                             f"(> export.parity_atol {params.export.parity_atol})")
    calibration = data.val if data.val is not None else data.train
    x_cal, _ = as_arrays(calibration, limit=q.calibration_size, seed=0)
    quantize_int8(FP32_ONNX, INT8_ONNX, x_cal, per_channel=q.per_channel, method=q.calibration_method,
                  reduce_range=q.reduce_range)
    int8_out = ort_logits(ort_session(INT8_ONNX), x_test)
    n_pruned = sum(int((w == 0).sum()) for n, w in model.state_dict().items()
                   if n.endswith("weight") and w.dim() > 1)
    metrics = {
        "fp32_accuracy": float((fp32_out.argmax(1) == y_test).mean()),
        "int8_accuracy": float((int8_out.argmax(1) == y_test).mean()),
        "prediction_agreement": float((fp32_out.argmax(1) == int8_out.argmax(1)).mean()),
        "fp32_parity_max_abs": parity,
        "fp32_bytes": FP32_ONNX.stat().st_size,
        "int8_bytes": INT8_ONNX.stat().st_size,
        "pruned_weights": n_pruned,
        "int8_zero_weights": sum(int8_weight_zeros(INT8_ONNX).values()),
        "sparsity": meta.get("sparsity"),
        "granularity": params.prune.granularity,
        "calibration_split": "validation" if data.val is not None else "train",
        "fp32_parameters": sum(int(t.numel()) for n, t in model.state_dict().items() if n.endswith(("weight", "bias"))),
    }
    metrics["accuracy_drop"] = metrics["fp32_accuracy"] - metrics["int8_accuracy"]
    if metrics["int8_zero_weights"] < n_pruned:
        raise HydraPipeError(f"{INT8_ONNX}: {n_pruned - metrics['int8_zero_weights']} pruned weights are non-zero after quantization")
    return write_figures("quantize", metrics, "quantize (int8, onnxruntime QDQ)")
