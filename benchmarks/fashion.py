"""The HYDRA paper's experiments on Fashion-MNIST at eps = 0.1 (L-inf), with the library's own functions.

Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020, on real 28 x 28 data:
``pipeline.data`` (``fashion_mnist``: 55,000 training images, the 5,000 validation images calibrate int8, the test
split is measured), ``pipeline.models`` (CNN-small, CNN-large), ``pipeline.training.train`` (every stage),
``pipeline.pruning.prune`` (``hydra``, ``lwm``, ``admm``), int8 (``pipeline.onnx_io.export_onnx``,
``pipeline.quantization.quantize_int8``) and the audit's attack part (``pipeline.audit.run.run_audit``: APGD-CE,
APGD-T, then PGD) on the fp32 ONNX model (32-bit rows) and on the int8 model as deployed (8-bit rows).

Experiments (``--experiments``, comma-separated):

- ``adversarial``: PGD adversarial training in every stage; dense, then ``hydra`` / ``lwm`` / ``admm`` at each
  sparsity (90, 95, 99%), each finetuned with the same budget; every arch of ``--archs``; the seeds of ``--seeds``
  at 99%, the first seed elsewhere (the paper's Table 1, and its seed spread at the highest sparsity).
- ``verified``: ``crown-ibp`` in every stage (``--verified-objective ibp`` for IBP), dense and ``hydra`` at 90% and
  99%; the rows add CROWN verified accuracy (``pipeline.bounds`` on fp32, the audit's IBP / CROWN on int8).
- ``benign``: a benign (non-robust) dense network, pruned by ``hydra`` with the PGD objective and no finetuning
  (the paper's robust sub-networks inside non-robust networks), ``lwm`` beside it for comparison.
- ``score_init``: HYDRA's ``scaled`` score initialisation vs ``kaiming`` at 99% (the paper's ablation).

One dense pretrained network per (pretraining objective, arch, seed) is shared by every method of that seed.
Rows: ``experiment, arch, method, sparsity, seed, bits (32 or 8), clean_accuracy, robust_accuracy,
verified_accuracy (null where not measured), eps, n_test, seconds`` (seconds: the training and pruning of that model,
then its evaluation), plus the machine, the thread count and the wall time. The JSON is rewritten atomically after
every model, and a rerun with the same ``--out`` skips the rows already there (a killed run resumes).

Example (smoke test, about 2 minutes on one core)::

    .venv/bin/python benchmarks/fashion.py --train-subset 500 --epochs 1 --n-test 50 --experiments adversarial \\
        --archs cnn_small --sparsities 0.9 --seeds 0 --out /tmp/fashion.json
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)
EXPERIMENTS = ("adversarial", "verified", "benign", "score_init")
EPS = 0.1


def _list(values: list[str], kind=str) -> list:
    return [kind(v.strip()) for item in values for v in item.split(",") if v.strip()]


class Results:
    """The output file: rows keyed by (experiment, arch, method, sparsity, seed, bits), rewritten atomically."""

    KEY = ("experiment", "arch", "method", "sparsity", "seed", "bits")

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.doc = {**header, "rows": []}
        if path.is_file():
            old = json.loads(path.read_text())
            self.doc["rows"] = old.get("rows", [])
            self.doc["wall_seconds_before"] = old.get("wall_seconds", 0.0) + old.get("wall_seconds_before", 0.0)
        self.done = {self.key(r) for r in self.doc["rows"]}

    @classmethod
    def key(cls, row: dict) -> tuple:
        return tuple(round(row[k], 6) if isinstance(row[k], float) else row[k] for k in cls.KEY)

    def has(self, **key) -> bool:
        return self.key(key) in self.done

    def add(self, rows: list[dict], wall: float) -> None:
        from pipeline.reporting import write_json

        for r in rows:
            if self.key(r) not in self.done:
                self.doc["rows"].append(r)
                self.done.add(self.key(r))
        self.doc["wall_seconds"] = wall
        write_json(self.path, self.doc)


def plan(experiments: list[str], archs: list[str], sparsities: list[float], seeds: list[int]) -> list[dict]:
    """Every model to measure: experiment, arch, seed, pretraining objective, method, sparsity, prune overrides."""
    jobs = []
    for exp in experiments:
        for arch in archs:
            if exp == "adversarial":
                for seed in seeds:
                    jobs.append(dict(experiment=exp, arch=arch, seed=seed, pretrain="pgd", method="dense", sparsity=0.0))
                    for s in sparsities:
                        if s == max(sparsities) or seed == seeds[0]:
                            jobs += [dict(experiment=exp, arch=arch, seed=seed, pretrain="pgd", method=m, sparsity=s)
                                     for m in ("hydra", "lwm", "admm")]
            elif exp == "verified":
                jobs.append(dict(experiment=exp, arch=arch, seed=seeds[0], pretrain="verified", method="dense",
                                 sparsity=0.0))
                jobs += [dict(experiment=exp, arch=arch, seed=seeds[0], pretrain="verified", method="hydra", sparsity=s)
                         for s in (0.9, 0.99)]
            elif exp == "benign":
                jobs.append(dict(experiment=exp, arch=arch, seed=seeds[0], pretrain="benign", method="dense",
                                 sparsity=0.0))
                jobs += [dict(experiment=exp, arch=arch, seed=seeds[0], pretrain="benign", method=m, sparsity=s)
                         for s in sparsities for m in ("hydra", "lwm")]
            elif exp == "score_init":
                jobs += [dict(experiment=exp, arch=arch, seed=seeds[0], pretrain="pgd", method=f"hydra-{init}",
                              sparsity=0.99) for init in ("scaled", "kaiming")]
    return jobs


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="JSON results; rows already there are skipped")] =
        Path("benchmarks/results/fashion.json"),
    experiments: Annotated[list[str], typer.Option(help=f"comma-separated: {', '.join(EXPERIMENTS)}")] =
        [",".join(EXPERIMENTS)],
    archs: Annotated[list[str], typer.Option(help="comma-separated architectures")] = ["cnn_small,cnn_large"],
    sparsities: Annotated[list[str], typer.Option(help="comma-separated")] = ["0.9,0.95,0.99"],
    seeds: Annotated[list[str], typer.Option(help="comma-separated; all at the highest sparsity, the first elsewhere")] =
        ["0,1,2"],
    epochs: Annotated[int, typer.Option(min=0, help="epochs of each training stage (pretrain, prune, finetune)")] = 10,
    train_subset: Annotated[int | None, typer.Option(min=10, help="seeded subset of the training images")] = None,
    n_test: Annotated[int, typer.Option(min=1, help="seeded subset of the test split measured")] = 1000,
    attack_steps: Annotated[int, typer.Option(min=1, help="PGD steps of the measurement")] = 50,
    restarts: Annotated[int, typer.Option(min=1, help="PGD random restarts of the measurement")] = 5,
    verified_objective: Annotated[str, typer.Option(help="crown-ibp or ibp")] = "crown-ibp",
    int8: Annotated[bool, typer.Option(help="also measure each model as int8 ONNX (8-bit rows)")] = True,
    root: Annotated[str | None, typer.Option(help="Fashion-MNIST folder (default: Debian's)")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch and onnxruntime threads")] = 1,
) -> None:
    os.environ.setdefault("HYDRA_PIPE_QUIET", "1")
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from pipeline.config import AuditParams, DataParams, FinetuneParams, PruneParams, TrainParams
    from pipeline.data import as_arrays, load_dataset
    from pipeline.errors import HydraPipeError
    from pipeline.masking import global_sparsity, plain_copy
    from pipeline.models import build_model
    from pipeline.pruning import prune
    from pipeline.training import train

    exps = _list(experiments)
    unknown = sorted(set(exps) - set(EXPERIMENTS))
    if unknown:
        raise typer.BadParameter(f"--experiments: unknown {', '.join(unknown)}; expected {', '.join(EXPERIMENTS)}")
    if verified_objective not in ("crown-ibp", "ibp"):
        raise typer.BadParameter("--verified-objective: crown-ibp or ibp")
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        data = load_dataset(DataParams(name="fashion_mnist", root=root))
    except HydraPipeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    train_set = data.train
    if train_subset is not None and train_subset < len(train_set):
        idx = np.sort(np.random.default_rng(0).choice(len(train_set), train_subset, replace=False))
        train_set = Subset(train_set, idx.tolist())
    x_np, y_np = as_arrays(data.test, limit=n_test, seed=0)
    x_cal, _ = as_arrays(data.val if data.val is not None else data.train, limit=500, seed=0)
    header = {"benchmark": "fashion", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__, "eps": EPS,
              "options": {"epochs": epochs, "train_subset": train_subset, "n_test": n_test, "attack_steps": attack_steps,
                          "restarts": restarts, "verified_objective": verified_objective,
                          "train_images": len(train_set)}}
    results = Results(out, header)
    seeds_ = _list(seeds, int)
    jobs = plan(exps, _list(archs), _list(sparsities, float), seeds_)
    dense_cache: dict[tuple, tuple] = {}

    def stage_params(kind: str, objective: str, seed: int) -> dict:
        return {"objective": objective, "epochs": epochs, "seed": seed, "eps": EPS, "attack_steps": 10,
                **({"eps_ramp": 0.5} if kind == "pretrain" and objective in ("ibp", "crown-ibp") else {})}

    def dense(pretrain: str, arch: str, seed: int):
        key = (pretrain, arch, seed)
        if key not in dense_cache:
            objective = verified_objective if pretrain == "verified" else pretrain
            t = time.perf_counter()
            torch.manual_seed(seed)
            model = build_model(arch, data.info)
            train(model, train_set, TrainParams(**stage_params("pretrain", objective, seed)),
                  label=f"pretrain {arch} {objective} seed {seed}")
            dense_cache[key] = (model, time.perf_counter() - t)
        return dense_cache[key]

    def measure(model, verify: bool, bits: int) -> dict:
        """The audit's attack part (APGD-CE, APGD-T, PGD ``attack_steps`` x ``restarts``; no Square) on the model
        as ONNX, fp32 or int8 as deployed, and with ``verify`` its IBP / CROWN verified accuracy: one measurement
        for both bit widths, so their difference is the quantization's alone."""
        from pipeline.audit.run import run_audit
        from pipeline.onnx_io import export_onnx
        from pipeline.quantization import quantize_int8

        model.eval()
        with tempfile.TemporaryDirectory(prefix="hydra-fashion-") as tmp:
            fp32, q8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
            info = data.info
            export_onnx(plain_copy(model).eval(), fp32, (info.channels, info.size, info.size))
            if bits == 8:
                quantize_int8(fp32, q8, x_cal)
            audit = AuditParams(eps=EPS, steps=attack_steps, restarts=restarts, n_examples=None, ibp=verify,
                                crown=verify, alpha_crown=False, bab=False, square_queries=0, sweep_eps=[],
                                threads=threads, attacks=["apgd-ce", "apgd-t", "pgd"])
            report = run_audit(q8 if bits == 8 else fp32, x_np, y_np, audit, progress=False)
        return {"clean_accuracy": report.clean_accuracy, "robust_accuracy": report.robust_accuracy,
                "verified_accuracy": report.verified_accuracy if verify else None}

    for job in jobs:
        bits = [32, 8] if int8 else [32]
        key = {k: job[k] for k in ("experiment", "arch", "method", "sparsity", "seed")}
        if all(results.has(**key, bits=b) for b in bits):
            continue
        verify = job["experiment"] == "verified"
        base, dense_s = dense(job["pretrain"], job["arch"], job["seed"])
        t = time.perf_counter()
        if job["method"] == "dense":
            model, train_s = base, dense_s
        else:
            model = copy.deepcopy(base)
            method, _, init = job["method"].partition("-")
            objective = verified_objective if verify else "pgd"
            p = PruneParams(**{**stage_params("prune", objective, job["seed"]), "method": method,
                               "keep_ratio": round(1.0 - job["sparsity"], 6), "score_init": init or "scaled"})
            prune(model, train_set, p)
            if job["experiment"] != "benign":  # the robust sub-network of a benign network is not finetuned
                train(model, train_set, FinetuneParams(**stage_params("finetune", objective, job["seed"])),
                      label=f"finetune {job['method']} {job['sparsity']:g}")
            train_s = dense_s + time.perf_counter() - t
        rows = []
        for b in bits:
            t = time.perf_counter()
            figures = measure(model, verify, b)
            rows.append({**key, "bits": b, **figures, "eps": EPS, "n_test": len(y_np),
                         "seconds": round(train_s + time.perf_counter() - t, 2),
                         "measured_sparsity": round(global_sparsity(model), 6)})
            typer.echo(f"{job['experiment']:>11} {job['arch']:>9} {job['method']:>13} {job['sparsity']:>5g} "
                       f"seed {job['seed']} {b:>2}-bit: clean {rows[-1]['clean_accuracy']:.3f} robust "
                       f"{rows[-1]['robust_accuracy']:.3f}" + (f" verified {rows[-1]['verified_accuracy']:.3f}"
                                                              if verify else ""))
        results.add(rows, time.perf_counter() - t_start)
    typer.echo(f"{len(results.doc['rows'])} rows in {out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    app()
