"""What every stage shares: the fixed file layout of the DVC pipeline, params and data loading."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Params, load_params
from pipeline.data import Splits, load_dataset
from pipeline.runtime import default_device

MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")
DEPLOY = Path("deploy")

PRETRAINED = MODELS / "pretrained.safetensors"
PRUNED = MODELS / "pruned.safetensors"
FINETUNED = MODELS / "finetuned.safetensors"
FP32_ONNX = MODELS / "finetuned.onnx"
INT8_ONNX = MODELS / "quantized.onnx"
AUDIT_REPORT = REPORTS / "audit.json"
AUDIT_BOUNDS = REPORTS / "bounds.npz"
SHIPPED = DEPLOY / "model.onnx"
MODEL_CARD = DEPLOY / "MODEL_CARD.md"


def setup(params_path: Path) -> tuple[Params, Splits, torch.device]:
    """Validate params first (a bad key stops the stage before anything is read or written), then load data."""
    params = load_params(params_path)
    return params, load_dataset(params.data), default_device()
