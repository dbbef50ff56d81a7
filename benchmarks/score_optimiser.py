"""Why global magnitude pruning (LWM) beats HYDRA at 99% on Fashion-MNIST: the masks and the two phases apart.

Issue 25 asks, where HYDRA's robust-aware scores lose to global magnitude pruning, to find out why (score
initialisation across layers, score learning rate, epochs, BatchNorm mode). CNN-small has no BatchNorm, and the
allocation across layers is the same for both (``rates: global``: HYDRA takes global magnitude pruning's per-layer
counts, its scores choose within each layer), so what is left is what the score training does with the weights frozen.
For each variant of the prune stage this measures, from the same pretrained network:

- after pruning (no finetuning): clean and PGD-20 accuracy on the whole test split (what the scores optimise),
- the mask: kept weights per layer, and the share of them LWM would keep too (overlap with the magnitude mask),
- after the run's finetuning (every variant the same: ``finetune`` of ``--params``): clean and PGD-20 accuracy.

Variants (``--variants``): ``lwm`` (one-shot magnitude mask), ``hydra-adam`` (scores trained by Adam at lr 1e-3,
the runs' setting before 2026-12-07), ``hydra-sgd`` (the authors' score optimiser: SGD lr 0.1, momentum 0.9, weight
decay 1e-4; the prune stage's default for HYDRA since). The rest of the prune stage is the run's. One JSON row per variant appended to ``--out`` as it finishes; a rerun
skips the variants already there. ``--table FILE --readme benchmarks/README.md`` rewrites the README's generated
block from the file.

    .venv/bin/python benchmarks/score_optimiser.py --pretrained runs/fashion/models/pretrained.safetensors \\
        --params runs/fashion/params.yaml --keep 0.01 --rates global --out benchmarks/results/score_optimiser.jsonl
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)

VARIANTS = {
    "lwm": {"method": "lwm"},
    "hydra-adam": {"method": "hydra", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "hydra-sgd": {"method": "hydra", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def overlap(masks: list, reference: list) -> list[float]:
    """Per layer: the share of the kept weights that ``reference`` keeps too (1.0 for an empty mask)."""
    out = []
    for m, r in zip(masks, reference):
        kept = int(m.sum())
        out.append(round(float((m * r).sum()) / kept, 4) if kept else 1.0)
    return out


MARKS = ("<!-- generated:score-optimiser by `benchmarks/score_optimiser.py --table FILE --readme README`; do not edit -->",
         "<!-- /generated:score-optimiser -->")


def table(rows: list[dict]) -> str:
    """One line per (keep, rates, variant), in the file's order."""
    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    lines = ["| keep | rates | variant | score optimiser | score epochs | kept per layer | kept also by LWM | "
             "after pruning: clean / PGD-20 | after finetuning: clean / PGD-20 | CPU s |",
             "| ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        p = r["prune"]
        opt = "-" if p["method"] == "lwm" else f"{p['optimizer']} {p['lr']:g}" + \
            (f", wd {p['weight_decay']:g}" if p["weight_decay"] else "")
        lines.append(f"| {100 * r['keep']:g}% | {r['rates']} | {r['variant']} | {opt} | "
                     f"{'-' if p['method'] == 'lwm' else p['epochs']} | {' / '.join(map(str, r['kept']))} | "
                     f"{pct(r['overlap_total'])} | {pct(r['pruned']['clean'])} / {pct(r['pruned']['pgd20'])} | "
                     f"{pct(r['finetuned']['clean'])} / {pct(r['finetuned']['pgd20'])} | {r['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def readme_with_table(readme: str, rows: list[dict]) -> str:
    from stages.figures import replace_block

    return replace_block(readme, MARKS, table(rows))


@app.command()
def main(
    pretrained: Annotated[Path | None, typer.Option(help="the dense network (a pretrain checkpoint)")] = None,
    params: Annotated[Path | None, typer.Option(help="the run whose prune and finetune settings are the base")] = None,
    out: Annotated[Path, typer.Option(help="JSON lines, one per variant")] = Path("benchmarks/results/score_optimiser.jsonl"),
    keep: Annotated[float, typer.Option(help="keep ratio")] = 0.01,
    rates: Annotated[str, typer.Option(help="allocation across layers")] = "global",
    variants: Annotated[str, typer.Option(help=f"comma-separated: {', '.join(VARIANTS)}")] = ",".join(VARIANTS),
    threads: Annotated[int, typer.Option(min=1)] = 1,
    table_of: Annotated[Path | None, typer.Option("--table", help="print the table of this results file and stop")] =
        None,
    readme: Annotated[Path | None, typer.Option(help="with --table: rewrite that file's generated block")] = None,
) -> None:
    if table_of is not None:
        rows = read_rows(table_of)
        typer.echo(table(rows))
        if readme is not None:
            from pipeline.reporting import atomic_write_bytes

            atomic_write_bytes(readme, readme_with_table(readme.read_text(), rows).encode())
        return
    if pretrained is None or params is None:
        raise typer.BadParameter("--pretrained and --params are needed to measure (or --table FILE)")
    os.environ.setdefault("HYDRA_PIPE_QUIET", "1")
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.config import FinetuneParams, PruneParams, load_params
    from pipeline.data import load_dataset
    from pipeline.masking import prunable_layers
    from pipeline.pruning import prune
    from pipeline.reporting import atomic_write_bytes
    from pipeline.training import accuracy, pgd_accuracy, train

    names = [v for v in variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise typer.BadParameter(f"--variants: unknown {', '.join(unknown)}; expected {', '.join(VARIANTS)}")
    torch.set_num_threads(threads)
    run = load_params(params)
    data = load_dataset(run.data)
    eps = run.prune.eps

    def figures(model) -> dict:
        return {"clean": accuracy(model, data.test), "pgd20": pgd_accuracy(model, data.test, eps)}

    def masks_of(model) -> list:
        return [layer.mask().detach().clone() for _, layer in prunable_layers(model)]

    base = {**run.prune.model_dump(), "keep_ratio": keep, "rates": rates}
    lwm, _ = load_checkpoint(pretrained)
    prune(lwm, data.train, PruneParams(**{**base, "method": "lwm", "rates": "global" if rates == "learned" else rates}))
    reference = masks_of(lwm)  # LWM's mask (global magnitude for learned rates): the overlap's reference
    for name in names:
        if name in {r["variant"] for r in read_rows(out) if r["keep"] == keep and r["rates"] == rates}:
            continue
        t, c = time.perf_counter(), time.process_time()
        over = dict(VARIANTS[name])
        model, _ = load_checkpoint(pretrained)
        p = PruneParams(**{**base, **over})
        prune(model, data.train, p)
        masks = masks_of(model)
        o = p.optimiser()
        row = {"variant": name, "keep": keep, "rates": rates,
               "prune": {"method": p.method, "optimizer": o.optimizer, "lr": o.lr, "epochs": p.epochs,
                         "weight_decay": o.weight_decay, "score_init": p.score_init},
               "kept": [int(m.sum()) for m in masks], "overlap_with_lwm": overlap(masks, reference),
               "overlap_total": round(sum(float((m * r).sum()) for m, r in zip(masks, reference))
                                      / max(sum(int(m.sum()) for m in masks), 1), 4),
               "pruned": figures(model)}
        train(model, data.train, FinetuneParams(**run.finetune.model_dump()), label=f"finetune {name}")
        row["finetuned"] = figures(model)
        row["cpu_seconds"] = round(time.process_time() - c, 1)
        row["seconds"] = round(time.perf_counter() - t, 1)
        typer.echo(json.dumps(row))
        rows = read_rows(out) + [row]
        atomic_write_bytes(out, "".join(json.dumps(r) + "\n" for r in rows).encode())


if __name__ == "__main__":
    app()
