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
