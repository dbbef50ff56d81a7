"""A stage command's process lifecycle: a training stage with ``compute.workers > 1`` launches itself under
torchrun's elastic agent (:func:`launch`, the launcher side), and each torchrun worker runs the stage and leaves
cleanly when another worker fails (:func:`run_stage`, the worker side). README "Several workers".

One line per run: a worker's own error (exit code 2) is that line; a worker that dies is named once, by the
launcher; the workers stopped because of it withdraw quietly with :data:`WITHDRAWN_EXIT`.

torch is imported only when a stage runs, so ``hydra-pipe --help`` starts fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import HydraPipeError

ParamsOpt = Annotated[Path, typer.Option("--params", help="the params file (one section per stage)")]
"""The option every stage command takes (and ``hydra-pipe audit`` without MODEL)."""

TRAINING_STAGES = ("pretrain", "prune", "finetune")
WORKER_ENV = "HYDRA_PIPE_WORKER"
"""Set in the workers :func:`launch` starts: they leave the run's one line about a lost worker to the launcher."""
WITHDRAWN_EXIT = 75
"""A worker's exit code when it stopped because another worker failed (nothing printed under :func:`launch`)."""


def run_stage(name: str, params: Path) -> None:
    """Run ``stages.<name>``; a training stage with ``compute.workers > 1`` first launches itself under torchrun
    (:func:`launch`). In a torchrun worker, a stop caused by another worker (it died, or rank 0 reports the error)
    ends this one with exit code WITHDRAWN_EXIT and, under our own launcher, nothing printed: the run's one line is
    the launcher's (or rank 0's)."""
    import importlib
    import signal

    from pipeline import distributed

    if distributed.launched() and name not in TRAINING_STAGES:
        raise HydraPipeError(f"{name}: only the training stages ({', '.join(TRAINING_STAGES)}) run under torchrun; "
                             f"run {name} as one process")
    code = launch(name, params)
    if code is not None:
        if code:
            raise typer.Exit(code)
        return
    if not distributed.launched():
        importlib.import_module(f"stages.{name}").run(params)
        return
    running = [True]

    def terminated(signum, frame):  # torchrun stops this worker: leave through the atomic writes' cleanup, once
        if running[0]:
            running[0] = False
            raise distributed.Withdrawn("terminated")

    signal.signal(signal.SIGTERM, terminated)
    ours = os.environ.get(WORKER_ENV) == "1"
    if os.environ.get("RANK", "0") != "0":
        os.environ["HYDRA_PIPE_QUIET"] = "1"  # one progress bar for the run: rank 0's
    try:
        importlib.import_module(f"stages.{name}").run(params)
    except distributed.Withdrawn:
        raise typer.Exit(WITHDRAWN_EXIT) from None
    except Exception as e:
        running[0] = False
        if not distributed.lost_peer(e):
            raise
        if not ours:  # a peer is gone mid-collective: torchrun names it too
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            typer.echo(f"error: {name}: worker {distributed.rank()} lost the other workers ({first})", err=True)
        raise typer.Exit(WITHDRAWN_EXIT) from None
    except KeyboardInterrupt:
        if ours:
            raise typer.Exit(130) from None
        raise
    finally:
        running[0] = False  # a SIGTERM while leaving changes nothing
    distributed.teardown()


def launch(stage: str, params_path: Path) -> int | None:
    """Run a training stage in ``compute.workers`` processes under torchrun's elastic agent (this node, a free
    port) unless this process already is a torchrun worker; returns the exit code, or None to run the stage here.

    A worker that dies (killed, out of memory) stops the whole run: the agent stops the others, no output is
    written (rank 0 writes only at the end, atomically) and this prints one line and returns 1; a worker's own
    one-line error (exit code 2) is that line."""
    from pipeline import distributed
    from pipeline.config import load_params

    if stage not in TRAINING_STAGES or distributed.launched():
        return None
    params = load_params(params_path)  # bad params: one line here, before any worker starts
    n = params.compute.workers
    if n == 1:
        return None
    import logging
    import tempfile
    import uuid

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
