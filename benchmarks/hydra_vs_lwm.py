"""HYDRA vs LWM on the embedded digits with CNN-small: the paper's claims, measured with the pipeline's own functions.

Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020. Every number comes from
``pipeline``: ``build_model``, ``train`` (PGD adversarial training, Madry et al.), ``prune`` (``hydra`` / ``lwm``)
and the audit's attack ``pgd_attack`` (L-inf PGD, 50 steps x 10 restarts, worst case per example) at the pipeline's
default eps. Training settings are the params.yaml defaults (the pydantic defaults of ``TrainParams``,
``PruneParams``, ``FinetuneParams``) unless an option overrides them.

Studies (``--study``):

- ``main`` (the issue's table): per seed, pretrain once (PGD-AT); for each sparsity prune with ``hydra`` and with
  ``lwm``, finetune both with the same budget, evaluate clean and PGD robust accuracy before and after finetuning.
- ``init``: the same with HYDRA's scores initialised ``scaled`` (the paper) vs ``kaiming`` (random, same scale).
- ``benign``: a benign (non-robust) pretrained network pruned by HYDRA with the robust objective and no
  finetuning: the paper's "robust sub-networks hidden inside non-robust networks". Rows ``dense`` (before),
  ``hydra`` and ``lwm`` (after pruning).
- ``epochs``: the number of score-training epochs (``--epochs-list``; 0 = the scaled-init mask, i.e. LWM),
  before and after finetuning.

One JSON row per (method, sparsity, seed) with ``method``, ``sparsity``, ``seed``, ``clean_accuracy``,
``pgd_robust_accuracy`` (after finetuning where there is one) and the study's extra keys; a rich table of means and
spreads on stdout.

Example::

    .venv/bin/python benchmarks/hydra_vs_lwm.py --out benchmarks/results/hydra_vs_lwm.json
    .venv/bin/python benchmarks/hydra_vs_lwm.py --study init --sparsities 0.99 --out benchmarks/results/init.json
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

Study = Literal["main", "init", "benign", "epochs"]
app = typer.Typer(add_completion=False)


def _floats(values: list[str]) -> list[float]:
    return [float(v) for item in values for v in item.split(",") if v.strip()]


def _ints(values: list[str]) -> list[int]:
    return [int(v) for item in values for v in item.split(",") if v.strip()]


def run_seed(study: Study, seed: int, sparsities: list[float], cfg: dict) -> tuple[list[dict], list[dict]]:
    """All rows of one seed (and, for ``main``, the weight histograms of that seed's masks)."""
    import torch

    torch.set_num_threads(cfg["threads"])
    os.environ.setdefault("HYDRA_PIPE_QUIET", "1")
    from pipeline.attacks import AttackOptions, pgd_attack
    from pipeline.config import AuditParams, DataParams, FinetuneParams, PruneParams, TrainParams
    from pipeline.data import load_dataset
    from pipeline.masking import global_sparsity, masked_layers
    from pipeline.models import build_model
    from pipeline.pruning import kept_weight_histogram, prune
    from pipeline.training import accuracy, train

    data = load_dataset(DataParams())
    n = len(data.test) if cfg["eval_n"] is None else min(cfg["eval_n"], len(data.test))
    x = torch.stack([data.test[i][0] for i in range(n)])
    y = torch.tensor([int(data.test[i][1]) for i in range(n)])
    eps = AuditParams().eps

    def evaluate(model) -> dict[str, float]:
        res = pgd_attack(model, x, y, eps, steps=cfg["attack_steps"], restarts=cfg["restarts"],
                         options=AttackOptions(seed=seed))
        return {"clean_accuracy": accuracy(model, data.test), "pgd_robust_accuracy": float(res.robust_accuracy)}

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    dense = build_model("cnn_small", data.info)
    pretrain_objective = "benign" if study == "benign" else "pgd"
    train(dense, data.train, TrainParams(objective=pretrain_objective, epochs=cfg["pretrain_epochs"], seed=seed),
          label=f"pretrain seed {seed}")
    dense_eval = evaluate(dense)
    base = {"seed": seed, "pretrain_objective": pretrain_objective, "pretrain_seconds": time.perf_counter() - t0,
            **{f"dense_{k}": v for k, v in dense_eval.items()}}
    rows: list[dict] = []
    histograms: list[dict] = []
    if study == "benign":
        rows.append({"method": "dense", "sparsity": 0.0, **base, **dense_eval})

    prune_kw = {"epochs": cfg["prune_epochs"], "lr": cfg["score_lr"], "optimizer": cfg["score_optimizer"],
                "objective": "pgd", "seed": seed}
    finetune = FinetuneParams(epochs=0 if study == "benign" else cfg["finetune_epochs"], seed=seed)

    variants: list[tuple[str, dict]]
    if study in ("main", "benign"):
        variants = [("hydra", {"method": "hydra"}), ("lwm", {"method": "lwm"})]
    elif study == "init":
        variants = [("hydra-scaled", {"method": "hydra", "score_init": "scaled"}),
                    ("hydra-kaiming", {"method": "hydra", "score_init": "kaiming"})]
    else:
        variants = [(f"hydra-{e}ep", {"method": "hydra", "epochs": e}) for e in cfg["epochs_list"]]

    for sparsity in sparsities:
        before = {n_: l.weight.detach().numpy().copy() for n_, l in masked_layers(dense)}
        kept: dict[str, dict] = {}
        for name, overrides in variants:
            model = copy.deepcopy(dense)
            p = PruneParams(**{**prune_kw, **overrides, "keep_ratio": round(1.0 - sparsity, 6)})
            t = time.perf_counter()
            prune(model, data.train, p)
            prune_s = time.perf_counter() - t
            kept[name] = {n_: l.effective_weight().detach().numpy().copy() for n_, l in masked_layers(model)}
            pruned_eval = evaluate(model)
            t = time.perf_counter()
            train(model, data.train, finetune, label=f"finetune {name} {sparsity:g} seed {seed}")
            finetune_s = time.perf_counter() - t
            final = evaluate(model) if finetune.epochs else pruned_eval
            rows.append({"method": name, "sparsity": sparsity, **base, **final,
                         **{f"pruned_{k}": v for k, v in pruned_eval.items()},
                         "measured_sparsity": global_sparsity(model), "score_init": p.score_init,
                         "prune_epochs": p.epochs if p.method == "hydra" else 0, "score_lr": p.lr,
                         "score_optimizer": p.optimizer, "finetune_epochs": finetune.epochs,
                         "prune_seconds": prune_s, "finetune_seconds": finetune_s})
        if study == "main" and {"hydra", "lwm"} <= kept.keys():
            for r in kept_weight_histogram(before, {"lwm": kept["lwm"], "hydra": kept["hydra"]}):
                histograms.append({"seed": seed, "sparsity": sparsity, **r})
    return rows, histograms


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:5.1f} ± {100 * sd:4.1f}  [{100 * min(values):.1f}, {100 * max(values):.1f}]"


