"""HYDRA's score training: BatchNorm behaviour (``prune.bn``), every objective, and the method's invariants."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import PruneParams
from pipeline.masking import MaskedConv2d, MaskedLinear, masked_layers
from pipeline.pruning import prune


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(MaskedConv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         MaskedLinear(4 * 8 * 8, 10))


def tiny_data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("objective", ["benign", "pgd", "trades"])
def test_bn_eval_keeps_running_statistics_and_bn_train_updates_them(objective):
    """``prune.bn: eval`` must hold BatchNorm in eval mode for the whole score training, attacks included."""
    for bn, should_change in (("eval", False), ("train", True)):
        model = bn_net()
        norm = model[1]
        with torch.no_grad():  # a pretrained network has non-default statistics
            norm.running_mean.fill_(0.3)
            norm.running_var.fill_(2.0)
        before = norm.running_mean.clone(), norm.running_var.clone()
        prune(model, tiny_data(), PruneParams(keep_ratio=0.5, epochs=1, batch_size=16, attack_steps=2, bn=bn,
                                              objective=objective))
        same = torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
        assert same != should_change, (bn, objective)
        # BatchNorm's affine parameters are frozen with the weights either way (only scores train)
        assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))


def test_lwm_kept_weights_match_the_lwm_method_and_the_histogram_compares_distributions():
    import numpy as np

    from pipeline.pruning import kept_weight_histogram, lwm_kept_weights

    model = bn_net()
    before = {n: l.weight.detach().numpy().copy() for n, l in masked_layers(model)}
    prune(model, tiny_data(), PruneParams(method="lwm", keep_ratio=0.2))
    by_method = {n: l.effective_weight().detach().numpy() for n, l in masked_layers(model)}
    predicted = lwm_kept_weights(before, 0.2)
    for n in before:
        assert np.array_equal(predicted[n], by_method[n]), n
    # a mask that keeps the smallest weights: the opposite of LWM
    smallest = {n: np.where(np.abs(w) <= np.quantile(np.abs(w), 0.2), w, 0.0) for n, w in before.items()}
    rows = kept_weight_histogram(before, {"lwm": predicted, "small": smallest}, bins=10)
    for col in ("pretrained", "kept_lwm", "kept_small"):
        assert abs(sum(r[col] for r in rows) - 1.0) < 1e-4, col
    centre = lambda col: sum(r["magnitude"] * r[col] for r in rows)  # noqa: E731
    assert centre("kept_small") < centre("pretrained") < centre("kept_lwm")
