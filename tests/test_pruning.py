import pytest
import torch
from torch.utils.data import Dataset, Subset

from pipeline.config import DataParams, FinetuneParams, PruneParams, TrainParams
from pipeline.data import load_dataset
from pipeline.masking import masked_layers
from pipeline.models import build_model
from pipeline.pruning import prune
from pipeline.training import train


@pytest.fixture(scope="module")
def tiny():
    data = load_dataset(DataParams())
    return data, Subset(data.train, range(128))


def fresh(data):
    torch.manual_seed(0)
    return build_model("cnn_small", data.info)


@pytest.mark.parametrize("method", ["hydra", "lwm", "random"])
def test_pruning_leaves_weights_and_biases_unchanged(tiny, method):
    data, small = tiny
    model = fresh(data)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("weight", "bias"))}
    prune(model, small, PruneParams(method=method, keep_ratio=0.1, epochs=1, batch_size=32, attack_steps=2))
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    for _, layer in masked_layers(model):
        assert layer.mode == "fixed"
        assert abs(float(layer.weight_mask.mean()) - 0.1) < 0.02


def test_hydra_scores_move_the_mask_away_from_magnitude(tiny):
    """Scaled init starts at the magnitude mask; training the scores with the loss must change it."""
    data, small = tiny
    model = fresh(data)
    magnitude = [l.weight.detach().abs().clone() for _, l in masked_layers(model)]
    prune(model, small, PruneParams(keep_ratio=0.1, epochs=2, batch_size=32, attack_steps=2, optimizer="adam", lr=0.01))
    moved = 0
    for mag, (_, layer) in zip(magnitude, masked_layers(model)):
        lwm = torch.zeros_like(mag).flatten()
        lwm[mag.flatten().topk(int(layer.weight_mask.sum())).indices] = 1
        moved += int((lwm.view_as(mag) != layer.weight_mask).sum())
    assert moved > 0


def test_multistep_schedule_ends_at_final_ratio(tiny):
    data, small = tiny
    model = fresh(data)
    hist = prune(model, small, PruneParams(keep_ratio=0.05, schedule_keep=[0.5, 0.2], epochs=1, batch_size=64,
                                           objective="benign"))
    assert [h["keep_ratio"] for h in hist] == [0.5, 0.2, 0.05]
    for _, layer in masked_layers(model):
        assert abs(float(layer.weight_mask.mean()) - 0.05) < 0.01


def test_mask_survives_finetune(tiny):
    data, small = tiny
    model = fresh(data)
    prune(model, small, PruneParams(method="lwm", keep_ratio=0.1))
    masks = {n: l.weight_mask.clone() for n, l in masked_layers(model)}
    train(model, small, FinetuneParams(epochs=2, batch_size=32, attack_steps=2, lr=0.1, weight_decay=0.01))
    for n, l in masked_layers(model):
        assert torch.equal(l.weight_mask, masks[n])
        w = l.effective_weight()
        assert torch.all(w[masks[n] == 0] == 0), n
        assert (w[masks[n] == 1] != 0).all()


@pytest.mark.parametrize("objective", ["benign", "pgd", "trades"])
def test_objective_decreases_its_loss_and_reaches_scores(tiny, objective):
    from pipeline.masking import start_score_pruning
    from pipeline.objectives import get_objective

    data, small = tiny
    x, y = torch.stack([small[i][0] for i in range(64)]), torch.tensor([small[i][1] for i in range(64)])
    p = TrainParams(objective=objective, attack_steps=3, eps=0.1)
    model = fresh(data)
    loss_fn = get_objective(objective)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    first = loss_fn(model, x, y, p, 0.0).item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model, x, y, p, 0.0).backward()
        opt.step()
    torch.manual_seed(1)
    assert loss_fn(model, x, y, p, 0.0).item() < first
    start_score_pruning(masked_layers(model), 0.1, "scaled")
    for par in model.parameters():
        par.grad = None
    loss_fn(model, x, y, p, 0.0).backward()
    assert all(l.scores.grad is not None and l.scores.grad.abs().sum() > 0 for _, l in masked_layers(model))


# ---------------------------------------------------------------------------------------------------------------
# ADMM (Ye et al., ICCV 2019)

def admm_params(**kw) -> PruneParams:
    base = dict(method="admm", keep_ratio=0.1, epochs=4, batch_size=32, attack_steps=2, lr=0.01, admm_rho=1.0,
                admm_rho_growth=2.0, admm_update_every=1, objective="pgd")
    return PruneParams(**{**base, **kw})


def test_admm_keeps_exactly_the_ratio_per_layer_and_differs_from_lwm(tiny):
    import math

    data, small = tiny
    model = fresh(data)
    start = {n: l.weight.detach().clone() for n, l in masked_layers(model)}
    # lr 0.05: the weights must move enough to reorder their magnitudes (the final mask ranks |W| alone)
    history = prune(model, small, admm_params(lr=0.05))
    assert len(history) == 4 and all(math.isfinite(h["loss"]) for h in history)
    assert [h["rho"] for h in history] == [1.0, 2.0, 4.0, 8.0]
    differs = 0
    for n, layer in masked_layers(model):
        assert layer.mode == "fixed"
        assert int(layer.weight_mask.sum()) == math.ceil(0.1 * layer.weight.numel()), n
        assert not any(hasattr(layer, b) for b in ("admm_z", "admm_u", "admm_updates"))  # gone after pruning
        lwm = torch.zeros(start[n].numel())
        lwm[start[n].abs().flatten().topk(int(layer.weight_mask.sum())).indices] = 1
        differs += int((lwm.view_as(start[n]) != layer.weight_mask).sum())
        assert not torch.equal(layer.weight, start[n])  # ADMM trains the weights
    assert differs > 0
    assert set(model.state_dict()) == set(fresh(data).state_dict())  # no ADMM buffer reaches the checkpoint


