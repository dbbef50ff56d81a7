"""APGD: known worst cases, the targeted loss where cross-entropy is blind, its step-size schedule, verdicts that do
not depend on batching, confirmation on the deployed numerics (breaks and boundary)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.attacks import ATTACKS, AttackOptions, AttackResult, apgd_attack, pgd_attack
from pipeline.attacks.apgd import APGDStep, dlr_grad
from pipeline.attacks.steps import pgd_rule
from pipeline.errors import HydraPipeError
from pipeline.threat import ThreatModel
from tests.test_attacks import _data, _exact_linf_margin, _linear, _mlp, _Recorder

torch.set_num_threads(1)


def _two_class(seed: int, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 2-class linear model and points away from the range's edges: cross-entropy's gradient is a positive
    multiple of ``w_other - w_y``, so APGD-CE heads straight for the exact worst case (L-inf and L2)."""
    model = _linear(2, 16, seed)
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_apgd_ce_on_a_linear_model_breaks_exactly_what_the_exact_worst_case_breaks():
    model, x, y = _two_class(1, 80)
    eps = 0.1
    exact = _exact_linf_margin(model, x, y, eps)
    assert 5 < int((exact > 0).sum()) < 75  # a mix of robust and breakable examples
    res = apgd_attack(model, x, y, eps, steps=50)
    clear = exact.abs() > 1e-3  # leave out float ties
    assert torch.equal(res.robust[clear], (exact > 0)[clear])
    rob = exact > 0
    assert torch.allclose(res.min_margin[rob], exact[rob], atol=1e-4)  # it reaches the worst vertex
    xa = res.adv_x
    assert (xa - x[res.adv_index]).abs().amax() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        assert (model(xa).argmax(1) != y[res.adv_index]).all()


def test_apgd_l2_on_a_linear_model_matches_the_exact_worst_case():
    model, x, y = _two_class(3, 80)
    eps = 0.1
    w, b = model[1].weight.detach(), model[1].bias.detach()
    c = w[y] - w[1 - y]
    exact = (c * x.flatten(1)).sum(1) + b[y] - b[1 - y] - eps * c.norm(dim=1)  # the box never binds here
    assert 5 < int((exact > 0).sum()) < 75
    res = apgd_attack(model, x, y, eps, norm="l2", steps=50)
    clear = exact.abs() > 1e-3
    assert torch.equal(res.robust[clear], (exact > 0)[clear])
    rob = exact > 0
    assert torch.allclose(res.min_margin[rob], exact[rob], atol=1e-4)
    assert ((res.adv_x - x[res.adv_index]).flatten(1).norm(dim=1) <= eps + 1e-5).all()


def test_only_the_targeted_loss_breaks_where_cross_entropy_is_saturated():
    """4 classes, logits ``scale * (1.4, s.x, -5, -5)`` with ``s`` 8 plus and 8 minus ones; example i sits at
    ``0.5 + a_i s / 16`` (``s.x = a_i``), so its worst case over the eps = 0.1 box is ``1.4 - a_i - 1.6``. The
    softmax is saturated wherever APGD-CE can get to (cross-entropy's gradient is exactly 0 and no random start
    comes near the boundary), while the DLR losses do not see the scale."""
    scale = 1e4
    s = torch.tensor([1.0, -1.0] * 8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] = s * scale
        model[1].bias.copy_(torch.tensor([1.4, 0.0, -5.0, -5.0]) * scale)
    a = torch.tensor([-0.4, -0.3, -0.1, 0.0])
    x = (0.5 + a[:, None] * s / 16).view(4, 1, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    exact = 1.4 - a - 1.6  # robust, robust, broken, broken
    eps = 0.1
    ce = apgd_attack(model, x, y, eps, steps=50)
    assert ce.robust.all() and ce.settled["full_budget"] == 4
    t = apgd_attack(model, x, y, eps, steps=50, loss="dlr-targeted")
    assert torch.equal(t.robust, exact > 0)
    assert torch.equal(apgd_attack(model, x, y, eps, steps=50, loss="dlr").robust, exact > 0)
    with torch.no_grad():
        assert (model(t.adv_x).argmax(1) == 1).all()  # the first target: the most likely other class
    assert torch.equal(pgd_attack(model, x, y, eps, steps=50, restarts=2, loss="ce").robust, ce.robust)


def test_targeted_rows_are_targets_times_restarts_most_likely_first():
    model = _mlp(21)
    x, y = _data(model, 6, seed=22)
    res = apgd_attack(model, x, y, 0.0, loss="dlr-targeted", restarts=2)  # eps 0: nothing attacked
    assert res.budget_row_steps == 6 * 2 * 3 * 100  # 4 classes: 3 targets, 2 restarts each
    with torch.no_grad():
        z = model(x)
    z[torch.arange(6), y] = -torch.inf
    goals = dict(enumerate(z.argsort(1, descending=True).tolist()))
    rule = APGDStep(ThreatModel(0.1), 100, "dlr-targeted", restarts=2, targets=goals)
    _, state = rule.start(x[4], seed=0, example=4, restarts=range(6))
    assert state.target.tolist() == [goals[4][0]] * 2 + [goals[4][1]] * 2 + [goals[4][2]] * 2


def test_step_size_halves_on_the_papers_checkpoints():
    """A loss that never rises: condition 1 holds at every checkpoint, so the step size halves at each
    ``w_j = p_j N``: p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 for N = 100."""
    threat = ThreatModel(0.1)
    rule = APGDStep(threat, steps=100)
    x0 = torch.full((1, 4, 4), 0.5)
    x, state = rule.start(x0, seed=0, example=0, restarts=range(2))
    halved_at = []
    for t in range(100):
        eta = state.eta.clone()
        x = rule.step(x, torch.ones_like(x), state, torch.full((2,), t), torch.zeros(2))
        if (state.eta < eta).any():
            assert (state.eta == eta / 2).all()
            halved_at.append(t)
        assert (x - x0).abs().amax() <= 0.1 + 1e-6
    assert halved_at == [22, 41, 57, 70, 80, 87, 93, 99]


def test_a_rising_loss_keeps_its_step_size_and_a_stalled_one_returns_to_its_best_point():
    rule = APGDStep(ThreatModel(0.1), steps=100)
    x0 = torch.full((1, 4, 4), 0.5)
    x, state = rule.start(x0, seed=0, example=0, restarts=range(2))
    best_x = None
    for t in range(23):
        # row 0's loss rises every step; row 1's peaks at step 3 and falls after
        loss = torch.tensor([float(t), float(-abs(t - 3))])
        if t == 3:
            best_x = x[1].clone()
        x = rule.step(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(t)), state,
                      torch.full((2,), t), loss)
        if t == 22:
            assert state.eta.tolist() == pytest.approx([0.2, 0.1])
            assert torch.equal(state.prev[1], best_x)  # row 1 stepped from its best point


