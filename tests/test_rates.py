"""Per-layer rates (``prune.rates``): uniform, global and learned (HARP's idea, the budget a hard constraint)."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import PruneParams, TrainParams
from pipeline.data import DatasetInfo
from pipeline.errors import HydraPipeError
from pipeline.masking import LearnedRates, MaskedLinear, allocate, masked_layers, prunable_layers, start_score_pruning
from pipeline.models import build_model
from pipeline.objectives import get_objective
from pipeline.pruning import prune
from pipeline.training import train

DIGITS = DatasetInfo(1, 8, 10, (0.3,), (0.4,))


def digits_like(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn_small", DIGITS)


def kept(model: nn.Module) -> list[int]:
    return [int(layer.weight_mask.sum()) for _, layer in masked_layers(model)]


def untrained(sizes: list[int], keep_ratio: float, start: list[int] | None = None) -> list[int]:
    """The counts learned rates start from: all logits 0, the budget split in proportion to the layer sizes; or in
    proportion to ``start`` (an empty layer's half a weight), each layer held to its floor."""
    budget = math.ceil(keep_ratio * sum(sizes))
    floors = [max(1, math.ceil(0.1 * keep_ratio * n)) for n in sizes]
    shares = sizes if start is None else [max(c, 0.5) for c in start]
    return allocate([budget * n / sum(shares) for n in shares], floors, sizes, budget)


@pytest.mark.parametrize("desired, lo, hi, total", [
    ([1.0, 1.0, 1.0], [1, 1, 1], [10, 10, 10], 10),        # three equal shares of 10: 4 / 3 / 3
    ([100.0, 1.0, 1.0], [1, 1, 1], [5, 50, 50], 30),       # the first layer is capped, the rest share what is left
    ([0.001, 5.0, 5.0], [3, 1, 1], [10, 10, 10], 12),      # a floor holds
    ([2.5, 2.5, 2.5, 2.5], [1, 1, 1, 1], [7, 7, 7, 7], 7),
])
def test_allocate_meets_the_total_exactly_within_the_bounds(desired, lo, hi, total):
    counts = allocate(desired, lo, hi, total)
    assert sum(counts) == total
    assert all(l <= c <= h for c, l, h in zip(counts, lo, hi))
    if desired == [1.0, 1.0, 1.0]:
        assert sorted(counts) == [3, 3, 4]
    if hi[0] == 5:
        assert counts[0] == 5 and abs(counts[1] - counts[2]) <= 1
    with pytest.raises(HydraPipeError):
        allocate(desired, lo, hi, sum(hi) + 1)


@pytest.mark.parametrize("keep_ratio", [0.01, 0.1, 0.37])
def test_learned_rates_land_exactly_on_keep_ratio(keep_ratio):
    model = cnn()
    fresh_keys = set(model.state_dict())
    total = sum(layer.weight.numel() for _, layer in masked_layers(model))
    prune(model, digits_like(), PruneParams(keep_ratio=keep_ratio, rates="learned", epochs=2, batch_size=16,
                                            attack_steps=2, rate_lr=0.5))
    assert sum(kept(model)) == math.ceil(keep_ratio * total)
    assert all(k >= 1 for k in kept(model))
    for _, layer in masked_layers(model):
        assert layer.mode == "fixed" and layer.rates is None and not hasattr(layer, "rate_score")
    assert set(model.state_dict()) == fresh_keys  # nothing of the rates reaches a checkpoint


def toy_task() -> tuple[nn.Module, TensorDataset]:
    """The label is the largest of 4 of the 64 inputs; a trained 64-64-64-4 MLP. At 5% uniform rates the last layer
    keeps 13 of its 256 weights (about 3 per class), too few to read the hidden features: that layer matters more."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), MaskedLinear(64, 64), nn.ReLU(), MaskedLinear(64, 64), nn.ReLU(),
                          MaskedLinear(64, 4))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 1, 8, 8, generator=g)
    data = TensorDataset(x, x.flatten(1)[:, :4].argmax(1))
    train(model, data, TrainParams(objective="benign", epochs=30, lr=0.01, batch_size=64, optimizer="adam"))
    return model, data


def test_learned_rates_move_the_budget_to_the_layer_that_matters():
    import copy

    dense, data = toy_task()
    p = PruneParams(keep_ratio=0.05, epochs=10, batch_size=64, objective="benign", lr=0.01)
    runs = {}
    for rates in ("uniform", "learned"):
        model = copy.deepcopy(dense)
        history = prune(model, data, p.model_copy(update={"rates": rates}))
        runs[rates] = (kept(model), history[-1]["loss"])
    (uniform, uniform_loss), (learned, learned_loss) = runs["uniform"], runs["learned"]
    assert uniform == [205, 205, 13]
    assert sum(learned) == math.ceil(0.05 * (64 * 64 * 2 + 256))  # the same budget, exactly
    assert learned[2] >= 3 * uniform[2]  # the weights went to the last layer
    assert learned_loss < uniform_loss  # and the loss the rates trained on is lower for it


@pytest.mark.parametrize("objective", ["pgd", "trades", "ibp", "crown-ibp", "smoothing", "mixtrain"])
def test_every_objective_reaches_the_rates(objective):
    """The rates train through whatever the objective computes with: attacks, bounds (IBP, CROWN) or noise."""
    torch.manual_seed(0)  # the objective draws (attack starts, noise, mixtrain's sample) from torch's stream
    model = cnn()
    layers = prunable_layers(model)
    start_score_pruning(layers, 0.1, "scaled")
    rates = LearnedRates([l for _, l in layers], 0.1)
    p = PruneParams(objective=objective, attack_steps=2, eps_ramp=0.0, kappa_end=0.0, mixtrain_prob=1.0)
    x, y = digits_like(16).tensors
    model.train()
    get_objective(objective)(model, x, y, p, 0.5).backward()
    grads = [l.rate_score.grad for _, l in layers]
    assert all(g is not None and torch.isfinite(g) for g in grads), objective
    assert any(float(g) != 0.0 for g in grads), objective
    assert sum(rates.counts()) == math.ceil(0.1 * sum(l.weight.numel() for _, l in layers))


def test_learned_rates_train_under_ibp_and_stay_on_the_budget():
    model = cnn()
    total = sum(layer.weight.numel() for _, layer in masked_layers(model))
    start = untrained([layer.weight.numel() for _, layer in masked_layers(model)], 0.1)
    prune(model, digits_like(), PruneParams(keep_ratio=0.1, rates="learned", objective="ibp", epochs=2, batch_size=16,
                                            eps_ramp=0.0, kappa_end=0.0, rate_lr=0.5))
    assert sum(kept(model)) == math.ceil(0.1 * total)
    assert kept(model) != start  # the rates moved under the IBP loss


def test_learned_rates_with_filter_granularity():
    from pipeline.channels import prunable_groups
    from pipeline.structured import channel_keep

    model = cnn()
    groups = prunable_groups(model)
    filters = [model.get_submodule(g.producer).weight.shape[0] for g in groups]
    prune(model, digits_like(), PruneParams(granularity="filter", keep_ratio=0.5, rates="learned", epochs=2,
                                            batch_size=16, attack_steps=1, lr=0.05, rate_lr=0.5))
    keep = [int(k.sum()) for k in channel_keep(model, groups)]
    assert sum(keep) == math.ceil(0.5 * sum(filters))  # the budget counts filters, exactly
    assert keep != untrained(filters, 0.5)  # and moved between the layers
    for _, layer in masked_layers(model):
        assert layer.rates is None and not hasattr(layer, "rate_score")


@pytest.mark.parametrize("text, needle", [
    ("prune:\n  rates: adaptive\n", "prune.rates"),
    ("prune:\n  method: lwm\n  rates: learned\n", "rates learned trains the per-layer rates with HYDRA's scores"),
    ("prune:\n  scope: global\n", "prune.scope: unknown key"),
])
def test_bad_rates_are_one_line_errors(tmp_path, text, needle):
    from pipeline.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(HydraPipeError) as e:
        load_params(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_budget_below_the_layers_minimum_is_refused():
    model = cnn()
    layers = prunable_layers(model)
    start_score_pruning(layers, 0.5, "scaled")
    with pytest.raises(HydraPipeError, match="raise keep_ratio"):
        LearnedRates([l for _, l in layers], 1e-6)


def test_learned_rates_resume_bit_for_bit(tmp_path):
    """The rate logits and their optimizer state travel in the training loop's resume state: a run killed in its
    second epoch and rerun ends with the uninterrupted run's mask."""
    from tests.test_pruning import KilledAfter

    data = digits_like(32)
    p = PruneParams(keep_ratio=0.1, rates="learned", objective="benign", epochs=3, batch_size=8, rate_lr=0.5)
    whole = cnn()
    prune(whole, data, p)
    with pytest.raises(KeyboardInterrupt):
        prune(cnn(), KilledAfter(data, len(data) + 12), p, resume_dir=tmp_path)
    resumed = cnn()
    prune(resumed, KilledAfter(data, 2 * len(data)), p, resume_dir=tmp_path)  # epochs 2 and 3 only
    assert kept(whole) == kept(resumed)
    for (n, a), (_, b) in zip(masked_layers(whole), masked_layers(resumed)):
        assert torch.equal(a.weight_mask, b.weight_mask), n


def test_lwm_comparison_keeps_the_learned_counts_per_layer():
    """The stage's weight histogram compares a learned mask with LWM at the same count per layer."""
    import numpy as np

    from pipeline.pruning import lwm_kept_weights

    g = np.random.default_rng(0)
    weights = {"a": g.normal(size=(4, 5)).astype(np.float32), "b": g.normal(size=(30,)).astype(np.float32)}
    kept = lwm_kept_weights(weights, 0.1, counts={"a": 7, "b": 2})
    for name, k in (("a", 7), ("b", 2)):
        w, out = weights[name], kept[name]
        assert int(np.count_nonzero(out)) == k
        assert np.abs(out[out != 0]).min() >= np.sort(np.abs(w).ravel())[-k]  # the k largest |w|


def test_hydra_global_takes_the_magnitude_allocation_not_the_scaled_scores():
    """One threshold over the scaled scores compares per-layer scales (``sqrt(6 / fan_in) / max|w|``); HYDRA's
    global counts are global magnitude pruning's, the scores choose within each layer."""
    from pipeline.masking import keep_counts

    model, lwm_model = cnn(3), cnn(3)
    for m in (model, lwm_model):  # the second convolution on a larger scale, as training leaves layers
        with torch.no_grad():
            prunable_layers(m)[1][1].weight.mul_(1.5)
    layers = prunable_layers(model)
    start_score_pruning(layers, 0.1, "scaled", "global")
    by_scores = keep_counts([l.scores for _, l in layers], 0.1, "global")
    prune(lwm_model, digits_like(), PruneParams(method="lwm", rates="global", keep_ratio=0.1))
    hydra_counts = [int(layer.mask().sum()) for _, layer in layers]
    assert hydra_counts == kept(lwm_model)
    assert by_scores[1] < hydra_counts[1] // 10  # one threshold over the scores all but empties that layer


def test_hydra_global_filters_take_the_l1_allocation():
    from pipeline.channels import prunable_groups
    from pipeline.structured import channel_keep

    counts = []
    for method in ("hydra", "lwm"):
        model = cnn(3)
        with torch.no_grad():  # the first convolution's filters on a larger scale
            prunable_layers(model)[0][1].weight.mul_(3.0)
        groups = prunable_groups(model)
        prune(model, digits_like(), PruneParams(method=method, granularity="filter", keep_ratio=0.3, rates="global",
                                                epochs=1, batch_size=32, attack_steps=1))
        counts.append([int(k.sum()) for k in channel_keep(model, groups)])
    assert counts[0] == counts[1]
    from pipeline.masking import keep_counts
    from pipeline.structured import init_filter_scores

    model = cnn(3)
    with torch.no_grad():
        prunable_layers(model)[0][1].weight.mul_(3.0)
    layers = [model.get_submodule(g.producer) for g in prunable_groups(model)]
    by_scores = keep_counts([init_filter_scores(l, "scaled", None) for l in layers], 0.3, "global")
    assert by_scores != counts[0]  # what one threshold over the scaled scores would have kept


def test_learned_rates_can_start_from_the_global_allocation():
    """``prune.rate_start: global``: the logits start where the rates hand every layer global magnitude pruning's
    count, so with no epoch trained the mask keeps global LWM's counts, each layer held to its floor (this random
    network's global threshold empties the second convolution), and uniform's without it."""
    from pipeline.masking import keep_counts

    weights = [layer.weight.detach() for _, layer in masked_layers(cnn())]
    glob = keep_counts(weights, 0.05, "global")
    sizes = [w.numel() for w in weights]
    assert untrained(sizes, 0.05, glob) != untrained(sizes, 0.05)  # the two starts differ on this network
    assert 0 in glob
    for start, expected in (("global", untrained(sizes, 0.05, glob)), ("uniform", untrained(sizes, 0.05))):
        model = cnn()
        prune(model, digits_like(), PruneParams(keep_ratio=0.05, rates="learned", rate_start=start, epochs=0))
        assert kept(model) == expected, start
    model = cnn()  # and they train from there, on the same budget
    prune(model, digits_like(), PruneParams(keep_ratio=0.05, rates="learned", rate_start="global", epochs=2,
                                            batch_size=16, attack_steps=1, rate_lr=0.5))
    assert sum(kept(model)) == math.ceil(0.05 * sum(sizes)) and kept(model) != glob


def test_learned_filter_rates_can_start_from_the_global_allocation():
    from pipeline.channels import prunable_groups
    from pipeline.masking import keep_counts
    from pipeline.structured import channel_keep, filter_norms

    model = cnn()
    groups = prunable_groups(model)
    layers = [model.get_submodule(g.producer) for g in groups]
    glob = keep_counts([filter_norms(l) for l in layers], 0.5, "global")
    sizes = [l.weight.shape[0] for l in layers]
    assert untrained(sizes, 0.5, glob) != untrained(sizes, 0.5)
    prune(model, digits_like(), PruneParams(granularity="filter", keep_ratio=0.5, rates="learned",
                                            rate_start="global", epochs=0))
    assert [int(k.sum()) for k in channel_keep(model, groups)] == untrained(sizes, 0.5, glob)
