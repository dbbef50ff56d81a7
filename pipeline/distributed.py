"""Data-parallel training under torchrun: the process group, who writes, reductions, DDP and the data shards.

One process per device (``compute.workers`` per node, any number of nodes), launched by torchrun, which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without those variables (the
default, one worker) nothing here does anything: :func:`world` is 1, :func:`is_main` is true, :func:`wrap` returns
the model itself and :func:`sharded_loader` is :func:`pipeline.data.loader`'s loader, so a one-worker run is bit for
bit what it was before this module existed.

**Global batch.** ``batch_size`` is the *global* batch: every rank draws the same permutation (the loader's seeded
``torch.Generator``, consumed exactly as the one-worker loader consumes it), cuts it into the same global batches
and takes every ``world``-th example of each (rank ``r`` gets ``batch[r::world]``, as ``DistributedSampler``
strides). The union of the ranks' batches is the one-worker run's batch and the epoch has as many steps; the
training loop weights each rank's mean loss by its share of the global batch, so the all-reduced (averaged)
gradient is the one-worker run's gradient up to float summation order for deterministic objectives (benign, ibp,
crown-ibp) on networks without BatchNorm. Not otherwise: rank ``r`` seeds its random draws (attack starts, noise)
with ``seed + r``, and BatchNorm normalises each rank's shard by its own batch statistics (no SyncBatchNorm).

Backend: NCCL when training on CUDA, gloo on CPU. Only rank 0 writes anything (checkpoints, metrics, plots, resume
states); DDP averages the gradients, so identical starting parameters and identical updates keep every rank's
weights and HYDRA scores, hence its top-k masks, identical (``tests/test_distributed.py`` checks it bit for bit).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.dataloader import default_collate

from pipeline.errors import HydraPipeError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process is one of torchrun's workers (its environment names a rank and a world)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes outputs."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device: ``cuda:LOCAL_RANK`` with NCCL when
    training on CUDA, the CPU with gloo otherwise. Without torchrun: no group, the device ``device`` asks for."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise HydraPipeError("compute.device is cuda, but torch sees no CUDA device (use auto or cpu)")
    if not launched():
        return torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank())
    if not active():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few floats over the ranks (float64; returned as they are without a group)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_min_max(value: int) -> tuple[int, int]:
    """The smallest and largest of an integer over the ranks (e.g. the epoch each rank would resume after)."""
    if not active():
        return value, value
    t = torch.tensor([value, -value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0]), int(-t[1])


def all_gather_bytes(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (for states kept per rank, e.g. RNG states), on the CPU."""
    if not active():
        return [t]
    dev = _collective_device()
    out = [torch.empty_like(t, device=dev) for _ in range(world())]
    dist.all_gather(out, t.to(dev))
    return [o.cpu() for o in out]


def agree(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every rank holds the same ``tensors``, bit for bit (a SHA-256 of their bytes, gathered)."""
    if not active():
        return True
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = all_gather_bytes(torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8))
    return all(torch.equal(d, digests[0]) for d in digests)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap(model: nn.Module) -> nn.Module:
    """The model DDP-wrapped for training (gradients of the parameters that train are averaged over the ranks);
    the model itself without a group. Call after choosing what trains: DDP registers the parameters that require
    gradients when it is built.

    No buffer broadcast at each forward: it is a collective, and the ranks need not run the same number of forwards
    in a step (an attack's iterates, a mixtrain draw, a rank with no example in a short last batch), which would
    deadlock. So BatchNorm's running statistics are each rank's own (those of its shards; rank 0's are saved), as
    with DDP's default between two broadcasts; masks are buffers no training step changes."""
    if world() == 1:
        return model
    dev = next(model.parameters()).device
    ids = [dev.index] if dev.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.14 names it forward_sync_buffers (and warns about broadcast_buffers); older releases have only the latter
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=ids, output_device=ids[0] if ids else None, **no_sync)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def release() -> None:
    """After dropping :func:`wrap`'s model: collect DDP's reducer now, so its gradient hooks can never fire in a
    later training of the same parameters (the next step of a pruning schedule wraps the model afresh)."""
    if active():
        gc.collect()


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank is gone (gloo raises a plain RuntimeError
    naming its transport, NCCL a DistBackendError)."""
    text = str(e)
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and (
        "gloo" in text or "NCCL" in text or "Connection closed by peer" in text or "Connection reset by peer" in text))


class Withdrawn(Exception):
    """This rank stops because the whole run stops, and rank 0 says why (one line for the run, not one per rank)."""


def stop_with_main() -> NoReturn:
    """On a rank other than 0, for an error every rank sees (a non-finite loss): wait until rank 0 has reported it
    and left (its exit ends this barrier with an error, or torchrun stops this rank), then stop quietly."""
    with contextlib.suppress(Exception):
        barrier()
    raise Withdrawn(f"rank {rank()} stopped with rank 0")


class ShardedBatches(Sampler[list[int]]):
    """The one-worker loader's global batches, every ``world``-th example of each to this rank (module docstring).

    ``set_epoch`` exists for ``DistributedSampler``'s interface; the permutation comes from the shared seeded
    generator (one draw per epoch, as the one-worker loader), so it needs no epoch number and resumes with the
    generator's state."""

    def __init__(self, batches: BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def set_epoch(self, epoch: int) -> None:  # DistributedSampler's interface; the generator carries the epoch
        pass

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rank::self.world]

    def __len__(self) -> int:
        return len(self.batches)


def sharded_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """:func:`pipeline.data.loader` for this rank: the same generator draws in the same order (the loader's base
    seed, then the permutation), the global batch cut into ``world`` strided shards."""
    g = torch.Generator().manual_seed(seed)
    if world() == 1:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)
    order = RandomSampler(ds, generator=g) if shuffle else SequentialSampler(ds)
    shards = ShardedBatches(BatchSampler(order, batch_size, drop_last=False), rank(), world())
    x0, y0 = ds[0]
    x0, y0 = torch.as_tensor(x0), torch.as_tensor(y0)

    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        # a short last batch may leave this rank no example: an empty batch of the right shape, not an error
        if items:
            return default_collate(items)
        return x0.new_empty((0, *x0.shape)), y0.new_empty((0, *y0.shape))

    return DataLoader(ds, batch_sampler=shards, generator=g, num_workers=0, collate_fn=collate)
