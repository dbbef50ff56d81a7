import math

import pytest
import torch

from pipeline.errors import HydraPipeError
from pipeline.masking import (GetSubnet, MaskedConv2d, MaskedLinear, apply_fixed_masks, freeze_masks, initial_scores,
                              keep_counts, masked_layers, prunable_layers, start_score_pruning)
from pipeline.models import build_model, model_names


def test_getsubnet_keeps_exactly_k_and_passes_gradient_straight_through():
    importance = torch.rand(7, 5, requires_grad=True)
    mask = GetSubnet.apply(importance, 9)
    assert mask.sum() == 9
    kept = importance.detach().flatten()[mask.flatten().bool()]
    dropped = importance.detach().flatten()[~mask.flatten().bool()]
    assert kept.min() >= dropped.max()
    g = torch.randn(7, 5)
    mask.backward(g)
    assert torch.equal(importance.grad, g)  # every entry gets the gradient, kept or not


def test_straight_through_gradient_reaches_every_score_of_every_layer(digits_info):
    """d loss / d scores = d loss / d mask * sign(scores) (straight-through through |s|, as HYDRA's SubnetConv),
    for kept and pruned entries."""
    torch.manual_seed(0)
    model = build_model("cnn_small", digits_info)
    layers = masked_layers(model)
    start_score_pruning(layers, 0.1, "scaled")
    x = torch.rand(64, 1, 8, 8)
    model(x).logsumexp(1).sum().backward()
    score_grads = [layer.scores.grad.clone() for _, layer in layers]
    freeze_masks(model)  # same masks, now as leaves whose gradient we can read
    for _, layer in layers:
        layer.weight_mask.requires_grad_(True)
    model(x).logsumexp(1).sum().backward()
    for g, (name, layer) in zip(score_grads, layers):
        assert torch.allclose(g, layer.weight_mask.grad * layer.scores.detach().sign(), atol=1e-6), name
        assert (g[layer.weight_mask.detach() == 0] != 0).any(), name  # pruned scores move too


def test_score_descent_grows_the_magnitude_of_helpful_connections_of_either_sign():
    """One SGD step on the scores moves |s| by -lr * dL/dmask for negative and positive scores alike.

    Ranking signed scores by abs without the sign in the gradient would shrink a helpful negative score."""
    torch.manual_seed(0)
    layer = MaskedLinear(6, 3)
    start_score_pruning([("fc", layer)], 0.5, "kaiming")
    x = torch.randn(16, 6)
    before = layer.scores.detach().clone()
    layer(x).pow(2).sum().backward()
    freeze_masks(layer)
    layer.weight_mask.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    g_mask = layer.weight_mask.grad
    lr = 1e-4
    after = before - lr * layer.scores.grad
    assert (before < 0).any() and (before > 0).any()
    assert torch.allclose(after.abs() - before.abs(), -lr * g_mask, atol=1e-7)


def test_scaled_init_formula():
    layer = MaskedConv2d(3, 4, 3)
    layer.use_scores(initial_scores(layer, "scaled"))
    w = layer.weight.detach()
    expected = math.sqrt(6 / (3 * 3 * 3)) * w / w.abs().max()
    assert torch.allclose(layer.scores, expected)


@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.01])
def test_exactly_k_weights_kept_per_layer(digits_info, ratio):
    model = build_model("cnn_small", digits_info)
    layers = masked_layers(model)
    start_score_pruning(layers, ratio, "kaiming")
    for _, layer in layers:
        assert int(layer.mask().sum()) == max(1, math.ceil(ratio * layer.weight.numel()))


def test_frozen_hydra_scores_initialised_by_magnitude_equal_lwm(digits_info):
    torch.manual_seed(0)
    model = build_model("cnn_small", digits_info)
    layers = masked_layers(model)
    start_score_pruning(layers, 0.05, "scaled")  # scaled init is proportional to w per layer
    hydra = [layer.mask().clone() for _, layer in layers]
    apply_fixed_masks(layers, [layer.weight.abs() for _, layer in layers], 0.05)
    for h, (_, layer) in zip(hydra, layers):
        assert torch.equal(h, layer.weight_mask)


def test_global_rates_allocate_by_one_threshold():
    big, small = torch.full((100,), 2.0), torch.full((100,), 1.0)
    assert keep_counts([big, small], 0.5, "global") == [100, 0]
    assert keep_counts([big, small], 0.5, "uniform") == [50, 50]


def test_mask_that_empties_a_layer_is_refused():
    layers = [("a", MaskedLinear(10, 10)), ("b", MaskedLinear(10, 10))]
    with torch.no_grad():
        layers[1][1].weight.mul_(1e-6)
    with pytest.raises(HydraPipeError, match="disconnected"):
        apply_fixed_masks(layers, [l.weight.abs() for _, l in layers], 0.05, rates="global")


def test_first_last_policy(digits_info):
    model = build_model("cnn_small", digits_info)
    all_layers = masked_layers(model)
    chosen = prunable_layers(model, skip_first=True, skip_last=True)
    assert [n for n, _ in chosen] == [n for n, _ in all_layers[1:-1]]


def test_freeze_turns_scores_into_fixed_mask(digits_info):
    model = build_model("cnn_small", digits_info)
    layers = masked_layers(model)
    start_score_pruning(layers, 0.2, "scaled")
    masks = [l.mask().clone() for _, l in layers]
    freeze_masks(model)
    for m, (_, l) in zip(masks, layers):
        assert l.mode == "fixed" and torch.equal(m, l.weight_mask) and not l.scores.requires_grad


@pytest.mark.parametrize("arch", model_names())
def test_every_architecture_runs_at_digits_size(digits_info, arch):
    model = build_model(arch, digits_info).eval()
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_a_masked_layer_changes_its_own_state_through_its_methods():
    layer = MaskedLinear(6, 4)
    assert layer.mode == "dense" and torch.equal(layer.effective_weight(), layer.weight)
    layer.use_scores(initial_scores(layer, "scaled"))
    layer.set_keep(5)
    assert layer.mode == "scores" and layer.scores.requires_grad and int(layer.mask().sum()) == 5
    layer.fix_mask()
    assert layer.mode == "fixed" and layer.keep == 5 and not layer.scores.requires_grad
    kept = layer.weight_mask.clone()
    layer.drop(outputs=torch.tensor([True, False, False, False]), inputs=torch.tensor([False] * 5 + [True]))
    assert layer.weight_mask[0].sum() == 0 and layer.weight_mask[:, 5].sum() == 0
    assert layer.keep == int(layer.weight_mask.sum()) == int((kept[1:, :5]).sum())
    layer.reset_scores()
    assert layer.scores.shape == layer.weight.shape and not layer.scores.any() and layer.mode == "fixed"
