"""PGD audit speed and strength: ours vs torchattacks, ART and a plain PyTorch loop, same model, examples, threads.

    .venv/bin/python benchmarks/audit_speed.py --n 100 --peer-n 20 --out benchmarks/results/audit_speed.json

Model: ``models/quantized.onnx`` from ``dvc repro`` when it exists (``--model``), else a 57k-parameter CNN
(Conv(16,3)-Conv(32,3,s2)-Fc(100)-Fc(10)) trained here on digits with PGD adversarial training (eps 0.1), so that
the robust accuracy is not trivially 0. Examples: the first ``--n`` of the digits test split.

Contenders, every one on 1 thread (``--threads``), L-inf, eps ``--eps``, the same constant step ``2.5 eps /
min(steps, 100)``:
- ``ours``: :func:`pipeline.audit.run.run_audit` on the ONNX file (load, clean accuracy on onnxruntime, IBP and CROWN
  verification, PGD with margin loss confirmed on onnxruntime; Square off since peers have none), wall time of
  the whole call; plus ablations of :func:`pipeline.attacks.pgd_attack` on the same module.
- ``torchattacks``: ``torchattacks.PGD`` called once per restart on the whole batch; an example is broken when any
  restart's final iterate is misclassified.
- ``art``: ART's ``ProjectedGradientDescent(num_random_init=restarts)`` with a ``PyTorchClassifier``.
- ``plain``: the textbook loop, restarts one after another over the whole batch, margin loss, worst case over
  every iterate (what ours computes, without batching restarts or any exit).
Peers get the torch module directly (the native ``nn.Sequential`` for the trained model). The physical floor is
``steps x restarts x`` one forward+backward of the model on the batch of examples (median of 50).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.attacks import AttackOptions, default_step_size, pgd_attack, pgd_perturb  # noqa: E402
from pipeline.audit.run import run_audit  # noqa: E402
from pipeline.config import QUICK_ATTACKS, AuditParams  # noqa: E402
from pipeline.data import digits_arrays  # noqa: E402


def cnn57k() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(512, 100), nn.ReLU(), nn.Linear(100, 10))


def train_default(x: np.ndarray, y: np.ndarray, eps: float = 0.1, epochs: int = 30, seed: int = 0) -> nn.Module:
    """PGD adversarial training (Madry et al.), 7 steps, eps ramped over the first third."""
    torch.manual_seed(seed)
    model = cnn57k()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for ep in range(epochs):
        perm = torch.randperm(len(xt))
        e = eps * min(1.0, (ep + 1) / (epochs / 3))
        for i in range(0, len(perm), 64):
            xb, yb = xt[perm[i:i + 64]], yt[perm[i:i + 64]]
            model.eval()
            xa = pgd_perturb(model, xb, yb, e, 2.5 * e / 7, 7)
            model.train()
            loss = F.cross_entropy(model(xa), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    torch.onnx.export(model, torch.zeros(1, 1, 8, 8), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17)


def floor_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int = 50) -> float:
    """One forward+backward (gradient w.r.t. the input only) of the batch: the unit of any PGD's cost."""
    times = []
    for _ in range(reps + 5):
        t = time.perf_counter()
        xr = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xr), y)
        torch.autograd.grad(loss, xr)
        times.append(time.perf_counter() - t)
    return statistics.median(times[5:])


def margin_grad(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    other = z.detach().clone()
    other[torch.arange(len(y)), y] = -torch.inf
    return other.max(1).values - z.gather(1, y[:, None]).squeeze(1)


def plain_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
              restarts: int, seed: int = 0) -> torch.Tensor:
    """The textbook loop: restart after restart over the whole batch, worst case over every iterate."""
    torch.manual_seed(seed)
    with torch.no_grad():
        broken = model(x).argmax(1) != y
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    for _ in range(restarts):
        xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for t in range(steps + 1):
            xa.requires_grad_(True)
            z = model(xa)
            broken |= z.detach().argmax(1) != y
            if t == steps:
                break
            (g,) = torch.autograd.grad(margin_grad(z, y).sum(), xa)
            xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), lo), hi)
    return ~broken


