"""IBP / CROWN / alpha-CROWN: equality with auto_LiRPA's results, soundness, closed forms, int8 graphs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.bounds import (alpha_crown_bounds, certify, crown_bounds, interval_bounds, margin_lower_bounds,
                             margin_spec, verified)
from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.masking import MaskedConv2d, MaskedLinear, start_score_pruning, masked_layers
from pipeline.models import Normalize
from pipeline.graph import Binary, GraphModule, Node
from pipeline.onnx_io import ort_logits, ort_session
from pipeline.onnx_load import load_onnx
from pipeline.threat import ThreatModel

DATA = Path(__file__).parent / "data" / "ibp"
ORACLES = [("mlp", 0.01), ("mlp", 0.05), ("cnn", 0.005), ("cnn", 0.01)]


def close(ours: torch.Tensor, ref: np.ndarray) -> None:
    """Within 1e-5 relative, relative to the bound's own scale (float32 summation order differs)."""
    np.testing.assert_allclose(ours.detach().numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("net,eps", ORACLES)
def test_bounds_equal_auto_lirpa(net, eps):
    ref = np.load(DATA / f"{net}.eps{eps}.bounds.npz")
    model = load_onnx(DATA / f"{net}.onnx")
    x_lo, x_hi, y = torch.from_numpy(ref["x_L"]), torch.from_numpy(ref["x_U"]), torch.from_numpy(ref["y"])
    lo, hi = interval_bounds(model, x_lo, x_hi)
    close(lo, ref["ibp_lb"])
    close(hi, ref["ibp_ub"])
    ibp_margin = margin_lower_bounds(model, x_lo, x_hi, y, "ibp")
    close(ibp_margin, ref["ibp_margin_lb"])
    assert np.array_equal((ibp_margin > 0).all(1).numpy(), ref["ibp_verified"])
    lo, hi = crown_bounds(model, x_lo, x_hi)
    close(lo, ref["crown_lb"])
    close(hi, ref["crown_ub"])
    crown_margin = margin_lower_bounds(model, x_lo, x_hi, y, "crown")
    close(crown_margin, ref["crown_margin_lb"])
    assert np.array_equal((crown_margin > 0).all(1).numpy(), ref["crown_verified"])
    assert torch.equal(margin_spec(y, 10), torch.from_numpy(ref["C"]))
    # every logit seen by auto_LiRPA's sampling and attacks lies inside our bounds
    assert (ref["emp_min"] >= lo.detach().numpy() - 1e-5).all() and (ref["emp_max"] <= hi.detach().numpy() + 1e-5).all()


def test_folded_margins_are_tighter_than_subtracting_logit_bounds():
    ref = np.load(DATA / "cnn.eps0.005.bounds.npz")
    model = load_onnx(DATA / "cnn.onnx")
    x_lo, x_hi, y = torch.from_numpy(ref["x_L"]), torch.from_numpy(ref["x_U"]), torch.from_numpy(ref["y"])
    folded = margin_lower_bounds(model, x_lo, x_hi, y, "ibp")
    lo, hi = interval_bounds(model, x_lo, x_hi)
    spec = margin_spec(y, 10)
    naive = (spec.clamp(min=0) * lo.unsqueeze(1) + spec.clamp(max=0) * hi.unsqueeze(1)).sum(2)
    close(naive, ref["ibp_naive_margin_lb"])
    assert (folded.detach().numpy() >= ref["ibp_naive_margin_lb"] - 1e-5).all()
    assert (folded > 0).all(1).sum() > int(ref["ibp_naive_verified"].sum())


# ---------------------------------------------------------------- closed forms

def test_single_linear_layer_ibp_is_exact():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    x_lo, x_hi = torch.tensor([[-1.0, 0.0, 2.0]]), torch.tensor([[1.0, 0.5, 2.5]])
    lo, hi = interval_bounds(nn.Sequential(layer), x_lo, x_hi)
    corners = torch.cartesian_prod(*[torch.stack([a, b]) for a, b in zip(x_lo[0], x_hi[0])])
    values = layer(corners).detach()
    # the bound is attained at a corner of the box, for every output
    assert torch.allclose(lo[0], values.min(0).values, atol=1e-6)
    assert torch.allclose(hi[0], values.max(0).values, atol=1e-6)
    clo, chi = crown_bounds(nn.Sequential(layer), x_lo, x_hi)
    assert torch.allclose(clo, lo, atol=1e-6) and torch.allclose(chi, hi, atol=1e-6)


def test_crown_on_a_relu_network_known_by_hand():
    """y = relu(x1 + x2) + relu(x1 - x2) on [-1, 1]^2. Both pre-activations lie in [-2, 2]: unstable, with
    u = -l, so the adaptive lower slope is 0 and the upper chord is h / 2 + 1. CROWN: y <= (x1 + x2) / 2 + 1 +
    (x1 - x2) / 2 + 1 = x1 + 2 <= 3 and y >= 0. IBP: [0, 4]. The true range is [0, 2]."""
    fc1 = nn.Linear(2, 2)
    fc2 = nn.Linear(2, 1)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        fc1.bias.zero_()
        fc2.weight.copy_(torch.tensor([[1.0, 1.0]]))
        fc2.bias.zero_()
    net = nn.Sequential(fc1, nn.ReLU(), fc2)
    x_lo, x_hi = -torch.ones(1, 2), torch.ones(1, 2)
    lo, hi = crown_bounds(net, x_lo, x_hi)
    assert lo.item() == pytest.approx(0.0, abs=1e-6) and hi.item() == pytest.approx(3.0, abs=1e-6)
    ilo, ihi = interval_bounds(net, x_lo, x_hi)
    assert ilo.item() == pytest.approx(0.0, abs=1e-6) and ihi.item() == pytest.approx(4.0, abs=1e-6)
    # with intermediate bounds from IBP the first layer's bounds are the same (exact), so is the result
    lo2, hi2 = crown_bounds(net, x_lo, x_hi, intermediate="ibp")
    assert hi2.item() == pytest.approx(3.0, abs=1e-6)


# ---------------------------------------------------------------- soundness, property-based

def random_net(seed: int, conv: bool) -> nn.Sequential:
    torch.manual_seed(seed)
    if conv:
        net = nn.Sequential(Normalize([0.5], [0.25]), MaskedConv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            MaskedConv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                            MaskedLinear(24, 12), nn.ReLU(), MaskedLinear(12, 5))
        with torch.no_grad():
            net[2].running_mean.uniform_(-0.3, 0.3)
            net[2].running_var.uniform_(0.5, 2.0)
            net[2].weight.uniform_(-1.5, 1.5)
    else:
        net = nn.Sequential(nn.Flatten(), MaskedLinear(64, 16), nn.ReLU(), MaskedLinear(16, 16), nn.ReLU(),
                            MaskedLinear(16, 5))
    return net.eval()


def inside(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tol: float = 1e-4) -> bool:
    return bool(((v >= lo - tol) & (v <= hi + tol)).all())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), conv=st.booleans(), eps=st.floats(0.001, 0.2))
