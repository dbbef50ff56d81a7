"""Branch and bound: sound against a 1e6-point grid and PGD, and stronger than alpha-CROWN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.attacks import pgd_attack
from pipeline.bounds import branch_and_bound, certify
from pipeline.errors import HydraPipeError
from pipeline.threat import ThreatModel

torch.set_num_threads(1)


def _two_input_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


def _grid_min_margin(net: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """The smallest margin ``logit[y] - max_{j != y} logit[j]`` over a 1001 x 1001 grid of each example's box."""
    g = torch.linspace(0, 1, 1001)
    pts = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    lo, hi = threat.box(x)
    out = []
    with torch.no_grad():
        for i in range(len(x)):
            logits = net(lo[i] + pts * (hi[i] - lo[i]))
            others = logits.clone()
            others[:, y[i]] = -torch.inf
            out.append((logits[:, y[i]] - others.amax(1)).min())
    return torch.stack(out)


@pytest.mark.parametrize("eps", [0.2, 0.3])
def test_bab_is_sound_and_complete_on_a_two_input_net(eps):
    net = _two_input_net()
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = ThreatModel(eps)
    res = branch_and_bound(net, x, y, threat, time_budget_s=1e6, max_shortfall=None)  # search every example
    grid = _grid_min_margin(net, x, y, threat)
    statuses = torch.stack([res.verified, res.falsified, res.undecided, res.timed_out])
    assert (statuses.sum(0) == 1).all()  # one status per example
    # sound: every verified example is robust on the grid, and its margin bounds are below the grid's
    assert (grid[res.verified] > 0).all()
    assert (res.lower.amin(1) <= grid + 1e-4).all()
    # a counterexample is real: the grid finds a point misclassified too (its resolution permitting)
    assert (grid[res.falsified] < 1e-3).all()
    # complete here: every example robust on the grid with some slack is verified
    assert res.verified[grid > 1e-3].all()
    attack = pgd_attack(net, x, y, eps, steps=100, restarts=10)
    assert not (res.verified & ~attack.robust).any()
    assert (~attack.robust).any() and res.verified.any()  # neither side is vacuous


def test_bab_verifies_more_than_alpha_crown():
    net = _two_input_net()
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = ThreatModel(0.2)
    alpha = certify(net, x, y, threat, "alpha-crown").verified
    bab = certify(net, x, y, threat, "bab")
    assert (bab.verified >= alpha).all() and bab.verified.sum() > alpha.sum()
    res = branch_and_bound(net, x, y, threat, time_budget_s=1e6)
    assert torch.equal(res.verified, bab.verified)
    assert (res.domains[alpha] == 1).all() and (res.domains[res.verified & ~alpha] > 1).all()
    assert (res.seconds > 0).all()


def test_bab_on_a_cnn_is_sound_against_pgd():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = ThreatModel(0.1)
    res = branch_and_bound(net, x, y, threat, time_budget_s=1e6, max_domains=400, batch=16)
    attack = pgd_attack(net, x, y, 0.1, steps=100, restarts=10)
    assert not (res.verified & ~attack.robust).any()
    assert (res.domains <= 400).all()


