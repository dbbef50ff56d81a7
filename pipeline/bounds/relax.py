"""The linear relaxations of the nonlinear ops, as math on tensors: the rules of :mod:`pipeline.bounds.ops` apply
them, and alpha-CROWN starts its slopes from the ReLU's.

ReLU: CROWN's (Zhang et al., NeurIPS 2018), the chord above and auto_LiRPA's adaptive slope below.
QuantizeLinear: the lines ``v -/+ (1/2 + QUANT_TOL)`` inside the clip range and constants beyond it; why, and why
the endpoints are widened by ``QUANT_TOL`` before rounding, is in :mod:`pipeline.bounds` ("Quantized graphs").
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.bounds.box import Box, _dot
from pipeline.graph import Quantize

QUANT_TOL = 1e-2
"""Quanta by which interval endpoints are widened before rounding (see :mod:`pipeline.bounds`)."""


def _relu_relaxation(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CROWN's ReLU relaxation: ``lower_slope * x <= relu(x) <= upper_slope * x + upper_bias``.

    Upper: the chord through ``(l, 0)`` and ``(u, u)`` for unstable neurons. Lower: slope 1 if ``u > -l`` else 0
    (auto_LiRPA's "adaptive" choice, the one minimising the relaxation's area). Stable neurons are exact.
    """
    lo_r, hi_r = lo.clamp(max=0), hi.clamp(min=0)
    upper_slope = hi_r / (hi_r - lo_r).clamp_min(1e-12)
    upper_bias = -lo_r * upper_slope
    lower_slope = (hi_r > -lo_r).to(lo.dtype)
    return lower_slope, upper_slope, upper_bias


def _relu_backward(a: Tensor, box: Box, lower_slope: Tensor, upper_slope: Tensor, upper_bias: Tensor
                   ) -> tuple[list[Tensor], Tensor]:
    """Coefficients through a ReLU for lower bounds: ``a * lower_slope`` where ``a > 0``, ``a * upper_slope``
    (the chord) where ``a < 0``, bias ``sum(min(a, 0) * upper_bias)``.

    The two slopes differ only at unstable neurons, a few per example in a trained network; there the correction
    is applied on gathered columns instead of a full ``where`` over the coefficient tensor.
    """
    n = box.shape[0]
    unstable = ((box.lo < 0) & (box.hi > 0)).reshape(n, -1)
    counts = unstable.sum(1)
    k = int(counts.max()) if n else 0
    dim = unstable.shape[1]
    if 4 * k > dim:
        pulled = a * torch.where(a > 0, lower_slope.unsqueeze(1), upper_slope.unsqueeze(1))
        return [pulled], _dot(a.clamp(max=0), upper_bias)
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


def _quant_endpoints(m: Quantize, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``v_lo, v_hi`` (in quanta) and the rounded, clipped ``q(v_lo), q(v_hi)`` widened by ``QUANT_TOL``."""
    scale, zero = m.params(lo.dim())
    v_lo, v_hi = lo / scale + zero, hi / scale + zero
    q_lo = torch.clamp(torch.round(v_lo - QUANT_TOL), m.qmin, m.qmax)
    q_hi = torch.clamp(torch.round(v_hi + QUANT_TOL), m.qmin, m.qmax)
    # rounding has no useful gradient; the straight-through value keeps IBP-trained losses differentiable
    q_lo = v_lo + (q_lo - v_lo).detach()
    q_hi = v_hi + (q_hi - v_hi).detach()
    return v_lo, v_hi, q_lo, q_hi


def _quant_relaxation(m: Quantize, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear bounds ``ls * x + lb <= q(x) <= us * x + ub`` of QuantizeLinear on ``[lo, hi]``."""
    scale, zero = m.params(lo.dim())
    v_lo, v_hi, q_lo, q_hi = _quant_endpoints(m, lo, hi)
    half = 0.5 + QUANT_TOL
    mid = (v_lo + v_hi) * 0.5
    use_lower_line = (v_hi <= m.qmax + 0.5) & (mid - half > q_lo)
    use_upper_line = (v_lo >= m.qmin - 0.5) & (mid + half < q_hi)
    inv = (1.0 / scale).expand_as(lo)
    zeros = torch.zeros_like(lo)
    lower_slope = torch.where(use_lower_line, inv, zeros)
    lower_bias = torch.where(use_lower_line, zero - half, q_lo)
    upper_slope = torch.where(use_upper_line, inv, zeros)
    upper_bias = torch.where(use_upper_line, zero + half, q_hi)
    return lower_slope, lower_bias, upper_slope, upper_bias
