"""One training loop for pretrain, prune and finetune: *what* trains (weights or HYDRA scores) is a parameter.

**Resume.** With ``resume_dir`` the loop writes a resume state after every epoch
(:func:`pipeline.checkpoint.write_state`: one atomic safetensors file, JSON in its header, never pickle) holding
everything the rest of the run depends on: the model's state dict (weights, scores, masks, BatchNorm statistics),
the optimizer's state, the LR scheduler's, the epoch, the step, the history so far, torch's CPU (and CUDA) RNG,
which the objectives' random starts, noise and mixtrain draws consume, and the data loader's ``torch.Generator``,
which its shuffles consume. A rerun that
finds a state with the same fingerprint (the training params, what trains, the caller's key and the *starting*
model) restores it and continues with the next epoch: the final weights are bit for bit those of an uninterrupted
run (on CPU, same machine kind and thread count). A state with another fingerprint is someone else's and is
ignored; an unreadable one is reported and ignored. The caller removes the folder once its outputs are written
(by the stage that asked for it); until then a finished run's last state lets a rerun skip the training altogether.

**Several workers** (torchrun, :mod:`pipeline.distributed`): the model trains DDP-wrapped, each rank on its strided
shard of every global batch (``batch_size`` stays the global batch), each rank's loss weighted by its share of the
batch so the averaged gradient is the one-worker gradient up to float summation order for deterministic objectives
on networks without BatchNorm (not for random-start objectives: rank ``r`` draws its random starts and noise from
seed ``p.seed + r``; not with BatchNorm: each rank normalises by its own shard's statistics). The epoch's loss is summed over the ranks, and a non-finite loss on any
rank stops every rank at the same step (rank 0 says so). Only rank 0 writes the resume state; it holds every rank's
RNG state. With one worker none of this runs: the loop is bit for bit what it was.

**Compute** (``compute``): ``precision`` bf16 / fp16 trains under autocast (fp16 with a gradient scaler, kept in the
resume state); ``channels_last`` trains in that memory format (the model comes back contiguous).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.attacks import pgd_perturb
from pipeline.checkpoint import read_state, tensor_digest, write_state
from pipeline.config import ComputeParams, TrainParams
from pipeline.data import loader
from pipeline.distributed import (all_gather_bytes, all_min_max, all_sum, is_main, rank, release, sharded_loader,
                                 stop_with_main, world, wrap)
from pipeline.errors import HydraPipeError
from pipeline.masking import rate_parameters, score_parameters, weight_parameters
from pipeline.objectives import get_objective
from pipeline.reporting import console, progress_bar
from pipeline.runtime import device_of, eval_mode, frozen, seed_everything
from pipeline.threat import ThreatModel

Trainable = Literal["weights", "scores"]

STATE_FILE = "state.safetensors"
_STATE_FORMAT = 1  # bump when the state's layout changes: older states then no longer match and are ignored


def trainable_parameters(model: nn.Module, what: Trainable) -> list[nn.Parameter]:
    """Weights and biases (scores excluded), or only the importance scores of scored layers (and the logits of
    learned per-layer rates); everything else is frozen for the stage."""
    chosen = [*score_parameters(model), *rate_parameters(model)] if what == "scores" else \
        [p for _, p in weight_parameters(model)]
    ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return chosen


def _release(model: nn.Module) -> None:
    """After a stage: weights trainable again, scores frozen (the state a checkpoint is saved and loaded in)."""
    weights = {id(p) for _, p in weight_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in weights)


def _optimizer(params: Iterable[nn.Parameter], p: TrainParams,
               rates: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """One group, or two when learned per-layer rates train: their logits at ``p.rate_lr``, without weight decay."""
    o = p.optimiser()
    rate_ids = {id(q) for q in rates}
    params = list(params)
    groups: list[dict[str, Any]] = [{"params": [q for q in params if id(q) not in rate_ids]}]
    if rate_ids:
        groups.append({"params": [q for q in params if id(q) in rate_ids], "lr": getattr(p, "rate_lr", o.lr),
                       "weight_decay": 0.0})
    if o.optimizer == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.momentum > 0)


def _set_bn(model: nn.Module, mode: Literal["train", "eval"]) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(mode == "train")


def resume_label(label: str) -> str:
    """A folder name for a training run's label (``prune to keep 0.1`` -> ``prune-to-keep-0.1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "train"


def _fingerprint(model: nn.Module, n_examples: int, p: TrainParams, what: str, bn: str, label: str, key: str) -> str:
    """What a resume state must have been made from to be trusted: the params this run trains with, what trains,
    the caller's key (the stage's data / compute params), the data's size, and the starting model bit for bit."""
    run = {"format": _STATE_FORMAT, "params": p.model_dump(mode="json"), "what": what, "bn": bn, "label": label,
           "key": key, "examples": n_examples}
    start = tensor_digest(dict(model.state_dict()))
    return hashlib.sha256(json.dumps([run, start], sort_keys=True).encode()).hexdigest()