def test_sampled_and_attacked_points_lie_inside_every_bound(seed, conv, eps):
    net = random_net(seed, conv)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 1, 8, 8, generator=g)
    x_lo, x_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        ibp = interval_bounds(net, x_lo, x_hi)
        crown = crown_bounds(net, x_lo, x_hi)
        crown_ibp = crown_bounds(net, x_lo, x_hi, intermediate="ibp")
    alpha = alpha_crown_bounds(net, x_lo, x_hi, iterations=5)
    # CROWN is intersected with IBP, so it is never looser; alpha-CROWN keeps its best iterate, never looser
    assert (crown[0] >= ibp[0] - 1e-5).all() and (crown[1] <= ibp[1] + 1e-5).all()
    assert (alpha[0] >= crown[0] - 1e-5).all() and (alpha[1] <= crown[1] + 1e-5).all()
    # random points of the box, its corners, and points found by gradient ascent / descent on each logit
    u = torch.rand(64, *x.shape, generator=g)
    samples = [x_lo + u * (x_hi - x_lo), torch.where(u < 0.5, x_lo, x_hi)]
    z = (x_lo + x_hi) / 2
    for sign in (1.0, -1.0):
        for k in range(5):
            p = z.clone().requires_grad_(True)
            for _ in range(8):
                (grad,) = torch.autograd.grad(sign * net(p)[:, k].sum(), p)
                p = torch.min(torch.max(p.detach() + (x_hi - x_lo) * 0.25 * grad.sign(), x_lo), x_hi).requires_grad_(True)
            samples.append(p.detach().unsqueeze(0))
    with torch.no_grad():
        for s in samples:
            out = net(s.reshape(-1, *x.shape[1:])).reshape(s.shape[0], x.shape[0], -1)
            for lo, hi in (ibp, crown, crown_ibp, alpha):
                assert inside(out, lo, hi)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.1))