def torchattacks_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                     restarts: int, seed: int = 0) -> torch.Tensor:
    import torchattacks

    torch.manual_seed(seed)
    atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    with torch.no_grad():
        broken = model(x).argmax(1) != y
    for _ in range(restarts):
        xa = atk(x, y)
        with torch.no_grad():
            broken |= model(xa).argmax(1) != y
    return ~broken


def art_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
            restarts: int, seed: int = 0) -> torch.Tensor:
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    np.random.seed(seed)
    torch.manual_seed(seed)
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    atk = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                   num_random_init=restarts, batch_size=len(x), verbose=False)
    xa = atk.generate(x=x.numpy(), y=y.numpy())
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        return clean & (model(torch.as_tensor(xa)).argmax(1) == y)


PEERS = {"plain": plain_pgd, "torchattacks": torchattacks_pgd, "art": art_pgd}


# ---------------------------------------------------------------------------------------------------------------
# --suite autoattack: the whole audit and its attack part against AutoAttack and torchattacks' PGD
# ---------------------------------------------------------------------------------------------------------------

def fashion_model(work: Path, epochs: int, threads: int, seed: int = 0) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """CNN-small PGD-trained on Fashion-MNIST (eps 0.1, PGD-10, ``epochs`` over the 60,000 training images, torch
    seeded with ``seed``) by this script (cached in ``work``), and the test split."""
    from pipeline.config import DataParams, TrainParams
    from pipeline.data import as_arrays, load_dataset
    from pipeline.masking import plain_copy
    from pipeline.models import build_model
    from pipeline.training import train

    data = load_dataset(DataParams(name="fashion_mnist"))
    model = build_model("cnn_small", data.info)
    weights = work / f"fashion_cnn_small_pgd_{epochs}{f'_seed{seed}' if seed else ''}.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        t = time.perf_counter()
        torch.manual_seed(seed)
        train(model, data.train, TrainParams(objective="pgd", epochs=epochs, batch_size=128, lr=0.05, eps=0.1,
                                             attack_steps=10, eps_ramp=0.0, seed=seed))
        print(f"trained the Fashion-MNIST model in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        torch.save(model.state_dict(), weights)
    x, y = as_arrays(data.test)
    return plain_copy(model).eval(), x, y


def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's test split (images N x 1 x 28 x 28 in [0, 1], labels)."""
    from pipeline.config import DataParams
    from pipeline.data import as_arrays, load_dataset

    return as_arrays(load_dataset(DataParams(name="fashion_mnist")).test)


def resnet18_model(work: Path, x_tr: np.ndarray, y_tr: np.ndarray) -> nn.Module:
    """torchvision's ResNet-18 (10 classes) at 32x32, trained briefly (one benign epoch on ``x_tr``)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    weights = work / "resnet18_32.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
        xt, yt = torch.as_tensor(x_tr), torch.as_tensor(y_tr)
        model.train()
        for i in range(0, len(xt), 128):
            loss = F.cross_entropy(model(xt[i:i + 128]), yt[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), weights)
    return model.eval()


def to_rgb32(x: np.ndarray) -> np.ndarray:
    """28x28 grey images -> 3 x 32 x 32 (zero padding, the grey value in every channel)."""
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.ascontiguousarray(np.repeat(x, 3, axis=1))


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, confirm) -> torch.Tensor:
    """torchattacks' AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square 5000), judged on the deployed
    numerics (``confirm``: onnxruntime); returns the robust flags."""
    import torchattacks

    atk = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    x_adv = atk(x, y)
    x, y = x.cpu(), y.cpu()  # on CUDA (benchmarks/gpu.py): onnxruntime's confirmation takes numpy
    return torch.as_tensor(confirm(x_adv.detach().cpu().numpy()).argmax(1) == y.numpy()) & \
        torch.as_tensor(confirm(x.numpy()).argmax(1) == y.numpy())


def torchattacks_pgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int,
                        confirm) -> torch.Tensor:
    """torchattacks.PGD (cross-entropy, random start) once per restart; robust unless some restart's final iterate
    is misclassified on the deployed numerics."""
    import torchattacks

    robust = torch.as_tensor(confirm(x.numpy()).argmax(1) == y.numpy())
    atk = torchattacks.PGD(model, eps=eps, alpha=default_step_size(eps, steps), steps=steps, random_start=True)
    for r in range(restarts):
        torch.manual_seed(r)
        robust &= torch.as_tensor(confirm(atk(x, y).detach().numpy()).argmax(1) == y.numpy())
    return robust


CONTENDERS = ("attacks", "audit", "quick", "aa", "pgd_peer", "autoattack")
"""``--contenders`` of the autoattack suite: ours with every attack (``attacks``), the whole audit (``audit``; not on
ResNet-18), the quick preset (``quick``), the AutoAttack-equivalent part (``aa``: APGD-CE, APGD-T, Square, no
verifier), PGD at the peers' budget with torchattacks' PGD (``pgd_peer``); AutoAttack itself (``autoattack``)
always runs, as every row's anchor."""
AA_ATTACKS = QUICK_ATTACKS  # APGD-CE, APGD-T, Square: the quick preset's attacks, without its verifiers


def contenders(spec: str) -> set[str]:
    """The contenders of a ``--contenders`` list (comma separated, names of :data:`CONTENDERS`)."""
    chosen = {c.strip() for c in spec.split(",") if c.strip()}
    unknown = chosen - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    return chosen


def autoattack_suite(args: argparse.Namespace) -> dict:
    """Per model: ours (attack part: every attack, no verifier; whole audit: defaults), AutoAttack standard, and
    at the peers' budget (``--peer-budget``) ours PGD alone against torchattacks' PGD; same examples, threads."""
    from pipeline.onnx_io import export_onnx, ort_logits, ort_session
    from pipeline.onnx_load import load_onnx

    torch.set_num_threads(args.threads)
    work = args.work
    models = []
    if "default" in args.models and Path("models/quantized.onnx").exists():
        x_tr, y_tr, x_te, y_te = digits_arrays()
        models.append(("default pipeline int8 (digits)", Path("models/quantized.onnx"),
                       load_onnx(Path("models/quantized.onnx")).eval(), x_te[:args.n], y_te[:args.n], 0.1))
    if "fashion" in args.models or "resnet18" in args.models:
        if "fashion" in args.models:
            fashion, fx, fy = fashion_model(work, args.fashion_epochs, args.threads, args.fashion_seed)
        else:  # ResNet-18 alone needs only the test split, not the PGD-trained CNN
            fx, fy = fashion_test()
        if "fashion" in args.models:
            path = work / "fashion_cnn_small.onnx"
            export_onnx(fashion, path, (1, 28, 28))
            models.append((f"Fashion-MNIST CNN-small, PGD-trained here ({args.fashion_epochs} epochs, seed "
                           f"{args.fashion_seed})", path, fashion, fx[:args.n], fy[:args.n], 0.1))
        if "resnet18" in args.models:
            from pipeline.data import as_arrays, load_dataset
            from pipeline.config import DataParams

            tr = load_dataset(DataParams(name="fashion_mnist")).train
            xr, yr = as_arrays(tr, limit=5000, seed=0)
            resnet = resnet18_model(work, to_rgb32(xr), yr)
            path = work / "resnet18_32.onnx"
            export_onnx(resnet, path, (3, 32, 32))
            models.append(("torchvision ResNet-18 at 32x32 (one benign epoch, 5k Fashion-MNIST images)", path,
                           resnet, to_rgb32(fx[:args.resnet_n]), fy[:args.resnet_n], args.resnet_eps))
    rows = []
    p_steps, p_restarts = (int(v) for v in args.peer_budget.split("x"))
    for name, path, module, x, y, eps in models:
        for prm in module.parameters():
            prm.requires_grad_(False)
        session = ort_session(path, threads=args.threads)
        confirm = lambda xs: ort_logits(session, xs)  # noqa: E731
        xs, ys = torch.as_tensor(x), torch.as_tensor(y)
        line: dict = dict(model=name, n=len(x), eps=eps)
        base = dict(eps=eps, threads=args.threads, n_examples=None, batch_size=args.batch_size)
        heavy = "ResNet" in name
        chosen = contenders(args.contenders)
        runs = []
        if "attacks" in chosen:
            runs.append(("ours_attacks", AuditParams(**base, ibp=False, crown=False, alpha_crown=False, bab=False)))
        if "aa" in chosen:  # issue 26's goal: the AutoAttack-equivalent attacks alone, no verifier, no card's PGD
            runs.append(("ours_aa", AuditParams(**base, attacks=list(AA_ATTACKS), ibp=False, crown=False,
                                                alpha_crown=False, bab=False)))
        if "audit" in chosen and not heavy:
            runs.append(("ours_audit", AuditParams(**base)))
        if "quick" in chosen:  # the CI gate's preset: AutoAttack's attacks and IBP + CROWN
            runs.append(("ours_quick", AuditParams(**base, budget="quick")))
        if "pgd_peer" in chosen:
            runs.append(("ours_pgd_peer_budget", AuditParams(**base, steps=p_steps, restarts=p_restarts,
                                                             attacks=["pgd"], ibp=False, crown=False,
                                                             alpha_crown=False, bab=False)))
        for label, params in runs:
            cpu = time.process_time()
            rep = run_audit(path, x, y, params, progress=False)
            # CPU seconds too: on a shared machine (other jobs on the cores) the wall time is noisy
            line[label] = dict(seconds=rep.seconds.total, cpu_seconds=time.process_time() - cpu,
                               robust=rep.robust_accuracy,
                               verified=rep.verified_accuracy, decided=rep.decided.model_dump(),
                               attacks=[a.model_dump() for a in rep.attacks],
                               parts={k: v for k, v in rep.seconds.model_dump().items() if k != "total" and v is not None})
            print(name, label, line[label], file=sys.stderr, flush=True)
        t, cpu = time.perf_counter(), time.process_time()
        robust = autoattack(module, xs, ys, eps, confirm)
        line["autoattack"] = dict(seconds=time.perf_counter() - t, cpu_seconds=time.process_time() - cpu,
                                  robust=float(robust.float().mean()))
        print(name, "autoattack", line["autoattack"], file=sys.stderr, flush=True)
        if "pgd_peer" in chosen:
            t = time.perf_counter()
            robust = torchattacks_pgd_ce(module, xs, ys, eps, p_steps, p_restarts, confirm)
            line["torchattacks_pgd_peer_budget"] = dict(seconds=time.perf_counter() - t,
                                                        robust=float(robust.float().mean()))
            print(name, "torchattacks pgd", line["torchattacks_pgd_peer_budget"], file=sys.stderr, flush=True)
        line["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        line["load_average"] = os.getloadavg()
        rows.append(line)
    return dict(suite="autoattack", threads=args.threads, peer_budget=args.peer_budget,
                machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                load_average=os.getloadavg(), rows=rows)


_CONTENDERS = (("ours_attacks", "**ours, attacks** (APGD-CE, APGD-T, PGD 1000 x 100, Square 5000)"),
               ("ours_audit", "**ours, whole audit** (defaults)"),
               ("ours_quick", "**ours, `--budget quick`** (APGD-CE, APGD-T, Square 5000; IBP + CROWN)"),
               ("ours_aa", "**ours, AutoAttack-equivalent part** (APGD-CE, APGD-T, Square 5000; no verifier)"),
               ("autoattack", "AutoAttack standard (torchattacks)"),
               ("ours_pgd_peer_budget", "ours, PGD {budget}"),
               ("torchattacks_pgd_peer_budget", "torchattacks PGD {budget}"))


def autoattack_table(result: dict) -> str:
    """benchmarks/README.md's table of an ``--suite autoattack`` result: per model and contender, wall seconds, the
    ratio to AutoAttack, robust and verified accuracy, undecided examples; then where the time went."""
    budget = result.get("peer_budget", "50x10").replace("x", " x ")
    lines = ["| model (examples, eps) | contender | wall s | x AutoAttack | robust acc. | verified | undecided |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for row in result["rows"]:
        label = f"{row['model']} ({row['n']}, {row['eps']:.3g})"
        aa = row.get("autoattack", {}).get("seconds")
        for key, name in _CONTENDERS:
            c = row.get(key)
            if c is None:
                continue
            ratio = f"{c['seconds'] / aa:.1f}" if aa else "-"
            verified = f"{100 * c['verified']:.1f}%" if c.get("verified") is not None else "-"
            undecided = str(c["decided"]["undecided"]) if c.get("decided") and c.get("verified") is not None else "-"
            lines.append(f"| {label} | {name.format(budget=budget)} | {c['seconds']:.1f} | {ratio} | "
                         f"{100 * c['robust']:.1f}% | {verified} | {undecided} |")
        for key in ("ours_attacks", "ours_audit", "ours_aa"):
            if key in row:
                parts = ", ".join(f"{k} {v:.1f} s" for k, v in row[key]["parts"].items() if v >= 0.5)
                # the parts are named apgd-ce, apgd-ce_twin (older results) or apgd_ce, apgd_ce_twin
                attack = sum(v for k, v in row[key]["parts"].items()
                             if k.replace("_", "-").removesuffix("-twin") in ("apgd-ce", "apgd-t", "pgd", "square"))
                notes.append(f"- {row['model']}, {key.replace('_', ' ')}: {parts} (attacks {attack:.1f} s)")
        cpu = [f"{key.replace('_', ' ')} {row[key]['cpu_seconds']:.1f} s" for key, _ in _CONTENDERS
               if "cpu_seconds" in row.get(key, {})]
        if cpu:  # on a shared machine the CPU seconds are the steadier figure
            notes.append(f"- {row['model']}, CPU seconds: {', '.join(cpu)}")
    dates = [f"{row['model']} {row['measured']}" for row in result["rows"] if "measured" in row]
    if dates:  # rows from different runs (--update): each row's contenders still ran back to back
        notes.append(f"- measured: {'; '.join(dates)}")
    return "\n".join(lines + ["", "Where the time went (seconds per part):"] + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=("pgd", "autoattack"), default="pgd",
                    help="pgd: PGD speed against peers and the exits' ablation; autoattack: the audit against "
                         "AutoAttack standard and torchattacks' PGD on three models")
    ap.add_argument("--models", default="default,fashion,resnet18", help="autoattack suite: the models")
    ap.add_argument("--fashion-epochs", type=int, default=3, help="autoattack suite: PGD-training epochs")
    ap.add_argument("--fashion-seed", type=int, default=0, help="autoattack suite: the Fashion-MNIST model's seed")
    ap.add_argument("--contenders", default="attacks,audit,quick,pgd_peer",
                    help="autoattack suite: ours besides AutoAttack (attacks, audit, quick, aa: the "
                         "AutoAttack-equivalent part, pgd_peer: also torchattacks' PGD at the peer budget; "
                         "autoattack: accepted, it always runs)")
    ap.add_argument("--resnet-n", type=int, default=50, help="autoattack suite: examples for ResNet-18")
    ap.add_argument("--resnet-eps", type=float, default=2 / 255, help="autoattack suite: eps for ResNet-18")
    ap.add_argument("--peer-budget", default="50x10", help="autoattack suite: PGD steps x restarts for both")
    ap.add_argument("--model", type=Path, default=Path("models/quantized.onnx"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--peer-n", type=int, default=20, help="examples for peers at the large budget")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", default="50x10,1000x100", help="steps x restarts, comma separated")
    ap.add_argument("--peers", default="plain,torchattacks,art")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hydra_audit_bench")
    ap.add_argument("--update", action="store_true",
                    help="autoattack suite: replace only the rows of the models run in --out, keep the others")
    ap.add_argument("--table", type=Path, default=None,
                    help="print benchmarks/README.md's table of an --suite autoattack results file, and exit")
    args = ap.parse_args()
    if args.table is not None:
        print(autoattack_table(json.loads(args.table.read_text())))
        return
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.suite == "autoattack":
        result = autoattack_suite(args)
        if args.update and args.out is not None and args.out.exists():  # the other models' rows stay as measured
            fresh = {row["model"]: row for row in result["rows"]}
            kept = [fresh.pop(row["model"], row) for row in json.loads(args.out.read_text())["rows"]]
            result["rows"] = kept + list(fresh.values())
        _write(result, args.out)
        return
    x_tr, y_tr, x_te, y_te = digits_arrays()
    x, y = x_te[:args.n], y_te[:args.n]

    if args.model.exists():
        from pipeline.onnx_load import load_onnx

        onnx_path, peer_model, model_name = args.model, load_onnx(args.model).eval(), str(args.model)
    else:
        onnx_path = args.work / "cnn57k_pgd.onnx"
        weights = args.work / "cnn57k_pgd.pt"
        peer_model = cnn57k()
        if weights.exists():
            peer_model.load_state_dict(torch.load(weights, weights_only=True))
        else:
            t = time.perf_counter()
            peer_model = train_default(x_tr, y_tr)
            print(f"trained the default model in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            torch.save(peer_model.state_dict(), weights)
        peer_model.eval()
        export(peer_model, onnx_path)
        model_name = "cnn57k (PGD-AT eps 0.1, trained by this script)"
    for p in peer_model.parameters():
        p.requires_grad_(False)

    rows = []
    for budget in args.budgets.split(","):
        steps, restarts = (int(v) for v in budget.split("x"))
        alpha = default_step_size(args.eps, steps)
        large = steps * restarts > 50_000
        subsets = [args.n] if not large or args.peer_n >= args.n else [args.peer_n, args.n]
        for n in subsets:
            xs, ys = torch.as_tensor(x[:n]), torch.as_tensor(y[:n])
            floor = floor_seconds(peer_model, xs, ys) * steps * restarts
            line = dict(budget=budget, n=n, floor_s=floor)
            # ours: the whole audit call (verification included), then peers back to back
            params = AuditParams(eps=args.eps, steps=steps, restarts=restarts, square_queries=0,
                                 batch_size=args.batch_size, threads=args.threads)
            rep = run_audit(onnx_path, x[:n], y[:n], params, progress=False)
            line["ours"] = dict(seconds=rep.seconds.total, robust=rep.pgd_robust_accuracy,
                                pgd_seconds=rep.seconds.pgd, work=rep.attack_work, settled=rep.settled.model_dump() if rep.settled else None)
            print(budget, n, "ours", line["ours"], file=sys.stderr, flush=True)
            if n == subsets[0]:
                for name in args.peers.split(","):
                    t = time.perf_counter()
                    robust = PEERS[name](peer_model, xs, ys, args.eps, alpha, steps, restarts)
                    line[name] = dict(seconds=time.perf_counter() - t, robust=float(robust.float().mean()))
                    print(budget, n, name, line[name], file=sys.stderr, flush=True)
            rows.append(line)
    # ablation of the exits on the large budget (pgd_attack alone, on the module the audit attacks)
    from pipeline.onnx_load import load_onnx

    module = load_onnx(onnx_path).eval()
    steps, restarts = (int(v) for v in args.budgets.split(",")[-1].split("x"))
    n = min(args.peer_n, args.n)
    xs, ys = torch.as_tensor(x[:n]), torch.as_tensor(y[:n])
    ablation = {}
    for label, kw in (("no exits (batched restarts only)", dict(early_exit=False, cycle_exit=False)),
                      ("+ broken examples leave", dict(cycle_exit=False)),
                      ("+ cycling rows leave", dict())):
        if label.startswith("no exits") and steps * restarts * n >= 1_000_000:
            continue  # as long as the plain loop; measured there
        r = pgd_attack(module, xs, ys, args.eps, steps=steps, restarts=restarts,
                       options=AttackOptions(batch_size=args.batch_size, **kw))
        ablation[label] = dict(seconds=r.seconds, robust=r.robust_accuracy, work=r.row_steps / r.budget_row_steps)
        print("ablation", label, ablation[label], file=sys.stderr, flush=True)
    result = dict(model=model_name, eps=args.eps, threads=args.threads, machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), load_average=os.getloadavg(), rows=rows, ablation=ablation)
    _write(result, args.out)


def _write(result: dict, out: Path | None) -> None:
    print(json.dumps(result, indent=1))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
