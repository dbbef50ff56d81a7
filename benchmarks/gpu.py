"""GPU readiness (issue 26, item 4): the audit against AutoAttack on ResNet-18 at 32x32, and one DDP training epoch.

``benchmarks/gpu.sh`` runs the parts of this helper, each under its own time limit, and appends one JSON row to
``benchmarks/results/gpu.json``::

    benchmarks/gpu.sh                 # on a CUDA machine, under 8 minutes
    benchmarks/gpu.sh --cpu-smoke     # a tiny version on the CPU (seconds), to check the script anywhere
    benchmarks/gpu.sh --table         # the table of benchmarks/results/gpu.json

Parts (one subcommand each; ``gpu.sh`` is the only caller that needs to know them):

- ``check``: exit 0 when torch sees a CUDA device; otherwise one line and exit code 2 (``--smoke``: always 0).
- ``audit``: torchvision's ResNet-18 at 32x32 (:func:`audit_speed.resnet18_model`: one benign epoch, here on the
  GPU, on 5,000 Fashion-MNIST training images padded to 32x32 RGB, or digits scaled up where Fashion-MNIST is
  missing), exported to ONNX; then, back to back on the same ``--n`` test images at eps 2/255, every verdict read
  on onnxruntime: ours, the AutoAttack-equivalent part of the audit (APGD-CE, APGD-T with 9 targets, Square 5000;
  no verifier), torchattacks' AutoAttack standard (:func:`audit_speed.autoattack`: APGD-CE, APGD-T, FAB-T,
  Square 5000), and ours with ``--budget quick`` (those attacks plus IBP and CROWN). All of it in plain fp32
  (:func:`pipeline.runtime.full_precision`: no TF32 matmuls or convolutions, no autocast), so that both sides
  run the same arithmetic and the bounds are the fp32 network's. The part file is rewritten after each contender:
  a part stopped by its time limit keeps what finished.
- ``ddp``: the project's own data-parallel training, as README "Several workers" documents it: ``torchrun
  --standalone --nproc_per_node <GPUs> -m stages pretrain`` for one PGD-10 epoch of CNN-small on Fashion-MNIST
  (digits where it is missing), NCCL on CUDA, in a scratch folder (the stage writes ``models/`` and ``metrics/``
  relative to its working directory). Wall time of the whole torchrun call: process start, data loading, the
  epoch, the ranks' agreement check and rank 0's metrics (clean and PGD-20 accuracy on the test split).
- ``collect``: the parts and the machine (device names, torch / CUDA / cuDNN / onnxruntime versions) into one row,
  appended to ``--out`` (write-then-rename), and the row's table.
- ``table``: the table of every row of a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
SMOKE_ENV = "HYDRA_GPU_SMOKE"
NO_CUDA = ("gpu.sh: torch sees no CUDA device; run it on a CUDA machine, or pass --cpu-smoke (or set "
           f"{SMOKE_ENV}=1) for a tiny CPU check")

CONTENDERS = (("ours_aa_part", "ours, AutoAttack-equivalent part (APGD-CE, APGD-T, Square; no verifier)"),
              ("autoattack", "AutoAttack standard (torchattacks)"),
              ("ours_quick", "ours, `--budget quick` (APGD-CE, APGD-T, Square; IBP + CROWN)"))


def write_json(path: Path, obj: dict) -> None:
    """Write-then-rename: a reader (or a part killed by its time limit) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# check

NEEDED = ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "pydantic", "yaml", "sklearn", "scipy",
          "safetensors", "typer", "rich")
"""What the parts import (the project's dependencies but DVC's); ``torchattacks`` (the bench extra) is optional:
without it the AutoAttack contender is skipped, and the row says so."""


