"""Issue 6: every robust objective through pretrain -> prune (hydra, lwm) -> finetune at sparsity 0.9 and 0.99.

For one objective (the same objective in all three stages), pretrain CNN-small on the embedded digits once, then for
each pruning method and keep ratio prune and finetune a copy, and measure on the digits test split (fp32 torch
model, before quantization): clean accuracy, PGD robust accuracy (L-inf, eps), IBP- and CROWN-verified accuracy
(eps), and the Gaussian-smoothed model's certified accuracy (CERTIFY, L2 radii). Stage settings are params.yaml's
unless overridden with --pretrain-epochs / --prune-epochs / --finetune-epochs.

    python benchmarks/objectives.py --objective crown-ibp --out benchmarks/results/objectives_crown-ibp.json
    python benchmarks/objectives.py --table benchmarks/results/objectives_*.json   # the README's table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bounds import verified  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import as_arrays, load_dataset  # noqa: E402
from pipeline.masking import global_sparsity  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.pruning import prune  # noqa: E402
from pipeline.smoothing import certify_report  # noqa: E402
from pipeline.runtime import seed_everything
from pipeline.training import accuracy, pgd_accuracy, train  # noqa: E402


def evaluate(model, data, eps: float, sigma: float, smoothing_n: int, pgd_steps: int, pgd_restarts: int) -> dict:
    model.eval()
    x, y = as_arrays(data.test)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for p in model.parameters():
        p.requires_grad_(False)
    clean_ok = model(xt).argmax(1) == yt
    out = {"clean": accuracy(model, data.test),
           "pgd": pgd_accuracy(model, data.test, eps, steps=pgd_steps, restarts=pgd_restarts)}
    for method in ("ibp", "crown"):
        out[method] = float((verified(model, xt, yt, eps, method) & clean_ok).float().mean())
    sm = certify_report(model, xt, y, sigma, [0.25, 0.5], n0=100, n=smoothing_n, alpha=0.001)
    out["smoothing"] = sm["certified_accuracy"]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.endswith("scores"))
    return out


def run(objective: str, args) -> dict:
    params = load_params(args.params)
    data = load_dataset(params.data)
    upd = {"objective": objective}
    pre = params.pretrain.model_copy(update={**upd, **({"epochs": args.pretrain_epochs} if args.pretrain_epochs is not None else {})})
    seed_everything(pre.seed)
    model = build_model(params.model.arch, data.info)
    t = time.perf_counter()
    train(model, data.train, pre, label="pretrain")
    rows = [{"objective": objective, "method": "dense", "keep_ratio": 1.0, "sparsity": 0.0,
             "seconds": time.perf_counter() - t,
             **evaluate(model, data, pre.eps, args.sigma, args.smoothing_n, args.pgd_steps, args.pgd_restarts)}]
    print(json.dumps(rows[-1]), flush=True)
    for method in args.methods:
        for keep in args.keep:
            m = copy.deepcopy(model)
            pp = params.prune.model_copy(update={**upd, "method": method, "keep_ratio": keep,
                                                 **({"epochs": args.prune_epochs} if args.prune_epochs is not None else {})})
            ft = params.finetune.model_copy(update={**upd, **({"epochs": args.finetune_epochs} if args.finetune_epochs is not None else {})})
            t = time.perf_counter()
            prune(m, data.train, pp)
            train(m, data.train, ft, label="finetune")
            rows.append({"objective": objective, "method": method, "keep_ratio": keep, "sparsity": global_sparsity(m),
                         "seconds": time.perf_counter() - t,
                         **evaluate(m, data, pre.eps, args.sigma, args.smoothing_n, args.pgd_steps, args.pgd_restarts)})
            print(json.dumps(rows[-1]), flush=True)
    return {"objective": objective, "settings": {k: v for k, v in vars(args).items() if k not in ("table",)},
            "epochs": {"pretrain": pre.epochs, "prune": pp.epochs, "finetune": ft.epochs}, "rows": rows}


def table(paths: list[str]) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["| objective | method | sparsity | clean | PGD | IBP verified | CROWN verified | smoothed cert. r=0.25 / 0.5 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in paths:
        res = json.loads(Path(path).read_text())
        for r in res["rows"]:
            sm = r["smoothing"]
            lines.append(f"| {r['objective']} | {r['method']} | {r['sparsity']:.3f} | {pct(r['clean'])} | {pct(r['pgd'])} "
                         f"| {pct(r['ibp'])} | {pct(r['crown'])} | {pct(sm['0.25'])} / {pct(sm['0.5'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", default="crown-ibp")
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--methods", nargs="+", default=["hydra", "lwm"])
    ap.add_argument("--keep", nargs="+", type=float, default=[0.1, 0.01])
    ap.add_argument("--pretrain-epochs", type=int)
    ap.add_argument("--prune-epochs", type=int)
    ap.add_argument("--finetune-epochs", type=int)
    ap.add_argument("--sigma", type=float, default=0.25, help="noise of the smoothed classifier that is certified")
    ap.add_argument("--smoothing-n", type=int, default=1000)
    ap.add_argument("--pgd-steps", type=int, default=50)
    ap.add_argument("--pgd-restarts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--table", nargs="*")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    os.environ.setdefault("HYDRA_PIPE_QUIET", "1")
    torch.set_num_threads(args.threads)
    res = run(args.objective, args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
