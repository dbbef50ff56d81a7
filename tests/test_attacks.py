"""The audit's attacks: known worst cases, restarts, exits that must not change the verdict, deployed numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.attacks import AttackOptions, pgd_attack
from pipeline.attacks.steps import RowState, pgd_rule
from pipeline.errors import HydraPipeError
from pipeline.threat import ThreatModel
from tests.graphs import qdq_linear_graph

torch.set_num_threads(1)


def _linear(k: int, d: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _data(model: nn.Module, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def _exact_linf_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """min over the box [x - eps, x + eps] ∩ [0, 1] of min_j (z_y - z_j), exact for a linear model: each
    coordinate sits at the end of its interval that the sign of (w_y - w_j) picks."""
    lin = model[1]
    w, b = lin.weight.detach(), lin.bias.detach()
    xf = x.flatten(1)
    lo, hi = (xf - eps).clamp(0, 1), (xf + eps).clamp(0, 1)
    out = []
    for i in range(len(x)):
        c = w[y[i]] - w  # [K, d]
        worst = torch.where(c > 0, lo[i], hi[i])
        m = (c * worst).sum(1) + b[y[i]] - b
        m[y[i]] = torch.inf
        out.append(m.min())
    return torch.stack(out)


def test_linear_model_linf_matches_exact_worst_case():
    model = _linear(3, 16, seed=1)
    x, y = _data(model, 60, seed=2)
    eps = 0.05
    exact = _exact_linf_margin(model, x, y, eps)
    assert 5 < int((exact > 0).sum()) < 55  # a mix of robust and breakable examples
    res = pgd_attack(model, x, y, eps, steps=60, restarts=4, options=AttackOptions(batch_size=64))
    clear = exact.abs() > 1e-3  # leave out float ties
    assert torch.equal(res.robust[clear], (exact > 0)[clear])
    # on robust examples PGD reaches the worst vertex: its lowest margin is the exact minimum
    rob = exact > 0
    assert torch.allclose(res.min_margin[rob], exact[rob], atol=1e-4)
    # every adversarial example is in the ball and in [0, 1], and misclassified
    xa = res.adv_x
    assert ((xa - x[res.adv_index]).abs().amax() <= eps + 1e-6) and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        assert (model(xa).argmax(1) != y[res.adv_index]).all()


def test_linear_model_l2_matches_exact_worst_case():
    model = _linear(2, 16, seed=3)
    g = torch.Generator().manual_seed(4)
    x = 0.3 + 0.4 * torch.rand(80, 1, 4, 4, generator=g)  # far enough from 0 and 1 that the box never binds
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.1
    w, b = model[1].weight.detach(), model[1].bias.detach()
    c = w[y] - w[1 - y]
    # worst case of a linear margin over an L2 ball: m(x) - eps |c|_2
    exact = (c * x.flatten(1)).sum(1) + b[y] - b[1 - y] - eps * c.norm(dim=1)
    assert 5 < int((exact > 0).sum()) < 75
    res = pgd_attack(model, x, y, eps, norm="l2", steps=50, restarts=2, step_size=0.03,
                     options=AttackOptions(batch_size=64))
    clear = exact.abs() > 1e-3  # leave out float ties
    assert torch.equal(res.robust[clear], (exact > 0)[clear])
    rob = exact > 0
    assert torch.allclose(res.min_margin[rob], exact[rob], atol=1e-4)
    assert ((res.adv_x - x[res.adv_index]).flatten(1).norm(dim=1) <= eps + 1e-5).all()


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_iterate_stays_in_the_ball_and_the_valid_range(norm):
    inner = _mlp(5)
    x, y = _data(inner, 1, seed=6)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the range's edges: the clip must bind
    model = _Recorder(inner)
    eps = 0.3
    pgd_attack(model, x, y, eps, norm=norm, steps=30, restarts=8,
               options=AttackOptions(early_exit=False, cycle_exit=False))
    seen = torch.cat(model.seen).flatten(1)
    assert len(seen) >= 8 * 30
    dist = (seen - x.flatten(1)).abs().amax(1) if norm == "linf" else (seen - x.flatten(1)).norm(dim=1)
    assert dist.max() <= eps + 1e-5
    assert seen.min() >= 0 and seen.max() <= 1
    assert dist.max() > 0.9 * eps  # the attack does move to the ball's edge


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_each_step_rule_keeps_every_iterate_in_the_threat_set(norm):
    threat = ThreatModel(0.3, norm)
    rule = pgd_rule(threat, alpha=0.25)  # large steps: the projection binds on most of them
    g = torch.Generator().manual_seed(19)
    x0 = torch.rand(5, 1, 4, 4, generator=g)
    x0[:, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the range's edges: the clip must bind
    starts = [rule.start(x0[i], seed=0, example=i, restarts=range(4)) for i in range(5)]
    x = torch.cat([s for s, _ in starts])
    state = RowState.cat([st for _, st in starts])
    centre = x0.repeat_interleave(4, 0)
    for t in range(40):
        dist = (x - centre).flatten(1).abs().amax(1) if norm == "linf" else (x - centre).flatten(1).norm(dim=1)
        assert dist.max() <= threat.eps + 1e-5, t
        assert x.min() >= 0 and x.max() <= 1, t
        if t == 20:  # rows leave with their state: the others keep their own box or centre
            keep = torch.arange(len(x)) % 3 != 0
            x, state, centre = x[keep], state.keep(keep), centre[keep]
        x = rule.step(x, torch.randn(x.shape, generator=g), state, torch.full((len(x),), t), torch.zeros(len(x)))
    assert dist.max() > 0.9 * threat.eps  # the rule does reach the ball's edge


class _Flat(nn.Module):
    """Breakable only near one corner whose region has zero gradient elsewhere: only a random start inside
    ``x_0 > 0.5 + 0.8 eps`` sees a gradient (probability 0.1 per restart), and from there PGD breaks it."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.t = 0.5 + 0.8 * eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x.flatten(1)[:, :1] - self.t)
        return torch.cat([1 - 100 * h, torch.zeros_like(h)], 1)


