"""Stage 1: train the dense network with ``pretrain.objective``."""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import save_checkpoint
from pipeline.config import params_hash
from pipeline.models import build_model, count_parameters
from pipeline.reporting import write_csv
from pipeline.runtime import seed_everything
from pipeline.training import accuracy, pgd_accuracy, train
from stages.common import PLOTS, PRETRAINED, finished, resume_args, setup, trained, write_figures


def run(params_path: Path) -> dict:
    params, data, device = setup(params_path)
    p = params.pretrain
    seed_everything(p.seed)
    model = build_model(params.model.arch, data.info).to(device)
    history = train(model, data.train, p, what="weights", label="pretrain", **resume_args("pretrain", params))
    if not trained("pretrain", model):  # several workers: rank 0 measures and writes
        return {}
    metrics = {"parameters": count_parameters(model), "clean_accuracy": accuracy(model, data.test),
               "pgd_robust_accuracy": pgd_accuracy(model, data.test, p.eps),
               "final_loss": history[-1]["loss"] if history else None}
    save_checkpoint(model, PRETRAINED, params.model.arch, data.info, params_hash(params, "data", "model", "pretrain"),
                    extra={"stage": "pretrain", "objective": p.objective})
    write_csv(PLOTS / "pretrain.csv", history)
    figures = write_figures("pretrain", metrics)
    finished("pretrain")  # only now: every output is written
    return figures
