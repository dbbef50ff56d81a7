"""What every stage shares: the fixed file layout of the DVC pipeline, params and data loading."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from torch import nn

from pipeline import distributed
from pipeline.config import Params, load_params, params_hash
from pipeline.data import Splits, load_dataset
from pipeline.errors import HydraPipeError
from pipeline.reporting import metrics_table, show, write_json

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
AUDIT_TIMINGS = REPORTS / "audit.timing.json"  # this machine's wall times: ignored by git, not a DVC output
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


MADE_BY = {PRETRAINED: "pretrain", PRUNED: "prune", FINETUNED: "finetune", FP32_ONNX: "quantize",
           INT8_ONNX: "quantize", AUDIT_REPORT: "audit", SHIPPED: "export"}
"""The stage that writes each input a later stage reads: what to run when it is missing."""


def require(*paths: Path) -> None:
    """One line naming the first of ``paths`` (a checkpoint: its weights or its JSON sidecar) that is missing and
    the stage that writes it: ``models/pretrained.safetensors not found: run the pretrain stage first (...)``."""
    for path in paths:
        files = [path, path.with_suffix(".json")] if path.suffix == ".safetensors" else [path]
        for file in files:
            if not file.is_file():
                stage = MADE_BY.get(path)
                run = (f": run the {stage} stage first (hydra-pipe {stage}, or dvc repro {stage})" if stage
                       else "")
                raise HydraPipeError(f"{file} not found{run}")


def setup(params_path: Path, needs: tuple[Path, ...] = ()) -> tuple[Params, Splits, torch.device]:
    """Validate params first (a bad key stops the stage before anything is read or written), then check that the
    earlier stages' outputs ``needs`` are there (:func:`require`), then load data. Under torchrun (a training stage
    with ``compute.workers > 1``) this joins the process group."""
    params = load_params(params_path)
    require(*needs)
    torch.set_num_threads(params.compute.threads)  # the figures depend on it (see ComputeParams)
    device = distributed.init(params.compute.device)
    return params, load_dataset(params.data), device


# ---------------------------------------------------------------------------------------------------------------
# Resuming a killed stage, and several workers (compute.workers > 1: the training stages under torchrun, launched
# by stages.launch)

RESUME = Path(".resume")
"""Where a killed stage's progress waits for its rerun: ``.resume/<stage>/`` (a training stage's epoch states, the
audit's journal), under the repo root when DVC runs the stage. Ignored by git and DVC."""


def resume_args(stage: str, params: Params) -> dict:
    """What a training stage hands the training loop (or ``prune``) so that a killed run continues from its last
    epoch, bit for bit: its resume folder, what else the run depends on (data, compute), the compute settings."""
    return {"resume_dir": RESUME / stage, "resume_key": params_hash(params, "compute", "data"),
            "compute": params.compute}


def trained(stage: str, model: nn.Module) -> bool:
    """After training: the workers agree (:func:`ranks_agree`); True on the process that measures and writes."""
    ranks_agree(stage, model)
    return distributed.is_main()


def finished(stage: str) -> None:
    """Every output of ``stage`` is written: its resume folder goes, and ``.resume`` too once no stage's is left."""
    shutil.rmtree(RESUME / stage, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another stage's progress
        RESUME.rmdir()


def ranks_agree(stage: str, model: nn.Module) -> None:
    """With several workers, after training: every rank holds the same parameters (weights, HYDRA scores) and
    frozen masks, or the run stops before rank 0 writes anything (DDP's invariant; a failure is a bug)."""
    if distributed.world() == 1:
        return
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith("weight_mask"))]
    if not distributed.agree(tensors):
        if not distributed.is_main():
            distributed.stop_with_main()
        raise HydraPipeError(f"{stage}: the workers' weights or masks differ after training; nothing was written")