def _save_state(path: Path, fingerprint: str, model: nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler | None, batches: DataLoader, epoch: int, step: int,
                history: list[dict[str, float]], scaler: torch.amp.GradScaler | None = None) -> None:
    """Every rank calls this (the RNG states are gathered); rank 0 writes."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    o = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in o["state"].items():  # tensors (momentum, Adam moments and step) to safetensors, the rest JSON
        for k, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"optimizer/{pid}/{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    tensors["rng/cpu"] = torch.get_rng_state()
    tensors["rng/loader"] = batches.generator.get_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    if world() > 1:  # each rank's own random stream (rank 0's is rng/cpu, as with one worker)
        for r, state in enumerate(all_gather_bytes(torch.get_rng_state())):
            if r:
                tensors[f"rng/rank{r}/cpu"] = state
        if next(model.parameters()).is_cuda:
            for r, state in enumerate(all_gather_bytes(torch.cuda.get_rng_state())):
                tensors[f"rng/rank{r}/cuda"] = state
    meta = {"fingerprint": fingerprint, "epoch": epoch, "step": step, "history": history,
            "optimizer": {"param_groups": o["param_groups"], "scalars": scalars},
            "scheduler": sched.state_dict() if sched is not None else None}
    if scaler is not None:
        meta["scaler"] = scaler.state_dict()
    if is_main():
        write_state(path, tensors, meta)


def _note(line: str) -> None:
    if not is_main():  # several workers: said once, by rank 0
        return
    console.print(line, markup=False, highlight=False, soft_wrap=True)  # one line on stderr, never wrapped


def _load_state(path: Path, fingerprint: str, model: nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler | None, batches: DataLoader, label: str,
                scaler: torch.amp.GradScaler | None = None) -> dict | None:
    """Restore the state at ``path`` into the run if it is this run's; returns its JSON, or None to start afresh."""
    if not path.is_file():
        return None
    try:
        tensors, meta = read_state(path)
    except HydraPipeError as e:
        _note(f"{label}: ignoring the resume state ({e}); training from the start")
        return None
    if meta.get("fingerprint") != fingerprint:  # other params, data or starting weights: not this run's
        return None
    try:  # the fingerprint matched, so only a hand-made file gets here with parts missing
        model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
        state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["optimizer"]["scalars"].items()}
        for k, v in tensors.items():
            if k.startswith("optimizer/"):
                _, pid, name = k.split("/", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        if sched is not None:
            sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors.get(f"rng/rank{rank()}/cpu", tensors["rng/cpu"]))
        batches.generator.set_state(tensors["rng/loader"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HydraPipeError(f"{path}: resume state does not fit this run ({first}); delete {path.parent} "
                             "to train from the start") from None
    cuda = [tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if f"rng/rank{rank()}/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng/rank{rank()}/cuda"])
    return meta


def train(model: nn.Module, data: Dataset, p: TrainParams, what: Trainable = "weights",
          bn: Literal["train", "eval"] = "train", label: str = "train", resume_dir: Path | None = None,
          resume_key: str = "", compute: ComputeParams | None = None) -> list[dict[str, float]]:
    """Minimise ``p.objective`` over ``data`` for ``p.epochs`` epochs; returns one row per epoch.

    ``what="scores"`` is HYDRA's pruning step: weights and biases are frozen and only the importance scores of
    layers in ``scores`` mode move. ``bn`` chooses whether BatchNorm statistics update during training.
    ``resume_dir``: keep a resume state there after every epoch and continue from a matching one (module
    docstring); ``resume_key`` names what else the run depends on (the caller's data / compute params). A loss
    that is not finite stops training with one line naming ``label``, the epoch and the step; the last good
    state is kept. ``compute``: precision and memory format (module docstring); workers come from torchrun.
    """
    history: list[dict[str, float]] = []
    if p.epochs == 0:
        return history
    compute = compute or ComputeParams()
    ranks = world()
    seed_everything(p.seed + rank())  # rank 0 (and a one-worker run): p.seed, as always
    params = trainable_parameters(model, what)
    if not params:
        raise ValueError(f"{label}: nothing to train ({what})")
    if compute.channels_last:
        model.to(memory_format=torch.channels_last)
    net = wrap(model)  # DDP with several workers (after trainable_parameters: DDP takes those that need grads)
    loss_fn = get_objective(p.objective)
    opt = _optimizer(params, p, rate_parameters(model) if what == "scores" else ())
    batches = loader(data, p.batch_size, shuffle=True, seed=p.seed) if ranks == 1 else \
        sharded_loader(data, p.batch_size, shuffle=True, seed=p.seed)
    total = p.epochs * len(batches)
    sched = None
    if p.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    dev = device_of(model)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute.precision)
    scaler = torch.amp.GradScaler(dev.type) if compute.precision == "fp16" else None
    step, start = 0, 0
    state_file = fingerprint = None
    if resume_dir is not None:
        state_file = Path(resume_dir) / STATE_FILE
        key = resume_key if ranks == 1 else f"{resume_key}|world {ranks}"  # each rank's RNG state is in the state
        fingerprint = _fingerprint(model, len(data), p, what, bn, label, key)
        meta = _load_state(state_file, fingerprint, model, opt, sched, batches, label, scaler)
        if meta is not None:
            start, step, history = meta["epoch"], meta["step"], meta["history"]
        if ranks > 1 and len(set(all_min_max(start))) > 1:
            raise HydraPipeError(f"{label}: the workers found different resume states in {state_file} (not every "
                                 "node sees the same .resume folder); share it, or delete it to train from the start")
        if meta is not None and start < p.epochs:
            _note(f"{label}: resuming after epoch {start} of {p.epochs} ({state_file})")
    with progress_bar() as bar:
        task = bar.add_task(f"{label} ({p.objective}, {what})", total=total, completed=step)
        for epoch in range(start, p.epochs):
            model.train()
            if bn == "eval":
                _set_bn(model, "eval")
            seen, loss_sum = 0, 0.0
            for i, (x, y) in enumerate(batches):
                x, y = x.to(dev), y.to(dev)
                if compute.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=low) if low is not None else contextlib.nullcontext():
                    loss = loss_fn(net, x, y, p, step / total) if len(y) else _no_examples(net, x)
                value = loss.detach().item()  # one host sync per step, as before
                if ranks > 1:  # the global batch: its summed loss and size; a non-finite loss anywhere shows here
                    batch_sum, n = all_sum([value * len(y), len(y)], dev)
                    if len(y) and len(y) * ranks != n:  # a short last batch: weigh this rank's mean by its share
                        loss = loss * (len(y) * ranks / n)
                else:
                    batch_sum, n = value * len(y), len(y)
                if not math.isfinite(batch_sum if ranks > 1 else value):
                    if not is_main():
                        stop_with_main()  # rank 0 says it, once
                    _diverged(label, f"the loss is {value if ranks == 1 else batch_sum / n}", epoch, i, len(batches),
                              state_file)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                seen += n
                loss_sum += batch_sum
                bar.advance(task)
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "lr": opt.param_groups[0]["lr"]})
            # a finite loss can still be followed by a step that overflows the weights: never save those as "good"
            if not all(bool(torch.isfinite(q).all()) for q in params):  # the same on every rank: rank 0 says it
                if not is_main():
                    stop_with_main()
                _diverged(label, "the trained parameters are not finite", epoch, len(batches) - 1, len(batches),
                          state_file)
            if state_file is not None:
                _save_state(state_file, fingerprint, model, opt, sched, batches, epoch + 1, step, history, scaler)
    if net is not model:
        del net
        release()  # DDP's reducer and its gradient hooks go now, before anything else trains these parameters
    if compute.channels_last:
        model.to(memory_format=torch.contiguous_format)
    _release(model)
    return history


