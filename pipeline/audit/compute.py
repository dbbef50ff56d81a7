"""What computes one part of the audit: :func:`compute_task`, the default :class:`~pipeline.audit.parts.Compute`
(a verifier's block or an attack's chunk), in this process or in a worker."""

from __future__ import annotations

import torch

from pipeline.audit.attacks import attack_chunk
from pipeline.audit.deployed import Deployed
from pipeline.audit.journal import Entry
from pipeline.audit.parts import Task, Tick
from pipeline.audit.verify import verify_block


def compute_task(deployed: Deployed, xt: torch.Tensor, yt: torch.Tensor, task: Task, tick: Tick) -> Entry:
    """The journal entry of ``task``: its per-example arrays and its figures."""
    return (attack_chunk if task.is_attack else verify_block)(deployed, xt, yt, task, tick)
