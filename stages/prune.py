"""Stage 2: prune the pretrained network (``prune.method``: hydra, lwm or random) with ``prune.objective``."""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import params_hash
from pipeline.masking import global_sparsity, masked_layers, prunable_layers, sparsity_report
from pipeline.pruning import kept_weight_histogram, lwm_kept_weights, prune
from pipeline.reporting import write_csv
from pipeline.training import accuracy, pgd_accuracy
from stages.common import PLOTS, PRETRAINED, PRUNED, finished, resume_args, setup, trained, write_figures


def run(params_path: Path) -> dict:
    params, data, device = setup(params_path, needs=(PRETRAINED,))
    p = params.prune
    model, parent = load_checkpoint(PRETRAINED)
    model.to(device)
    pruned_names = {n for n, _ in prunable_layers(model, p.skip_first, p.skip_last)}
    before = {n: layer.weight.detach().cpu().numpy().copy() for n, layer in masked_layers(model) if n in pruned_names}
    history = prune(model, data.train, p, **resume_args("prune", params))
    if not trained("prune", model):  # several workers: rank 0 measures and writes
        return {}
    kept = {n: layer.effective_weight().detach().cpu().numpy() for n, layer in masked_layers(model) if n in pruned_names}
    layers = sparsity_report(model)
    metrics = {"method": p.method, "rates": p.rates, "keep_ratio": p.keep_ratio, "sparsity": global_sparsity(model),
               "clean_accuracy": accuracy(model, data.test),
               "pgd_robust_accuracy": pgd_accuracy(model, data.test, p.eps),
               "layers": {n: r["sparsity"] for n, r in layers.items()}}
    save_checkpoint(model, PRUNED, params.model.arch, data.info, params_hash(params, "data", "model", "pretrain", "prune"),
                    parent=str(PRETRAINED), extra={"stage": "prune", "method": p.method, "objective": p.objective})
    # rate: the fraction of the layer kept, as prune.rates allocated it (learned rates: what they learned)
    write_csv(PLOTS / "prune_layers.csv", [{"layer": n, "sparsity": r["sparsity"], "kept": r["kept"],
                                            "weights": r["weights"], "rate": r["kept"] / r["weights"], "rates": p.rates}
                                           for n, r in layers.items()])
    # the paper's figure: pretrained weights, those LWM would keep at the same ratio, and those this run kept
    # (learned rates: LWM with the same count per layer)
    counts = {n: layers[n]["kept"] for n in before} if p.rates == "learned" else None
    lwm = lwm_kept_weights(before, p.keep_ratio, p.rates, counts)
    write_csv(PLOTS / "prune_weights.csv", kept_weight_histogram(before, {"lwm": lwm, "mask": kept}))
    write_csv(PLOTS / "prune_history.csv", history or [{"epoch": 0, "loss": None, "lr": None, "keep_ratio": p.keep_ratio}])
    figures = write_figures("prune", metrics, f"prune ({p.method})")
    finished("prune")  # only now: every output is written
    return figures
