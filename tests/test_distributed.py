"""The training stages under torchrun (DDP, gloo on the CPU): two workers train as one worker does, every rank holds
the same HYDRA masks bit for bit, only rank 0 writes, and a killed worker stops the whole run with one line.

What is compared with the one-worker run (same seed, same *global* batch): ``batch_size`` is the global batch and
each of the two ranks takes every second example of it, so the averaged gradient is the one-worker gradient up to
the order of float sums (~1e-8 relative). The weights therefore agree to 1e-5 and the figures to one test example;
the benign HYDRA masks are equal here. They are equal because a top-k flips only when two ``|scores|`` lie within
that rounding of each other at the k-th place, which these few steps do not produce; with ``pgd`` each rank draws
its own random starts (seed + rank), so 1-vs-2-worker masks differ by design. What holds always, whatever the
objective or machine, is that the ranks agree with each other bit for bit: DDP gives every rank the same averaged
gradient, so identical scores stay identical and so do their top-k masks. That is checked on a pgd run.

Runs the real CLI: ``python -m stages <stage>`` with ``compute.workers: 2`` (the stage launches torchrun itself), and
``python -m torch.distributed.run`` around a recording worker (the "already under torchrun" path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.scratch import scratch

ROOT = Path(__file__).resolve().parent.parent
TINY = {"compute": {"threads": 1},
        "pretrain": {"epochs": 2, "objective": "benign", "batch_size": 64},
        "prune": {"epochs": 1, "objective": "benign", "batch_size": 64},
        "finetune": {"epochs": 1, "objective": "benign", "batch_size": 64}}

# run under torchrun: records every file this rank renames into place (each atomic write ends in os.replace, audited as os.rename) and
# the masks and scores this rank holds right after training, then runs the stage's CLI
RECORDER = r'''
import json, os, sys
from pathlib import Path
from safetensors.torch import save_file
out = Path(sys.argv[2]); rank = os.environ["RANK"]
replaced = []
sys.addaudithook(lambda event, args: replaced.append(str(args[1])) if event == "os.rename" else None)
import stages.common
agree = stages.common.ranks_agree
def recording(stage, model):
    held = {n: t.detach().clone().contiguous() for n, t in model.named_parameters() if n.endswith("scores")}
    held |= {n: b.detach().clone().contiguous() for n, b in model.named_buffers() if n.endswith("weight_mask")}
    save_file(held, str(out / f"held-{rank}.safetensors"))
    agree(stage, model)
stages.common.ranks_agree = recording  # what stages.common.trained calls
from stages.cli import app
try:
    app([sys.argv[1]], prog_name="hydra-pipe")
finally:
    (out / f"replaced-{rank}.json").write_text(json.dumps(replaced))
'''


def _env() -> dict[str, str]:
    env = {**os.environ, "HYDRA_PIPE_QUIET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _stage(folder: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", stage], cwd=folder, env=_env(), capture_output=True,
                          text=True, timeout=240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(folder: Path, stage: str, record: Path) -> subprocess.CompletedProcess:
    script = record / "recorder.py"
    script.write_text(RECORDER)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           "--log-dir", str(record / "logs"), str(script), stage,
                           str(record)], cwd=folder, env=_env(), capture_output=True, text=True, timeout=240)




def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == ".resume"]


def _close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The one-worker reference run: pretrain, prune, finetune."""
    folder = scratch(tmp_path_factory.mktemp("one"), "run", TINY)
    for stage in ("pretrain", "prune", "finetune"):
        done = _stage(folder, stage)
        assert done.returncode == 0, done.stderr
    return folder


