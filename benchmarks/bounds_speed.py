"""Cost of IBP, CROWN and alpha-CROWN as multiples of one forward pass of the same network on the same batch.

Networks: the two reference networks of ``../shared/oracles/ibp`` (auto_LiRPA's costs on them are in that
folder's README), the embedded default model (cnn_small on 8x8 digits) and cnn_large on 8x8 digits, each
trained for a few epochs on digits (verification cost depends on the number of unstable ReLUs). Timings are the minimum over ``--repeats`` runs of each method, interleaved with the forward pass
so that load from other processes affects both alike.

    python benchmarks/bounds_speed.py [--threads 1] [--batch 32] [--repeats 3] [--budget 0.5] [--wall] [--eps 0.01]
    python benchmarks/bounds_speed.py --suite per-example --eps 0.004 --epochs 1

``--suite per-example``: seconds per example of CROWN and alpha-CROWN (last-layer slopes; the audit's two stages) on
CNN-small and CNN-large at 28x28 and torchvision's ResNet-18 at 32x32, briefly trained on Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bounds import alpha_crown_bounds, crown_bounds, interval_bounds, margin_lower_bounds, margin_spec
from pipeline.graph import as_graph
from pipeline.onnx_load import load_onnx

ORACLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "oracles" / "ibp"


def _digits(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = ORACLES / "ibp_inputs.npz"
    if path.exists():
        d = np.load(path)
        x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    else:
        from sklearn.datasets import load_digits

        dd = load_digits()
        x = torch.tensor(dd.images[:batch] / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(dd.target[:batch])
    reps = -(-batch // len(x))
    return x.repeat(reps, 1, 1, 1)[:batch], y.repeat(reps)[:batch]


def _models(epochs: int) -> list[tuple[str, torch.nn.Module]]:
    nets: list[tuple[str, torch.nn.Module]] = []
    for name in ("mlp", "cnn"):
        if (ORACLES / f"{name}.onnx").exists():
            nets.append((f"oracle {name}", load_onnx(ORACLES / f"{name}.onnx")))
    from pipeline.data import DatasetInfo
    from pipeline.models import build_model

    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    info = DatasetInfo(channels=1, size=8, classes=10, mean=(0.3,), std=(0.3,))
    for arch in ("cnn_small", "cnn_large"):
        torch.manual_seed(0)
        model = build_model(arch, info)
        # a few epochs of plain training: verification cost depends on how many ReLUs are unstable, and a
        # random network has far more of them than a trained one
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            for i in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
                opt.step()
        nets.append((f"{arch} (digits 8x8, {epochs} epochs)", model.eval()))
    return nets


CLOCK = time.thread_time
"""With one torch thread all work runs on the calling thread, so its CPU time excludes the time other processes
hold the cores (the shared CI machine often runs at a load of 10+); ``--wall`` uses wall-clock time instead."""


def _time(fn, forward, budget: float = 0.5, min_repeats: int = 3) -> tuple[float, float]:
    """min over repeats of (fn time, forward time), measured back to back; repeats until ``budget`` seconds."""
    best_fn = best_fwd = float("inf")
    fn()
    forward()
    start, runs = time.perf_counter(), 0
    while runs < min_repeats or time.perf_counter() - start < budget:
        for _ in range(3):
            t = CLOCK()
            forward()
            best_fwd = min(best_fwd, CLOCK() - t)
        t = CLOCK()
        fn()
        best_fn = min(best_fn, CLOCK() - t)
        runs += 1
    return best_fn, best_fwd


def _per_example_models(epochs: int) -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor, int]]:
    """CNN-small and CNN-large at 28x28 (``epochs`` benign epochs on 5,000 Fashion-MNIST images) and torchvision's
    ResNet-18 at 32x32 (the same images padded, in three channels), with test images; the batch per call."""
    import torchvision

    from pipeline.config import DataParams
    from pipeline.data import as_arrays, load_dataset
    from pipeline.models import build_model

    data = load_dataset(DataParams(name="fashion_mnist"))
    x_tr, y_tr = (torch.from_numpy(a) for a in as_arrays(data.train, limit=5000, seed=0))
    x_te, y_te = (torch.from_numpy(a) for a in as_arrays(data.test, limit=64, seed=0))
    rgb32 = lambda x: torch.nn.functional.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # noqa: E731
    nets = []
    for name, model, to_input, batch in (
            ("cnn_small 28x28", build_model("cnn_small", data.info), lambda x: x, 16),
            ("cnn_large 28x28", build_model("cnn_large", data.info), lambda x: x, 4),
            ("torchvision resnet18 32x32", torchvision.models.resnet18(num_classes=10), rgb32, 1)):
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(epochs):
            for i in torch.randperm(len(x_tr)).split(128):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(to_input(x_tr[i])), y_tr[i]).backward()
                opt.step()
        nets.append((name, model.eval(), to_input(x_te[:batch]), y_te[:batch], batch))
    return nets


def per_example(args: argparse.Namespace) -> None:
    """Seconds per example of CROWN (within its work budget, ``pipeline.bounds.crown.DEFAULT_MAX_WORK``),
    alpha-CROWN on the final layer's slopes, and the audit's two-stage alpha-CROWN (final layer for every example,
    every layer's slopes with re-optimised intermediate bounds where the first stage came close), on the margins at
    eps ``--eps``."""
    from pipeline.bounds.alpha import alpha_crown_bounds as alpha

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"eps {args.eps}, {args.alpha_iterations} alpha iterations, wall time")
    print("| network | batch | CROWN s/example | alpha-CROWN (last layer) s/example | alpha-CROWN (two stages, the "
          "audit's) s/example | verified CROWN / alpha last / two stages |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, model, x, y, batch in _per_example_models(args.epochs):
        graph = as_graph(model)
        for prm in graph.parameters():
            prm.requires_grad_(False)
        x_lo, x_hi = (x - args.eps).clamp(0, 1), (x + args.eps).clamp(0, 1)
        spec = margin_spec(y, 10)
        t = time.perf_counter()
        with torch.no_grad():
            crown = margin_lower_bounds(graph, x_lo, x_hi, y, "crown")
        results, times = [crown], [time.perf_counter() - t]
        for stage in ("last", "two"):
            if batch == 1 and not args.deep_alpha:  # ResNet-18: minutes per image; --deep-alpha to measure
                times.append(float("nan"))
                results.append(torch.full_like(crown, float("nan")))
                continue
            t = time.perf_counter()
            with torch.enable_grad():
                if stage == "last":
                    lo = alpha(graph, x_lo, x_hi, spec, iterations=args.alpha_iterations, lower_only=True,
                               intermediate=False)[0]
                else:
                    lo = margin_lower_bounds(graph, x_lo, x_hi, y, "alpha-crown")
            times.append(time.perf_counter() - t)
            results.append(lo)
        counts = " / ".join(str(int((r > 0).all(1).sum())) for r in results)
        print(f"| {name} | {batch} | " + " | ".join(f"{t / batch:.3g}" for t in times) + f" | {counts} of {batch} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("multiples", "per-example"), default="multiples",
                    help="multiples: cost as multiples of a forward pass on digits networks; per-example: seconds "
                         "per example on CNN-small, CNN-large (28x28) and ResNet-18 (32x32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="at least this many timed runs per method")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timed runs per method (at least)")
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--alpha-iterations", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the registry models on digits")
    ap.add_argument("--wall", action="store_true", help="wall-clock instead of thread CPU time")
    ap.add_argument("--deep-alpha", action="store_true", help="per-example suite: alpha-CROWN on ResNet-18 too")
    args = ap.parse_args()
    global CLOCK
    if args.wall or args.threads > 1:
        CLOCK = time.perf_counter
    torch.set_num_threads(args.threads)
    if args.suite == "per-example":
        per_example(args)
        return
    x, y = _digits(args.batch)
    x_lo, x_hi = (x - args.eps).clamp(0, 1), (x + args.eps).clamp(0, 1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch}, eps {args.eps}, {'wall' if CLOCK is time.perf_counter else 'thread CPU'} time")
    print("| network | forward (ms) | IBP | IBP margins | CROWN | CROWN margins | alpha-CROWN margins | "
          "verified IBP / CROWN / alpha |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, model in _models(args.epochs):
        graph = as_graph(model)
        with torch.no_grad():
            def forward():
                return model(x)

            ibp, fwd = _time(lambda: interval_bounds(graph, x_lo, x_hi), forward, args.budget, args.repeats)
            ibp_m, fwd2 = _time(lambda: margin_lower_bounds(graph, x_lo, x_hi, y, "ibp"), forward, args.budget, args.repeats)
            crown, fwd3 = _time(lambda: crown_bounds(graph, x_lo, x_hi), forward, args.budget, args.repeats)
            crown_m, fwd4 = _time(lambda: margin_lower_bounds(graph, x_lo, x_hi, y, "crown"), forward, args.budget, args.repeats)
            fwd = min(fwd, fwd2, fwd3, fwd4)
            spec = margin_spec(y, 10)
            alpha = None

            def run_alpha():
                nonlocal alpha
                with torch.enable_grad():
                    alpha = alpha_crown_bounds(graph, x_lo, x_hi, spec, iterations=args.alpha_iterations,
                                               lower_only=True)[0]

            alpha_t, fwd5 = _time(run_alpha, forward, 0.0, 1)
            fwd = min(fwd, fwd5)
            v_ibp = int((margin_lower_bounds(graph, x_lo, x_hi, y, "ibp") > 0).all(1).sum())
            v_crown = int((margin_lower_bounds(graph, x_lo, x_hi, y, "crown") > 0).all(1).sum())
            v_alpha = int((alpha > 0).all(1).sum())
        print(f"| {name} | {fwd * 1e3:.2f} | {ibp / fwd:.1f}x | {ibp_m / fwd:.1f}x | {crown / fwd:.0f}x | "
              f"{crown_m / fwd:.0f}x | {alpha_t / fwd:.0f}x | {v_ibp} / {v_crown} / {v_alpha} of {len(x)} |", flush=True)


if __name__ == "__main__":
    main()
