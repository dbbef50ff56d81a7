"""The training objectives: each lowers its own loss, sends gradients to HYDRA's scores, and follows its schedule."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import FinetuneParams, PruneParams, TrainParams
from pipeline.masking import MaskedConv2d, MaskedLinear, masked_layers, start_score_pruning
from pipeline.objectives import (MIXTRAIN_MAX_WEIGHT, get_objective, mixtrain_weight, objective_names, ramp,
                                 robust_cross_entropy)
from pipeline.pruning import prune
from pipeline.training import train, trainable_parameters

ROBUST = ["pgd", "trades", "ibp", "crown-ibp", "mixtrain", "smoothing"]


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(MaskedConv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         MaskedLinear(4 * 3 * 3, 16), nn.ReLU(), MaskedLinear(16, 3))


def tiny_batch(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by which third of a 6x6 image is bright: learnable, robust at small eps."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, 1, 6, 6, generator=g)
    for i in range(n):
        x[i, 0, 2 * int(y[i]):2 * int(y[i]) + 2] += 0.6
    return x.clamp(0, 1), y


def params(objective: str, **kw) -> TrainParams:
    base = dict(objective=objective, eps=0.05, attack_steps=3, eps_ramp=0.0, mixtrain_k=8, mixtrain_prob=1.0,
                mixtrain_weight=1.0, smoothing_sigma=0.25)
    return TrainParams(**{**base, **kw})


def loss_at(model, x, y, p, seed=0) -> float:
    torch.manual_seed(seed)  # same noise / restarts / sampled subset for every evaluation
    return float(get_objective(p.objective)(model, x, y, p, 1.0).detach())


def test_every_objective_is_registered():
    assert set(ROBUST) | {"benign"} <= set(objective_names())


@pytest.mark.parametrize("objective", ROBUST)
def test_objective_decreases_its_own_loss(objective):
    model, (x, y) = tiny_net(), tiny_batch()
    p = params(objective)
    before = loss_at(model, x, y, p)
    opt = torch.optim.Adam(trainable_parameters(model, "weights"), lr=0.01)
    loss_fn = get_objective(objective)
    for step in range(40):
        torch.manual_seed(100 + step)
        loss = loss_fn(model, x, y, p, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_at(model, x, y, p)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("objective", ROBUST)
def test_objective_gradients_reach_the_scores(objective):
    model, (x, y) = tiny_net(), tiny_batch()
    start_score_pruning(masked_layers(model), keep_ratio=0.5, init="scaled")
    scores = trainable_parameters(model, "scores")
    torch.manual_seed(0)
    get_objective(objective)(model, x, y, params(objective), 1.0).backward()
    for (name, layer), s in zip(masked_layers(model), scores):
        assert s is layer.scores
        assert s.grad is not None and float(s.grad.abs().sum()) > 0, name
        assert layer.weight.grad is None, name  # weights are frozen while the scores train


@pytest.mark.parametrize("objective", ["ibp", "crown-ibp", "mixtrain"])
def test_verified_objectives_score_gradient_differs_from_clean(objective):
    """The bound term itself (not only the clean or adversarial term) must send gradient to the scores."""
    x, y = tiny_batch()
    grads = {}
    for eps in (0.0, 0.05):
        model = tiny_net()
        start_score_pruning(masked_layers(model), keep_ratio=0.5, init="scaled")
        torch.manual_seed(0)
        p = params(objective, eps=eps, mixtrain_base="benign")
        get_objective(objective)(model, x, y, p, 1.0).backward()
        grads[eps] = torch.cat([s.grad.flatten() for s in trainable_parameters(model, "scores")])
    assert not torch.allclose(grads[0.0], grads[0.05])


def test_robust_cross_entropy_is_the_clean_loss_at_eps_zero():
    """At eps = 0 the bounds are exact, so the worst-case logits' CE equals the CE of the logits."""
    from pipeline.bounds import margin_lower_bounds

    model, (x, y) = tiny_net(), tiny_batch()
    with torch.no_grad():
        clean = float(F.cross_entropy(model(x), y))
        for method in ("ibp", "crown"):
            lower = margin_lower_bounds(model, x, x, y, method)
            assert math.isclose(float(robust_cross_entropy(lower)), clean, rel_tol=1e-5)