def test_dlr_gradients_match_autograd():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (20,), generator=g)
    t = (y + torch.randint(1, 6, (20,), generator=g)) % 6
    for target in (None, t):
        zz = z.clone().requires_grad_(True)
        top = zz.sort(1, descending=True).values
        rows = torch.arange(20)
        if target is None:
            other = zz.clone()
            other[rows, y] = -torch.inf
            want = -(zz[rows, y] - other.max(1).values) / (top[:, 0] - top[:, 2] + 1e-12)
        else:
            want = -(zz[rows, y] - zz[rows, target]) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)
        (auto,) = torch.autograd.grad(want.sum(), zz)
        grad, value = dlr_grad(z, y, target)
        assert torch.allclose(value, want.detach()) and torch.allclose(grad, auto)


@pytest.mark.parametrize("loss", ["ce", "dlr-targeted"])
def test_verdicts_do_not_depend_on_batching_or_on_the_other_examples(loss):
    model = _mlp(9)
    x, y = _data(model, 20, seed=10)
    eps = 0.12
    full = apgd_attack(model, x, y, eps, loss=loss, steps=40, options=AttackOptions(batch_size=1000, early_exit=False))
    assert 0 < full.robust_accuracy < 1
    for kw in (dict(), dict(batch_size=7), dict(batch_size=2), dict(exact_curves=True)):
        res = apgd_attack(model, x, y, eps, loss=loss, steps=40, options=AttackOptions(**{"batch_size": 1000, **kw}))
        assert torch.equal(res.robust, full.robust), kw
        assert res.row_steps < full.row_steps, kw  # early exit: broken examples stop
    part = torch.tensor([17, 3, 11, 5, 0])
    sub = apgd_attack(model, x[part], y[part], eps, loss=loss, steps=40, options=AttackOptions(index=part))
    assert torch.equal(sub.robust, full.robust[part])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_iterate_stays_in_the_ball_and_the_range(norm):
    inner = _mlp(5)
    x, y = _data(inner, 2, seed=6)
    x[:, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the range's edges: the clip must bind
    model = _Recorder(inner)
    eps = 0.3
    apgd_attack(model, x, y, eps, norm=norm, steps=30, loss="dlr-targeted", options=AttackOptions(early_exit=False))
    seen = torch.cat(model.seen[2:]).flatten(1)  # [0], [1]: the clean checks
    assert len(seen) >= 2 * 3 * 30
    centre = x.flatten(1)
    dist = torch.cdist(seen, centre, p=float("inf") if norm == "linf" else 2).min(1).values
    assert dist.max() <= eps + 1e-5 and seen.min() >= 0 and seen.max() <= 1
    assert dist.max() > 0.9 * eps


def test_early_exit_respects_confirm():
    """A deployed model that refuses the first candidates: their examples stay attacked and break later."""
    model, x, y = _two_class(1, 40)
    eps = 0.1
    plain = apgd_attack(model, x, y, eps, steps=50)
    assert (~plain.robust).sum() > 3
    calls = []

    def confirm(xs: np.ndarray) -> np.ndarray:
        calls.append(len(xs))
        with torch.no_grad():
            z = model(torch.as_tensor(xs)).numpy()
        if 2 <= len(calls) <= 3:  # after the clean check, the first two calls are refused: "it is the label"
            return np.eye(2)[1 - z.argmax(1)]
        return z

    res = apgd_attack(model, x, y, eps, steps=50, options=AttackOptions(confirm=confirm, confirm_margin=0))
    assert res.rejected > 0 and res.rejected_examples > 0
    assert torch.equal(res.robust, plain.robust)
    assert (res.break_step[~res.robust] >= plain.break_step[~res.robust]).all()
    assert (res.break_step[~res.robust] > plain.break_step[~res.robust]).any()


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "apgd-t"])
def test_a_break_only_the_deployed_model_sees_is_found_near_the_boundary(attack):
    """The deployed model is the attacked one with class 1 raised by 0.05: an example whose worst-case margin lies
    in (0, 0.05) is robust for the attacked model and broken for the deployed one. Only iterates the attacked model
    classifies correctly reach it, so only the near-boundary confirmation finds it."""
    model = _linear(4, 16, seed=32)
    x, y = _data(model, 60, seed=33)
    eps = 0.05
    shift = np.array([0.0, 0.05, 0.0, 0.0], dtype=np.float32)

    def confirm(xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(xs)).numpy() + shift

    run = ATTACKS.get(attack)
    kw = dict(steps=60, restarts=2) if attack == "pgd" else dict(steps=60)
    off = run(model, x, y, eps, options=AttackOptions(confirm=confirm, confirm_margin=0), **kw)
    on = run(model, x, y, eps, options=AttackOptions(confirm=confirm, confirm_margin=0.1), **kw)
    assert off.near_boundary_checked == 0 and on.near_boundary_checked > 0
    gained = on.robust < off.robust  # broken only with the near-boundary confirmation
    assert gained.any()
    assert (off.min_margin[gained] > 0).all() and (off.min_margin[gained] < 0.05).all()
    assert (confirm(on.adv_x.numpy()).argmax(1) != y[on.adv_index].numpy()).all()
    assert not (on.robust & ~off.robust).any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_and_apgd_draw_their_starts_from_independent_streams(norm):
    """Each attack has its own random streams: with one shared stream, APGD's L-inf starts were PGD's rescaled to
    the sphere (within 0.003 of them), so APGD retried PGD's starts instead of new ones."""
    eps = 0.3
    threat = ThreatModel(eps, norm)
    x0 = torch.full((1, 8, 8), 0.5)  # the range's clip never binds
    pgd, apgd = pgd_rule(threat, alpha=0.1), APGDStep(threat, steps=10)
    gaps = [(pgd.start(x0, 0, i, range(9))[0] - apgd.start(x0, 0, i, range(9))[0]).flatten(1).abs().amax(1)
            for i in range(10)]
    assert torch.cat(gaps).mean() > 0.1 * eps
    # each attack's draws are still a function of (seed, example, restart) alone
    for rule in (pgd, apgd):
        assert torch.equal(rule.start(x0, 0, 3, range(4, 9))[0], rule.start(x0, 0, 3, range(9))[0][4:])
        assert not torch.equal(rule.start(x0, 0, 3, range(1))[0], rule.start(x0, 0, 4, range(1))[0])


