import pytest
import torch
from torch.utils.data import Subset

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
    prune(model, small, PruneParams(keep_ratio=0.1, epochs=2, batch_size=32, attack_steps=2, lr=0.01))
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
