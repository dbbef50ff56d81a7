"""The linear relaxations of the nonlinear ops, as math on tensors: the rules of :mod:`pipeline.bounds.ops` apply
them, and alpha-CROWN starts its slopes from the ReLU's.

ReLU: CROWN's (Zhang et al., NeurIPS 2018), the chord above and auto_LiRPA's adaptive slope below.
QuantizeLinear: the chords of the clipped lines ``clip(v -/+ (1/2 + QUANT_TOL), q(v_lo), q(v_hi))`` that enclose the
staircase (the lines ``v -/+ (1/2 + QUANT_TOL)`` inside the clip range); why the endpoints are widened by
``QUANT_TOL`` before rounding is in :mod:`pipeline.bounds` ("Quantized graphs").
Sigmoid: two lines parallel to the chord over the box, each moved to touch the curve (exact extrema of
``sigmoid(x) - k x`` over the box), the shape-agnostic form of CROWN's sigmoid bounds (Zhang et al. 2018).
Mul of two bounded tensors: McCormick's planes (McCormick, Math. Programming 1976; auto_LiRPA's ``BoundMul``).
MaxPool: auto_LiRPA's ``BoundMaxPool`` (Xu et al. 2020): below, the input with the largest lower bound; above, that
input where its lower bound reaches every other input's upper bound (exact), else the window's largest upper bound.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.bounds.box import Box, dot
from pipeline.errors import UnsupportedOpError
from pipeline.graph import Quantize

QUANT_TOL = 1e-2
"""Quanta by which interval endpoints are widened before rounding (see :mod:`pipeline.bounds`)."""

QUANT_WIDE = 2.0
"""A QuantizeLinear input box at least this many quanta wide and this far from both clip edges has the relaxation
``v -/+ (1/2 + QUANT_TOL)`` whatever its bounds (:func:`quant_relaxation`), so CROWN does not tighten it
(:meth:`pipeline.bounds.ops.QuantizeRule.unstable`): a tighter box would change the lines only by shrinking below
2 quanta. On the int8 graphs of the digits and Fashion-MNIST pipelines (450 and 1,000 test images, eps 0.1) CROWN
ran 4.7x and 2.3x faster and alpha-CROWN 1.4x and 1.7x, verifying exactly the same examples."""


def relu_relaxation(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CROWN's ReLU relaxation: ``lower_slope * x <= relu(x) <= upper_slope * x + upper_bias``.

    Upper: the chord through ``(l, 0)`` and ``(u, u)`` for unstable neurons. Lower: slope 1 if ``u > -l`` else 0
    (auto_LiRPA's "adaptive" choice, the one minimising the relaxation's area). Stable neurons are exact.
    """
    lo_r, hi_r = lo.clamp(max=0), hi.clamp(min=0)
    upper_slope = hi_r / (hi_r - lo_r).clamp_min(1e-12)
    upper_bias = -lo_r * upper_slope
    lower_slope = (hi_r > -lo_r).to(lo.dtype)
    return lower_slope, upper_slope, upper_bias


def relu_backward(a: Tensor, box: Box, lower_slope: Tensor, upper_slope: Tensor, upper_bias: Tensor
                   ) -> tuple[list[Tensor], Tensor]:
    """Coefficients through a ReLU for lower bounds: ``a * lower_slope`` where ``a > 0``, ``a * upper_slope``
    (the chord) where ``a < 0``, bias ``sum(min(a, 0) * upper_bias)``.

    The two slopes differ only at unstable neurons, a few per example in a trained network; there the correction
    is applied on gathered columns instead of a full ``where`` over the coefficient tensor (when there are several
    rows per example: with one, as on the windows of :func:`pipeline.bounds.crown.window_chain`, the ``where``
    is as cheap).
    """
    n = box.shape[0]
    unstable = ((box.lo < 0) & (box.hi > 0)).reshape(n, -1)
    counts = unstable.sum(1)
    k = int(counts.max()) if n else 0
    dim = unstable.shape[1]
    if 4 * k > dim or a.shape[1] == 1:  # one row per example: gathering costs as much as the full ``where``
        pulled = a * torch.where(a > 0, lower_slope.unsqueeze(1), upper_slope.unsqueeze(1))
        return [pulled], dot(a.clamp(max=0), upper_bias)
    pulled = a * upper_slope.unsqueeze(1)
    if k == 0:
        return [pulled], torch.zeros(pulled.shape[:2], dtype=a.dtype, device=a.device)
    idx = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :k]  # [N, k], unstable first
    valid = (torch.arange(k, device=a.device).unsqueeze(0) < counts.unsqueeze(1)).to(a.dtype)
    m = a.shape[1]
    cols = idx.unsqueeze(1).expand(n, m, k)
    a_u = a.flatten(2).expand(n, m, dim).gather(2, cols)
    ls_u = lower_slope.reshape(n, -1).gather(1, idx)
    us_u = upper_slope.reshape(n, -1).gather(1, idx)
    ub_u = upper_bias.reshape(n, -1).gather(1, idx) * valid
    correction = a_u.clamp(min=0) * ((ls_u - us_u) * valid).unsqueeze(1)
    pulled = pulled.contiguous()
    pulled.view(n, m, dim).scatter_add_(2, cols, correction)  # in place: a fresh product, not saved by autograd
    bias = (a_u.clamp(max=0) * ub_u.unsqueeze(1)).sum(2)
    return [pulled], bias