def check(args: argparse.Namespace) -> int:
    """Exit 0 when the parts can run here; otherwise one line saying what is missing, exit 2."""
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu.sh: {sys.executable} lacks {', '.join(missing)}: run `make install`, or point PYTHON at an "
              "interpreter that has them (benchmarks/README.md, GPU readiness, says how to carry wheels)",
              file=sys.stderr)
        return 2
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():  # the refusal is the one line: nothing else matters without CUDA
            print(NO_CUDA, file=sys.stderr)
            return 2
    if importlib.util.find_spec("torchattacks") is None:
        print("gpu.sh: torchattacks is missing: the AutoAttack contender will be skipped", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# audit: ours against AutoAttack on ResNet-18 at 32x32

def rgb32_data(train_limit: int, n: int, fashion: bool = True):
    """(x_train, y_train, x_test, y_test, name) as 3 x 32 x 32 images in [0, 1]: Fashion-MNIST padded
    (:func:`audit_speed.to_rgb32`, as the CPU benchmark) where Debian's files are and ``fashion``, else digits
    scaled up 4x."""
    import numpy as np

    from audit_speed import to_rgb32
    from pipeline.config import DataParams
    from pipeline.data import as_arrays, digits_arrays, load_dataset

    if fashion and FASHION_ROOT.is_dir():
        data = load_dataset(DataParams(name="fashion_mnist"))
        x_tr, y_tr = as_arrays(data.train, limit=train_limit, seed=0)
        x_te, y_te = as_arrays(data.test)
        return to_rgb32(x_tr), y_tr, to_rgb32(x_te[:n]), y_te[:n], "fashion_mnist"

    def up(x):  # 8x8 -> 32x32 (nearest), grey in every channel
        return np.ascontiguousarray(np.repeat(x.repeat(4, axis=2).repeat(4, axis=3), 3, axis=1))

    x_tr, y_tr, x_te, y_te = digits_arrays()
    return up(x_tr[:train_limit]), y_tr[:train_limit], up(x_te[:n]), y_te[:n], "digits"


def audit_part(args: argparse.Namespace) -> None:
    import torch

    from audit_speed import autoattack, resnet18_model
    from pipeline.audit.run import run_audit
    from pipeline.config import QUICK_ATTACKS, AuditParams
    from pipeline.onnx_io import export_onnx, ort_logits, ort_session
    from pipeline.runtime import default_device, full_precision

    t_part = time.perf_counter()
    torch.set_num_threads(args.threads)
    dev = default_device()
    smoke = args.smoke
    budget = (dict(apgd_steps=5, apgd_targets=2, square_queries=20) if smoke else {})
    part: dict = dict(model="torchvision ResNet-18 at 32x32", n=args.n, eps=args.eps, device=str(dev),
                      threads=args.threads, budget=budget or "AutoAttack's (APGD 100 steps, 9 targets, Square 5000)",
                      contenders={})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # the smoke run: digits (loads in no time) and a pool of test images to pick clean-correct ones from
    x_tr, y_tr, x, y, data_name = rgb32_data(args.train_n, 64 if smoke else args.n, fashion=not smoke)
    part.update(data=data_name, train_images=len(x_tr))
    with full_precision():  # both sides in plain fp32: the same arithmetic, and the bounds are the fp32 network's
        part["tf32"] = dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32)
        t = time.perf_counter()
        with torch.device(dev):  # resnet18_model builds and trains where the default device says
            module = resnet18_model(work, x_tr, y_tr)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        part["train_seconds"] = time.perf_counter() - t
        if smoke:  # a model trained for seconds gets most images wrong: keep ones it gets right, so attacks run
            with torch.no_grad():
                right = (module(torch.as_tensor(x, device=dev)).argmax(1).cpu().numpy() == y)
            order = sorted(range(len(y)), key=lambda i: not right[i])[:args.n]
            x, y = x[order], y[order]
            part["images"] = (f"{int(right.sum())} of the first {len(right)} test images are right; "
                              f"the first {args.n} of them first")
        path = work / "resnet18_32.onnx"
        export_onnx(module, path, (3, 32, 32))
        for prm in module.parameters():
            prm.requires_grad_(False)
        session = ort_session(path, threads=args.threads)
        part["ort_providers"] = session.get_providers()
        confirm = lambda xs: ort_logits(session, xs)  # noqa: E731
        base = dict(eps=args.eps, threads=args.threads, n_examples=None, batch_size=args.batch_size, **budget)
        runs = {"ours_aa_part": AuditParams(**base, attacks=list(QUICK_ATTACKS), ibp=False, crown=False,
                                            alpha_crown=False, bab=False),
                "ours_quick": AuditParams(**base, budget="quick")}
        # warm-up (CUDA context, kernels, onnxruntime's first runs): not timed, not reported
        run_audit(path, x[:2], y[:2], runs["ours_aa_part"].model_copy(
            update=dict(apgd_steps=2, apgd_targets=1, square_queries=5)), progress=False)
        write_json(args.out, part)
        for label, _ in CONTENDERS:
            if label == "autoattack":
                try:
                    import torchattacks  # noqa: F401  (the bench extra)
                except ImportError:
                    part["contenders"][label] = dict(skipped="torchattacks is not installed (pip install "
                                                             "--no-deps torchattacks==3.5.1)")
                    write_json(args.out, part)
                    continue
                xs, ys = torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev)
                t = time.perf_counter()
                robust = autoattack(module, xs, ys, args.eps, confirm)
                part["contenders"][label] = dict(seconds=time.perf_counter() - t,
                                                 robust=float(robust.float().mean()))
            else:
                rep = run_audit(path, x, y, runs[label], progress=False)
                part["contenders"][label] = dict(
                    seconds=rep.seconds.total, robust=rep.robust_accuracy, verified=rep.verified_accuracy,
                    decided=rep.decided.model_dump(),
                    parts={k: v for k, v in rep.seconds.model_dump().items() if k != "total" and v is not None})
            print("audit", label, json.dumps(part["contenders"][label]), file=sys.stderr, flush=True)
            part["seconds"] = time.perf_counter() - t_part
            write_json(args.out, part)
    part["finished"] = True
    part["seconds"] = time.perf_counter() - t_part
    write_json(args.out, part)