def test_admm_penalty_pulls_the_pruned_weights_to_zero(tiny):
    """The penalty is what makes the hard prune harmless: with it, the weights the mask removes shrink towards 0;
    with rho ~ 0 (plain training) they do not."""
    data, small = tiny

    def removed_fraction(rho: float) -> float:
        model = fresh(data)
        prune(model, small, admm_params(admm_rho=rho, admm_rho_growth=1.0, objective="benign", epochs=3, lr=0.01,
                                        optimizer="sgd", momentum=0.0))
        w = torch.cat([l.weight.detach().flatten() for _, l in masked_layers(model)])
        m = torch.cat([l.weight_mask.flatten() for _, l in masked_layers(model)])
        return float((w * (1 - m)).norm() / w.norm())

    with_penalty, without = removed_fraction(30.0), removed_fraction(1e-9)
    assert with_penalty < 0.5 * without, (with_penalty, without)


def test_admm_loss_includes_the_penalty(tiny):
    """The history's loss is objective + rho/2 ||W - Z + U||^2: a larger rho gives a larger first-epoch loss."""
    data, small = tiny
    losses = {}
    for rho in (1e-9, 50.0):
        model = fresh(data)
        losses[rho] = prune(model, small, admm_params(admm_rho=rho, epochs=1, objective="benign"))[0]["loss"]
    assert losses[50.0] > losses[1e-9] + 1.0


def test_admm_penalty_value_and_projection():
    from pipeline.masking import MaskedLinear
    from pipeline.pruning import admm_penalty, admm_project

    t = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    (z,) = admm_project([t], 0.34)  # ceil(0.34 * 6) = 3 entries stay
    assert torch.equal(z, torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 0.0]]) + torch.tensor([[0, 0, 0.5], [0, 0, 0]]))
    layer = MaskedLinear(3, 2)
    layer.register_buffer("admm_z", torch.zeros(2, 3))
    layer.register_buffer("admm_u", torch.ones(2, 3))
    expected = 0.5 * 4.0 * float(((layer.weight.detach() + 1) ** 2).sum())
    assert abs(float(admm_penalty([("l", layer)], 4.0)) - expected) < 1e-5


class KilledAfter(Dataset):
    """``data`` that raises KeyboardInterrupt (a Ctrl-C) once ``limit`` items have been read: a killed run."""

    def __init__(self, data: Dataset, limit: int) -> None:
        self.data, self.left = data, limit

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return self.data[i]


def test_admm_resumes_bit_for_bit(tiny, tmp_path):
    """Z, U and the update count travel in the training loop's resume state: a run killed in its third epoch and
    rerun ends with the uninterrupted run's weights and mask."""
    data, small = tiny
    p = admm_params(epochs=4, objective="benign", admm_update_every=1)
    whole = fresh(data)
    prune(whole, small, p)
    with pytest.raises(KeyboardInterrupt):
        prune(fresh(data), KilledAfter(small, 2 * len(small) + 40), p, resume_dir=tmp_path)
    resumed = fresh(data)
    history = prune(resumed, KilledAfter(small, 2 * len(small)), p, resume_dir=tmp_path)  # epochs 3 and 4 only
    assert len(history) == 4
    for (n, a), (_, b) in zip(masked_layers(whole), masked_layers(resumed)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_mask, b.weight_mask), n


def authors_masking(w: "np.ndarray", prune_ratio: float) -> "np.ndarray":
    """A reference copy of the final hard prune of Ye et al.'s code (``masking()`` -> ``weight_pruning``, sparsity
    type ``irregular``): the weight alone, its ``prune_ratio`` percentile of ``|W|`` as the threshold, kept above it."""
    import numpy as np

    magnitude = np.abs(w)
    return (magnitude > np.percentile(magnitude, prune_ratio * 100)).astype(np.float32)


def test_admm_hard_prune_keeps_the_top_weights_as_the_authors_masking_does():
    """A toy layer where ``U`` is large on the small weights: ``|W + U|`` would keep those, the authors keep ``|W|``."""
    import numpy as np

    from pipeline.masking import MaskedLinear
    from pipeline.pruning import admm_hard_prune

    torch.manual_seed(0)
    layer = MaskedLinear(10, 10)  # 100 weights, keep 10: the percentile cut and the top-k agree on the count
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1, 1, 100)[torch.randperm(100)].view(10, 10))
    u = torch.where(layer.weight.abs() < 0.3, 5.0, 0.0)  # ADMM's dual grows where Z pushed W to zero
    layer.register_buffer("admm_u", u)
    admm_hard_prune([("fc", layer)], PruneParams(method="admm", keep_ratio=0.1))
    w = layer.weight.detach().numpy()
    expected = authors_masking(w, 0.9)
    assert expected.sum() == 10
    assert np.array_equal(layer.weight_mask.numpy(), expected)
    # the test tells the two rules apart: ranking |W + U| would have kept other weights
    assert not np.array_equal(authors_masking(w + u.numpy(), 0.9), expected)


def test_admm_final_mask_matches_the_authors_masking_of_the_trained_weights(tiny):
    import numpy as np

    data, small = tiny
    model = fresh(data)
    prune(model, small, admm_params(keep_ratio=0.1))
    for n, layer in masked_layers(model):
        w = layer.weight.detach().numpy()  # the trained W; the mask is a buffer beside it
        expected = authors_masking(w, 0.9)
        assert expected.sum() == layer.weight_mask.sum(), n  # same count at these layer sizes
        assert np.array_equal(layer.weight_mask.numpy(), expected), n