def test_restarts_matter_and_the_restart_curve_is_exact():
    eps = 0.1
    model = _Flat(eps)
    x = torch.rand(40, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = 0.5
    y = torch.zeros(40, dtype=torch.long)
    one = pgd_attack(model, x, y, eps, steps=20, restarts=1)
    many = pgd_attack(model, x, y, eps, steps=20, restarts=64)
    assert one.robust_accuracy > 0.6  # one random start rarely lands in the corner's basin
    assert many.robust_accuracy < 0.1
    curve = many.robust_by_restart
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    # the curve is what runs with fewer restarts (same seed) report
    for k in (1, 3, 10):
        assert pgd_attack(model, x, y, eps, steps=20, restarts=k).robust_accuracy == pytest.approx(curve[k - 1])
    assert curve[0] == pytest.approx(one.robust_accuracy)


def test_step_curve_is_exact():
    model = _mlp(7)
    x, y = _data(model, 40, seed=8)
    eps, alpha = 0.15, 0.01
    res = pgd_attack(model, x, y, eps, steps=50, restarts=3, step_size=alpha)
    assert res.robust_by_step[0] > res.robust_by_step[50]  # the steps do work
    for s in (5, 20):
        short = pgd_attack(model, x, y, eps, steps=s, restarts=3, step_size=alpha)
        assert short.robust_accuracy == pytest.approx(res.robust_by_step[s])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_early_exits_and_batching_do_not_change_the_result(norm):
    model = _mlp(9)
    x, y = _data(model, 20, seed=10)
    eps = 0.12 if norm == "linf" else 0.5
    plain = pgd_attack(model, x, y, eps, norm=norm, steps=80, restarts=5,
                       options=AttackOptions(batch_size=1000, early_exit=False, cycle_exit=False))
    assert 0 < plain.robust_accuracy < 1
    for kw in (dict(), dict(exact_curves=False), dict(batch_size=7), dict(cycle_exit=False)):
        res = pgd_attack(model, x, y, eps, norm=norm, steps=80, restarts=5,
                         options=AttackOptions(**{"batch_size": 1000, **kw}))
        assert torch.equal(res.robust, plain.robust), kw
        assert torch.equal(res.break_step, plain.break_step), kw
        assert res.row_steps < plain.row_steps, kw
        if kw.get("exact_curves", True):
            assert res.robust_by_restart == plain.robust_by_restart
            assert torch.equal(res.break_restart, plain.break_restart)
    # on L-inf, unbroken rows settle into cycles long before 80 steps: most of the work is skipped
    if norm == "linf":
        assert pgd_attack(model, x, y, eps, steps=80, restarts=5).row_steps < 0.7 * plain.row_steps


def test_a_part_attacked_with_its_index_gets_the_whole_runs_verdicts():
    model = _mlp(9)
    x, y = _data(model, 20, seed=10)
    full = pgd_attack(model, x, y, 0.12, steps=40, restarts=3)
    assert 0 < full.robust_accuracy < 1
    part = torch.tensor([17, 3, 11, 5, 0, 8])
    sub = pgd_attack(model, x[part], y[part], 0.12, steps=40, restarts=3,
                     options=AttackOptions(index=part, batch_size=5))
    assert torch.equal(sub.robust, full.robust[part])
    assert torch.equal(sub.break_step, full.break_step[part])
    assert torch.equal(sub.break_restart, full.break_restart[part])


def test_reproducible_with_a_seed_and_seed_matters():
    model = _mlp(11)
    x, y = _data(model, 30, seed=12)
    a = pgd_attack(model, x, y, 0.1, steps=15, restarts=3, options=AttackOptions(seed=5))
    b = pgd_attack(model, x, y, 0.1, steps=15, restarts=3, options=AttackOptions(seed=5))
    c = pgd_attack(model, x, y, 0.1, steps=15, restarts=3, options=AttackOptions(seed=6))
    assert torch.equal(a.robust, b.robust) and torch.equal(a.adv_x, b.adv_x)
    assert torch.equal(a.min_margin, b.min_margin)
    assert not torch.equal(a.min_margin, c.min_margin)


def test_verified_examples_are_not_attacked_and_count_as_robust():
    model = _Recorder(_mlp(13))
    x, y = _data(model.inner, 10, seed=14)
    verified = torch.zeros(10, dtype=torch.bool)
    verified[:4] = True
    res = pgd_attack(model, x, y, 0.2, steps=10, restarts=2, options=AttackOptions(verified=verified))
    assert res.robust[:4].all() and res.settled["verification"] == 4
    attacked = torch.cat(model.seen[1:]).flatten(1)  # [0] is the clean check of all examples
    near = torch.cdist(attacked, x[:4].flatten(1), p=float("inf")) <= 0.2 + 1e-6
    assert not near.any()


def test_parameters_get_no_gradient_and_modes_are_restored():
    model = _mlp(15).train()
    x, y = _data(model, 8, seed=16)
    pgd_attack(model, x, y, 0.1, steps=5, restarts=2)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_candidates_rejected_by_the_deployed_numerics(tmp_path):
    import onnxruntime as ort

    qdq_linear_graph(tmp_path / "q.onnx")
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])

    def confirm(xs: np.ndarray) -> np.ndarray:
        return sess.run(None, {"input": xs})[0]

    # the float model the gradients come from: no rounding, so it is broken for x > 0.6
    float_model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        float_model[1].weight.copy_(torch.tensor([[-10.0], [0.0]]))
        float_model[1].bias.copy_(torch.tensor([6.0, 0.0]))
    x = torch.full((3, 1, 1, 1), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    # eps 0.12: the float model finds x = 0.62 > 0.6, which onnxruntime rounds to 0.5: rejected, still robust
    res = pgd_attack(float_model, x, y, 0.12, steps=20, restarts=3, options=AttackOptions(confirm=confirm))
    assert res.robust.all() and res.rejected > 0 and res.rejected_examples == 3
    assert not pgd_attack(float_model, x, y, 0.12, steps=20, restarts=3).robust.any()  # unconfirmed: broken
    # eps 0.2: x = 0.7 rounds to 0.75 > 0.6 on the deployed model too: confirmed
    res = pgd_attack(float_model, x, y, 0.2, steps=20, restarts=3, options=AttackOptions(confirm=confirm))
    assert not res.robust.any()
    assert (confirm(res.adv_x.numpy()).argmax(1) != 0).all()


def test_bad_inputs_raise_one_line_errors():
    model = _mlp()
    x, y = _data(model, 4)
    with pytest.raises(HydraPipeError):
        pgd_attack(model, x, y, -0.1)
    with pytest.raises(HydraPipeError):
        pgd_attack(model, x * 2, y, 0.1)
    with pytest.raises(HydraPipeError):
        pgd_attack(model, x, y[:3], 0.1)
    with pytest.raises(HydraPipeError):
        pgd_attack(model, x, y, 0.1, norm="l1")
    for kw in (dict(batch_size=0), dict(seed=-1), dict(confirm_margin=-1.0), dict(threads=0)):
        with pytest.raises(HydraPipeError, match="attack options"):
            AttackOptions(**kw)
    for kw in (dict(index=torch.arange(3)), dict(verified=torch.ones(5, dtype=torch.bool))):
        with pytest.raises(HydraPipeError, match="entries for 4 examples"):
            pgd_attack(model, x, y, 0.1, steps=2, restarts=1, options=AttackOptions(**kw))
