"""What every stage shares: the fixed file layout of the DVC pipeline, params and data loading."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch
from torch import nn

from pipeline import distributed
from pipeline.config import Params, load_params, params_hash
from pipeline.data import Splits, load_dataset
from pipeline.errors import HydraPipeError
from pipeline.reporting import metrics_table, show, write_json

MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")
DEPLOY = Path("deploy")

PRETRAINED = MODELS / "pretrained.safetensors"
PRUNED = MODELS / "pruned.safetensors"
FINETUNED = MODELS / "finetuned.safetensors"
FP32_ONNX = MODELS / "finetuned.onnx"
INT8_ONNX = MODELS / "quantized.onnx"
AUDIT_REPORT = REPORTS / "audit.json"
AUDIT_BOUNDS = REPORTS / "bounds.npz"
SHIPPED = DEPLOY / "model.onnx"
MODEL_CARD = DEPLOY / "MODEL_CARD.md"


HEADLINE = {
    "pretrain": ("clean_accuracy", "pgd_robust_accuracy"),
    "prune": ("sparsity", "clean_accuracy", "pgd_robust_accuracy"),
    "finetune": ("sparsity", "clean_accuracy", "pgd_robust_accuracy"),
    "quantize": ("int8_accuracy", "accuracy_drop", "prediction_agreement"),
    "audit": ("clean_accuracy", "pgd_robust_accuracy", "robust_accuracy", "verified_accuracy"),
    "export": ("bytes", "size_ratio_vs_dense_fp32"),
}
"""The figures each stage gives DVC (``metrics/<stage>.json``): what ``dvc metrics show`` and ``dvc exp show``
compare, few enough to fit a terminal. Everything else a stage measures is plain JSON in ``reports/<stage>.json``
(the audit's full report is ``reports/audit.json``) or a plot."""


def write_headline(stage: str, figures: dict) -> None:
    """``metrics/<stage>.json``: the stage's headline figures (:data:`HEADLINE`)."""
    write_json(METRICS / f"{stage}.json", {k: figures[k] for k in HEADLINE[stage]})


def write_figures(stage: str, figures: dict, title: str | None = None) -> dict:
    """The headline figures to ``metrics/<stage>.json``, the rest to ``reports/<stage>.json``, and a table of all
    of them for people. Returns ``figures``."""
    write_headline(stage, figures)
    write_json(REPORTS / f"{stage}.json", {k: v for k, v in figures.items() if k not in HEADLINE[stage]})
    show(metrics_table(title or stage, figures))
    return figures


def setup(params_path: Path) -> tuple[Params, Splits, torch.device]:
    """Validate params first (a bad key stops the stage before anything is read or written), then load data.
    Under torchrun (a training stage with ``compute.workers > 1``) this joins the process group."""
    params = load_params(params_path)
    torch.set_num_threads(params.compute.threads)  # the figures depend on it (see ComputeParams)
    device = distributed.init(params.compute.device)
    return params, load_dataset(params.data), device


# ---------------------------------------------------------------------------------------------------------------
# Several workers (compute.workers > 1): the training stages run under torchrun, launched here when needed

RESUME = Path(".resume")
"""Where a killed stage's progress waits for its rerun: ``.resume/<stage>/`` (a training stage's epoch states, the
audit's journal), under the repo root when DVC runs the stage. Ignored by git and DVC."""


def resume_args(stage: str, params: Params) -> dict:
    """What a training stage hands the training loop (or ``prune``) so that a killed run continues from its last
    epoch, bit for bit: its resume folder, what else the run depends on (data, compute), the compute settings."""
    return {"resume_dir": RESUME / stage, "resume_key": params_hash(params, "compute", "data"),
            "compute": params.compute}


def trained(stage: str, model: nn.Module) -> bool:
    """After training: the workers agree (:func:`ranks_agree`); True on the process that measures and writes."""
    ranks_agree(stage, model)
    return distributed.is_main()


def finished(stage: str) -> None:
    """Every output of ``stage`` is written: its resume folder goes, and ``.resume`` too once no stage's is left."""
    shutil.rmtree(RESUME / stage, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another stage's progress
        RESUME.rmdir()


TRAINING_STAGES = ("pretrain", "prune", "finetune")
WORKER_ENV = "HYDRA_PIPE_WORKER"
"""Set in the workers :func:`launch` starts: they leave the run's one line about a lost worker to the launcher."""
WITHDRAWN_EXIT = 75
"""A worker's exit code when it stopped because another worker failed (nothing printed under :func:`launch`)."""


def ranks_agree(stage: str, model: nn.Module) -> None:
    """With several workers, after training: every rank holds the same parameters (weights, HYDRA scores) and
    frozen masks, or the run stops before rank 0 writes anything (DDP's invariant; a failure is a bug)."""
    if distributed.world() == 1:
        return
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith("weight_mask"))]
    if not distributed.agree(tensors):
        if not distributed.is_main():
            distributed.stop_with_main()
        raise HydraPipeError(f"{stage}: the workers' weights or masks differ after training; nothing was written")


def launch(stage: str, params_path: Path) -> int | None:
    """Run a training stage in ``compute.workers`` processes under torchrun's elastic agent (this node, a free
    port) unless this process already is a torchrun worker; returns the exit code, or None to run the stage here.

    A worker that dies (killed, out of memory) stops the whole run: the agent stops the others, no output is
    written (rank 0 writes only at the end, atomically) and this prints one line and returns 1; a worker's own
    one-line error (exit code 2) is that line."""
    if stage not in TRAINING_STAGES or distributed.launched():
        return None
    params = load_params(params_path)  # bad params: one line here, before any worker starts
    n = params.compute.workers
    if n == 1:
        return None
    import tempfile

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logs = tempfile.TemporaryDirectory(prefix="hydra-pipe-torchrun-")  # the agent's folder, removed afterwards
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"hydra-pipe-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=logs.name))
    os.environ[WORKER_ENV] = "1"  # the workers inherit it
    # the agent's warnings and tracebacks would bury the one line below: mute the handlers its records reach
    muted, log = [], logging.getLogger("torch.distributed.elastic")
    while log is not None:
        muted += [(h, h.level) for h in log.handlers]
        log = log.parent if log.propagate else None
    for h, _ in muted:
        h.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "stages", stage, "--params", str(params_path))
        return 0
    except ChildFailedError as e:
        return _failed(stage, n, e.failures)
    except SignalException:  # SIGINT / SIGTERM to this process: the agent has stopped the workers
        raise KeyboardInterrupt from None
    finally:
        for h, level in muted:
            h.setLevel(level)
        os.environ.pop(WORKER_ENV, None)
        logs.cleanup()


def _failed(stage: str, n: int, failures: dict) -> int:
    codes = {r: f.exitcode for r, f in failures.items()}
    said = sorted(c for c in codes.values() if c in (2, 130))
    if said:  # a worker printed its own line (bad input, a diverged loss, an interrupt)
        return said[0]
    import signal

    # the worker that died (a signal), else one that failed on its own; not those stopped because of it
    cause = sorted((r for r, c in codes.items() if c not in (WITHDRAWN_EXIT, -signal.SIGTERM)),
                   key=lambda r: (codes[r] >= 0, r)) or sorted(codes)
    r = cause[0]
    f, c = failures[r], codes[r]
    try:
        how = f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with code {c}"
    except ValueError:
        how = f"was killed by signal {-c}"
    print(f"error: {stage}: worker {r} of {n} (pid {f.pid}) {how}; the run stopped and no output is partly written "
          "(a rerun resumes from the last finished epoch)", file=sys.stderr)
    return 1
