"""The op rules of ``pipeline.bounds.ops``: MaxPool's relaxation (auto_LiRPA's ``BoundMaxPool``), the chords of
QuantizeLinear's staircase, against onnxruntime's int8 graphs and against auto_LiRPA's own results (the oracles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.bounds import certify, crown_bounds, interval_bounds, margin_lower_bounds
from pipeline.bounds.ops import MaxPoolRule
from pipeline.bounds.box import Box
from pipeline.bounds.relax import QUANT_TOL, maxpool_relaxation, quant_endpoints, quant_relaxation
from pipeline.graph import Quantize, as_graph
from pipeline.onnx_io import export_onnx, ort_logits, ort_session
from pipeline.onnx_load import load_onnx
from pipeline.threat import ThreatModel
from tests.graphs import extreme_points

DATA = Path(__file__).parent / "data" / "ibp"


def tol(*bounds: torch.Tensor) -> float:
    """1e-5 relative to the bounds' scale: float32 sums in another order."""
    return 1e-5 * (1.0 + max(float(b.abs().max()) for b in bounds))


def inside(out: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    t = tol(lo, hi)
    return bool(((out >= lo - t) & (out <= hi + t)).all())


def width(bounds: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float((bounds[1] - bounds[0]).mean())


# ---------------------------------------------------------------------------------------------------------------
# MaxPool
# ---------------------------------------------------------------------------------------------------------------

POOLS = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, stride=1, padding=1),
         dict(kernel_size=3, stride=2, ceil_mode=True), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),
         dict(kernel_size=(2, 3), stride=(1, 2), dilation=2, padding=1), dict(kernel_size=1, stride=2)]


def pool_net(pool: dict, size: int = 9) -> nn.Sequential:
    """Conv-ReLU-MaxPool-Conv-ReLU-Linear."""
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(**pool), nn.Conv2d(4, 5, 3, padding=1),
                         nn.ReLU(), nn.Flatten())
    flat = body(torch.zeros(1, 2, size, size)).shape[1]
    return nn.Sequential(*body, nn.Linear(flat, 6)).eval()


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_maxpool_bounds_contain_sampled_outputs_and_beat_the_cut(pool, monkeypatch):
    torch.manual_seed(0)
    net = pool_net(pool)
    x = torch.rand(3, 2, 9, 9)
    x_lo, x_hi = x - 0.05, x + 0.05
    with torch.no_grad():
        ibp = interval_bounds(net, x_lo, x_hi)
        crown = crown_bounds(net, x_lo, x_hi)
        u = torch.rand(2000, *x.shape)
        pts = torch.cat([x_lo + u * (x_hi - x_lo), torch.where(u[:200] < 0.5, x_lo, x_hi)])
        out = net(pts.reshape(-1, 2, 9, 9)).reshape(len(pts), 3, 6)
        for lo, hi in (ibp, crown):
            assert inside(out, lo, hi)
        monkeypatch.setattr(MaxPoolRule, "relaxed", False)  # what CROWN did before: a cut at the MaxPool
        cut = crown_bounds(net, x_lo, x_hi)
    assert width(crown) < width(cut) <= width(ibp) + 1e-6


def test_maxpool_relaxation_is_exact_where_one_input_dominates_and_auto_lirpa_elsewhere():
    pool = nn.MaxPool2d(2)
    lo = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]], [[0.0, 1.0], [2.0, 1.5]]]])  # one example, 2 channels, 1 window
    hi = lo + torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    index, exact, upper, _ = maxpool_relaxation(pool, lo, hi, (1, 1))
    # channel 0: x[1,1] in [5, 6] dominates every other upper bound (<= 3): y = x[1,1] exactly
    # channel 1: the largest lower bound is x[1,0] (2), but x[1,1] can reach 2.5: y <= max upper = 3
    assert index.flatten().tolist() == [3, 2] and exact.flatten().tolist() == [True, False]
    assert upper.flatten().tolist() == [6.0, 3.0]


def test_maxpool_relaxation_bounds_every_point_of_the_box():
    """The rule's lines themselves: x_i <= max(window) <= x_i (exact) or max(window) <= upper, at sampled inputs."""
    g = torch.Generator().manual_seed(1)
    for cfg in POOLS:
        pool = nn.MaxPool2d(**cfg)
        lo = torch.randn(2, 3, 7, 7, generator=g)
        hi = lo + torch.rand(2, 3, 7, 7, generator=g) * torch.rand(2, 3, 1, 1, generator=g) * 3
        out_hw = tuple(pool(lo).shape[-2:])
        index, exact, upper, (hp, wp, pad) = maxpool_relaxation(pool, lo, hi, out_hw)
        pts = lo + torch.rand(500, *lo.shape, generator=g) * (hi - lo)
        y = pool(pts.reshape(-1, 3, 7, 7)).reshape(500, 2, 3, -1)
        padded = torch.nn.functional.pad(pts, (pad[1], wp - 7 - pad[1], pad[0], hp - 7 - pad[0]))
        chosen = padded.flatten(3).gather(3, index.unsqueeze(0).expand(500, -1, -1, -1))
        assert bool((y >= chosen).all())
        assert bool(torch.where(exact, y <= chosen, y <= upper).all())


