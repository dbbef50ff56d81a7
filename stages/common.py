"""What every stage shares: the fixed file layout of the DVC pipeline, params and data loading."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Params, load_params
from pipeline.data import Splits, load_dataset
from pipeline.reporting import metrics_table, show, write_json
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


HEADLINE = {
    "pretrain": ("clean_accuracy", "pgd_robust_accuracy"),
    "prune": ("sparsity", "clean_accuracy", "pgd_robust_accuracy"),
    "finetune": ("sparsity", "clean_accuracy", "pgd_robust_accuracy"),
    "quantize": ("int8_accuracy", "accuracy_drop", "prediction_agreement"),
    "audit": ("clean_accuracy", "pgd_robust_accuracy", "robust_accuracy", "verified_accuracy"),
    "export": ("bytes", "size_ratio_vs_dense_fp32"),
}
"""The figures each stage gives DVC (``metrics/<stage>.json``): what ``dvc metrics show`` and ``dvc exp show``
compare, few enough to fit a terminal. Everything else a stage measures is plain JSON in ``reports/<stage>.json``
(the audit's full report is ``reports/audit.json``) or a plot."""


def write_headline(stage: str, figures: dict) -> None:
    """``metrics/<stage>.json``: the stage's headline figures (:data:`HEADLINE`)."""
    write_json(METRICS / f"{stage}.json", {k: figures[k] for k in HEADLINE[stage]})


def write_figures(stage: str, figures: dict, title: str | None = None) -> dict:
    """The headline figures to ``metrics/<stage>.json``, the rest to ``reports/<stage>.json``, and a table of all
    of them for people. Returns ``figures``."""
    write_headline(stage, figures)
    write_json(REPORTS / f"{stage}.json", {k: v for k, v in figures.items() if k not in HEADLINE[stage]})
    show(metrics_table(title or stage, figures))
    return figures


def setup(params_path: Path) -> tuple[Params, Splits, torch.device]:
    """Validate params first (a bad key stops the stage before anything is read or written), then load data."""
    params = load_params(params_path)
    torch.set_num_threads(params.compute.threads)  # the figures depend on it (see ComputeParams)
    return params, load_dataset(params.data), default_device()
