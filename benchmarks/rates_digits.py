"""Per-layer allocations on digits, quickly: HYDRA's uniform, global and learned rates against global LWM.

Digits, CNN-small, PGD (eps 0.1) in every stage; one dense network per seed (``PRE`` epochs), then each variant
prunes (``PRU`` score epochs) and finetunes (``FT`` epochs); PGD-20 robust accuracy on the test split before and
after finetuning. ``hydra-global-by-scores`` is HYDRA's global allocation as it was before 2026-12-07 (one threshold
over the scaled scores, whose per-layer scales starve layers); ``hydra-global`` is today's (global magnitude
pruning's counts, the scores choose within each layer). Rows append to the JSON-lines file as they finish.

    PRE=15 PRU=10 FT=5 .venv/bin/python benchmarks/rates_digits.py SEED KEEP OUT.jsonl VARIANT,VARIANT,...
    .venv/bin/python benchmarks/rates_digits.py --table OUT.jsonl [--readme benchmarks/README.md]

Variants: ``METHOD-RATES`` (``hydra-uniform``, ``hydra-global``, ``hydra-learned``, ``lwm-global``, ...) and
``hydra-global-by-scores``. A few CPU minutes per seed on one thread.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HYDRA_PIPE_QUIET", "1")

import torch  # noqa: E402

import pipeline.masking as M  # noqa: E402
from pipeline.config import DataParams, FinetuneParams, PruneParams, TrainParams  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.masking import keep_counts, masked_layers  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.pruning import prune  # noqa: E402
from pipeline.training import accuracy, pgd_accuracy, train  # noqa: E402


def by_scores(layers, keep_ratio, rates="uniform"):
    """The allocation before 2026-12-07: one threshold over the scaled scores."""
    for (_, layer), k in zip(layers, keep_counts([l.scores for _, l in layers], keep_ratio, rates)):
        layer.set_keep(k)


def main(seed: int, keep: float, out: Path, variants: list[str]) -> None:
    torch.set_num_threads(1)
    env = {k: int(os.environ.get(k, d)) for k, d in (("PRE", 15), ("PRU", 10), ("FT", 5))}
    data = load_dataset(DataParams(name="digits"))
    torch.manual_seed(seed)
    base = build_model("cnn_small", data.info)
    train(base, data.train, TrainParams(objective="pgd", epochs=env["PRE"], seed=seed, eps=0.1, lr=0.05,
                                        optimizer="sgd", momentum=0.9, weight_decay=5e-4, schedule="cosine"),
          label="pretrain")
    current = M.set_score_keep
    for v in variants:
        model = copy.deepcopy(base)
        method, rates = v.split("-")[:2]
        M.set_score_keep = by_scores if v.endswith("-by-scores") else current
        t = time.process_time()
        try:
            prune(model, data.train, PruneParams(method=method, rates=rates, keep_ratio=keep, epochs=env["PRU"],
                                                 seed=seed, eps=0.1, objective="pgd"))
        finally:
            M.set_score_keep = current
        before = pgd_accuracy(model, data.test, eps=0.1, steps=20)
        train(model, data.train, FinetuneParams(objective="pgd", epochs=env["FT"], seed=seed, eps=0.1),
              label="finetune")
        row = dict(variant=v, seed=seed, keep=keep, epochs=[env["PRE"], env["PRU"], env["FT"]],
                   kept=[int(l.mask().sum()) for _, l in masked_layers(model)], pgd_before_ft=before,
                   clean=accuracy(model, data.test), pgd20=pgd_accuracy(model, data.test, eps=0.1, steps=20),
                   cpu_s=round(time.process_time() - t, 1))
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


MARKS = ("<!-- generated:rates-digits by `benchmarks/rates_digits.py --table FILE --readme README`; do not edit -->",
         "<!-- /generated:rates-digits -->")


def table(rows: list[dict]) -> str:
    """One line per (keep ratio, epochs, variant): the seeds' mean ± half their range."""
    from stages.figures import mean_spread

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["keep"], tuple(r["epochs"]), r["variant"]), []).append(r)
    lines = ["| keep | epochs (pretrain / prune / finetune) | variant | seeds | kept per layer (first seed) | "
             "PGD-20 before finetuning | clean | PGD-20 |", "| ---: | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for (keep, epochs, variant), g in groups.items():
        lines.append(f"| {100 * keep:g}% | {' / '.join(map(str, epochs))} | {variant} | "
                     f"{', '.join(str(r['seed']) for r in g)} | {' / '.join(map(str, g[0]['kept']))} | "
                     f"{mean_spread([r['pgd_before_ft'] for r in g])} | {mean_spread([r['clean'] for r in g])} | "
                     f"{mean_spread([r['pgd20'] for r in g])} |")
    return "\n".join(lines)


def readme_with_table(readme: str, rows: list[dict]) -> str:
    from stages.figures import replace_block

    return replace_block(readme, MARKS, table(rows))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--table":
        rows = read_rows(Path(sys.argv[2]))
        print(table(rows))
        if len(sys.argv) == 5 and sys.argv[3] == "--readme":
            from pipeline.reporting import atomic_write_bytes

            readme = Path(sys.argv[4])
            atomic_write_bytes(readme, readme_with_table(readme.read_text(), rows).encode())
    elif len(sys.argv) == 5:
        main(int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(","))
    else:
        sys.exit(__doc__)