def quant_endpoints(m: Quantize, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``v_lo, v_hi`` (in quanta) and the rounded, clipped ``q(v_lo), q(v_hi)`` widened by ``QUANT_TOL`` (for a
    QuantizeLinear without rounding, the float twin of :func:`pipeline.graph.float_twin`, clipped only)."""
    scale, zero = m.params(lo.dim())
    v_lo, v_hi = lo / scale + zero, hi / scale + zero
    if not getattr(m, "rounding", True):  # the float twin (pipeline.graph.float_twin): clip only
        return v_lo, v_hi, torch.clamp(v_lo, m.qmin, m.qmax), torch.clamp(v_hi, m.qmin, m.qmax)
    q_lo = torch.clamp(torch.round(v_lo - QUANT_TOL), m.qmin, m.qmax)
    q_hi = torch.clamp(torch.round(v_hi + QUANT_TOL), m.qmin, m.qmax)
    # rounding has no useful gradient; the straight-through value keeps IBP-trained losses differentiable
    q_lo = v_lo + (q_lo - v_lo).detach()
    q_hi = v_hi + (q_hi - v_hi).detach()
    return v_lo, v_hi, q_lo, q_hi


def quant_relaxation(m: Quantize, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear bounds ``ls * x + lb <= q(x) <= us * x + ub`` of QuantizeLinear on ``[lo, hi]`` (slopes per unit of
    ``x``, biases in quanta).

    In quanta ``v = x / s + z`` and with ``A = q(v_lo)``, ``B = q(v_hi)`` (rounded and clipped, widened by
    ``QUANT_TOL``), the staircase lies between two clipped lines over the box:

        clip(v - h, A, B) <= q(v) <= clip(v + h, A, B),     h = 1/2 + QUANT_TOL,

    (``q`` is monotone, so ``A <= q <= B``; where ``q > A`` it is not clipped at ``qmin``, so ``q <= round(v) <=
    v + 1/2``, and symmetrically below). Both envelopes are convex below their upper kink and concave above
    their lower one, so the tightest lines are those of the ReLU's triangle relaxation (Zhang et al. 2018),
    applied to the envelopes: the upper line is the chord of ``clip(v + h, A, B)`` from ``v_lo`` to
    ``p = min(v_hi, B - h)`` (the kink where it reaches ``B``), continued flat-above beyond it, and the lower line
    the chord of ``clip(v - h, A, B)`` from ``max(v_lo, A + h)`` to ``v_hi``. Where the box's middle lies on the
    flat side of that kink the constant ``B`` (upper) or ``A`` (lower) has the smaller mean over the box and is
    taken instead (every line through the kink and above the other endpoint is higher at the middle); a box that
    rounds to one level is exact. Within the clip range the chords are the lines ``v -/+ h``; where the box
    crosses ``qmin`` or ``qmax`` (the floor of a fused Conv-Relu's QuantizeLinear) they are the chords across the
    clip, which a constant bound gave away.

    Float rounding: the lines are anchored at one endpoint of the box and widened outward by a few ulps of the
    magnitudes met in computing them, the largest of ``|v|`` and ``|v - z| = |x / s|`` at both ends (the error of
    ``x / s + z`` grows with the distance from the zero point, not only with ``|v|``; far below the ``QUANT_TOL``
    quanta that cover onnxruntime's tie breaking).
    """
    scale, zero = m.params(lo.dim())
    v_lo, v_hi, q_lo, q_hi = quant_endpoints(m, lo, hi)
    half = 0.5 + QUANT_TOL if getattr(m, "rounding", True) else 0.0  # the float twin only clips
    mid = (v_lo + v_hi) * 0.5
    # the float error of the lines, in quanta, is a few roundings of the magnitudes met in computing them: x / s
    # (= v - z: its quotient is rounded before z is added, so near the clip floor of a zero point 142, v ~ 0 but
    # |x / s| ~ 142), v, and the biases' sums (of the size of z, at most |v| + |v - z|); about 13 unit roundoffs of
    # their largest in all, so 8 eps = 16 u of it. A guard in |v| alone left a U8 upper line 1.6e-5 quanta short
    magnitude = torch.stack([v_lo.abs(), v_hi.abs(), (v_lo - zero).abs(), (v_hi - zero).abs()]).amax(0)
    guard = 8 * torch.finfo(lo.dtype).eps * (magnitude + 1.0)

    def upper_env(v: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(v + half, q_lo), q_hi)

    def lower_env(v: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(v - half, q_lo), q_hi)

    # upper: chord of clip(v + h, A, B) over [v_lo, p], p = min(v_hi, B - h); constant B beyond the kink
    p_up = torch.minimum(torch.maximum(q_hi - half, v_lo), v_hi)
    run_up = p_up - v_lo
    use_up = (q_lo < q_hi) & (mid <= p_up) & (run_up > 1e-6)
    slope_up = torch.where(use_up, (upper_env(p_up) - upper_env(v_lo)) / run_up.clamp_min(1e-6), 0.0)
    slope_up = slope_up.clamp(0.0, 1.0)
    # in x: slope (v - v_lo) + env(v_lo) = slope / s * x + env(v_lo) - slope (v_lo - z)
    upper_bias = torch.where(use_up, upper_env(v_lo) - slope_up * (v_lo - zero) + guard, q_hi)
    # lower: chord of clip(v - h, A, B) over [p, v_hi], p = max(v_lo, A + h); constant A before the kink
    p_lo = torch.maximum(torch.minimum(q_lo + half, v_hi), v_lo)
    run_lo = v_hi - p_lo
    use_lo = (q_lo < q_hi) & (mid >= p_lo) & (run_lo > 1e-6)
    slope_lo = torch.where(use_lo, (lower_env(v_hi) - lower_env(p_lo)) / run_lo.clamp_min(1e-6), 0.0)
    slope_lo = slope_lo.clamp(0.0, 1.0)
    lower_bias = torch.where(use_lo, lower_env(v_hi) - slope_lo * (v_hi - zero) - guard, q_lo)
    inv = 1.0 / scale
    return slope_lo * inv, lower_bias, slope_up * inv, upper_bias


def _maxpool_windows(pool: torch.nn.MaxPool2d, t: Tensor, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor, tuple]:
    """The pooling windows of ``t`` [N, C, H, W]: values [N, C, k*k, L] (padding reads ``-inf``, as MaxPool's),
    the flat position of each window entry in the padded input [k*k, L], and the padded shape's geometry.

    ``out_hw`` is the pool's output size (``ceil_mode`` can add a last window reaching past the right padding:
    that overhang is padded with ``-inf`` too).
    """
    from torch.nn.modules.utils import _pair

    k, s, p, d = (_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    h, w = t.shape[-2:]
    extra = [max(0, (out_hw[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 - ((h, w)[i] + 2 * p[i])) for i in range(2)]
    pads = (p[1], p[1] + extra[1], p[0], p[0] + extra[0])
    padded = torch.nn.functional.pad(t, pads, value=float("-inf"))
    hp, wp = padded.shape[-2:]
    n, c = t.shape[:2]
    values = torch.nn.functional.unfold(padded.reshape(n * c, 1, hp, wp), k, d, 0, s)  # [N*C, k*k, L]
    positions = torch.arange(hp * wp, dtype=torch.float64, device=t.device).view(1, 1, hp, wp)
    positions = torch.nn.functional.unfold(positions, k, d, 0, s)[0].round().long()  # [k*k, L]
    if values.shape[-1] != out_hw[0] * out_hw[1]:
        raise AssertionError(f"MaxPool windows: {values.shape[-1]} for an output of {out_hw}")
    return values.view(n, c, *values.shape[1:]), positions, (hp, wp, p)


def maxpool_relaxation(pool: torch.nn.MaxPool2d, lo: Tensor, hi: Tensor, out_hw: tuple[int, int]
                        ) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """auto_LiRPA's ``BoundMaxPool`` relaxation (Xu et al., NeurIPS 2020) of ``y = max_{j in window} x_j``:

    - lower: ``y >= x_i``, ``i`` the input with the largest lower bound in the window (any window member is a
      sound lower bound; this one is exact at the box's lower corner);
    - upper: ``y <= x_i`` where ``lo_i >= hi_j`` for every other ``j`` of the window (then ``y = x_i`` on the whole
      box: exact), else the constant ``max_j hi_j``.

    Returns ``index`` [N, C, L] (flat position of ``x_i`` in the padded input), ``exact`` (bool [N, C, L]),
    ``upper`` [N, C, L] (the constant upper bound where not exact) and the padded geometry. Any kernel, stride,
    padding, dilation and ``ceil_mode``; overlapping windows share inputs (the backward rule sums them).
    """
    lo_w, positions, geometry = _maxpool_windows(pool, lo, out_hw)
    hi_w, _, _ = _maxpool_windows(pool, hi, out_hw)
    best_lo, arg = lo_w.max(2)  # [N, C, L]
    if bool(torch.isneginf(best_lo).any()):  # a window of padding only, or an unbounded box: y >= -inf
        raise UnsupportedOpError("MaxPool window without a finite lower bound", "MaxPool")
    others = hi_w.scatter(2, arg.unsqueeze(2), float("-inf")).amax(2)
    exact = best_lo >= others
    upper = hi_w.amax(2)
    length = positions.shape[1]
    index = positions.reshape(-1)[arg * length + torch.arange(length, device=lo.device)]  # positions[arg, l]
    return index, exact, upper, geometry


def sigmoid_relaxation(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Linear bounds ``k x + lower <= sigmoid(x) <= k x + upper`` on ``[lo, hi]``, elementwise.

    ``k`` is the chord's slope (clamped to ``[0, 1/4]``, the range of ``sigmoid'``; any ``k`` gives sound lines),
    ``lower`` / ``upper`` the exact minimum / maximum of ``g(x) = sigmoid(x) - k x`` over the box: ``g' = 0``
    where ``sigmoid'(x) = s (1 - s) = k``, i.e. at ``x = logit((1 -/+ sqrt(1 - 4k)) / 2)``, so the extrema are
    among the endpoints and those two points clamped into the box. Where the box is convex (``hi <= 0``) the upper
    line is the chord and the lower one the tangent parallel to it; concave, the other way round; across 0 both
    lines touch the curve. Widened by a few ulps of the magnitudes involved (float rounding of ``sigmoid`` and of
    ``k x``)."""
    width = hi - lo
    s_lo, s_hi = torch.sigmoid(lo), torch.sigmoid(hi)
    mid = (lo + hi) * 0.5
    s_mid = torch.sigmoid(mid)
    chord = (s_hi - s_lo) / width.clamp_min(1e-12)
    k = torch.where(width > 1e-6, chord, s_mid * (1 - s_mid)).clamp(0.0, 0.25)
    root = torch.sqrt((1 - 4 * k).clamp_min(0.0))
    s1 = ((1 - root) * 0.5).clamp(1e-30, 1 - 1e-7)
    x1 = torch.log(s1) - torch.log1p(-s1)  # logit, <= 0; its mirror -x1 is the other critical point
    cands = torch.stack([lo, hi, torch.minimum(torch.maximum(x1, lo), hi), torch.minimum(torch.maximum(-x1, lo), hi)])
    g = torch.sigmoid(cands) - k * cands
    magnitude = 1.0 + k * torch.maximum(lo.abs(), hi.abs())
    guard = 8 * torch.finfo(lo.dtype).eps * magnitude
    return k, g.amin(0) - guard, g.amax(0) + guard


def mul_relaxation(x: Box, y: Box) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """McCormick's planes for ``z = x * y`` on the boxes (broadcast to the product's shape):
    ``z >= ly x + lx y - lx ly`` (as ``(x - lx)(y - ly) >= 0``) and ``z <= uy x + lx y - lx uy`` (as
    ``(x - lx)(uy - y) >= 0``). Returns the lower plane's x and y coefficients and constant, then the upper
    plane's."""
    lx, ly, uy = x.lo, y.lo, y.hi
    shape = torch.broadcast_shapes(lx.shape, ly.shape)
    lx, ly, uy = (t.expand(shape) for t in (lx, ly, uy))
    return ly, lx, -lx * ly, uy, lx, -lx * uy