def _no_examples(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A rank whose shard of a short last batch is empty still joins DDP's gradient all-reduce: a zero loss
    through a forward on no examples (eval mode: BatchNorm refuses an empty training batch)."""
    with eval_mode(net):
        return net(x).sum() * 0.0


def _diverged(label: str, what: str, epoch: int, i: int, steps: int, state_file: Path | None) -> None:
    kept = (f"the state after epoch {epoch} is kept in {state_file}" if epoch > 0 and state_file is not None
            else "no earlier state was kept")
    raise HydraPipeError(f"{label}: training diverged at epoch {epoch + 1}, step {i + 1} of {steps}: {what} "
                         f"(lower the lr?); {kept}")


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    model.eval()
    dev = device_of(model)
    correct = total = 0
    for x, y in loader(data, batch_size, shuffle=False):
        correct += int((model(x.to(dev)).argmax(1) == y.to(dev)).sum())
        total += len(y)
    return correct / max(total, 1)


def pgd_accuracy(model: nn.Module, data: Dataset, eps: float, steps: int = 20, restarts: int = 1,
                 batch_size: int = 512, seed: int = 0) -> float:
    """Quick robust accuracy for stage metrics and benchmarks (the audit is the thorough measurement).

    An example counts as robust only if it survives every restart (worst case per example).
    """
    step_size = ThreatModel(eps).step_size(steps)
    dev = device_of(model)
    torch.manual_seed(seed)
    robust = total = 0
    with eval_mode(model), frozen(model):
        for x, y in loader(data, batch_size, shuffle=False):
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                alive = model(x).argmax(1) == y
            for _ in range(restarts):
                if not alive.any():
                    break
                xa = pgd_perturb(model, x[alive], y[alive], eps, step_size, steps)
                with torch.no_grad():
                    still = model(xa).argmax(1) == y[alive]
                alive[alive.clone()] = still
            robust += int(alive.sum())
            total += len(y)
    return robust / max(total, 1)