def test_robust_loss_is_an_upper_bound_of_the_adversarial_loss():
    """CE(-lower margins) >= CE(f(x')) for any x' in the ball: the verified loss bounds every attack's loss."""
    from pipeline.attacks import pgd_perturb

    model, (x, y) = tiny_net(), tiny_batch()
    p = params("ibp", kappa_end=0.0)
    x_adv = pgd_perturb(model, x, y, p.eps, p.step_size, 10)
    adv = F.cross_entropy(model(x_adv), y, reduction="none")
    for objective in ("ibp", "crown-ibp"):
        robust = loss_at(model, x, y, params(objective, kappa_end=0.0))
        assert robust >= float(adv.mean().detach()) - 1e-6


def test_eps_and_mixing_schedules_follow_progress():
    p = params("crown-ibp", eps_ramp=0.5, kappa_end=0.0, crown_beta_end=0.0)
    assert ramp(p, 0.0) == 0.0 and ramp(p, 0.25) == 0.5 and ramp(p, 0.5) == 1.0 and ramp(p, 0.9) == 1.0
    model, (x, y) = tiny_net(), tiny_batch()
    clean = float(F.cross_entropy(model(x), y))
    # progress 0: eps 0 and kappa 1 -> the clean loss
    assert math.isclose(float(get_objective("crown-ibp")(model, x, y, p, 0.0)), clean, rel_tol=1e-6)
    # after the ramp with beta_end = 0, CROWN-IBP is pure IBP
    end = float(get_objective("crown-ibp")(model, x, y, p, 0.9))
    assert math.isclose(end, float(get_objective("ibp")(model, x, y, p, 0.9)), rel_tol=1e-6)
    assert end > clean
    # halfway through the ramp CROWN-IBP mixes CROWN in: differs from IBP at the same eps
    mid_ibp = float(get_objective("ibp")(model, x, y, p, 0.25))
    mid_crown_ibp = float(get_objective("crown-ibp")(model, x, y, p, 0.25))
    assert not math.isclose(mid_ibp, mid_crown_ibp, rel_tol=1e-4)


def test_mixtrain_weight_schedule_matches_the_authors_code():
    p = params("mixtrain", epochs=40, eps_ramp=0.25, mixtrain_weight=0.1)  # ramp = 10 epochs
    at = lambda epoch: mixtrain_weight(p, epoch / p.epochs)  # noqa: E731
    assert at(0) == at(14) == pytest.approx(0.1)
    assert at(15) == pytest.approx(0.25) and at(20) == pytest.approx(0.625)
    big = params("mixtrain", epochs=400, eps_ramp=0.0, mixtrain_weight=1.0)
    assert mixtrain_weight(big, 1.0) == MIXTRAIN_MAX_WEIGHT


def test_smoothing_loss_depends_on_sigma():
    model, (x, y) = tiny_net(), tiny_batch()
    small = loss_at(model, x, y, params("smoothing", smoothing_sigma=1e-6))
    assert math.isclose(small, float(F.cross_entropy(model(x), y)), rel_tol=1e-4)
    assert loss_at(model, x, y, params("smoothing", smoothing_sigma=2.0)) != pytest.approx(small, rel=1e-3)


@pytest.mark.parametrize("pretrain,prune_obj,finetune", [("pgd", "smoothing", "smoothing"),
                                                        ("crown-ibp", "crown-ibp", "ibp"),
                                                        ("benign", "mixtrain", "crown-ibp")])
def test_objectives_mix_across_the_three_stages(pretrain, prune_obj, finetune):
    """Each stage picks its objective independently: same loop, same pruning code."""
    x, y = tiny_batch(48)
    data = TensorDataset(x, y)
    model = tiny_net()
    common = dict(epochs=1, batch_size=16, eps=0.05, attack_steps=2, mixtrain_k=4)
    train(model, data, TrainParams(objective=pretrain, **common))
    before = [layer.weight.detach().clone() for _, layer in masked_layers(model)]
    history = prune(model, data, PruneParams(objective=prune_obj, keep_ratio=0.5, **common))
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    for (_, layer), w in zip(masked_layers(model), before):
        assert torch.equal(layer.weight, w) and layer.mode == "fixed"
    train(model, data, FinetuneParams(objective=finetune, **common))
    for _, layer in masked_layers(model):
        assert torch.all(layer.effective_weight()[layer.weight_mask == 0] == 0)