# ---------------------------------------------------------------------------------------------------------------
# ddp: one epoch of the pretrain stage under torchrun

def ddp_part(args: argparse.Namespace) -> int:
    import torch
    import yaml

    smoke = args.smoke
    cuda = torch.cuda.is_available() and not smoke
    # NCCL takes one GPU per rank; on the CPU two gloo ranks exercise DDP's wrap and the sharded batches
    nproc = max(1, torch.cuda.device_count()) if cuda else 2
    data = "fashion_mnist" if FASHION_ROOT.is_dir() and not smoke else "digits"
    pretrain = dict(objective="pgd", epochs=1, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9,
                    weight_decay=0.0005, schedule="cosine", seed=0, eps=0.1, attack_steps=2 if smoke else 10)
    params = dict(compute=dict(threads=1 if smoke else 2, device="cuda" if cuda else "cpu"), data=dict(name=data),
                  model=dict(arch="cnn_small"), pretrain=pretrain)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages", "pretrain", "--params", "params.yaml"]
    part: dict = dict(command=" ".join(["torchrun", *cmd[3:]]), world=nproc, backend="nccl" if cuda else "gloo",
                      data=data, arch="cnn_small", **{k: pretrain[k] for k in ("objective", "epochs", "batch_size",
                                                                                "attack_steps")})
    write_json(args.out, part)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HYDRA_PIPE_QUIET="1")
    log = work / "torchrun.log"
    t = time.perf_counter()
    with log.open("w") as out:
        # a session of its own, so that a time limit stops torchrun's workers with it
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    part.update(seconds=time.perf_counter() - t, returncode=rc, timed_out=rc is None)
    metrics = work / "metrics" / "pretrain.json"
    if rc == 0 and metrics.exists():
        part.update(json.loads(metrics.read_text()))
        report = work / "reports" / "pretrain.json"
        if report.exists():
            part["final_loss"] = json.loads(report.read_text()).get("final_loss")
    else:
        part["log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    write_json(args.out, part)
    print("ddp", json.dumps({k: v for k, v in part.items() if k != "log_tail"}), file=sys.stderr, flush=True)
    return 124 if rc is None else rc  # timeout's code for a time limit


# ---------------------------------------------------------------------------------------------------------------
# collect and table

def machine() -> dict:
    import importlib.metadata

    import onnxruntime
    import torch

    info: dict = dict(torch=torch.__version__, cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                      onnxruntime=onnxruntime.__version__, ort_providers=onnxruntime.get_available_providers(),
                      python=platform.python_version(), cpus=os.cpu_count(), host_cpu=platform.processor() or
                      platform.machine())
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["device"] = info["gpus"][0] + (f" x{len(info['gpus'])}" if len(info["gpus"]) > 1 else "")
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    else:
        info["gpus"] = []
        info["device"] = f"CPU ({info['host_cpu']}, {os.cpu_count()} cores)"
    try:
        info["torchattacks"] = importlib.metadata.version("torchattacks")
    except importlib.metadata.PackageNotFoundError:
        info["torchattacks"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def collect(args: argparse.Namespace) -> None:
    def read(path: Path | None) -> dict | None:
        return json.loads(path.read_text()) if path is not None and path.exists() else None

    row: dict = dict(measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     mode="cpu-smoke" if args.smoke else "cuda", **machine())
    audit, ddp = read(args.audit), read(args.ddp)
    for name, part, rc, limit in (("audit", audit, args.audit_rc, args.audit_limit),
                                  ("ddp", ddp, args.ddp_rc, args.ddp_limit)):
        part = part if part is not None else {}
        part.update(exit_code=rc, limit_s=limit)
        if rc in (124, 137):
            part["stopped_by_time_limit"] = True
        row[name] = part
    aa = (audit or {}).get("contenders", {}).get("autoattack", {}).get("seconds")
    row["ratios_to_autoattack"] = {k: c["seconds"] / aa for k, c in (audit or {}).get("contenders", {}).items()
                                   if aa and k != "autoattack" and "seconds" in c}
    if args.total is not None:
        row["total_seconds"] = args.total
    rows = read(args.out) or {"rows": []}
    rows["rows"].append(row)
    write_json(args.out, rows)
    print(table([row]))
    print(f"\nrow appended to {args.out}")


def table(rows: list[dict]) -> str:
    """One block per row: the machine, then each contender of the audit and the DDP epoch."""
    out = ["| part | contender | wall s | x AutoAttack | robust acc. |", "| --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        a, d = row.get("audit", {}), row.get("ddp", {})
        head = (f"{row['measured']}, {row['mode']}: {row['device']}, torch {row['torch']}, CUDA {row['cuda']}"
                + (f", total {row['total_seconds']:.0f} s" if row.get("total_seconds") is not None else ""))
        out.append(f"| **{head}** | | | | |")
        what = f"audit, ResNet-18 32x32 ({a.get('data', '?')}, {a.get('n', '?')} images, eps {a.get('eps', 0):.3g})"
        aa = a.get("contenders", {}).get("autoattack", {}).get("seconds")
        for key, name in CONTENDERS:
            c = a.get("contenders", {}).get(key)
            if c is None or "seconds" not in c:
                why = (c or {}).get("skipped") or ("stopped by the time limit" if a.get("stopped_by_time_limit")
                                                   else "not run")
                out.append(f"| {what} | {name} | - | - | {why} |")
                continue
            ratio = f"{c['seconds'] / aa:.2f}" if aa else "-"
            out.append(f"| {what} | {name} | {c['seconds']:.1f} | {ratio} | {100 * c['robust']:.1f}% |")
        what = (f"DDP, pretrain 1 epoch ({d.get('objective', '?')}-{d.get('attack_steps', '?')}, "
                f"{d.get('arch', '?')}, {d.get('data', '?')}), {d.get('world', '?')} x {d.get('backend', '?')}")
        if d.get("clean_accuracy") is not None:
            out.append(f"| {what} | torchrun -m stages pretrain (whole call) | {d['seconds']:.1f} | - | "
                       f"clean {100 * d['clean_accuracy']:.1f}%, PGD-20 {100 * d['pgd_robust_accuracy']:.1f}% |")
        else:
            why = "stopped by the time limit" if d.get("timed_out") or d.get("stopped_by_time_limit") else \
                f"failed (exit {d.get('returncode', d.get('exit_code'))})"
            out.append(f"| {what} | torchrun -m stages pretrain | - | - | {why} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    smoke_default = os.environ.get(SMOKE_ENV) == "1"
    p = sub.add_parser("check", help="exit 0 when a CUDA device is present (or --smoke), else one line, exit 2")
    p.add_argument("--smoke", action="store_true", default=smoke_default)
    p = sub.add_parser("audit", help="ours against AutoAttack on ResNet-18 at 32x32")
    p.add_argument("--smoke", action="store_true", default=smoke_default)
    p.add_argument("--n", type=int, default=50, help="test images")
    p.add_argument("--train-n", type=int, default=5000, help="training images of ResNet-18's benign epoch")
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("ddp", help="one pretrain epoch under torchrun")
    p.add_argument("--smoke", action="store_true", default=smoke_default)
    p.add_argument("--limit", type=float, default=120.0, help="seconds before torchrun is stopped")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("collect", help="the parts into one row appended to --out, and its table")
    p.add_argument("--smoke", action="store_true", default=smoke_default)
    p.add_argument("--audit", type=Path)
    p.add_argument("--ddp", type=Path)
    p.add_argument("--audit-rc", type=int)
    p.add_argument("--ddp-rc", type=int)
    p.add_argument("--audit-limit", type=float)
    p.add_argument("--ddp-limit", type=float)
    p.add_argument("--total", type=float)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("table", help="the table of a results file")
    p.add_argument("file", type=Path, nargs="?", default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = ap.parse_args()
    if args.part == "check":
        return check(args)
    if args.part == "table":
        if not args.file.exists():
            print(f"{args.file}: no rows yet (benchmarks/gpu.sh writes them on a CUDA machine)", file=sys.stderr)
            return 2
        print(table(json.loads(args.file.read_text())["rows"]))
        return 0
    return {"audit": audit_part, "ddp": ddp_part, "collect": collect}[args.part](args) or 0


if __name__ == "__main__":
    sys.exit(main())
