"""Where and how torch runs: the device, seeds, thread counts, and modes set for a block and restored after it.

Every "set this for a while, then put it back" of the library is one of the context managers here, so a caller's
model never comes back in another mode, with other gradient flags, or with another thread count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count for the block (``None``: leave it as it is)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(old)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block; afterwards each module gets back its *own* mode (not ``model.train()``): the prune
    stage may hold BatchNorm in eval (``prune.bn``) while the rest trains, and that must survive an attack."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """No parameter receives a gradient in the block (attacks differentiate w.r.t. inputs only); flags restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def attack_mode(model: nn.Module, threads: int | None = None) -> Iterator[nn.Module]:
    """Eval mode, no parameter gradients and a deliberate thread count, all restored on exit."""
    with eval_mode(model), frozen(model), num_threads(threads):
        yield model


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Plain fp32 for the block, whatever the caller trains with: no autocast (CUDA or CPU) and no TF32 matmuls or
    convolutions. Bounds and the confirmation of adversarial examples run in it (a bound computed in bf16 or TF32
    is not a bound of the fp32 network); the flags are restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def sound_numerics() -> Iterator[None]:
    """What a sound bound needs from torch, for the block: :func:`full_precision` (no autocast, no TF32 matmuls or
    convolutions), fp32 matmuls at ``"highest"`` precision, and deterministic algorithms (cuDNN's too, without
    benchmarking; ops with no deterministic form warn instead of failing), so bounding and confirming give the
    same figures on every run. Every flag is restored after, nested uses included."""
    precision = torch.get_float32_matmul_precision()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_deterministic, cudnn_benchmark = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        with full_precision():
            torch.set_float32_matmul_precision("highest")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark
