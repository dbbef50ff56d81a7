"""Stage 2: prune the pretrained network (``prune.method``: hydra, lwm or random) with ``prune.objective``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import params_hash
from pipeline.masking import global_sparsity, masked_layers, prunable_layers, sparsity_report
from pipeline.pruning import prune
from pipeline.reporting import metrics_table, show, write_csv, write_json
from pipeline.training import accuracy, pgd_accuracy
from stages.common import METRICS, PLOTS, PRETRAINED, PRUNED, setup


def weight_histogram(pretrained: dict[str, np.ndarray], kept: dict[str, np.ndarray], method: str,
                     bins: int = 40) -> list[dict]:
    """The paper's Fig. 3: |pretrained weights| against the |weights| this method kept, per normalised layer.

    Magnitudes are divided by each layer's max so layers share one axis; LWM keeps only the right tail, HYDRA
    keeps some small weights and prunes some large ones.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    allw = np.concatenate([np.abs(w).ravel() / np.abs(w).max() for w in pretrained.values()])
    keptw = np.concatenate([np.abs(kept[k][kept[k] != 0]).ravel() / np.abs(pretrained[k]).max() for k in pretrained])
    h_all, _ = np.histogram(allw, edges)
    h_kept, _ = np.histogram(keptw, edges)
    return [{"magnitude": round(float(c), 4), "pretrained": int(a), f"kept_{method}": int(k)}
            for c, a, k in zip((edges[:-1] + edges[1:]) / 2, h_all, h_kept)]


def run(params_path: Path) -> dict:
    params, data, device = setup(params_path)
    p = params.prune
    model, parent = load_checkpoint(PRETRAINED)
    model.to(device)
    pruned_names = {n for n, _ in prunable_layers(model, p.skip_first, p.skip_last)}
    before = {n: layer.weight.detach().cpu().numpy().copy() for n, layer in masked_layers(model) if n in pruned_names}
    history = prune(model, data.train, p)
    kept = {n: layer.effective_weight().detach().cpu().numpy() for n, layer in masked_layers(model) if n in pruned_names}
    layers = sparsity_report(model)
    metrics = {"method": p.method, "keep_ratio": p.keep_ratio, "sparsity": global_sparsity(model),
               "clean_accuracy": accuracy(model, data.test),
               "pgd_robust_accuracy": pgd_accuracy(model, data.test, p.eps),
               "layers": {n: r["sparsity"] for n, r in layers.items()}}
    save_checkpoint(model, PRUNED, params.model.arch, data.info, params_hash(params, "data", "model", "pretrain", "prune"),
                    parent=str(PRETRAINED), extra={"stage": "prune", "method": p.method, "objective": p.objective})
    write_csv(PLOTS / "prune_layers.csv", [{"layer": n, "sparsity": r["sparsity"], "kept": r["kept"]} for n, r in layers.items()])
    write_csv(PLOTS / "prune_weights.csv", weight_histogram(before, kept, "mask"))
    write_csv(PLOTS / "prune_history.csv", history or [{"epoch": 0, "loss": None, "lr": None, "keep_ratio": p.keep_ratio}])
    write_json(METRICS / "prune.json", metrics)
    show(metrics_table(f"prune ({p.method})", metrics))
    return metrics