def test_margin_bounds_are_sound_and_ordered(seed, eps):
    net = random_net(seed, conv=True)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(seed + 1))
    x_lo, x_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    ibp = margin_lower_bounds(net, x_lo, x_hi, y, "ibp")
    crown = margin_lower_bounds(net, x_lo, x_hi, y, "crown")
    alpha = margin_lower_bounds(net, x_lo, x_hi, y, "alpha-crown")
    assert ibp.shape == (4, 4)
    # CROWN is intersected with the folded interval bound: every example IBP verifies, CROWN verifies too
    assert (crown >= ibp - 1e-5).all() and (alpha >= crown - 1e-5).all()
    spec = margin_spec(y, 5)
    with torch.no_grad():
        pts = x_lo + torch.rand(32, *x.shape) * (x_hi - x_lo)
        margins = torch.einsum("nmk,snk->snm", spec, net(pts.reshape(-1, 1, 8, 8)).reshape(32, 4, 5))
    for bound in (ibp, crown, alpha):
        assert (margins >= bound - 1e-4).all()


def test_alpha_crown_tightens_crown():
    ref = np.load(DATA / "cnn.eps0.01.bounds.npz")
    model = load_onnx(DATA / "cnn.onnx")
    x, y = torch.from_numpy(ref["x"]), torch.from_numpy(ref["y"])
    x_lo, x_hi = (x - 0.04).clamp(0, 1), (x + 0.04).clamp(0, 1)
    crown = margin_lower_bounds(model, x_lo, x_hi, y, "crown")
    alpha = margin_lower_bounds(model, x_lo, x_hi, y, "alpha-crown")
    assert (alpha >= crown - 1e-5).all() and (alpha - crown).sum() > 0.01


# ---------------------------------------------------------------- verification, training, errors

def test_verified_at_zero_eps_is_correct_classification():
    net = random_net(3, conv=True)
    x = torch.rand(20, 1, 8, 8)
    y = net(x).argmax(1)
    y[:5] = (y[:5] + 1) % 5
    for method in ("ibp", "crown", "alpha-crown"):
        assert torch.equal(verified(net, x, y, 0.0, method, batch_size=7), torch.arange(20) >= 5)