def test_every_registered_attack_takes_the_shared_options_and_returns_one_result():
    assert ATTACKS.names() == ["apgd-ce", "apgd-t", "pgd", "square"]
    model = _mlp(3)
    x, y = _data(model, 6, seed=4)
    y[0] = (y[0] + 1) % 4  # a clean mistake
    verified = torch.tensor([False, True, True, True, True, False])
    budget = {"pgd": dict(steps=20, restarts=2), "apgd-ce": dict(steps=20), "apgd-t": dict(steps=20),
              "square": dict(queries=50)}
    for name in ATTACKS.names():
        res = ATTACKS.get(name)(model, x, y, 0.05, options=AttackOptions(seed=1, verified=verified), **budget[name])
        assert isinstance(res, AttackResult), name
        assert int(res.break_step[0]) == 0 and int(res.break_restart[0]) == 0 and not res.robust[0], name
        assert res.robust[1:5].all() and res.clean_correct[1:].all(), name
        assert res.settled["verification"] == 4 and res.settled["clean_wrong"] == 1, name
        assert sum(res.settled.values()) == 6, name


def test_bad_inputs_raise_one_line_errors():
    model = _mlp()
    x, y = _data(model, 4)
    with pytest.raises(HydraPipeError, match="loss"):
        apgd_attack(model, x, y, 0.1, loss="cw")
    with pytest.raises(HydraPipeError, match="4 classes"):
        apgd_attack(_linear(3, 16, 0), x, y % 3, 0.1, loss="dlr-targeted")
    with pytest.raises(HydraPipeError, match="repeated"):
        apgd_attack(model, x, y, 0.1, options=AttackOptions(index=torch.tensor([0, 1, 1, 2])))
    with pytest.raises(HydraPipeError):
        apgd_attack(model, x, y, 0.1, norm="l1")
    with pytest.raises(HydraPipeError):
        apgd_attack(model, x, y, 0.1, options=AttackOptions(confirm_margin=-1))
