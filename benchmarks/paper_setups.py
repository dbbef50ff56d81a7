"""Expected compute of the paper's setups (``configs/*.yaml``) per training stage, from measured training steps.

For each config: its network at its data set's input size, one optimiser step of its training objective (PGD-10
adversarial training, or CROWN-IBP) on a random batch, timed after a warm-up; images per second, then the stage's
hours as ``epochs x training images / (images / s)``. Measured here on CPU; a GPU is far faster but not available
to this benchmark, so the CPU hours are an upper bound to plan with, not a prediction for a GPU.

    .venv/bin/python benchmarks/paper_setups.py [--threads 2] [--out benchmarks/results/paper_setups.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_params  # noqa: E402
from pipeline.data import DatasetInfo  # noqa: E402
from pipeline.models import build_model, count_parameters  # noqa: E402
from pipeline.objectives import get_objective  # noqa: E402

TRAIN_IMAGES = {"cifar10": 50_000, "svhn": 73_257, "imagefolder": 1_281_167}
INPUT = {"cifar10": (3, 32, 10), "svhn": (3, 32, 10), "imagefolder": (3, 224, 1000)}


def images_per_second(model: torch.nn.Module, p, info: DatasetInfo, batch: int, repeats: int) -> float:
    loss_fn = get_objective(p.objective)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(batch, info.channels, info.size, info.size)
    y = torch.randint(0, info.classes, (batch,))
    model.train()
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        # mid-ramp: CROWN-IBP then pays for both its IBP and its CROWN bound (at the end of the ramp its CROWN
        # weight is zero and the pass is skipped); PGD costs the same at any progress
        loss = loss_fn(model, x, y, p, p.eps_ramp / 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
    return batch / min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_setups.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for path in sorted(Path("configs").glob("*.yaml")):
        params = load_params(path)
        c, size, classes = INPUT[params.data.name]
        info = DatasetInfo(c, params.data.image_size or size, classes, (0.5,) * c, (0.25,) * c)
        model = build_model(params.model.arch, info)
        batch, repeats = (4, 1) if info.size > 64 else (32, 2)
        t0 = time.perf_counter()
        rate = images_per_second(model, params.pretrain, info, batch, repeats)
        n = TRAIN_IMAGES[params.data.name]
        row = {"config": path.stem, "arch": params.model.arch, "dataset": params.data.name,
               "objective": params.pretrain.objective, "parameters": count_parameters(model),
               "batch": batch, "images_per_s": rate,
               **{f"{stage}_cpu_hours": getattr(params, stage).epochs * n / rate / 3600
                  for stage in ("pretrain", "prune", "finetune")},
               "measure_seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"machine": {"cpu_threads": args.threads, "torch": torch.__version__, "platform": platform.platform()},
           "rows": rows}
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