# ---------------------------------------------------------------------------------------------------------------
# TRADES as in the authors' code (Zhang et al. 2019, trades.py)

def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(MaskedConv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        MaskedLinear(4 * 3 * 3, 3))
    with torch.no_grad():  # running statistics far from any batch's: train and eval mode differ a lot
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(4.0)
    return net.train()


def reference_trades_attack(model, x, eps, step_size, steps):
    """The authors' loop: eval mode, KL target softmax(f(x)), start x + 0.001 N(0, I), projection around x."""
    model.eval()
    with torch.no_grad():
        target = F.softmax(model(x), dim=1)
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * g.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    return x_adv, target


def test_trades_clean_target_is_the_eval_mode_softmax_and_leaves_bn_alone():
    from pipeline.objectives import trades_perturb

    model, (x, y) = bn_net(), tiny_batch()
    with torch.no_grad():
        eval_target = F.softmax(model.eval()(x), dim=1)
        train_target = F.softmax(copy.deepcopy(model).train()(x), dim=1)  # a copy: its running stats move
    model.train()
    assert not torch.allclose(eval_target, train_target, atol=1e-3)  # the model tells the two modes apart
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    _, target = trades_perturb(model, x, params("trades", eps=0.1, attack_steps=5))
    assert torch.allclose(target, eval_target, atol=1e-6)
    assert model.training and model[1].training  # the mode is restored
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])


def test_trades_attack_projects_around_x_not_the_noisy_start():
    """eps below the start's noise: an attack projected around the start ends up to eps + noise away from x."""
    from pipeline.objectives import trades_perturb

    model, (x, y) = bn_net(), tiny_batch()
    p = params("trades", eps=0.0005, attack_steps=10, attack_step_size=0.0005)
    torch.manual_seed(3)
    x_adv, _ = trades_perturb(model, x, p)
    torch.manual_seed(3)
    ref, _ = reference_trades_attack(model, x, p.eps, p.step_size, p.attack_steps)
    assert torch.allclose(x_adv, ref, atol=1e-7)
    assert float((x_adv - x).abs().max()) <= p.eps + 1e-7
    moved = (x_adv - x).abs() > 0.9 * p.eps  # the attack pushes most pixels to the ball's surface around x
    assert moved.float().mean() > 0.5


def test_trades_loss_is_ce_plus_beta_kl_on_the_attack_point():
    from pipeline.objectives import trades_perturb

    model, (x, y) = bn_net(), tiny_batch()
    twin = copy.deepcopy(model)  # the loss's train-mode forwards move the running stats the next attack uses
    p = params("trades", eps=0.1, attack_steps=3, trades_beta=6.0)
    torch.manual_seed(5)
    x_adv, _ = trades_perturb(twin, x, p)
    logits = twin(x)
    expected = F.cross_entropy(logits, y) + 6.0 * F.kl_div(F.log_softmax(twin(x_adv), 1), F.softmax(logits, 1),
                                                           reduction="batchmean")
    torch.manual_seed(5)
    got = get_objective("trades")(model, x, y, p, 0.0)
    assert math.isclose(float(got.detach()), float(expected.detach()), rel_tol=1e-6)


def test_added_penalty_joins_every_objective_while_active():
    from pipeline.objectives import added_penalty

    model, (x, y) = tiny_net(), tiny_batch()
    p = params("benign")
    plain = float(get_objective("benign")(model, x, y, p, 0.5).detach())
    seen = []
    with added_penalty(lambda progress: seen.append(progress) or torch.tensor(2.5)):
        assert math.isclose(float(get_objective("benign")(model, x, y, p, 0.5).detach()), plain + 2.5, rel_tol=1e-6)
    assert seen == [0.5]
    assert float(get_objective("benign")(model, x, y, p, 0.5).detach()) == plain  # gone once the block ends