def test_certify_does_not_depend_on_the_batching():
    """Each example's bounds depend on its own box only, so the batch size changes no verdict; the bounds agree to
    float rounding (BLAS blocking and the ReLU rule's sparse path depend on the batch). Margins only is exactly
    :func:`verified`."""
    net = random_net(5, conv=True)
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:3] = (y[:3] + 1) % 5  # misclassified: never verified
    threat = ThreatModel(0.005)
    for method in ("ibp", "crown", "alpha-crown"):
        calls: list[tuple[int, int]] = []
        small = certify(net, x, y, threat, method, batch_size=3,
                        progress=lambda done, total: calls.append((done, total)))
        full = certify(net, x, y, threat, method, batch_size=256)
        assert calls == [(3, 10), (6, 10), (9, 10), (10, 10)]
        assert torch.equal(small.verified, full.verified) and not small.verified[:3].any()
        if method == "alpha-crown":  # margins only: its slopes are optimised per margin row
            assert small.lower is None and small.upper is None
        else:
            assert small.lower.shape == small.upper.shape == (10, 5)
            torch.testing.assert_close(small.lower, full.lower, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(small.upper, full.upper, rtol=1e-5, atol=1e-5)
            with torch.no_grad():
                assert inside(net(x), full.lower, full.upper)
        margins_only = certify(net, x, y, threat, method, batch_size=3, logit_bounds=False)
        assert margins_only.lower is None
        assert torch.equal(margins_only.verified, verified(net, x, y, 0.005, method, batch_size=3))
    # IBP verifies some here and CROWN more: the checks above are not vacuous
    counts = [int(certify(net, x, y, threat, method).verified.sum()) for method in ("ibp", "crown")]
    assert 0 < counts[0] < counts[1]
    with pytest.raises(HydraPipeError, match="--method: unknown bound method 'crown-ibp'"):
        certify(net, x, y, threat, "crown-ibp")


def test_ibp_margins_send_gradients_to_weights_and_hydra_scores():
    net = random_net(0, conv=True)
    start_score_pruning(masked_layers(net), 0.5, "scaled")
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    for method in ("ibp", "crown"):
        net.zero_grad()
        for _, layer in masked_layers(net):
            layer.scores.grad = None
        loss = -margin_lower_bounds(net, (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1), y, method,
                                    intermediate="ibp").sum()
        loss.backward()
        for name, layer in masked_layers(net):
            assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0, (method, name)


def test_unsupported_op_in_bounds_names_op_and_node():
    lin = nn.Linear(4, 4)
    graph = GraphModule([Node("fc", "Gemm", lin, ("input",), "h"),
                         Node("the_product", "Binary", Binary("Div"), ("h", "h"), "out")], "input", "out")
    x = torch.rand(2, 4)
    with pytest.raises(UnsupportedOpError, match="the_product"):
        interval_bounds(graph, x, x + 0.1)


# ---------------------------------------------------------------- the deployed int8 graph

def test_bounds_contain_onnxruntime_outputs_of_the_int8_model(tmp_path):
    from tests.test_onnx_io import int8_model

    dst = int8_model(tmp_path)
    rng = np.random.default_rng(0)
    qmodel = load_onnx(dst)
    session = ort_session(dst, threads=1)
    x = torch.from_numpy(rng.random((6, 1, 8, 8), dtype=np.float32))
    for eps in (0.0, 0.01, 0.05):
        x_lo, x_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        with torch.no_grad():
            boxes = [interval_bounds(qmodel, x_lo, x_hi), crown_bounds(qmodel, x_lo, x_hi),
                     crown_bounds(qmodel, x_lo, x_hi, intermediate="ibp")]
        u = torch.from_numpy(rng.random((200, *x.shape), dtype=np.float32))
        pts = (x_lo + u * (x_hi - x_lo)).reshape(-1, 1, 8, 8).numpy()
        out = torch.from_numpy(ort_logits(session, pts)).reshape(200, *boxes[0][0].shape)
        for lo, hi in boxes:
            assert inside(out, lo, hi, tol=1e-6)
        if eps > 0:  # the linear relaxation of rounding pays off: CROWN is tighter than IBP on the int8 graph
            assert (boxes[1][1] - boxes[1][0]).sum() < 0.99 * (boxes[0][1] - boxes[0][0]).sum()


# ---------------------------------------------------------------- what people export (issue 16)

def test_sum_of_three_bounds_contain_onnxruntime_outputs(tmp_path):
    from tests.test_onnx_io import sum3_onnx

    path = sum3_onnx(tmp_path / "sum.onnx")
    model, session = load_onnx(path), ort_session(path, threads=1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 4, 4, generator=g)
    x_lo, x_hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    with torch.no_grad():
        boxes = [interval_bounds(model, x_lo, x_hi), crown_bounds(model, x_lo, x_hi)]
    boxes.append(alpha_crown_bounds(model, x_lo, x_hi, iterations=5))
    u = torch.rand(64, *x.shape, generator=g)
    for pts in (x_lo + u * (x_hi - x_lo), torch.where(u < 0.5, x_lo, x_hi)):
        out = torch.from_numpy(ort_logits(session, pts.reshape(-1, 1, 4, 4).numpy())).reshape(64, 4, 3)
        for lo, hi in boxes:
            assert inside(out, lo, hi, tol=1e-5)
    # CROWN pulls the Sum back exactly: tighter than IBP here
    assert (boxes[1][1] - boxes[1][0]).sum() < (boxes[0][1] - boxes[0][0]).sum()


def test_torch_resnet18_with_identity_shortcuts_is_bounded():
    from pipeline.data import DatasetInfo
    from pipeline.graph import as_graph
    from pipeline.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", DatasetInfo(3, 32, 10, (0.5,) * 3, (0.25,) * 3)).eval()
    graph = as_graph(net)
    assert "Identity" not in {n.op for n in graph.nodes}  # BasicBlock's nn.Identity shortcut: an alias
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    x_lo, x_hi = (x - 0.001).clamp(0, 1), (x + 0.001).clamp(0, 1)
    with torch.no_grad():
        lo, hi = interval_bounds(graph, x_lo, x_hi)
        u = torch.rand(4, *x.shape, generator=g)
        pts = torch.cat([x_lo + u * (x_hi - x_lo), torch.where(u < 0.5, x_lo, x_hi)])
        out = net(pts.reshape(-1, 3, 32, 32)).reshape(8, 2, 10)
        assert torch.allclose(graph(x), net(x), atol=1e-5)
    assert inside(out, lo, hi, tol=1e-4)


def test_ops_without_a_bound_rule_are_named_as_blockers(tmp_path):
    from pipeline.bounds.ops import bound_support, verification_blockers
    from pipeline.graph import ConstBinary, Softmax
    from tests.test_onnx_io import lrn_onnx

    lrn = load_onnx(lrn_onnx(tmp_path / "lrn.onnx", 3))
    assert verification_blockers(lrn.nodes) == ["LRN"]
    with pytest.raises(UnsupportedOpError, match="LRN"):
        interval_bounds(lrn, torch.zeros(1, 1, 6, 6), torch.ones(1, 1, 6, 6))
    nodes = [Node("fc", "Gemm", nn.Linear(4, 4), ("input",), "h"),
             Node("sm", "Softmax", Softmax(1, coerce=False), ("h",), "p"),
             Node("inv", "Div", ConstBinary("Div", torch.ones(1), const_first=True), ("p",), "q"),
             Node("sm2", "Softmax", Softmax(1, coerce=False), ("q",), "out")]
    assert verification_blockers(nodes) == ["Softmax", "Div"]
    assert [bound_support(n) for n in nodes] == [(True, "linear"), (False, None), (False, None), (False, None)]
    assert verification_blockers(load_onnx(DATA / "cnn.onnx").nodes) == []


def test_alpha_crown_with_every_relu_behind_a_cut_is_crown():
    """Conv, ReLU, LeakyReLU, head: CROWN's backward pass stops at the LeakyReLU (a cut; MaxPool no longer is
    one), so no slope reaches the bound."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(12, 4))
    x = torch.rand(3, 1, 4, 4)
    x_lo, x_hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    with torch.no_grad():
        crown = crown_bounds(net, x_lo, x_hi)
    alpha = alpha_crown_bounds(net, x_lo, x_hi, iterations=5)
    torch.testing.assert_close(alpha, crown)



def test_crown_work_budget_falls_back_to_ibp_layers_per_example():
    """``max_work`` caps each example's multiply-adds for the intermediate bounds: 0 tightens nothing (CROWN-IBP's
    bound), None is full CROWN, and a budget in between is decided per example: an example gets in a batch what
    it gets alone, and some budget fits the narrow box's tightening but not the wide box's. Always sound."""
    net = random_net(3, conv=True)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    eps = torch.tensor([0.002, 0.05, 0.002, 0.05]).view(4, 1, 1, 1)  # few and many unstable neurons
    x_lo, x_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        full = crown_bounds(net, x_lo, x_hi, max_work=None)
        none = crown_bounds(net, x_lo, x_hi, max_work=0)
        crown_ibp = crown_bounds(net, x_lo, x_hi, intermediate="ibp")
    for k in (0, 1):
        assert torch.allclose(none[k], crown_ibp[k], atol=1e-6)
    assert (full[0] >= none[0] - 1e-5).all() and (full[1] <= none[1] + 1e-5).all()
    assert bool((full[1] - full[0] < none[1] - none[0] - 1e-4).any()), "tightening changed nothing: test is void"
    split = False
    for budget in (1e3, 1e4, 1e5, 1e6, 1e7):
        with torch.no_grad():
            batch = crown_bounds(net, x_lo, x_hi, max_work=budget)
            alone = [crown_bounds(net, x_lo[i:i + 1], x_hi[i:i + 1], max_work=budget) for i in range(4)]
        for i in range(4):
            assert torch.allclose(batch[0][i], alone[i][0][0], atol=1e-5)
            assert torch.allclose(batch[1][i], alone[i][1][0], atol=1e-5)
        assert (batch[0] >= none[0] - 1e-5).all() and (batch[1] <= none[1] + 1e-5).all()
        assert (batch[0] <= full[0] + 1e-5).all() and (batch[1] >= full[1] - 1e-5).all()
        is_full = [torch.allclose(batch[0][i], full[0][i], atol=1e-6) for i in range(4)]
        split |= is_full[0] and not is_full[1]
    assert split, "no budget fitted the narrow box's tightening but not the wide box's"


def test_in_place_relus_give_the_bounds_of_plain_ones():
    """torchvision's models use ``nn.ReLU(inplace=True)``: run on a box it must not overwrite the pre-activation
    box that the backward pass relaxes it by (it did: CROWN-IBP bounds of torchvision's ResNet-18 excluded outputs
    of the network by 0.8)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8),
                          nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        plain[1].running_mean.uniform_(-0.5, 0.5)
    inplace = copy.deepcopy(plain)
    inplace[2].inplace = inplace[5].inplace = True
    x = torch.rand(2, 1, 8, 8)
    x_lo, x_hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    with torch.no_grad():
        for kind in ("crown", "ibp"):
            ref, got = crown_bounds(plain, x_lo, x_hi, intermediate=kind), crown_bounds(inplace, x_lo, x_hi,
                                                                                         intermediate=kind)
            assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        ref, got = interval_bounds(plain, x_lo, x_hi), interval_bounds(inplace, x_lo, x_hi)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def _constant_margin_net(margin: float) -> nn.Module:
    """Logits ``(margin, 0)`` whatever the input: every bound of the margin is exactly ``margin``."""
    net = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([margin, 0.0]))
    return net.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_margin_bound_within_float32_rounding_of_zero_is_no_proof(dtype):
    """A margin lower bound of +1e-9 is positive, but the deployed model's float32 rounding could take it below
    zero: no method proves it (certify and branch and bound, also with float64 bounds); a margin of 1e-3, far
    above that rounding (the slack), is proved by all."""
    from pipeline.bounds import branch_and_bound, margin_slack
    from pipeline.graph import as_graph

    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(3, dtype=torch.long)
    threat = ThreatModel(0.1)
    for margin, proved in ((1e-9, False), (1e-3, True)):
        net = _constant_margin_net(margin)
        lo, hi = threat.box(x)
        for method in ("ibp", "crown", "alpha-crown", "bab"):
            bound = margin_lower_bounds(net, lo, hi, y, method)
            assert (bound > 0).all() and (bound < 2 * margin).all()
            assert certify(net, x, y, threat, method, dtype=dtype).verified.tolist() == [proved] * 3, (margin, method)
        assert branch_and_bound(net, x, y, threat, dtype=dtype).verified.tolist() == [proved] * 3
        slack = margin_slack(as_graph(net), lo, hi)
        assert ((slack > 1e-9) & (slack < 1e-5)).all()


