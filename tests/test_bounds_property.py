"""Soundness of IBP and CROWN on random small graphs (hypothesis): Conv / Linear, ReLU, MaxPool (any kernel,
stride, padding, dilation, ceil_mode), AvgPool, residual Add with an ``nn.Identity`` shortcut, Concat and
QuantizeLinear / DequantizeLinear pairs, on random boxes. No sampled point (uniform, corners, the input's
rounding ties) and no PGD-attacked point leaves any bound, and CROWN is never looser than IBP.

Derandomized (CI sees the same graphs every run); each test takes well under 20 s on one core.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.bounds import crown_bounds, interval_bounds, margin_lower_bounds
from pipeline.graph import Dequantize, Quantize, as_graph
from tests.graphs import extreme_points

PROPERTY = settings(deadline=None, derandomize=True, database=None, max_examples=100,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Residual(nn.Module):
    """conv-ReLU-conv plus an ``nn.Identity`` shortcut, then ReLU (a ResNet basic block without BatchNorm)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.relu, self.shortcut = nn.ReLU(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.shortcut(x))


class Branches(nn.Module):
    """Two conv branches joined along the channels (an Inception-style Concat)."""

    def __init__(self, c: int, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, a, 3, padding=1), nn.Conv2d(c, b, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


def qdq(draw) -> list[nn.Module]:
    """A QuantizeLinear / DequantizeLinear pair: uint8 (zero point 0, as a fused ReLU, or mid-range) or int8."""
    kind = draw(st.sampled_from(["u8-relu", "u8-mid", "s8"]))
    scale = torch.tensor(draw(st.sampled_from([2.0 ** -4, 2.0 ** -6, 0.0113, 0.004])))
    qmin, qmax, zero = {"u8-relu": (0, 255, 0.0), "u8-mid": (0, 255, 128.0), "s8": (-128, 127, 0.0)}[kind]
    z = torch.tensor(zero)
    return [Quantize(scale, z, qmin, qmax), Dequantize(scale.clone(), z.clone())]


@st.composite
def networks(draw):
    """(model, input shape): a random sequence of blocks on a small image, then Flatten and a Linear head."""
    torch.manual_seed(draw(st.integers(0, 10_000)))
    c, size = draw(st.sampled_from([1, 2])), draw(st.sampled_from([4, 5, 6]))
    shape = (c, size, size)
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        layers += qdq(draw)  # the deployed graph's first op: the input quantized
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "maxpool", "avgpool", "residual", "concat", "qdq"]))
        if kind == "conv":
            out = draw(st.integers(1, 3))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            c = out
        elif kind == "maxpool":
            k = draw(st.integers(1, 3))
            layers.append(nn.MaxPool2d(k, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, k // 2)),
                                       dilation=draw(st.integers(1, 2)), ceil_mode=draw(st.booleans())))
        elif kind == "avgpool":
            layers.append(nn.AvgPool2d(2, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 1)),
                                       count_include_pad=draw(st.booleans())))
        elif kind == "residual":
            layers.append(Residual(c))
        elif kind == "concat":
            a, b = draw(st.integers(1, 2)), draw(st.integers(1, 2))
            layers += [Branches(c, a, b), nn.ReLU()]
            c = a + b
        else:
            layers += qdq(draw)
    body = nn.Sequential(*layers, nn.Flatten())
    try:
        flat = body(torch.zeros(1, *shape)).shape[1]
    except RuntimeError:  # a pool larger than what is left of the image
        assume(False)
    assume(flat > 0)
    classes = draw(st.integers(2, 4))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, classes)).eval(), shape


def _points(model: nn.Module, x_lo: torch.Tensor, x_hi: torch.Tensor) -> torch.Tensor:
    """Uniform points, corners, the input quantization's rounding ties and PGD's extremes: [P, N, ...]."""
    u = torch.rand(256, *x_lo.shape)
    pts = [x_lo + u * (x_hi - x_lo), torch.where(u[:64] < 0.5, x_lo, x_hi),
           extreme_points(model, x_lo, x_hi, steps=10)]
    first = model[0] if isinstance(model, nn.Sequential) else None
    if isinstance(first, Quantize):
        s = float(first.scale)
        ties = (torch.floor(pts[0][:64] / s) + 0.5) * s
        pts.append(torch.maximum(torch.minimum(ties, x_hi), x_lo))
    return torch.cat(pts)


def _tol(*bounds: torch.Tensor) -> float:
    return 1e-5 * (1.0 + max(float(b.abs().max()) for b in bounds))


@given(net=networks(), eps=st.sampled_from([0.01, 0.05, 0.2]), seed=st.integers(0, 1000))
@PROPERTY
def test_no_sampled_or_attacked_output_leaves_ibp_or_crown(net, eps, seed):
    model, shape = net
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, *shape, generator=g)
    x_lo, x_hi = x - eps, x + eps
    graph = as_graph(model)
    with torch.no_grad():
        bounds = {"ibp": interval_bounds(graph, x_lo, x_hi), "crown": crown_bounds(graph, x_lo, x_hi),
                  "crown-ibp": crown_bounds(graph, x_lo, x_hi, intermediate="ibp")}
    pts = _points(model, x_lo, x_hi)
    with torch.no_grad():
        out = model(pts.reshape(-1, *shape)).reshape(len(pts), 2, -1)
    for name, (lo, hi) in bounds.items():
        t = _tol(lo, hi)
        assert bool((out >= lo - t).all()) and bool((out <= hi + t).all()), (name, float((lo - out).max()),
                                                                           float((out - hi).max()))
    (ibp_lo, ibp_hi) = bounds["ibp"]
    t = _tol(ibp_lo, ibp_hi)
    for name in ("crown", "crown-ibp"):  # intersected with the folded interval bound: never looser than IBP
        lo, hi = bounds[name]
        assert bool((lo >= ibp_lo - t).all()) and bool((hi <= ibp_hi + t).all()), name


@given(net=networks(), eps=st.sampled_from([0.01, 0.05]), seed=st.integers(0, 1000))
@PROPERTY
def test_margin_bounds_are_sound_and_crown_never_looser_than_ibp(net, eps, seed):
    model, shape = net
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, *shape, generator=g)
    x_lo, x_hi = x - eps, x + eps
    with torch.no_grad():
        y = model(x).argmax(1)
        ibp = margin_lower_bounds(model, x_lo, x_hi, y, "ibp")
        crown = margin_lower_bounds(model, x_lo, x_hi, y, "crown")
    pts = _points(model, x_lo, x_hi)
    with torch.no_grad():
        out = model(pts.reshape(-1, *shape)).reshape(len(pts), 2, -1)
    k = out.shape[-1]
    others = torch.stack([torch.tensor([j for j in range(k) if j != int(yi)]) for yi in y])  # [N, K-1]
    margins = out.gather(2, y.view(1, 2, 1).expand(len(pts), 2, 1)) - out.gather(2, others.expand(len(pts), 2, -1))
    t = _tol(ibp, crown)
    assert bool((margins >= crown - t).all()) and bool((margins >= ibp - t).all())
    assert bool((crown >= ibp - t).all())
