"""The Square attack: per-example random streams (verdicts independent of the batch), known worst cases, the
threat set, no query spent on a window that does not change, the shared result type, confirmation on the deployed
numerics (breaks and boundary), the deployed model queried itself, gradient masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.attacks import AttackOptions, pgd_attack, square_attack
from pipeline.attacks.square import _eta, _place, _side, _square_p, deployed_model, queries_deployed
from pipeline.errors import HydraPipeError
from tests.test_attacks import _data, _exact_linf_margin, _linear, _mlp, _Recorder

torch.set_num_threads(1)


def _images(n: int, seed: int, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)


def _conv(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4))


class _RowWise(nn.Module):
    """A 2-layer network whose every row is computed on its own (products and a sum over the row, no BLAS): its
    logits do not change in the last bit with the batch, so neither may any decision of the attack."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1, self.w2 = torch.randn(16, 64, generator=g) / 8, torch.randn(4, 16, generator=g) / 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu((x.flatten(1)[:, None, :] * self.w1).sum(-1))
        return (h[:, None, :] * self.w2).sum(-1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_an_examples_result_does_not_depend_on_the_others_in_the_batch(norm):
    model = _RowWise(1)
    x, y = _images(16, 2, model)
    eps = 0.1 if norm == "linf" else 0.8
    full = square_attack(model, x, y, eps, norm=norm, queries=150, restarts=2, options=AttackOptions(seed=3))
    assert 0 < int((~full.robust).sum()) < 16 and full.clean_correct.all()
    pos = {int(i): k for k, i in enumerate(full.adv_index)}
    for part in (torch.tensor([9, 2, 14, 0, 5, 11]), torch.randperm(16, generator=torch.Generator().manual_seed(4))):
        sub = square_attack(model, x[part], y[part], eps, norm=norm, queries=150, restarts=2,
                            options=AttackOptions(seed=3, index=part, batch_size=5))
        assert torch.equal(sub.robust, full.robust[part])
        assert torch.equal(sub.min_margin, full.min_margin[part])
        assert torch.equal(sub.break_step, full.break_step[part])
        assert torch.equal(sub.break_restart, full.break_restart[part])
        for k, i in enumerate(sub.adv_index.tolist()):
            assert torch.equal(sub.adv_x[k], full.adv_x[pos[int(part[i])]])
    # a break is at a query of a restart (0: its start); an unbroken example spends the whole budget, its start and
    # every query of every restart but those whose window would not change
    broken = ~full.robust
    assert ((full.break_step[broken] >= 0) & (full.break_step[broken] <= 150)).all()
    assert ((full.break_restart[broken] >= 0) & (full.break_restart[broken] <= 1)).all()
    assert (full.break_step[~broken] == -1).all()
    assert full.settled == dict(verification=0, clean_wrong=0, broken=int(broken.sum()), convergence=0,
                                full_budget=int((~broken).sum()))
    assert 0.95 * 2 * 151 * int((~broken).sum()) < full.row_steps <= 2 * 151 * 16


def test_breaks_exactly_the_linear_examples_whose_worst_case_is_negative():
    model = _linear(3, 16, seed=1)
    x, y = _data(model, 60, seed=2)
    eps = 0.05
    exact = _exact_linf_margin(model, x, y, eps)
    assert 5 < int((exact > 0).sum()) < 55
    sq = square_attack(model, x, y, eps, queries=300)
    clear = exact.abs() > 1e-3
    assert torch.equal(sq.robust[clear], (exact > 0)[clear])
    assert (sq.min_margin >= exact - 1e-5).all()  # never below the exact minimum: the points are in the ball
    with torch.no_grad():
        assert (model(sq.adv_x).argmax(1) != y[sq.adv_index]).all()


def test_l2_never_breaks_a_robust_linear_example_and_breaks_the_clearly_broken_ones():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x = 0.3 + 0.4 * torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.3
    w, b = model[1].weight.detach(), model[1].bias.detach()
    c = w[y] - w[1 - y]
    exact = (c * x.flatten(1)).sum(1) + b[y] - b[1 - y] - eps * c.norm(dim=1)  # the box never binds here
    assert 5 < int((exact > 0).sum()) < 55
    sq = square_attack(model, x, y, eps, norm="l2", queries=500)
    assert sq.robust[exact > 0].all()
    assert not sq.robust[exact < -0.1].any()
    assert ((sq.adv_x - x[sq.adv_index]).flatten(1).norm(dim=1) <= eps + 1e-5).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_query_stays_in_the_ball_and_the_range(norm):
    inner = _conv(5)
    x, y = _images(3, 6, inner)
    x[:, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the range's edges: the clip must bind
    model = _Recorder(inner)
    eps = 0.3 if norm == "linf" else 1.0
    square_attack(model, x, y, eps, norm=norm, queries=60)
    assert torch.equal(model.seen[0], x)  # the clean check
    seen = torch.cat(model.seen[1:]).flatten(1)
    dist = torch.cdist(seen, x.flatten(1), p=float("inf") if norm == "linf" else 2).min(1).values
    assert dist.max() <= eps + 1e-5 and seen.min() >= 0 and seen.max() <= 1
    assert dist.max() > 0.99 * eps
    if norm == "linf":  # every query lies on the ball's edge (on L2 the range's clip pulls some inside)
        assert dist.min() > 0.99 * eps


class _Counted(nn.Module):
    """Two classes, class 0 by a margin no point of the ball closes: every example runs the whole budget. Counts
    the rows it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0
        self.w = torch.randn(2, 64, generator=torch.Generator().manual_seed(7)) / 100

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return x.flatten(1) @ self.w.T + torch.tensor([5.0, 0.0])


def test_no_query_is_spent_on_a_window_that_does_not_change():
    """Late in an L-inf run on one channel a window is a pixel or two already at one sign, so half the sign draws
    would leave the point as it is (before: 7547 of 16000 queries here). As in the paper's code the signs are redrawn
    until the window changes (at most REDRAWS times, then the query is skipped), and a candidate equal to the current
    point is neither evaluated nor counted."""
    model = _Counted()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    y = torch.zeros(8, dtype=torch.long)
    queries = 2000
    res = square_attack(model, x, y, 0.1, queries=queries)
    assert res.robust.all() and res.settled["full_budget"] == 8
    evaluated = model.rows - 8  # less the clean check
    assert res.row_steps == evaluated
    unchanged = 8 * (queries + 1) - evaluated
    assert unchanged <= 0.01 * 8 * queries  # a query whose 1 + REDRAWS sign draws all fail: ~2^-9 of them


def test_one_channel_verdicts_are_deterministic_and_do_not_depend_on_the_batch_size():
    model = _RowWise(5)
    x, y = _images(12, 6, model)
    runs = [square_attack(model, x, y, 0.03, queries=600, options=AttackOptions(seed=2, batch_size=b))
            for b in (4096, 5, 1, 4096)]
    first = runs[0]
    assert 0 < int((~first.robust).sum()) < 12
    for r in runs[1:]:
        assert torch.equal(r.robust, first.robust) and torch.equal(r.break_step, first.break_step)
        assert torch.equal(r.break_restart, first.break_restart) and torch.equal(r.adv_x, first.adv_x)
        assert torch.equal(r.min_margin, first.min_margin) and r.row_steps == first.row_steps


def test_clean_mistakes_verified_examples_and_the_restart_curve_as_the_gradient_attacks_report_them():
    model = _RowWise(1)
    x, y = _images(16, 2, model)
    y[:2] = (y[:2] + 1) % 4  # clean mistakes
    verified = torch.zeros(16, dtype=torch.bool)
    verified[2:4] = True
    opts = AttackOptions(seed=3, verified=verified)
    one = square_attack(model, x, y, 0.05, queries=30, restarts=1, options=opts)
    rec = _Recorder(model)
    three = square_attack(rec, x, y, 0.05, queries=30, restarts=3, options=opts)
    assert (three.break_step[:2] == 0).all() and (three.break_restart[:2] == 0).all()
    assert torch.equal(three.adv_x[:2], x[:2]) and not three.clean_correct[:2].any()
    assert three.robust[2:4].all() and three.settled["verification"] == 2 and three.settled["clean_wrong"] == 2
    assert sum(three.settled.values()) == 16
    attacked = torch.cat(rec.seen[1:]).flatten(1)  # [0] is the clean check of all examples
    assert not (torch.cdist(attacked, x[2:4].flatten(1), p=float("inf")) <= 0.05 + 1e-6).any()
    # a restart runs only on the examples still standing: the restart curve is what fewer restarts report
    assert (three.break_restart > 0).any()
    assert torch.equal(one.robust, three.robust | (three.break_restart >= 1))
    assert three.robust_by_restart[0] == pytest.approx(one.robust_accuracy)
    assert len(three.robust_by_restart) == 3 and three.robust_by_step[30] == pytest.approx(three.robust_accuracy)


def test_the_papers_schedule_and_l2_pattern():
    # halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10000 queries, rescaled to the budget
    assert [_square_p(0.8, q, 1000) for q in (0, 1, 2, 5, 6, 20, 21, 100, 101, 999)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 16, 0.8 / 32, 0.8 / 512]
    assert _side(0.8, 8, 8, "linf") == 7 and _side(0.001, 8, 8, "linf") == 1
    assert _side(0.001, 8, 8, "l2") == 3 and _side(0.5, 32, 32, "l2") % 2 == 1
    eta = _eta(5)
    assert eta.norm() == pytest.approx(1.0)
    assert (eta[:2] > 0).all() and (eta[2:] < 0).all() and eta[1, 2] == eta[:2].max()
    placed = _place(eta, torch.tensor([1, 3]), torch.tensor([2, 0]), torch.tensor([False, True]), 8, 8)
    assert torch.equal(placed[0, 0, 1:6, 2:7], eta) and torch.equal(placed[1, 0, 3:8, 0:5], eta.T)
    assert placed.abs().sum() == pytest.approx(2 * eta.abs().sum())


def test_a_break_only_the_deployed_model_sees_is_found_near_the_boundary():
    model = _linear(4, 16, seed=32)
    x, y = _data(model, 60, seed=33)
    eps = 0.05
    shift = np.array([0.0, 0.05, 0.0, 0.0], dtype=np.float32)

    def confirm(xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(xs)).numpy() + shift

    off = square_attack(model, x, y, eps, queries=300, options=AttackOptions(confirm=confirm, confirm_margin=0))
    on = square_attack(model, x, y, eps, queries=300, options=AttackOptions(confirm=confirm, confirm_margin=0.1))
    assert off.near_boundary_checked == 0 and on.near_boundary_checked > 0
    gained = off.robust & ~on.robust
    assert gained.any() and (off.min_margin[gained] > 0).all()
    assert not (on.robust & ~off.robust).any()
    assert (confirm(on.adv_x.numpy()).argmax(1) != y[on.adv_index].numpy()).all()


def test_querying_the_deployed_model_itself_needs_no_confirmation_and_keeps_the_trajectory():
    """The audit's Square queries the deployed model (onnxruntime) where it can: ``deployed_model(confirm)`` with no
    ``confirm``. On a deployed model that computes the attacked one's logits bit for bit, every query, verdict and
    adversarial point is the same as attacking the torch model and confirming; on one that differs, every break is
    the deployed model's own and nothing is rejected or checked twice."""
    model = _RowWise(40)
    x, y = _images(24, 41, model)

    def same(xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(xs)).numpy()

    for norm, eps in (("linf", 0.08), ("l2", 0.6)):
        torch_side = square_attack(model, x, y, eps, norm=norm, queries=150, options=AttackOptions(confirm=same))
        deployed = square_attack(deployed_model(same), x, y, eps, norm=norm, queries=150)
        assert torch.equal(torch_side.robust, deployed.robust) and torch.equal(torch_side.adv_x, deployed.adv_x)
        assert torch.equal(torch_side.break_step, deployed.break_step)
        assert torch.equal(torch_side.min_margin, deployed.min_margin)
        assert torch_side.row_steps == deployed.row_steps and 0 < deployed.robust.sum() < len(y)
    shift = np.array([0.0, 0.3, 0.0, 0.0], dtype=np.float32)
    other = deployed_model(lambda xs: same(xs) + shift)
    res = square_attack(other, x, y, 0.08, queries=150)
    assert res.rejected == 0 and res.near_boundary_checked == 0 and not res.robust.all()
    assert ((same(res.adv_x.numpy()) + shift).argmax(1) != y[res.adv_index].numpy()).all()
    # the audit's choice: a CPU module with a confirming deployed model, whose logits onnxruntime returns
    assert queries_deployed(model, same) and not queries_deployed(model, None) and not queries_deployed(same, same)
    model.stripped_output_ops = ["Softmax"]  # onnxruntime's outputs would be probabilities: another margin
    assert not queries_deployed(model, same)
    model.stripped_output_ops, model.fixed_batch = [], 1  # a fixed-batch export runs one slice at a time
    assert not queries_deployed(model, same)


class _Masked(nn.Module):
    """Gradient masking: rounding inside the model gives PGD a zero gradient everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (torch.round(x * 8) / 8 - 0.5).flatten(1).sum(1, keepdim=True)
        return torch.cat([0.5 - s, torch.zeros_like(s)], 1)


def test_square_attack_breaks_what_masked_gradients_hide():
    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    model = _Masked()
    pgd = pgd_attack(model, x, y, 0.1, steps=50, restarts=2)
    assert pgd.robust.all()
    assert pgd.row_steps < 4 * 2 * 50 / 4  # zero gradient: each row is a fixed point, caught by the cycle exit
    sq = square_attack(model, x, y, 0.1, queries=300)
    assert not sq.robust.any()
    assert ((sq.adv_x - x).abs().amax() <= 0.1 + 1e-6) and sq.adv_x.min() >= 0
    with torch.no_grad():
        assert (model(sq.adv_x).argmax(1) != y).all()


def test_square_attack_respects_confirm_and_is_seeded():
    model = _mlp(17)
    x, y = _data(model, 12, seed=18)
    a = square_attack(model, x, y, 0.2, queries=40, options=AttackOptions(seed=1))
    b = square_attack(model, x, y, 0.2, queries=40, options=AttackOptions(seed=1))
    c = square_attack(model, x, y, 0.2, queries=40, options=AttackOptions(seed=2))
    assert torch.equal(a.robust, b.robust) and torch.equal(a.adv_x, b.adv_x)
    assert torch.equal(a.break_step, b.break_step)
    assert not torch.equal(a.min_margin, c.min_margin)
    assert not a.robust.all()
    k = int(y[~a.robust][0])
    same = y == k  # a deployed model that always answers k: it never confirms a break of class k
    never = square_attack(model, x[same], y[same], 0.2, queries=40,
                          options=AttackOptions(seed=1, confirm_margin=0,
                                                confirm=lambda xs: np.tile(np.eye(4)[k], (len(xs), 1))))
    assert never.robust.all() and never.rejected > 0 and never.rejected_examples > 0
    # refused candidates keep the example attacked: it spends the whole budget
    assert never.settled["full_budget"] == int(same.sum()) and (never.break_step == -1).all()
    assert never.row_steps > 0.95 * 41 * int(same.sum())


def test_bad_inputs_raise_one_line_errors():
    model = _mlp()
    x, y = _data(model, 4)
    for kw in (dict(queries=-1), dict(restarts=0), dict(p_init=0.0), dict(norm="l1")):
        with pytest.raises(HydraPipeError):
            square_attack(model, x, y, 0.1, **kw)
    with pytest.raises(HydraPipeError, match="index"):
        square_attack(model, x, y, 0.1, options=AttackOptions(index=torch.arange(3)))
    with pytest.raises(HydraPipeError):
        square_attack(model, x * 2, y, 0.1)
    with pytest.raises(HydraPipeError, match="images"):
        square_attack(model, x.flatten(1), y, 0.1)