def test_bab_rejects_bad_input():
    net = _two_input_net()
    x, y = torch.rand(3, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(HydraPipeError, match="time_budget_s"):
        branch_and_bound(net, x, y, ThreatModel(0.1), time_budget_s=0)
    with pytest.raises(HydraPipeError, match="3 inputs but 2 labels"):
        branch_and_bound(net, x, y[:2], ThreatModel(0.1))


def test_bab_searches_only_examples_within_reach():
    """``max_shortfall`` skips the search of examples whose root bound is too far from zero: they stay at the
    root (one domain, undecided); the others get what an ungated run gives them."""
    from pipeline.bounds import margin_spec
    from pipeline.bounds.alpha import alpha_crown_bounds, shortfall

    net = _two_input_net()
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = ThreatModel(0.3)
    lo, hi = threat.box(x)
    spec = margin_spec(y, 3)
    root = alpha_crown_bounds(net, lo, hi, spec, lower_only=True, target=0.0, intermediate=False)[0]
    gap = shortfall(net, lo, hi, spec, root)
    full = branch_and_bound(net, x, y, threat, time_budget_s=1e6, max_shortfall=None)
    gate = 0.5 * float(gap[full.verified & (gap > 0)].max())  # below the farthest example the search proves
    gated = branch_and_bound(net, x, y, threat, time_budget_s=1e6, max_shortfall=gate)
    far = gap > gate
    assert far.any() and (full.verified & far).any(), "the gate must skip something the search would prove"
    assert (gated.domains[far] == 1).all() and not gated.verified[far].any()
    assert torch.equal(gated.verified[~far], full.verified[~far])


def test_the_audit_gates_branch_and_bound_as_the_library_does():
    from pipeline.bounds.bab import BAB_SHORTFALL
    from pipeline.config import AuditParams

    assert AuditParams().bab_shortfall == BAB_SHORTFALL


def test_a_childs_inherited_boxes_are_sound_and_within_its_parents():
    """A child domain's boxes (:func:`pipeline.bounds.alpha.inherited_boxes`: the parent's, narrowed by the split
    through IBP) contain every value the network takes on the child's inputs, lie within the parent's, and carry
    the split forward."""
    from pipeline.bounds.alpha import inherited_boxes, initial_boxes
    from pipeline.bounds.bab import find_kinks
    from pipeline.graph import as_graph

    graph = as_graph(_two_input_net())
    x = torch.tensor([[0.4, 0.6]])
    lo, hi = ThreatModel(0.3).box(x)
    root = initial_boxes(graph, lo, hi)
    (z, _, _), (z2, _, _) = find_kinks(graph)
    unstable = ((root[z].lo < 0) & (root[z].hi > 0))[0].nonzero().squeeze(1)
    assert len(unstable) > 1
    g = torch.Generator().manual_seed(0)
    pts = lo + torch.rand(200_000, 2, generator=g) * (hi - lo)
    env = {graph.input_name: pts}
    with torch.no_grad():
        for node in graph.nodes:
            env[node.output] = node.module(*[env[i] for i in node.inputs])
    narrowed = 0
    for neuron in unstable.tolist():
        for sign in (1, -1):
            splits = {name: torch.zeros_like(root[name].lo, dtype=torch.int8) for name in (z, z2)}
            splits[z][0, neuron] = sign
            child = inherited_boxes(graph, lo, hi, splits, dict(root))
            inside = sign * env[z][:, neuron] >= 0  # the child's inputs
            assert inside.any()
            for name, box in child.items():
                assert (box.lo >= root[name].lo).all() and (box.hi <= root[name].hi).all()
                v = env[name][inside]
                assert (v >= box.lo - 1e-5).all() and (v <= box.hi + 1e-5).all(), name
            assert (child[z].lo[0, neuron] >= 0) if sign > 0 else (child[z].hi[0, neuron] <= 0)
            narrowed += int(((child[z2].hi - child[z2].lo) < (root[z2].hi - root[z2].lo) - 1e-6).sum())
    assert narrowed > 0  # the split reaches the next layer's boxes


def test_bab_splits_the_clip_floors_of_an_onnxruntime_int8_graph(tmp_path):
    """onnxruntime fuses each ReLU into its activation's QuantizeLinear (U8, zero point 0: the clip floor), so the
    oracle CNN's int8 graph has no Relu node left; branch and bound splits those floors instead, proves more than
    alpha-CROWN, and nothing it proves is broken, nor is any bound above onnxruntime's margins at sampled points."""
    from pipeline.attacks.pgd import pgd_attack
    from pipeline.bounds.bab import find_kinks
    from pipeline.data import digits_arrays
    from pipeline.onnx_io import ort_logits, ort_session
    from pipeline.onnx_load import load_onnx
    from tests.test_bounds_ops import DATA, plain_int8

    x_train, _, x_test, y_test = digits_arrays()
    path = plain_int8(DATA / "cnn.onnx", tmp_path, (1, 8, 8), x_train[:256])
    graph = load_onnx(path)
    assert not any(node.op == "Relu" for node in graph.nodes)
    assert sum(k.quant is not None for k in find_kinks(graph)) >= 3  # both convolutions and the dense layer
    x, y = torch.from_numpy(x_test[:40]), torch.from_numpy(y_test[:40])
    threat = ThreatModel(0.05)
    alpha = certify(graph, x, y, threat, "alpha-crown", logit_bounds=False).verified
    res = branch_and_bound(graph, x, y, threat, max_domains=60, time_budget_s=1e6)  # domains, not seconds
    assert (res.verified >= alpha).all() and res.verified.sum() > alpha.sum()
    attack = pgd_attack(graph, x, y, 0.05, steps=100, restarts=5)
    assert not (res.verified & ~attack.robust).any()
    session = ort_session(path, threads=1)
    lo, hi = threat.box(x)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pts = lo + torch.rand(x.shape, generator=g) * (hi - lo)
        z = torch.from_numpy(ort_logits(session, pts.numpy()))
        margins = z.gather(1, y[:, None]) - z  # [N, classes], 0 at the label
        others = torch.stack([torch.cat([margins[i, :y[i]], margins[i, y[i] + 1:]]) for i in range(len(y))])
        assert (res.lower <= others + 1e-4).all()


def _slow_clock(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """``time.perf_counter`` running ``factor`` times fast: the machine seems ``factor`` times slower."""
    import time

    real = time.perf_counter
    start = real()
    monkeypatch.setattr(time, "perf_counter", lambda: start + factor * (real() - start))


def test_bab_verdicts_do_not_depend_on_the_machines_speed(monkeypatch):
    """Rounds and budgets are counted in domains: on a machine 100x slower (the clock patched) with a time budget
    that does not bind, every verdict, domain count and bound is the same; with one that runs out mid-search, each
    example either gets that very result or is reported ``timed_out`` (never undecided for lack of time)."""
    net = _two_input_net()
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = ThreatModel(0.3)
    budget = dict(max_domains=120, batch=16, max_shortfall=None)
    normal = branch_and_bound(net, x, y, threat, time_budget_s=1e6, **budget)
    assert not normal.timed_out.any() and (normal.domains > 1).sum() >= 5
    _slow_clock(monkeypatch, 100.0)
    slow = branch_and_bound(net, x, y, threat, time_budget_s=1e6, **budget)
    assert slow.seconds.sum() > 10 * normal.seconds.sum()  # the clock did run slow
    for field in ("verified", "falsified", "undecided", "timed_out", "domains", "lower"):
        assert torch.equal(getattr(slow, field), getattr(normal, field)), field
    searched = normal.domains > 1
    cap = 0.25 * float(slow.seconds[searched].max())  # the longest searches run out of time
    part = branch_and_bound(net, x, y, threat, time_budget_s=cap, **budget)
    kept = ~part.timed_out
    assert part.timed_out.any() and kept.any()
    for field in ("verified", "falsified", "undecided", "domains", "lower"):
        assert torch.equal(getattr(part, field)[kept], getattr(normal, field)[kept]), field
    assert (part.domains[part.timed_out] < budget["max_domains"]).all()


def test_bab_reports_a_search_stopped_by_the_time_budget_as_timed_out():
    net = _two_input_net()
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = ThreatModel(0.3)
    normal = branch_and_bound(net, x, y, threat, time_budget_s=1e6, max_domains=120, batch=16, max_shortfall=None)
    tiny = branch_and_bound(net, x, y, threat, time_budget_s=1e-9, max_domains=120, batch=16, max_shortfall=None)
    # every example the root bound leaves unproved is searched, and each search stops before its first round
    assert torch.equal(tiny.verified, normal.verified & (normal.domains == 1))
    assert torch.equal(tiny.timed_out, ~tiny.verified) and tiny.timed_out.any()
    assert not tiny.undecided.any() and not tiny.falsified.any() and (tiny.domains == 1).all()
    # one status per example
    statuses = torch.stack([normal.verified, normal.falsified, normal.undecided, normal.timed_out])
    assert (statuses.sum(0) == 1).all()


def test_an_empty_domain_needs_its_bounds_to_cross_by_more_than_their_rounding():
    """A domain counts as empty (and is dropped as proved) only when a bound crosses its opposite bound by more
    than their float error, which grows with their magnitude: 1000.001 > 1000 is within float32 rounding of
    values near 1000 (an ulp is 6e-5), so that domain may be non-empty and must stay."""
    from pipeline.bounds.bab import empty_domains
    from pipeline.bounds.box import Box

    lo = torch.tensor([[0.0, 1000.001], [0.0, 1000.5], [0.5 + 2e-5, 0.0], [0.5 + 5e-6, 0.0], [-1e30, 0.0]])
    hi = torch.tensor([[1.0, 1000.0], [1.0, 1000.0], [0.5, 1.0], [0.5, 1.0], [1e30, 1.0]])
    assert empty_domains({"z": Box(lo=lo, hi=hi)}).tolist() == [False, True, True, False, False]
