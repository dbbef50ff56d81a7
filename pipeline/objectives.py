"""Training losses by name. Each is ``loss(model, x, y, params, progress) -> scalar``.

``progress`` in [0, 1] is how far the stage's training has come (step / total steps). The same objectives train
weights (pretrain, finetune) and HYDRA's importance scores (prune): the loop decides what trains, and every loss is
differentiable through the masked layers, so its gradient reaches the scores. The four robust objectives of the
HYDRA paper (Sehwag et al., NeurIPS 2020, Sec. 4) are ``pgd`` (and ``trades``, what its code uses), ``smoothing``,
``mixtrain`` and ``crown-ibp``; ``ibp`` is CROWN-IBP's pure-IBP special case.

Verified objectives (``ibp``, ``crown-ibp``, ``mixtrain``) bound the margins ``z_y - z_j`` over the L-inf ball
intersected with [0, 1] with :mod:`pipeline.bounds` (specification folded into the last layer) and take the
cross-entropy of the worst-case logits ``-lower(z_y - z_j)`` (Gowal et al. 2018; Zhang et al. 2020). Their bounds
use BatchNorm's running statistics (the digits models have no BatchNorm).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import pgd_perturb
from pipeline.config import TrainParams
from pipeline.registry import Registry
from pipeline.distributed import unwrap
from pipeline.runtime import eval_mode, full_precision
from pipeline.threat import ThreatModel

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, TrainParams, float], torch.Tensor]
OBJECTIVES: Registry[Loss] = Registry("objective", "objective")


Penalty = Callable[[float], torch.Tensor]
_PENALTY: ContextVar[Penalty | None] = ContextVar("penalty", default=None)


@contextlib.contextmanager
def added_penalty(penalty: Penalty) -> Iterator[None]:
    """While active, :func:`get_objective` returns each objective plus ``penalty(progress)``: a term on the
    parameters (ADMM's ``rho/2 ||W - Z + U||^2``) that the training loop minimises, reports and checks for NaN with
    the loss, without knowing of it."""
    token = _PENALTY.set(penalty)
    try:
        yield
    finally:
        _PENALTY.reset(token)


def get_objective(name: str) -> Loss:
    loss = OBJECTIVES.get(name)
    penalty = _PENALTY.get()
    if penalty is None:
        return loss

    def penalised(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
        return loss(model, x, y, p, progress) + penalty(progress)

    return penalised


def objective_names() -> list[str]:
    return OBJECTIVES.names()


@OBJECTIVES.register("benign")
def benign(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, loss_fn=None) -> torch.Tensor:
    # The attack runs with the model in eval mode so BatchNorm statistics are not updated by adversarial
    # iterates (as in the HYDRA and TRADES code), then the previous modes are restored for the loss.
    with eval_mode(model):
        return pgd_perturb(model, x, y, p.eps, p.step_size, p.attack_steps, loss_fn=loss_fn)


@OBJECTIVES.register("pgd")
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    """Madry et al. (2018): cross-entropy on the L-inf PGD adversarial example."""
    return F.cross_entropy(model(_attack(model, x, y, p)), y)


def trades_perturb(model: nn.Module, x: torch.Tensor, p: TrainParams) -> tuple[torch.Tensor, torch.Tensor]:
    """TRADES' inner maximisation as in the authors' ``trades.py``: ``(x', softmax(f(x)))``.

    In eval mode (BatchNorm's running statistics neither used from the batch nor updated), the clean target
    ``softmax(f(x))`` is taken once; ``x'`` starts at ``x + 0.001 N(0, I)`` and takes ``p.attack_steps`` signed
    gradient steps of ``p.step_size`` up ``KL(target || f(x'))``, each projected onto the eps-ball around ``x``
    itself (not around the noisy start) and [0, 1]. ``x'`` is detached; the model's modes are restored."""
    with eval_mode(model):
        with torch.no_grad():
            target = F.softmax(model(x), dim=1)
        if p.eps == 0 or p.attack_steps == 0:
            return x.detach(), target
        x0 = x.detach()
        x_adv = (x0 + 0.001 * torch.randn_like(x0)).clamp(0.0, 1.0)
        for _ in range(p.attack_steps):
            x_adv.requires_grad_(True)
            loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + p.step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x0 - p.eps), x0 + p.eps).clamp(0.0, 1.0)
    return x_adv.detach(), target


@OBJECTIVES.register("trades")
def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    """Zhang et al. (2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL (HYDRA's default).

    The attack is :func:`trades_perturb`; the loss itself runs in the model's own mode (train mode: batch
    statistics), its KL target ``softmax(f(x))`` with its gradient, as in the authors' code."""
    x_adv, _ = trades_perturb(model, x, p)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + p.trades_beta * robust


# ---------------------------------------------------------------------------------------------------------------
# Verified objectives
# ---------------------------------------------------------------------------------------------------------------

def ramp(p: TrainParams, progress: float) -> float:
    """Fraction of the final eps reached at ``progress``: linear from 0 over the first ``p.eps_ramp`` of the stage
    (CROWN-IBP's schedule, per batch), then 1."""
    return 1.0 if p.eps_ramp <= 0 else min(1.0, progress / p.eps_ramp)


def robust_cross_entropy(margin_lower: torch.Tensor) -> torch.Tensor:
    """CE of the worst-case logits: class y at 0, class j at ``-lower(z_y - z_j)`` (CROWN-IBP, Zhang et al. 2020,
    Eq. 4), i.e. ``mean log(1 + sum_j exp(-lower_j))``; ``margin_lower`` is N x (K-1)."""
    z = torch.cat([margin_lower.new_zeros(len(margin_lower), 1), -margin_lower], 1)
    return F.cross_entropy(z, torch.zeros(len(z), dtype=torch.long, device=z.device))


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str,
             intermediate: str = "crown") -> torch.Tensor:
    from pipeline.bounds import margin_lower_bounds

    lo, hi = ThreatModel(eps).box(x)
    with full_precision():  # fp32 bounds whatever the training precision; through the model itself, not DDP
        return margin_lower_bounds(unwrap(model), lo, hi, y, method, intermediate=intermediate)


def _kappa(p: TrainParams, t: float) -> float:
    # CROWN-IBP: kappa = 1 - t (1 - kappa_end) while eps ramps, t = eps_t / eps
    return 1.0 - t * (1.0 - p.kappa_end)


@OBJECTIVES.register("ibp")
def ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    """IBP training (Gowal et al. 2018): ``kappa CE(f(x), y) + (1 - kappa) CE(-lower_IBP(margins(eps_t)), y)``.

    ``eps_t`` ramps from 0 to ``p.eps`` over ``p.eps_ramp`` of the stage; ``kappa`` from 1 to ``p.kappa_end``.
    """
    t = ramp(p, progress)
    clean = F.cross_entropy(model(x), y)
    kappa = _kappa(p, t)
    if t * p.eps == 0 or kappa == 1.0:
        return clean
    robust = robust_cross_entropy(_margins(model, x, y, t * p.eps, "ibp"))
    return kappa * clean + (1 - kappa) * robust


@OBJECTIVES.register("crown-ibp")
def crown_ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    """CROWN-IBP (Zhang et al., ICLR 2020, Eq. 6): the worst-case CE on the mixed lower bound

        lower = beta * CROWN_IBP(eps_t) + (1 - beta) * IBP(eps_t),   loss = kappa CE(f(x)) + (1 - kappa) CE(-lower)

    where CROWN_IBP is the backward linear relaxation with IBP intermediate bounds. ``eps_t`` ramps from 0 to
    ``p.eps`` over ``p.eps_ramp`` of the stage; with ``t = eps_t / eps``, ``beta = 1 - t (1 - crown_beta_end)`` and
    ``kappa = 1 - t (1 - kappa_end)`` (the paper's code; HYDRA's trainer uses beta 1 -> 0 and the robust CE alone).
    """
    t = ramp(p, progress)
    clean = F.cross_entropy(model(x), y)
    kappa = _kappa(p, t)
    eps = t * p.eps
    if eps == 0 or kappa == 1.0:
        return clean
    beta = 1.0 - t * (1.0 - p.crown_beta_end)
    lower = _margins(model, x, y, eps, "ibp")
    if beta > 1e-5:  # as in the paper's code, the CROWN pass is skipped once its weight is zero
        lower = beta * _margins(model, x, y, eps, "crown", intermediate="ibp") + (1 - beta) * lower
    return kappa * clean + (1 - kappa) * robust_cross_entropy(lower)


# MixTrain's interval-weight schedule, as in HYDRA's trainer/mixtrain.py (written by MixTrain's first author):
# the weight starts at ``mixtrain_weight``, grows 2.5x every 5 epochs once eps is reached, and stops at 50.
MIXTRAIN_GROWTH, MIXTRAIN_EVERY, MIXTRAIN_MAX_WEIGHT = 2.5, 5, 50.0


def mixtrain_weight(p: TrainParams, progress: float) -> float:
    """The weight of MixTrain's symbolic loss at ``progress`` (see ``MIXTRAIN_GROWTH``)."""
    epoch = int(progress * p.epochs)
    after = max(0, epoch - math.ceil(p.eps_ramp * p.epochs))
    return min(p.mixtrain_weight * MIXTRAIN_GROWTH ** (after // MIXTRAIN_EVERY), MIXTRAIN_MAX_WEIGHT)


@OBJECTIVES.register("mixtrain")
def mixtrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    """MixTrain (Wang et al., "MixTrain: Scalable Training of Verifiably Robust Neural Networks", 2018).

    Two ideas: *stochastic robust approximation* (the verifiable loss of a batch is estimated on ``k`` examples
    drawn from it) and *dynamic mixed training* (that loss is added, with a growing weight, to the adversarial
    loss). Per batch:

        loss = L_base(x, y)                                                    # PGD CE (or clean CE)
        with probability mixtrain_prob:
            S <- mixtrain_k examples drawn with replacement from the batch
            loss += w(epoch) * CE(-lower_CROWN(margins(x_S, eps_t)), y_S)      # linear-relaxation bound

    Parameters of the authors' code (HYDRA's ``trainer/mixtrain.py``): k = 5 for CNN-small and 1 for CNN-large,
    probability 0.8, weight 0.1 growing 2.5x every 5 epochs after the eps ramp (at most 50), eps ramped linearly.
    Their symbolic intervals (ReluVal) are replaced here by CROWN with CROWN intermediate bounds, the same family
    of linear relaxations and at least as tight on ReLU networks; their code mixes with the clean CE
    (``mixtrain_base: benign``), the paper with the adversarial loss (``pgd``, default here).
    """
    base = pgd(model, x, y, p, progress) if p.mixtrain_base == "pgd" else benign(model, x, y, p, progress)
    eps = ramp(p, progress) * p.eps
    if eps == 0 or float(torch.rand(())) > p.mixtrain_prob:
        return base
    pick = torch.randint(0, len(y), (p.mixtrain_k,), device=y.device)
    lower = _margins(model, x[pick], y[pick], eps, "crown", intermediate="crown")
    return base + mixtrain_weight(p, progress) * robust_cross_entropy(lower)


@OBJECTIVES.register("smoothing")
def smoothing(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, progress: float) -> torch.Tensor:
    """Randomized smoothing's training (Cohen et al., ICML 2019, Sec. 3.3): CE of ``f(x + d)``,
    ``d ~ N(0, sigma^2 I)``, so the base classifier is accurate under the noise the smoothed classifier uses.
    Certification is :func:`pipeline.smoothing.certify`. The noise is not clipped to [0, 1] (as in the paper)."""
    return F.cross_entropy(model(x + p.smoothing_sigma * torch.randn_like(x)), y)