def test_two_workers_train_as_one_worker(one, tmp_path):
    two = scratch(tmp_path, "two", {**TINY, "compute": {"threads": 1, "workers": 2}})
    record = tmp_path / "record"
    record.mkdir()

    done = _stage(two, "pretrain")  # workers: 2, not under torchrun: the stage launches it
    assert done.returncode == 0, done.stderr
    _close(load_file(one / "models/pretrained.safetensors"), load_file(two / "models/pretrained.safetensors"))
    for name in ("pretrain.csv",):
        a, b = ((f / "plots" / name).read_text().splitlines() for f in (one, two))
        assert [float(r.split(",")[1]) for r in a[1:]] == pytest.approx([float(r.split(",")[1]) for r in b[1:]],
                                                                         rel=1e-5)
    # prune from the very same weights, under torchrun directly
    shutil.copy(one / "models/pretrained.safetensors", two / "models/pretrained.safetensors")
    shutil.copy(one / "models/pretrained.json", two / "models/pretrained.json")
    done = _torchrun(two, "prune", record)
    assert done.returncode == 0, done.stderr
    a, b = load_file(one / "models/pruned.safetensors"), load_file(two / "models/pruned.safetensors")
    masks = [k for k in a if k.startswith("mask/")]
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)  # the same masks as one worker (module docstring)
    _close(a, b)
    held = [load_file(record / f"held-{r}.safetensors") for r in (0, 1)]
    assert held[0] and all(torch.equal(held[0][k], held[1][k]) for k in held[0])  # every rank, bit for bit
    # only rank 0 wrote: rank 1 renamed nothing into place
    replaced = [json.loads((record / f"replaced-{r}.json").read_text()) for r in (0, 1)]
    assert replaced[1] == []
    assert any(p.endswith("pruned.safetensors") for p in replaced[0])

    done = _stage(two, "finetune")
    assert done.returncode == 0, done.stderr
    a, b = load_file(one / "models/finetuned.safetensors"), load_file(two / "models/finetuned.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in masks)
    _close(a, b)
    for stage in ("pretrain", "prune", "finetune"):  # the figures: within one of the 450 test examples
        fa, fb = (json.loads((f / "metrics" / f"{stage}.json").read_text()) for f in (one, two))
        assert fa.keys() == fb.keys()
        assert all(abs(fa[k] - fb[k]) <= 1 / 450 + 1e-12 for k in fa), stage
    assert not _leftovers(two)


def test_every_rank_holds_the_same_masks_under_pgd(one, tmp_path):
    """pgd with a random start per rank: the mask differs from one worker's, but never between the ranks. A global
    batch of 673 cuts the 1,347 training digits into 673, 673 and 1: the ranks' shards are 337 and 336, then 1 and
    none (the empty shard still joins the gradient all-reduce)."""
    two = scratch(tmp_path, "two", {**TINY, "prune": {**TINY["prune"], "objective": "pgd", "attack_steps": 1,
                                                        "batch_size": 673}})
    record = tmp_path / "record"
    record.mkdir()
    (two / "models").mkdir()
    for f in ("pretrained.safetensors", "pretrained.json"):
        shutil.copy(one / "models" / f, two / "models" / f)
    done = _torchrun(two, "prune", record)
    assert done.returncode == 0, done.stderr
    held = [load_file(record / f"held-{r}.safetensors") for r in (0, 1)]
    assert any(k.endswith("scores") for k in held[0]) and any(k.endswith("weight_mask") for k in held[0])
    assert all(torch.equal(held[0][k], held[1][k]) for k in held[0])
    saved = load_file(two / "models/pruned.safetensors")
    assert all(torch.equal(saved[f"mask/{k.removesuffix('.weight_mask')}"], held[0][k].to(torch.uint8))
               for k in held[0] if k.endswith("weight_mask"))


def _rank_pids(parent: int) -> dict[int, int]:
    """torchrun workers below ``parent``: {rank: pid}, read from their environment."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) != parent:
            continue
        for var in env:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = int(proc.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_killed_worker_stops_the_run_with_one_line(tmp_path):
    folder = scratch(tmp_path, "kill", {"compute": {"threads": 1, "workers": 2},
                                        "pretrain": {"epochs": 200, "objective": "pgd", "attack_steps": 1}})
    (folder / "models").mkdir()
    previous = b"the previous run's weights"
    (folder / "models/pretrained.safetensors").write_bytes(previous)
    proc = subprocess.Popen([sys.executable, "-m", "stages", "pretrain"], cwd=folder, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        state = folder / ".resume/pretrain/state.safetensors"
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state.exists(), proc.stderr.read() if proc.poll() is not None else "no epoch finished"
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: pretrain: worker 1 of 2") and "SIGKILL" in lines[0], lines[0]
    assert (folder / "models/pretrained.safetensors").read_bytes() == previous  # nothing replaced
    assert not (folder / "metrics").exists() and not (folder / "plots").exists()
    assert not [p for p in folder.rglob("*.tmp")]
    assert state.exists()  # the last finished epoch stays for the rerun


def test_a_diverging_loss_on_two_workers_is_one_line(tmp_path):
    """Every rank sees the global batch's loss; rank 0 names the stage, epoch and step, the others stop quietly."""
    folder = scratch(tmp_path, "nan", {"compute": {"threads": 1, "workers": 2},
                                        "pretrain": {"epochs": 2, "objective": "benign", "lr": 1e30}})
    done = _stage(folder, "pretrain")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pretrain: training diverged at epoch 1, step "), done.stderr
    assert not (folder / "models").exists() and not [p for p in folder.rglob("*.tmp")]
