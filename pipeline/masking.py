"""Score-based masked layers (HYDRA, Sehwag et al., NeurIPS 2020) and the masks of the baselines.

Every prunable ``Conv2d`` / ``Linear`` of a model is a :class:`MaskedConv2d` / :class:`MaskedLinear`. A layer is
in one of three modes:

- ``dense``: the plain layer (pretraining); no mask is applied.
- ``scores``: HYDRA. The mask keeps the ``keep`` entries of largest ``|scores|`` (:class:`GetSubnet`); the
  backward pass sends the gradient straight through to every score, so SGD on the scores minimises the
  (robust) loss of the masked network while the weights stay frozen.
- ``fixed``: the mask is the frozen buffer ``weight_mask`` (finetuning, LWM and random baselines).

Masks are chosen per layer by default (``keep = ceil(keep_ratio * numel)``); ``scope="global"`` allocates the
kept weights across layers by one global threshold instead. A mask that empties a layer would disconnect the
network and is refused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import HydraPipeError

Mode = Literal["dense", "scores", "fixed"]
ScoreInit = Literal["scaled", "kaiming", "magnitude"]


class GetSubnet(torch.autograd.Function):
    """Top-``keep`` entries of ``importance`` as a 0/1 mask; straight-through gradient (HYDRA's ``GetSubnet``).

    Callers pass ``|scores|`` (as HYDRA's ``SubnetConv`` does), so autograd gives ``dL/ds = dL/dmask * sign(s)``:
    a score whose connection would lower the loss grows in magnitude whatever its sign. Ranking the signed scores
    by ``abs`` inside this function instead would pass ``dL/dmask`` unsigned and push every negative score the
    wrong way.
    """

    @staticmethod
    def forward(ctx, importance: torch.Tensor, keep: int) -> torch.Tensor:  # type: ignore[override]
        mask = torch.zeros_like(importance, memory_format=torch.contiguous_format)  # view(-1) below, even channels-last
        idx = importance.detach().flatten().topk(keep, sorted=False).indices
        mask.view(-1)[idx] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class Masked:
    """Mixin holding the scores, the frozen mask and the mode of one prunable layer.

    The layer changes its own state through the methods below (as HYDRA's ``set_prune_rate``); nothing outside
    writes ``mode``, ``keep``, ``scores`` or ``weight_mask``.
    """

    weight: nn.Parameter

    def _init_masking(self) -> None:
        self.scores = nn.Parameter(torch.zeros_like(self.weight), requires_grad=False)
        self.register_buffer("weight_mask", torch.ones_like(self.weight))  # type: ignore[attr-defined]
        self.keep = self.weight.numel()
        self.mode: Mode = "dense"

    def mask(self) -> torch.Tensor:
        if self.mode == "scores":
            return GetSubnet.apply(self.scores.abs(), self.keep)
        return self.weight_mask

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with: ``weight * mask`` (just ``weight`` when dense)."""
        if self.mode == "dense":
            return self.weight
        return self.weight * self.mask()

    def use_scores(self, scores: torch.Tensor) -> None:
        """HYDRA mode: the mask is the top-``keep`` of ``|scores|``, and the scores train. ``scores`` has the
        weight's shape, or one entry per output filter (``[out, 1, ...]``, filter pruning)."""
        self.scores = nn.Parameter(scores.detach().clone(), requires_grad=True)
        self.mode = "scores"

    def set_keep(self, keep: int) -> None:
        """How many of the scores the top-k mask keeps."""
        self.keep = int(keep)

    @torch.no_grad()
    def fix_mask(self, mask: torch.Tensor | None = None) -> None:
        """Freeze the mask: ``mask`` (0/1, broadcastable to the weight) or, when None, the current one (all ones for
        a dense layer); the scores stop training."""
        if mask is None:
            mask = self.mask().detach() if self.mode != "dense" else torch.ones_like(self.weight)
        self.weight_mask.copy_(mask.expand_as(self.weight))
        self.keep = int(self.weight_mask.count_nonzero())
        self.mode = "fixed"
        self.scores.requires_grad_(False)

    @torch.no_grad()
    def drop(self, outputs: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> None:
        """Remove whole output rows and / or input columns (bool per row / column) from the frozen mask."""
        if self.mode != "fixed":
            self.fix_mask()
        if outputs is not None:
            self.weight_mask[outputs] = 0
        if inputs is not None:
            self.weight_mask[:, inputs] = 0
        self.keep = int(self.weight_mask.count_nonzero())

    def reset_scores(self) -> None:
        """Weight-shaped zero scores that do not train (the state checkpoints are saved and loaded in)."""
        self.scores = nn.Parameter(torch.zeros_like(self.weight), requires_grad=False)


class MaskedConv2d(Masked, nn.Conv2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_masking()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class MaskedLinear(Masked, nn.Linear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_masking()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


MaskedLayer = MaskedConv2d | MaskedLinear


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight an affine layer computes with, masked or not (used by the bounds and the exporter)."""
    if isinstance(layer, Masked):
        return layer.effective_weight()
    return layer.weight  # type: ignore[return-value]


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """All masked layers of ``model`` in definition order, with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Masked)]


def prunable_layers(model: nn.Module, skip_first: bool = False, skip_last: bool = False) -> list[tuple[str, MaskedLayer]]:
    """The masked layers a pruning method may touch, after the first/last-layer policy."""
    layers = masked_layers(model)
    lo = 1 if skip_first else 0
    hi = len(layers) - 1 if skip_last else len(layers)
    chosen = layers[lo:hi]
    if not chosen:
        raise HydraPipeError("prune: the first/last-layer policy leaves no layer to prune")
    return chosen


def fan_in(layer: nn.Module) -> int:
    w = layer.weight
    return int(w[0].numel())


@torch.no_grad()
def initial_scores(layer: MaskedLayer, how: ScoreInit, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial importance scores of a layer's weights.

    ``scaled`` is the paper's key ingredient (Sec. 3.2): ``s = sqrt(6 / fan_in) * w / max|w|``, so the first
    mask equals the magnitude mask and the scores live on the scale of a Kaiming-uniform weight. ``kaiming``
    is the random ablation; ``magnitude`` (``|w|``) is used to show that frozen HYDRA scores reproduce LWM.
    """
    w = layer.weight
    if how == "scaled":
        return math.sqrt(6.0 / fan_in(layer)) * w / w.abs().max().clamp_min(1e-12)
    if how == "kaiming":
        bound = math.sqrt(6.0 / fan_in(layer))
        return torch.empty_like(w).uniform_(-bound, bound, generator=generator)
    if how == "magnitude":
        return w.abs()
    raise HydraPipeError(f"unknown score init {how!r}; expected scaled, kaiming or magnitude")


def keep_counts(importance: list[torch.Tensor], keep_ratio: float, scope: Literal["layer", "global"]) -> list[int]:
    """How many weights each layer keeps: per layer ``ceil(ratio * n)``, or one global threshold."""
    if not 0.0 < keep_ratio <= 1.0:
        raise HydraPipeError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if scope == "layer":
        return [max(1, math.ceil(keep_ratio * t.numel())) for t in importance]
    flat = torch.cat([t.detach().abs().flatten() for t in importance])
    total = max(1, math.ceil(keep_ratio * flat.numel()))
    threshold = flat.topk(total, sorted=True).values[-1]
    return [int((t.detach().abs() >= threshold).sum()) for t in importance]


def _topk_mask(importance: torch.Tensor, keep: int) -> torch.Tensor:
    return GetSubnet.apply(importance.detach().abs(), keep)


def check_connected(layers: list[tuple[str, MaskedLayer]]) -> None:
    """Refuse a mask that empties a layer: the network's output would no longer depend on its input."""
    for name, layer in layers:
        if int(layer.mask().detach().count_nonzero()) == 0:
            raise HydraPipeError(f"prune: the mask removes every weight of layer {name!r}; the network would be disconnected")


@torch.no_grad()
def topk_masks(importance: list[torch.Tensor], keep_ratio: float,
               scope: Literal["layer", "global"] = "layer") -> list[torch.Tensor]:
    """0/1 masks keeping the largest ``|importance|`` entries, per layer or under one global threshold."""
    counts = keep_counts(importance, keep_ratio, scope)
    return [_topk_mask(imp, k) if k > 0 else torch.zeros_like(imp) for imp, k in zip(importance, counts)]


@torch.no_grad()
def apply_fixed_masks(layers: list[tuple[str, MaskedLayer]], importance: list[torch.Tensor], keep_ratio: float,
                      scope: Literal["layer", "global"] = "layer") -> None:
    """Freeze each layer's mask to the top entries of ``importance`` (LWM: ``|w|``; random: random scores)."""
    for (_, layer), mask in zip(layers, topk_masks(importance, keep_ratio, scope)):
        layer.fix_mask(mask)
    check_connected(layers)


def start_score_pruning(layers: list[tuple[str, MaskedLayer]], keep_ratio: float, init: ScoreInit,
                        scope: Literal["layer", "global"] = "layer", generator: torch.Generator | None = None) -> None:
    """Put layers in HYDRA mode: scores initialised, trainable, masks taken from their top-k."""
    for _, layer in layers:
        layer.use_scores(initial_scores(layer, init, generator))
    set_score_keep(layers, keep_ratio, scope)
    check_connected(layers)


def set_score_keep(layers: list[tuple[str, MaskedLayer]], keep_ratio: float, scope: Literal["layer", "global"] = "layer") -> None:
    """(Re)allocate the kept counts from the current scores (global scope moves weights between layers)."""
    for (_, layer), k in zip(layers, keep_counts([l.scores for _, l in layers], keep_ratio, scope)):
        layer.set_keep(k)


@torch.no_grad()
def freeze_masks(model: nn.Module) -> None:
    """Turn every scored layer's current mask into its fixed mask; scores stop training."""
    for _, layer in masked_layers(model):
        if layer.mode == "scores":
            layer.fix_mask()
        layer.scores.requires_grad_(False)


@torch.no_grad()
def fold_masks(model: nn.Module) -> None:
    """Write ``weight * mask`` into the weights so pruned entries are exactly zero (what a checkpoint stores)."""
    for _, layer in masked_layers(model):
        if layer.mode != "dense":
            layer.weight.mul_(layer.mask())


def sparsity_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per masked layer: number of weights, kept count and sparsity (fraction of zeros in the used weight)."""
    out: dict[str, dict[str, float]] = {}
    for name, layer in masked_layers(model):
        w = layer.effective_weight().detach()
        n = w.numel()
        kept = int(w.count_nonzero())
        out[name] = {"weights": n, "kept": kept, "sparsity": 1.0 - kept / n}
    return out


def global_sparsity(model: nn.Module) -> float:
    rep = sparsity_report(model)
    total = sum(r["weights"] for r in rep.values())
    kept = sum(r["kept"] for r in rep.values())
    return 1.0 - kept / max(total, 1)


def is_masking_state(name: str) -> bool:
    """Whether a parameter / state-dict name is a masked layer's own state (scores, frozen mask), not a weight."""
    return name.rpartition(".")[2] in ("scores", "weight_mask")


def weight_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The network's weights and biases (and BatchNorm's affine parameters): every parameter but the scores."""
    return [(n, p) for n, p in model.named_parameters() if not is_masking_state(n)]


def score_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for _, layer in masked_layers(model):
        if layer.mode == "scores":
            yield layer.scores


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose masked layers are plain Conv2d / Linear holding ``weight * mask``.

    Exporting the masked layers themselves would put a Mul by the mask (or HYDRA's top-k) into the graph; the
    deployed model only needs the folded weight, whose pruned entries are exact zeros.
    """
    clone = copy.deepcopy(model)
    for name, layer in masked_layers(clone):
        weight = layer.effective_weight().detach().clone()
        if isinstance(layer, nn.Conv2d):
            plain: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                         layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                         layer.padding_mode)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias.detach())
        plain.to(weight.device)
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, plain)
    return clone