WINDOW_NETS = {
    # CNN-small's geometry: 4 x 4 kernels, stride 2, padding 1
    "cnn-small": lambda: nn.Sequential(Normalize([0.3], [0.4]), nn.Conv2d(1, 4, 4, 2, 1), nn.ReLU(),
                                       nn.Conv2d(4, 6, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)),
    "dilation-groups-bn": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, 1, 2, dilation=2), nn.BatchNorm2d(4), nn.ReLU(),
                                                nn.Conv2d(4, 4, 3, 2, 0, groups=2),
                                                Normalize([0.1, -0.1, 0.2, 0.0], [0.5, 1.0, 1.5, 2.0]),
                                                nn.ReLU(),
                                                nn.Conv2d(4, 3, (2, 3), (1, 2), (1, 0)), nn.Sigmoid(), nn.Flatten(),
                                                nn.LazyLinear(3)),
}


@pytest.mark.parametrize("net", sorted(WINDOW_NETS))
def test_intermediate_bounds_on_windows_equal_those_on_whole_values_and_contain_sampled_points(net, monkeypatch):
    """CROWN's intermediate bounds of a chain of convolutions and elementwise ops, pulled back on each row's windows
    (:func:`pipeline.bounds.crown.window_chain`), are the whole-value pass's up to float rounding (the same rules),
    and every sampled point's hidden values lie in them."""
    import pipeline.bounds.crown as crown

    torch.manual_seed(0)
    channels = 1 if net == "cnn-small" else 2
    model = WINDOW_NETS[net]()
    x = torch.rand(5, channels, 20, 20)
    model(x)  # the lazy layer's shape
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    graph = crown.as_graph(model)
    x_lo, x_hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    with torch.no_grad():
        windows = crown.crown_boxes(graph, x_lo, x_hi, "crown", crown.DEFAULT_MAX_ELEMENTS)
        on_windows = [name for name in windows.tightened if (chain := crown.window_chain(graph, name))
                      and crown.windows_fit(chain, windows, crown.DEFAULT_MAX_ELEMENTS)]
        monkeypatch.setattr(crown, "window_chain", lambda g, name: None)
        whole = crown.crown_boxes(graph, x_lo, x_hi, "crown", crown.DEFAULT_MAX_ELEMENTS)
    assert windows.tightened.keys() == whole.tightened.keys()
    assert len(on_windows) == (1 if net == "cnn-small" else 2)
    for name, box in whole.items():
        tol = 1e-5 * (1 + float(box.hi.abs().max()))
        assert torch.allclose(windows[name].lo, box.lo, atol=tol) and torch.allclose(windows[name].hi, box.hi, atol=tol)
    pts = x_lo + torch.rand(200, *x.shape) * (x_hi - x_lo)
    values = {graph.input_name: pts.flatten(0, 1)}
    with torch.no_grad():
        for node in graph.nodes:
            values[node.output] = node.module(*[values[i] for i in node.inputs])
    for name, box in windows.items():
        v = values[name].view(200, *box.shape)
        tol = 1e-5 * (1 + float(v.abs().max()))
        assert bool((v >= box.lo - tol).all()) and bool((v <= box.hi + tol).all()), name
