"""Deployment that pays off: file size and onnxruntime latency of dense, unstructured and filter-pruned int8 models.

For each network (VGG-16-bn and ResNet-18 at CIFAR size 3x32x32, CNN-small at digits size 1x8x8) the pipeline's own
functions build the variants: dense fp32 (the reference), dense int8, 90% and 99% unstructured (LWM per layer) int8,
and 50% of the filters removed (LWM by L1 norm, ``pipeline.structured``, physically narrowed) in fp32 and int8.
Int8 is ``pipeline.quantization.quantize_int8`` (onnxruntime static QDQ, U8S8, per channel); the compact encoding is
``pipeline.compression`` (``delta``), checked here to give exactly the dense int8 file's logits.

Weights are random (seeded): size and latency depend on the shapes and the sparsity, not on what was learned, and
no CIFAR data ships with the project. Accuracy and robust accuracy are reported for trained models given with
``--trained RUN_DIR`` (a directory where ``hydra-pipe`` ran through ``export``): its shipped ``deploy/model.onnx``
is timed back to back against a dense fp32 export of the same architecture, and its audit figures are copied from
``reports/audit.json``.

Latency: one ``InferenceSession`` per file, ``--threads`` intra-op threads (default 1), inter-op 1; after warm-up,
``--repeats`` rounds in which every variant of one network runs in turn (so contention hits all alike); batch 1 is
the mean of ``--inner`` runs per round; the figure is the median over rounds. Sizes: raw file, xz (LZMA 9e) and zip
(deflate 9). ``size_ratio_vs_dense_fp32`` divides the dense fp32 ONNX file of the same network by the row's file.

    .venv/bin/python benchmarks/deploy.py --out benchmarks/results/deploy.json
    .venv/bin/python benchmarks/deploy.py --models cnn_small --trained /tmp/run --out /tmp/deploy.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

app = typer.Typer(add_completion=False)

SHAPES = {"vgg16_bn": (3, 32), "resnet18": (3, 32), "cnn_small": (1, 8), "cnn_large": (1, 8), "wrn_28_4": (3, 32)}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _info(arch: str):
    from pipeline.data import DatasetInfo

    c, s = SHAPES[arch]
    return DatasetInfo(c, s, 10, (0.5,) * c, (0.25,) * c)


def _weight_sparsity(model) -> float:
    from pipeline.masking import global_sparsity

    return round(global_sparsity(model), 4)


def build_variants(arch: str, work: Path, seed: int = 0) -> list[dict]:
    """The ONNX files of one network: dense fp32 and int8, unstructured 90/99%, filter 50%; sizes checked."""
    import numpy as np
    import torch

    from pipeline.compression import compact_file
    from pipeline.config import PruneParams
    from pipeline.models import build_model
    from pipeline.onnx_io import export_onnx
    from pipeline.pruning import prune
    from pipeline.quantization import quantize_int8
    from pipeline.channels import narrow

    info = _info(arch)
    shape = (info.channels, info.size, info.size)
    calib = np.random.default_rng(seed).random((64, *shape), dtype=np.float32)
    rows: list[dict] = []

    def add(name, model, sparsity, granularity, int8: bool, compact: bool, fp32: bool = False):
        base = work / f"{arch}_{name}"
        export_onnx(model.eval(), base.with_suffix(".fp32.onnx"), shape)
        if fp32:
            rows.append(dict(variant=name, path=base.with_suffix(".fp32.onnx"), sparsity=sparsity,
                             granularity=granularity, bits=32, encoding="dense"))
        if int8:
            quantize_int8(base.with_suffix(".fp32.onnx"), base.with_suffix(".int8.onnx"), calib)
            rows.append(dict(variant=name, path=base.with_suffix(".int8.onnx"), sparsity=sparsity,
                             granularity=granularity, bits=8, encoding="dense"))
        if compact:
            compact_file(base.with_suffix(".int8.onnx"), base.with_suffix(".int8.delta.onnx"))
            rows.append(dict(variant=name, path=base.with_suffix(".int8.delta.onnx"), sparsity=sparsity,
                             granularity=granularity, bits=8, encoding="delta",
                             same_as=str(base.with_suffix(".int8.onnx"))))

    torch.manual_seed(seed)
    dense = build_model(arch, info)
    add("dense", dense, 0.0, "none", int8=True, compact=False, fp32=True)
    for keep in (0.1, 0.01):
        m = build_model(arch, info)
        m.load_state_dict(dense.state_dict())
        prune(m, None, PruneParams(method="lwm", keep_ratio=keep))
        add(f"unstructured_{round(100 * (1 - keep))}", m, _weight_sparsity(m), "weight", int8=True, compact=True)
    m = build_model(arch, info)
    m.load_state_dict(dense.state_dict())
    prune(m, None, PruneParams(method="lwm", granularity="filter", keep_ratio=0.5))
    sparsity = _weight_sparsity(m)
    add("filter_50", narrow(m.eval()), sparsity, "filter", int8=True, compact=True, fp32=True)
    for r in rows:
        r["model"] = arch
        r["input"] = "x".join(map(str, shape))
    return rows


def measure(rows: list[dict], threads: int, repeats: int, inner: int, seed: int = 0) -> None:
    """Latency (median over interleaved rounds) and sizes of every row, in place; checks compact = dense logits."""
    import numpy as np

    from pipeline.compression import archive

    c, s = (int(v) for v in rows[0]["input"].split("x")[:2])
    x = np.random.default_rng(seed + 1).random((64, c, s, s), dtype=np.float32)
    sessions = [_session(r["path"], threads) for r in rows]
    for r, sess in zip(rows, sessions):
        if "same_as" in r:
            ref = _session(Path(r["same_as"]), threads).run(None, {"input": x})[0]
            r["exact_logits_vs_dense_int8"] = bool(np.array_equal(sess.run(None, {"input": x})[0], ref))
        for b in (1, 64):
            sess.run(None, {"input": x[:b]})  # warm-up
    t1: list[list[float]] = [[] for _ in rows]
    t64: list[list[float]] = [[] for _ in rows]
    for _ in range(repeats):
        for i, sess in enumerate(sessions):
            start = time.perf_counter()
            for _ in range(inner):
                sess.run(None, {"input": x[:1]})
            t1[i].append((time.perf_counter() - start) / inner)
            start = time.perf_counter()
            sess.run(None, {"input": x})
            t64[i].append(time.perf_counter() - start)
    ref_bytes = next(r for r in rows if r["variant"] == "dense" and r["bits"] == 32)["path"].stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(rows):
            r["latency_ms_b1"] = round(1000 * statistics.median(t1[i]), 3)
            r["latency_ms_b64"] = round(1000 * statistics.median(t64[i]), 2)
            r["bytes"] = r["path"].stat().st_size
            r["size_ratio_vs_dense_fp32"] = round(ref_bytes / r["bytes"], 1)
            r["xz_bytes"] = archive(r["path"], Path(tmp) / "a.xz")
            r["xz_ratio_vs_dense_fp32"] = round(ref_bytes / r["xz_bytes"], 1)
            r["zip_bytes"] = archive(r["path"], Path(tmp) / "a.zip", "zip")
            r["threads"] = threads
    dense = next(i for i, r in enumerate(rows) if r["variant"] == "dense" and r["bits"] == 32)
    for i, r in enumerate(rows):
        r["speedup_b1_vs_dense_fp32"] = round(statistics.median(t1[dense]) / statistics.median(t1[i]), 2)
        r["speedup_b64_vs_dense_fp32"] = round(statistics.median(t64[dense]) / statistics.median(t64[i]), 2)


def trained_rows(run: Path, work: Path) -> list[dict]:
    """The shipped model of a pipeline run and a dense fp32 export of its architecture (random weights, same shapes)."""
    import torch

    from pipeline.data import DatasetInfo
    from pipeline.models import build_model
    from pipeline.onnx_io import export_onnx, read_metadata

    shipped = run / "deploy" / "model.onnx"
    audit = json.loads((run / "reports" / "audit.json").read_text())
    meta = read_metadata(shipped)
    side = json.loads((run / "models" / "finetuned.json").read_text())
    info = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in side["dataset"].items()})
    torch.manual_seed(0)
    ref = work / f"trained_{meta['arch']}_dense.fp32.onnx"
    export_onnx(build_model(meta["arch"], info).eval(), ref, (info.channels, info.size, info.size))
    common = dict(model=meta["arch"], input=f"{info.channels}x{info.size}x{info.size}", run=str(run))
    figures = dict(accuracy=audit.get("clean_accuracy"), robust_accuracy=audit.get("robust_accuracy"),
                   pgd_robust_accuracy=audit.get("pgd_robust_accuracy"),
                   verified_accuracy=audit.get("verified_accuracy"), audit_n=audit.get("n"), eps=audit.get("eps"),
                   audit_steps=audit.get("steps"), audit_restarts=audit.get("restarts"))
    return [dict(common, variant="dense", path=ref, sparsity=0.0, granularity="none", bits=32, encoding="dense"),
            dict(common, variant=f"trained_{meta.get('granularity', 'weight')}", path=shipped,
                 sparsity=round(float(meta["sparsity"]), 4), granularity=meta.get("granularity", "weight"), bits=8,
                 encoding=meta.get("encoding", "dense"), **figures)]


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="JSON file: one row per variant")] = Path("benchmarks/results/deploy.json"),
    models: Annotated[str, typer.Option(help="comma-separated architectures")] = "vgg16_bn,resnet18,cnn_small",
    trained: Annotated[Optional[list[Path]], typer.Option(help="a pipeline run directory (after export); repeatable")] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads")] = 1,
    repeats: Annotated[int, typer.Option(help="interleaved timing rounds; the median is reported")] = 7,
    inner: Annotated[int, typer.Option(help="batch-1 runs averaged within a round")] = 5,
) -> None:
    """Size and latency of dense, unstructured and filter-pruned variants (see the module docstring)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(1)
    os.environ.setdefault("HYDRA_PIPE_QUIET", "1")
    all_rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        groups = [build_variants(a.strip(), work) for a in models.split(",") if a.strip()]
        groups += [trained_rows(Path(run), work) for run in trained or []]
        for rows in groups:
            measure(rows, threads, repeats, inner)
            for r in rows:
                r.pop("path")
                r.pop("same_as", None)
                r.setdefault("accuracy", None)
                r.setdefault("robust_accuracy", None)
            all_rows += rows
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(all_rows, indent=1))
    os.replace(tmp_out, out)

    table = Table(title=f"deploy: onnxruntime CPU, {threads} thread(s), median of {repeats} rounds")
    for col in ("model", "variant", "bits", "enc", "sparsity", "MB", "x fp32", "xz x", "b1 ms", "b64 ms",
                "speedup b64", "robust acc"):
        table.add_column(col)
    for r in all_rows:
        ra = r.get("robust_accuracy")
        table.add_row(r["model"], r["variant"], str(r["bits"]), r["encoding"], f"{r['sparsity']:.2f}",
                      f"{r['bytes'] / 1e6:.3f}", f"{r['size_ratio_vs_dense_fp32']:g}",
                      f"{r['xz_ratio_vs_dense_fp32']:g}", f"{r['latency_ms_b1']:g}", f"{r['latency_ms_b64']:g}",
                      f"{r['speedup_b64_vs_dense_fp32']:g}", "-" if ra is None else f"{100 * ra:.1f}%")
    Console(width=200).print(table)
    bad = [r for r in all_rows if r.get("exact_logits_vs_dense_int8") is False]
    if bad:
        raise SystemExit(f"compact encoding changed the logits of {[(r['model'], r['variant']) for r in bad]}")


if __name__ == "__main__":
    app()