def summary_table(rows: list[dict], study: str) -> Table:
    """Means ± sample std over seeds, and [min, max], in percent; for ``main`` also HYDRA - LWM per seed."""
    t = Table(title=f"hydra_vs_lwm --study {study}: accuracy in %, mean ± std [min, max] over seeds")
    for col in ("sparsity", "method", "seeds", "pruned robust", "clean", "PGD robust"):
        t.add_column(col, justify="right")
    epochs = {r["method"]: r.get("prune_epochs", 0) if study == "epochs" else 0 for r in rows}
    keys = sorted({(r["sparsity"], r["method"]) for r in rows}, key=lambda k: (k[0], epochs[k[1]], k[1]))
    for sparsity, method in keys:
        group = [r for r in rows if r["sparsity"] == sparsity and r["method"] == method]
        pruned = [r["pruned_pgd_robust_accuracy"] for r in group if "pruned_pgd_robust_accuracy" in r]
        t.add_row(f"{100 * sparsity:g}%", method, str(len(group)), _spread(pruned) if pruned else "-",
                  _spread([r["clean_accuracy"] for r in group]), _spread([r["pgd_robust_accuracy"] for r in group]))
        if study == "main" and method == "lwm":
            h = {r["seed"]: r for r in rows if r["sparsity"] == sparsity and r["method"] == "hydra"}
            lwm = {r["seed"]: r for r in group}
            seeds = sorted(set(h) & set(lwm))
            if seeds:
                d = lambda key: [h[s][key] - lwm[s][key] for s in seeds]  # noqa: E731 - paired by seed
                t.add_row("", "[b]hydra - lwm[/b]", str(len(seeds)), _spread(d("pruned_pgd_robust_accuracy")),
                          _spread(d("clean_accuracy")), _spread(d("pgd_robust_accuracy")), end_section=True)
    return t


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="JSON file: one row per (method, sparsity, seed)")] =
        Path("benchmarks/results/hydra_vs_lwm.json"),
    study: Annotated[str, typer.Option(help="main, init, benign or epochs")] = "main",
    seeds: Annotated[int, typer.Option(min=1, help="seeds 0..N-1, one pretrained network each")] = 3,
    sparsities: Annotated[list[str], typer.Option(help="comma-separated, e.g. 0.9,0.95,0.99")] = ["0.9,0.95,0.99"],
    pretrain_epochs: Annotated[int, typer.Option(min=0)] = 30,
    prune_epochs: Annotated[int, typer.Option(min=0, help="HYDRA score-training epochs")] = 20,
    finetune_epochs: Annotated[int, typer.Option(min=0, help="the same budget for every method")] = 20,
    score_lr: Annotated[float, typer.Option(help="learning rate of the scores")] = 1e-3,
    score_optimizer: Annotated[str, typer.Option(help="adam or sgd")] = "adam",
    epochs_list: Annotated[list[str], typer.Option(help="--study epochs: score epochs to compare")] = ["0,2,5,10,20,40"],
    attack_steps: Annotated[int, typer.Option(min=1)] = 50,
    restarts: Annotated[int, typer.Option(min=1)] = 10,
    eval_n: Annotated[int | None, typer.Option(help="test examples evaluated (default: all 450)")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="seeds run in parallel processes, one thread each")] = 1,
    weights_out: Annotated[Path | None, typer.Option(help="--study main: weight histograms of each seed's masks")] = None,
) -> None:
    from pipeline.reporting import write_json

    if study not in ("main", "init", "benign", "epochs"):
        raise typer.BadParameter(f"--study {study!r}: expected main, init, benign or epochs")
    cfg = {"pretrain_epochs": pretrain_epochs, "prune_epochs": prune_epochs, "finetune_epochs": finetune_epochs,
           "score_lr": score_lr, "score_optimizer": score_optimizer, "epochs_list": _ints(epochs_list),
           "attack_steps": attack_steps, "restarts": restarts, "eval_n": eval_n, "threads": 1}
    spars = _floats(sparsities)
    t0 = time.perf_counter()
    rows: list[dict] = []
    hist: list[dict] = []
    if jobs == 1:
        results = [run_seed(study, s, spars, cfg) for s in range(seeds)]  # type: ignore[arg-type]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_seed, [study] * seeds, range(seeds), [spars] * seeds, [cfg] * seeds))
    for r, h in results:
        rows += r
        hist += h
    write_json(out, rows)
    if weights_out is not None and hist:
        write_json(weights_out, hist)
    console = Console()
    console.print(summary_table(rows, study))
    console.print(f"{len(rows)} rows -> {out}; {time.perf_counter() - t0:.0f} s wall, {jobs} process(es), "
                  f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    app()