def test_crown_tighter_than_the_cut_on_a_conv_relu_maxpool_conv_relu_linear_net(monkeypatch):
    """No auto_LiRPA oracle has a MaxPool (see ORACLE_README.md): against the cut CROWN used before, on the
    margins of a trained-looking net (weights of the oracle CNN's shapes)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    x_lo, x_hi = (x - 0.02).clamp(0, 1), (x + 0.02).clamp(0, 1)
    with torch.no_grad():
        relaxed = crown_bounds(net, x_lo, x_hi), margin_lower_bounds(net, x_lo, x_hi, y, "crown")
        monkeypatch.setattr(MaxPoolRule, "relaxed", False)
        cut = crown_bounds(net, x_lo, x_hi), margin_lower_bounds(net, x_lo, x_hi, y, "crown")
    assert width(relaxed[0]) < 0.8 * width(cut[0])
    assert bool((relaxed[1] >= cut[1] - tol(cut[1])).all()) and float(relaxed[1].mean()) > float(cut[1].mean())


# ---------------------------------------------------------------------------------------------------------------
# QuantizeLinear: the chords of the staircase
# ---------------------------------------------------------------------------------------------------------------

def _staircase(m: Quantize, x: torch.Tensor, ties: str) -> torch.Tensor:
    """``clip(round(x / s) + z)`` with ties to even (ONNX), up, or down (a fused kernel's fixed point)."""
    v = x.double() / m.scale.double()
    r = {"even": torch.round(v), "up": torch.floor(v + 0.5), "down": torch.ceil(v - 0.5)}[ties]
    return torch.clamp(r + m.zero_point.double(), m.qmin, m.qmax)


def _random_quant(g: torch.Generator) -> Quantize:
    signed = bool(torch.rand(1, generator=g) < 0.5)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    # power-of-two scales make x / s exact, so the sampled ties are exact ties
    scale = 2.0 ** -float(torch.randint(2, 8, (1,), generator=g)) if torch.rand(1, generator=g) < 0.5 else \
        float(torch.rand(1, generator=g) * 0.05 + 1e-3)
    zero = 0 if signed else int(torch.randint(0, 256, (1,), generator=g))
    return Quantize(torch.tensor(scale), torch.tensor(float(zero)), qmin, qmax)


def test_quant_relaxation_contains_the_staircase_on_random_boxes_and_at_ties():
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(40):
        m = _random_quant(g)
        s, z = float(m.scale), float(m.zero_point)
        # boxes (in quanta around the clip range): inside, across qmin, across qmax, across both, within a step
        centre = (torch.rand(64, generator=g) * (m.qmax - m.qmin + 40) + m.qmin - 20 - z) * s
        half = torch.rand(64, generator=g) ** 3 * 80 * s
        half[:8] = torch.rand(8, generator=g) * 0.6 * s
        lo, hi = centre - half, centre + half
        lo[8:10], hi[8:10] = (m.qmin - z - 300) * s, (m.qmax - z + 300) * s
        lo[10] = hi[10] = 3.5 * s  # a point box at a tie
        ls, lb, us, ub = quant_relaxation(m, lo, hi)
        _, _, q_lo, q_hi = quant_endpoints(m, lo, hi)
        u = torch.rand(1600, 64, generator=g, dtype=torch.float64)
        pts = (lo.double() + u * (hi - lo).double()).float()
        ties = ((torch.floor(pts / s) + 0.5) * s).clamp(lo, hi)  # the tie points of each box, exact in float
        pts = torch.cat([pts, ties, lo.unsqueeze(0), hi.unsqueeze(0)])
        for mode in ("even", "up", "down"):
            q = _staircase(m, pts, mode)
            lower = ls.double() * pts.double() + lb.double()
            upper = us.double() * pts.double() + ub.double()
            assert bool((q >= lower - 1e-9).all()) and bool((q <= upper + 1e-9).all()), (s, z, mode)
            assert bool((q >= q_lo.double()).all()) and bool((q <= q_hi.double()).all())
            checked += q.numel()
    assert checked >= 1e5 * 3


def test_quant_chord_replaces_the_constant_where_the_box_crosses_the_clip():
    """A fused Conv-Relu's QuantizeLinear (uint8, zero point 0): a box across the floor gets the chord, as a
    ReLU's upper bound, not the constant q(hi); its mean over the box is far below."""
    m = Quantize(torch.tensor(0.1), torch.tensor(0.0), 0, 255)
    lo, hi = torch.tensor([-2.0, 23.0, -30.0]), torch.tensor([2.0, 26.0, 30.0])  # across 0; across 255; both
    ls, lb, us, ub = quant_relaxation(m, lo, hi)
    mid = (lo + hi) / 2
    _, _, q_lo, q_hi = quant_endpoints(m, lo, hi)
    assert bool((us > 0).all()) and bool((us * mid + ub < q_hi - 2).all())
    assert float(us[0]) == pytest.approx(20 / (19.49 + 20) / 0.1, rel=1e-4)  # the chord from (-20, 0) to the kink
    # within the clip range the chords are the lines v -/+ (1/2 + QUANT_TOL) (slope 1 / s)
    ls, lb, us, ub = quant_relaxation(m, torch.tensor([1.0]), torch.tensor([9.0]))
    assert float(us) == pytest.approx(10.0) and float(ls) == pytest.approx(10.0)
    assert float(ub) == pytest.approx(0.51, abs=1e-4) and float(lb) == pytest.approx(-0.51, abs=1e-4)


def test_quant_lines_hold_far_from_a_large_zero_point():
    """A U8 quantizer with zero point 142: ``v = x / s + z`` rounds ``x / s`` (up to 142 quanta) before adding z, so
    near the clip floor (v ~ 0) its float error is about ``u |x / s|``, not ``u |v|``; the lines' guard must cover
    it. Checked at sampled points with ONNX's QuantizeLinear, ``saturate(round(x / s) + z)``, in float64 (a guard
    in ``|v|`` alone left an upper line 1.6e-5 quanta below the staircase here)."""
    zero = 142
    m = Quantize(torch.tensor(0.0157), torch.tensor(float(zero)), 0, 255)
    s = float(m.scale)
    g = torch.Generator().manual_seed(0)
    # boxes within [-2.5, 2.5] around the clip floor (x ~ -z s), the ceiling (x ~ (255 - z) s) and the zero point
    edges = torch.tensor([-zero * s, (255 - zero) * s, 0.0])
    centre = (edges[torch.arange(768) % 3] + (torch.rand(768, generator=g) - 0.5) * 0.4).clamp(-2.5, 2.5)
    half = torch.rand(768, generator=g) ** 2 * 0.2
    lo, hi = centre - half, centre + half
    ls, lb, us, ub = quant_relaxation(m, lo, hi)
    u = torch.rand(4000, 768, generator=g, dtype=torch.float64)
    x = (lo.double() + u * (hi - lo).double()).float().double()  # float32 inputs, as the deployed model gets
    x = torch.cat([x, lo.double().unsqueeze(0), hi.double().unsqueeze(0)])
    q = torch.clamp(torch.round(x / s) + zero, 0, 255)
    assert bool((q <= us.double() * x + ub.double()).all())
    assert bool((q >= ls.double() * x + lb.double()).all())


@pytest.mark.parametrize("rounding", [True, False])
def test_quant_tightening_skips_only_boxes_whose_lines_do_not_depend_on_them(rounding):
    """CROWN tightens a QuantizeLinear input only where its relaxation can depend on the bounds: boxes at least
    QUANT_WIDE quanta wide and that far from both clip edges all get the same lines ``v -/+ h`` (slope 1 / s), so
    they are skipped; narrow boxes and boxes near either edge (where the lines bend or turn constant) are not."""
    from pipeline.bounds.ops import QuantizeRule
    from pipeline.bounds.relax import QUANT_WIDE
    from pipeline.graph import Node

    m = Quantize(torch.tensor(0.1), torch.tensor(3.0), 0, 255)
    m.rounding = rounding
    gen = torch.Generator().manual_seed(0)
    # random wide boxes inside [qmin + W, qmax - W] quanta (v = x / 0.1 + 3)
    v_lo = QUANT_WIDE + torch.rand(500, generator=gen) * 200
    v_hi = torch.minimum(v_lo + QUANT_WIDE + torch.rand(500, generator=gen) * 60, torch.tensor(255 - QUANT_WIDE))
    wide = (v_lo - 3) * 0.1, (v_hi - 3) * 0.1
    ls, lb, us, ub = quant_relaxation(m, *wide)
    h = 0.5 + QUANT_TOL if rounding else 0.0
    torch.testing.assert_close(ls, torch.full_like(ls, 10.0))
    torch.testing.assert_close(us, torch.full_like(us, 10.0))
    torch.testing.assert_close(ub, torch.full_like(ub, 3.0 + h), atol=1e-3, rtol=0)  # in quanta: v + h, x / s + 3
    torch.testing.assert_close(lb, torch.full_like(lb, 3.0 - h), atol=1e-3, rtol=0)
    rule, node = QuantizeRule(), Node("q", "QuantizeLinear", m, ("x",), "y")
    assert not rule.unstable(node, Box(lo=wide[0], hi=wide[1])).any()
    # narrow (1.5 quanta), near the floor, near the ceiling, across the floor: tightened
    v = torch.tensor([[100.0, 101.5], [1.0, 40.0], [200.0, 254.0], [-20.0, 30.0]])
    x_lo, x_hi = (v[:, 0] - 3) * 0.1, (v[:, 1] - 3) * 0.1
    assert rule.unstable(node, Box(lo=x_lo, hi=x_hi)).all()
    # with rounding, a box within one level is exact: never tightened
    one_level = Box(lo=torch.tensor([(100.1 - 3) * 0.1]), hi=torch.tensor([(100.3 - 3) * 0.1]))
    assert bool(rule.unstable(node, one_level).any()) != rounding


def test_float_twin_quantize_is_bounded_without_rounding_slack():
    m = Quantize(torch.tensor(0.1), torch.tensor(0.0), 0, 255)
    m.rounding = False
    lo, hi = torch.tensor([-2.0, 1.0]), torch.tensor([2.0, 9.0])
    ls, lb, us, ub = quant_relaxation(m, lo, hi)
    x = lo + torch.rand(1000, 2) * (hi - lo)
    q = m(x)
    assert bool((q >= ls * x + lb - 1e-4).all()) and bool((q <= us * x + ub + 1e-4).all())
    assert float(ub[1]) == pytest.approx(0.0, abs=1e-4)  # the line v itself inside the range


# ---------------------------------------------------------------------------------------------------------------
# onnxruntime's int8 graphs (static QDQ: uint8 activations, int8 per-channel weights, outputs quantized too)
# ---------------------------------------------------------------------------------------------------------------

def plain_int8(model: nn.Module | Path, folder: Path, shape: tuple[int, int, int], calibration: np.ndarray,
               reduce_range: bool = True) -> Path:
    """``model`` (or an ONNX file) quantized by onnxruntime's static quantizer with its defaults (QDQ, U8
    activations, S8 per-channel weights; unlike the pipeline's recipe the Gemm outputs are quantized too), 7-bit
    weights unless ``reduce_range`` is off: full-range ones saturate onnxruntime's kernels on x86 CPUs without
    VNNI, and its outputs there are not the graph's integer arithmetic (``pipeline.quantization``)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.quantization import _Calibration

    src, pre, dst = folder / "f.onnx", folder / "pre.onnx", folder / "q.onnx"
    if isinstance(model, Path):
        src = model
    else:
        export_onnx(model, src, shape)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), _Calibration("input", calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=reduce_range)
    return dst


@pytest.fixture(scope="module")
def ort_int8(tmp_path_factory):
    """A small conv-ReLU-MaxPool-conv-ReLU-linear digits-like net and its onnxruntime int8 graph."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    calibration = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    path = plain_int8(net, tmp_path_factory.mktemp("ort_int8"), (1, 8, 8), calibration)
    return net, path


def test_int8_graph_is_onnxruntime_and_requantization_is_dropped(ort_int8):
    import onnx

    _, path = ort_int8
    model, session = load_onnx(path), ort_session(path, threads=1)
    written = [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    ours = [n.op for n in model.nodes if n.op == "QuantizeLinear"]
    assert len(ours) < len(written)  # the Q -> DQ pairs after MaxPool / Flatten are the identity: dropped
    x = np.random.default_rng(1).random((300, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(model(torch.from_numpy(x)).numpy(), ort_logits(session, x))


def test_full_range_weights_are_named_as_saturating_and_exact_only_where_the_cpu_has_vnni(ort_int8, tmp_path,
                                                                                       monkeypatch):
    from pipeline import quantization
    from pipeline.audit.run import run_audit
    from pipeline.config import AuditParams
    from pipeline.quantization import SATURATION_FREE, int8_weight_range, saturating_layers, saturation_hint

    net, reduced = ort_int8
    calibration = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    full = plain_int8(net, tmp_path, (1, 8, 8), calibration, reduce_range=False)
    assert int8_weight_range(reduced) <= SATURATION_FREE < int8_weight_range(full)
    assert saturating_layers(reduced) == {}
    named = saturating_layers(full)
    assert named and all(SATURATION_FREE < top <= 127 for top in named.values())
    assert len(named) == 4  # the two convolutions and the two linear layers: u8 activations into each
    monkeypatch.setattr(quantization, "cpu_has_vnni", lambda: False)
    hint = saturation_hint(full)
    assert "without VNNI" in hint and "reduce_range" in hint and next(iter(named)) in hint
    assert saturation_hint(reduced) == ""
    monkeypatch.setattr(quantization, "cpu_has_vnni", lambda: True)
    assert saturation_hint(full) == ""
    monkeypatch.undo()
    # on this machine: with VNNI onnxruntime computes the exact integers; without it, the audit says why it refuses
    x = np.random.default_rng(1).random((300, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        exact = np.array_equal(load_onnx(full)(torch.from_numpy(x)).numpy(),
                               ort_logits(ort_session(full, threads=1), x))
    if quantization.cpu_has_vnni():
        assert exact
    elif not exact:
        y = load_onnx(full)(torch.from_numpy(x[:20])).argmax(1).numpy()
        report = run_audit(full, x[:20], y, AuditParams(eps=0.01, steps=0, alpha_crown=False, bab=False,
                                                        sweep_eps=[]), progress=False)
        assert not report.parity.ok and report.verified_accuracy is None
        assert "without VNNI" in report.verification_refused


def test_int8_bounds_contain_onnxruntime_at_sampled_tie_and_attacked_points(ort_int8):
    from pipeline.attacks import AttackOptions, pgd_attack

    _, path = ort_int8
    model, session = load_onnx(path), ort_session(path, threads=1)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 8, 8, generator=g)
    y = model(x).argmax(1).detach()
    s_in = float(next(n for n in model.nodes if n.op == "QuantizeLinear").module.scale)
    for eps in (0.01, 0.05):
        x_lo, x_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        with torch.no_grad():
            boxes = [interval_bounds(model, x_lo, x_hi), crown_bounds(model, x_lo, x_hi),
                     crown_bounds(model, x_lo, x_hi, intermediate="ibp")]
        u = torch.rand(300, *x.shape, generator=g)
        sampled = x_lo + u * (x_hi - x_lo)
        ties = torch.clamp((torch.floor(sampled / s_in) + 0.5) * s_in, x_lo, x_hi)  # the input's rounding ties
        attacked = extreme_points(model, x_lo, x_hi, generator=torch.Generator().manual_seed(0))
        for pts in (sampled, ties, attacked):
            out = torch.from_numpy(ort_logits(session, pts.reshape(-1, 1, 8, 8).numpy())).reshape(len(pts), 6, -1)
            for lo, hi in boxes:
                assert inside(out, lo, hi)
        # misclassifying points, if any
        result = pgd_attack(model, x, y, eps, steps=20, restarts=2, options=AttackOptions(seed=0))
        if result.adv_x is not None and len(result.adv_x):
            out = torch.from_numpy(ort_logits(session, result.adv_x.reshape(-1, 1, 8, 8).numpy()))
            for lo, hi in boxes:
                assert inside(out, lo[result.adv_index], hi[result.adv_index])
        assert width(boxes[1]) < width(boxes[0])


def test_int8_crown_close_to_float_on_a_digits_cnn(tmp_path):
    """The oracle CNN (digits), quantized by plain onnxruntime: CROWN at eps 0.05 verifies most of what it verifies
    on the float graph (before the chords, the requantization drop and the exact input box: 25% vs 82% on the whole
    test split; see the report of issue 12 for the figures)."""
    from pipeline.data import digits_arrays

    x_train, _, x_test, y_test = digits_arrays()
    path = plain_int8(DATA / "cnn.onnx", tmp_path, (1, 8, 8), x_train[:256])
    x, y = torch.from_numpy(x_test[:64]), torch.from_numpy(y_test[:64])
    threat = ThreatModel(0.05)
    ver = {name: certify(m, x, y, threat, "crown", logit_bounds=False).verified.float().mean().item()
           for name, m in (("float", load_onnx(DATA / "cnn.onnx")), ("int8", load_onnx(path)))}
    assert ver["float"] > 0.7 and ver["int8"] >= ver["float"] - 0.2, ver


# ---------------------------------------------------------------------------------------------------------------
# auto_LiRPA's results (tests/data/ibp, from /work/shared/oracles): never looser than its CROWN, IBP equal
# ---------------------------------------------------------------------------------------------------------------

ORACLES = sorted(DATA.glob("*.bounds.npz"))


@pytest.mark.parametrize("path", ORACLES, ids=lambda p: p.name)
def test_crown_never_looser_than_auto_lirpa_and_ibp_equal(path):
    ref = np.load(path)
    model = load_onnx(DATA / f"{path.name.split('.eps')[0]}.onnx")
    x_lo, x_hi, y = torch.from_numpy(ref["x_L"]), torch.from_numpy(ref["x_U"]), torch.from_numpy(ref["y"])
    with torch.no_grad():
        lo, hi = interval_bounds(model, x_lo, x_hi)
        t = tol(torch.from_numpy(ref["ibp_lb"]), torch.from_numpy(ref["ibp_ub"]))
        np.testing.assert_allclose(lo.numpy(), ref["ibp_lb"], rtol=1e-5, atol=t)
        np.testing.assert_allclose(hi.numpy(), ref["ibp_ub"], rtol=1e-5, atol=t)
        if "crown_lb" not in ref.files:
            return
        lo, hi = crown_bounds(model, x_lo, x_hi)
        ref_lo, ref_hi = torch.from_numpy(ref["crown_lb"]), torch.from_numpy(ref["crown_ub"])
        t = tol(ref_lo, ref_hi)
        assert bool((lo >= ref_lo - t).all()) and bool((hi <= ref_hi + t).all())
        margin = margin_lower_bounds(model, x_lo, x_hi, y, "crown")
        ref_margin = torch.from_numpy(ref["crown_margin_lb"])
        assert bool((margin >= ref_margin - tol(ref_margin)).all())
        assert bool(torch.from_numpy(ref["emp_min"]).ge(lo - t).all())
        assert bool(torch.from_numpy(ref["emp_max"]).le(hi + t).all())


# ---------------------------------------------------------------------------------------------------------------
# Pooling and residual networks: every op has a rule, IBP and CROWN bound them (torch and their ONNX exports)
# ---------------------------------------------------------------------------------------------------------------

def _check_bounded(net: nn.Module, model: nn.Module, x: torch.Tensor, eps: float) -> None:
    x_lo, x_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        boxes = [interval_bounds(model, x_lo, x_hi), crown_bounds(model, x_lo, x_hi)]
        u = torch.rand(8, *x.shape)
        pts = torch.cat([x_lo + u * (x_hi - x_lo), torch.where(u < 0.5, x_lo, x_hi)])
        out = net(pts.reshape(-1, *x.shape[1:])).reshape(len(pts), len(x), -1)
    for lo, hi in boxes:
        assert inside(out, lo, hi)
    assert width(boxes[1]) <= width(boxes[0]) + 1e-6


@pytest.mark.parametrize("arch,size", [("resnet18", 4), ("wrn_28_4", 4), ("vgg16_bn", 8)])
def test_registry_pooling_and_residual_models_and_their_onnx_exports_are_bounded(arch, size, tmp_path):
    from pipeline.data import DatasetInfo
    from pipeline.models import build_model

    torch.manual_seed(0)
    net = build_model(arch, DatasetInfo(3, size, 10, (0.5,) * 3, (0.25,) * 3)).eval()
    graph = as_graph(net)  # nn.Identity shortcuts are aliases, not nodes
    assert "Identity" not in {n.op for n in graph.nodes}
    x = torch.rand(1, 3, size, size)
    _check_bounded(net, graph, x, 1e-3)
    export_onnx(net, tmp_path / "m.onnx", (3, size, size))
    _check_bounded(net, load_onnx(tmp_path / "m.onnx"), x, 1e-3)


def test_torchvision_resnet18_with_its_maxpool_stem_is_bounded(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    graph = as_graph(net)
    assert "MaxPool" in {n.op for n in graph.nodes}
    x = torch.rand(1, 3, 16, 16)  # 32 x 32 works the same (about 20 s of CROWN per image on one core)
    _check_bounded(net, graph, x, 1e-3)
    from tests.test_onnx_io import export_with

    for dynamo in (True, False):  # the default exporter's ReduceMean + Reshape, the legacy one's GlobalAveragePool
        _check_bounded(net, load_onnx(export_with(net, tmp_path / "tv.onnx", dynamo, 17, (3, 16, 16))), x, 1e-3)


def test_crown_ibp_trains_resnet18():
    from pipeline.config import TrainParams
    from pipeline.data import DatasetInfo
    from pipeline.models import build_model
    from pipeline.objectives import OBJECTIVES

    torch.manual_seed(0)
    net = build_model("resnet18", DatasetInfo(3, 32, 10, (0.5,) * 3, (0.25,) * 3)).train()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 7])
    p = TrainParams(objective="crown-ibp", eps=2 / 255, eps_ramp=0.5, kappa_end=0.5)
    loss = OBJECTIVES.get("crown-ibp")(net, x, y, p, 0.3)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [q.grad for q in net.parameters() if q.requires_grad and q.grad is not None]
    assert grads and all(bool(torch.isfinite(gr).all()) for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)


@pytest.mark.parametrize("stride,padding,size", [(2, 1, 28), (1, 0, 23), (3, 2, 20)])
def test_one_channel_conv_is_pulled_back_as_its_transpose(stride, padding, size):
    """A convolution on a one-channel input with a large enough input x output is pulled back by matmul + fold
    (not the dense matrix, not a transposed conv): the coefficients must be exactly the transpose's."""
    from pipeline.bounds.box import Box, Boxes
    from pipeline.bounds.ops import ConvRule

    torch.manual_seed(stride)
    conv = nn.Conv2d(1, 16, 4, stride=stride, padding=padding)
    graph = as_graph(nn.Sequential(conv))
    node = graph.nodes[0]
    x = torch.rand(2, 1, size, size)
    out_shape = conv(x).shape
    assert x[0].numel() * out_shape[1:].numel() > 1 << 18, "the dense matrix would be used: test is void"
    boxes = Boxes({graph.input_name: Box(lo=x, hi=x + 0.1), node.output: Box(lo=conv(x), hi=conv(x))})
    a = torch.randn(2, 5, *out_shape[1:])
    (pulled,), bias = ConvRule().backward(node, a, boxes, None)
    opad = [size - ((out_shape[2 + i] - 1) * stride - 2 * padding + 4) for i in range(2)]
    ref = torch.nn.functional.conv_transpose2d(a.flatten(0, 1), conv.weight, None, stride, padding, opad)
    torch.testing.assert_close(pulled, ref.view(2, 5, 1, size, size), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias, (a.sum((3, 4)) * conv.bias).sum(2), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# What torch's exporters write today (issue 27, item 1): ReduceMean, Select (the dynamo exporter's upsampling
# AdaptiveAvgPool2d, fused), Sigmoid and the Mul of two tensors (SiLU, squeeze-excitation)
# ---------------------------------------------------------------------------------------------------------------

def _random_boxes(g: torch.Generator, n: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of every kind: narrow and wide, negative, positive and across zero, some far out, some degenerate."""
    centre = torch.randn(n, generator=g, dtype=dtype) * torch.tensor([0.5, 3.0, 12.0], dtype=dtype).repeat(n)[:n]
    radius = torch.rand(n, generator=g, dtype=dtype) * torch.tensor([1e-7, 1e-3, 0.5, 4.0, 20.0], dtype=dtype
                                                                     ).repeat(n)[:n]
    radius[::17] = 0
    return centre - radius, centre + radius


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_relaxation_contains_the_curve_on_random_boxes(dtype):
    from pipeline.bounds.relax import sigmoid_relaxation

    g = torch.Generator().manual_seed(0)
    lo, hi = _random_boxes(g, 3000, dtype)
    k, lower, upper = sigmoid_relaxation(lo, hi)
    t = torch.linspace(0, 1, 401, dtype=dtype).unsqueeze(1)
    x = torch.minimum(lo + t * (hi - lo), hi)  # [401, n], both endpoints included
    s = torch.sigmoid(x)
    assert bool((k * x + lower <= s).all()) and bool((s <= k * x + upper).all())
    # tight: each line touches the curve on the box (within the float guard and the sampling step)
    gap_lo, gap_hi = (s - k * x - lower).amin(0), (k * x + upper - s).amin(0)
    step = ((hi - lo) / 400) ** 2 * 0.1 + 1e-5  # sigmoid'' <= 0.1: a line is that close to its touching point
    assert bool((gap_lo <= step).all()) and bool((gap_hi <= step).all())


def test_mccormick_planes_contain_the_product_on_random_boxes():
    from pipeline.bounds.relax import mul_relaxation

    g = torch.Generator().manual_seed(1)
    xl, xh = _random_boxes(g, 2000)
    yl, yh = _random_boxes(g, 2000)
    ax, ay, a0, bx, by, b0 = mul_relaxation(Box(lo=xl, hi=xh), Box(lo=yl, hi=yh))
    u, v = torch.rand(2, 64, 2000, generator=g)
    u[:2], v[:2] = torch.tensor([0.0, 1.0]).view(2, 1), torch.tensor([1.0, 0.0]).view(2, 1)  # corners too
    x, y = xl + u * (xh - xl), yl + v * (yh - yl)
    z = x * y
    t = 1e-5 * (1 + z.abs() + (ax * x).abs() + (ay * y).abs() + a0.abs() + (bx * x).abs() + (by * y).abs()
                + b0.abs())
    assert bool((ax * x + ay * y + a0 <= z + t).all()) and bool((z <= bx * x + by * y + b0 + t).all())


def _exported(kind: str, dynamo: bool, opset: int, folder: Path) -> tuple[nn.Module, nn.Module]:
    from tests.test_onnx_io import export_with, tiny_net

    net = tiny_net(kind)
    return net, load_onnx(export_with(net, folder / f"{kind}.onnx", dynamo, opset))


@pytest.mark.parametrize("kind,dynamo,opset", [("gap", True, 18), ("eff", True, 21), ("eff", False, 13),
                                               ("up", True, 18)], ids=lambda v: str(v))
def test_exported_op_forms_bounds_contain_sampled_and_attacked_points(kind, dynamo, opset, tmp_path):
    """IBP, CROWN and alpha-CROWN on each exporter's forms contain the graph's logits at uniform points, corners
    and PGD's extreme points of the eps-box, and onnxruntime's; CROWN is no looser than IBP."""
    from pipeline.bounds import alpha_crown_bounds

    net, model = _exported(kind, dynamo, opset, tmp_path)
    ops = {n.op for n in model.nodes}
    assert ops & {"ReduceMean", "Select", "Sigmoid"}
    torch.manual_seed(1)
    x = torch.rand(2, 3, 8, 8)
    for eps in (0.02, 0.1):
        x_lo, x_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        with torch.no_grad():
            ibp = interval_bounds(model, x_lo, x_hi)
            crown = crown_bounds(model, x_lo, x_hi)
        alpha = alpha_crown_bounds(model, x_lo, x_hi, iterations=5)
        u = torch.rand(16, *x.shape)
        pts = torch.cat([x_lo + u * (x_hi - x_lo), torch.where(u < 0.5, x_lo, x_hi),
                         extreme_points(model, x_lo, x_hi, generator=torch.Generator().manual_seed(2))])
        with torch.no_grad():
            out = model(pts.reshape(-1, *x.shape[1:])).reshape(len(pts), len(x), -1)
        ref = torch.from_numpy(ort_logits(ort_session(tmp_path / f"{kind}.onnx", 1),
                                          pts.reshape(-1, *x.shape[1:]).numpy())).reshape(out.shape)
        for lo, hi in (ibp, crown, alpha):
            assert inside(out, lo, hi) and inside(ref, lo, hi)
        assert width(crown) <= width(ibp) + 1e-6 and width(alpha) <= width(crown) + 1e-6


@pytest.mark.parametrize("dynamo", [True, False])
def test_sigmoid_and_product_relaxations_beat_the_cut(dynamo, tmp_path, monkeypatch):
    """CROWN through Sigmoid and McCormick's Mul is tighter than cutting the backward pass at them (what CROWN did
    before these relaxations) on the squeeze-excitation net."""
    from pipeline.bounds import ops

    _, model = _exported("eff", dynamo, 17, tmp_path)
    torch.manual_seed(3)
    x = torch.rand(2, 3, 8, 8)
    x_lo, x_hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    with torch.no_grad():
        relaxed = crown_bounds(model, x_lo, x_hi)
        monkeypatch.setattr(ops.SigmoidRule, "relaxed", False)
        monkeypatch.setattr(ops.BinaryMulRule, "relaxed", False)
        cut = crown_bounds(model, x_lo, x_hi)
    assert width(relaxed) < width(cut)


@pytest.mark.parametrize("kind", ["mean", "upsample"])
def test_linear_reduce_mean_and_select_are_bounded_exactly(kind, tmp_path):
    """On a network with no nonlinearity CROWN is exact: its bounds are the linear map's range ``J c +- |J| r``,
    which checks the backward rules of ReduceMean (keepdims 1 and 0) and of the fused Select."""
    from tests.test_onnx_io import export_with

    torch.manual_seed(4)
    if kind == "mean":
        net, shape = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(4, 5)).eval(), (3, 6, 6)
    else:  # VGG's classifier head at 32 x 32: a 1 x 1 map pooled to 3 x 3 (GatherND between Transposes)
        net, shape = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 5)
                                   ).eval(), (3, 1, 1)
    model = load_onnx(export_with(net, tmp_path / "lin.onnx", True, 18, shape))
    assert ("Select" in {n.op for n in model.nodes}) == (kind == "upsample")
    x = torch.rand(1, *shape, dtype=torch.float64)
    model = model.double()
    r = torch.rand_like(x) * 0.1
    jac = torch.autograd.functional.jacobian(lambda v: model(v), x).reshape(5, -1)
    centre = model(x)[0]
    radius = jac.abs() @ r.flatten()
    lo, hi = crown_bounds(model, x - r, x + r)
    torch.testing.assert_close(lo[0], (centre - radius).detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hi[0], (centre + radius).detach(), rtol=1e-9, atol=1e-9)
