"""Stage 3: train the kept weights with ``finetune.objective``; the mask is frozen, pruned weights stay zero."""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import params_hash
from pipeline.masking import global_sparsity
from pipeline.reporting import write_csv
from pipeline.training import accuracy, pgd_accuracy, train
from stages.common import FINETUNED, PLOTS, PRUNED, finished, resume_args, setup, trained, write_figures


def run(params_path: Path) -> dict:
    params, data, device = setup(params_path, needs=(PRUNED,))
    p = params.finetune
    model, _ = load_checkpoint(PRUNED)
    model.to(device)
    history = train(model, data.train, p, what="weights", label="finetune", **resume_args("finetune", params))
    if not trained("finetune", model):  # several workers: rank 0 measures and writes
        return {}
    metrics = {"sparsity": global_sparsity(model), "clean_accuracy": accuracy(model, data.test),
               "pgd_robust_accuracy": pgd_accuracy(model, data.test, p.eps),
               "final_loss": history[-1]["loss"] if history else None}
    save_checkpoint(model, FINETUNED, params.model.arch, data.info,
                    params_hash(params, "data", "model", "pretrain", "prune", "finetune"),
                    parent=str(PRUNED), extra={"stage": "finetune", "objective": p.objective})
    write_csv(PLOTS / "finetune.csv", history)
    figures = write_figures("finetune", metrics)
    finished("finetune")  # only now: every output is written
    return figures
