"""PNG figures of the HYDRA benchmark (benchmarks/hydra_vs_lwm.py) from its committed JSON results.

- ``hydra_vs_lwm.png``: PGD robust and clean accuracy against sparsity, HYDRA vs LWM, before (dashed) and after
  (solid) finetuning, mean and std over seeds.
- ``weight_histogram.png``: the paper's Fig. 3: |pretrained weights| (normalised per layer) against those kept by
  LWM and by HYDRA, one panel per sparsity (first seed).
- ``hydra_init.png``, ``hydra_epochs.png``, ``hydra_benign.png``: the ablations, when their JSON exists.

Example::

    .venv/bin/python benchmarks/plot_hydra.py --results benchmarks/results
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import typer  # noqa: E402

app = typer.Typer(add_completion=False)


def _load(path: Path) -> list[dict] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _stats(rows: list[dict], method: str, key: str) -> tuple[list[float], list[float], list[float]]:
    xs = sorted({r["sparsity"] for r in rows if r["method"] == method})
    means, sds = [], []
    for s in xs:
        v = [100 * r[key] for r in rows if r["method"] == method and r["sparsity"] == s]
        means.append(statistics.fmean(v))
        sds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
    return [100 * x for x in xs], means, sds


def _save(fig, path: Path) -> None:
    # atomic: a reader never sees a half-written PNG
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    print(f"wrote {path}")


def plot_methods(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "pgd_robust_accuracy", "PGD robust accuracy (%)"),
                              (axes[1], "clean_accuracy", "clean accuracy (%)")):
        for i, m in enumerate(methods):
            colour = f"C{i}"
            x, mu, sd = _stats(rows, m, metric)
            ax.errorbar(x, mu, yerr=sd, marker="o", color=colour, capsize=3, label=f"{m}, finetuned")
            if any(f"pruned_{metric}" in r for r in rows if r["method"] == m):
                x, mu, sd = _stats(rows, m, f"pruned_{metric}")
                ax.errorbar(x, mu, yerr=sd, marker="x", ls="--", color=colour, capsize=3, alpha=0.7,
                            label=f"{m}, before finetuning")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_histograms(hist: list[dict], path: Path) -> None:
    seed = min(r["seed"] for r in hist)
    sparsities = sorted({r["sparsity"] for r in hist})
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.5 * len(sparsities), 3.6), squeeze=False)
    for ax, s in zip(axes[0], sparsities):
        rows = [r for r in hist if r["seed"] == seed and r["sparsity"] == s]
        x = [r["magnitude"] for r in rows]
        width = x[1] - x[0] if len(x) > 1 else 0.025
        for col, colour, label in (("pretrained", "0.6", "pretrained (all)"), ("kept_lwm", "C1", "kept by LWM"),
                                   ("kept_hydra", "C0", "kept by HYDRA")):
            ax.step(x, [r[col] for r in rows], where="mid", color=colour, label=label, lw=1.6)
            ax.fill_between(x, [r[col] for r in rows], step="mid", color=colour, alpha=0.15)
        ax.set_title(f"{100 * s:g}% sparsity (seed {seed})")
        ax.set_xlabel("|w| / max |w| of its layer")
        ax.set_xlim(0, 1 + width / 2)
    axes[0][0].set_ylabel("fraction of weights")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Weights kept: HYDRA keeps some small weights and drops some large ones (CNN-small, digits)")
    _save(fig, path)


def plot_epochs(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(sorted({r["sparsity"] for r in rows})):
        sub = [r for r in rows if r["sparsity"] == s]
        epochs = sorted({r["prune_epochs"] for r in sub})
        for key, ls, what in (("pruned_pgd_robust_accuracy", "--", "before finetuning"),
                              ("pgd_robust_accuracy", "-", "finetuned")):
            mu = [statistics.fmean([100 * r[key] for r in sub if r["prune_epochs"] == e]) for e in epochs]
            ax.plot(epochs, mu, ls=ls, marker="o", color=f"C{i}", label=f"{100 * s:g}% sparsity, {what}")
    ax.set_xlabel("HYDRA score-training epochs (0 = scaled init = LWM mask)")
    ax.set_ylabel("PGD robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_benign(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = statistics.fmean([100 * r["pgd_robust_accuracy"] for r in rows if r["method"] == "dense"])
    ax.axhline(dense, color="0.5", ls=":", label="benign dense network")
    for i, m in enumerate(("hydra", "lwm")):
        x, mu, sd = _stats(rows, m, "pgd_robust_accuracy")
        ax.errorbar(x, mu, yerr=sd, marker="o", color=f"C{i}", capsize=3, label=f"{m} sub-network (no finetuning)")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("PGD robust accuracy (%)")
    ax.set_title("Robust sub-networks inside a benign network")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


@app.command()
def main(results: Annotated[Path, typer.Option(help="folder of the benchmark's JSON files")] =
         Path("benchmarks/results")) -> None:
    if (rows := _load(results / "hydra_vs_lwm.json")) is not None:
        plot_methods(rows, ["hydra", "lwm"], results / "hydra_vs_lwm.png", "HYDRA vs LWM, CNN-small on digits, eps 0.1")
    if (hist := _load(results / "hydra_vs_lwm_weights.json")) is not None:
        plot_histograms(hist, results / "weight_histogram.png")
    if (rows := _load(results / "hydra_init.json")) is not None:
        plot_methods(rows, ["hydra-scaled", "hydra-kaiming"], results / "hydra_init.png",
                     "HYDRA score init: scaled (paper) vs kaiming (random)")
    if (rows := _load(results / "hydra_epochs.json")) is not None:
        plot_epochs(rows, results / "hydra_epochs.png")
    if (rows := _load(results / "hydra_benign.json")) is not None:
        plot_benign(rows, results / "hydra_benign.png")


if __name__ == "__main__":
    app()
