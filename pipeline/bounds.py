"""Sound bounds on a classifier's logits over an input box: IBP, CROWN and alpha-CROWN.

References:
- IBP: Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust
  Models", 2018 (interval arithmetic in centre/radius form through affine layers).
- CROWN: Zhang et al., "Efficient Neural Network Robustness Certification with General Activation Functions",
  NeurIPS 2018 (backward linear relaxation; ReLU upper bound = chord, adaptive lower slope).
- CROWN-IBP: Zhang et al., ICLR 2020 (margin specification folded into the last linear layer; CROWN with IBP
  intermediate bounds).
- alpha-CROWN: Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
  Massively Parallel Incomplete Verifiers", ICLR 2021 (lower ReLU slopes optimised by projected gradient).

What is bounded, over which set, and how are kept apart: a *model* (any module :func:`pipeline.onnx_io.as_graph`
accepts: our ``nn.Sequential`` models, residual models that ``torch.fx`` traces, an ``OnnxModule``), an input
*box* ``[x_lo, x_hi]`` (:func:`verified` builds it from the L-inf ball intersected with the valid range), and a
*method*. Everything is differentiable (no ``no_grad`` inside), so training losses on IBP or CROWN margins send
gradients to the weights and, through ``effective_weight``, to HYDRA's scores.

Op vocabulary (the graph form's ops): Conv, Gemm/Linear, BatchNormalization (running statistics), Normalize,
Add/Sub/Mul/Div with a constant, Add/Sub of two tensors, AveragePool, GlobalAveragePool, Flatten, Reshape and
Transpose that keep the batch dimension, Pad, Concat, Relu, LeakyRelu, Clip, MaxPool, QuantizeLinear,
DequantizeLinear, Constant. Anything else raises :class:`UnsupportedOpError` naming the op and the node.

How CROWN handles ops without a linear relaxation here (MaxPool, Clip, LeakyRelu, Mul of two tensors): the
backward pass stops at that node and bounds its contribution with the node's interval box (a "cut"), which is
sound because each term of the linear bound is bounded separately.

Quantized graphs (QuantizeLinear -> DequantizeLinear, as onnxruntime's QDQ format writes them):
- IBP: ``q(v) = clip(round(v), qmin, qmax)`` with ``v = x / s + z`` is monotone, so the box's endpoints are
  rounded and clipped. The endpoints are widened by ``QUANT_TOL`` quanta before rounding because onnxruntime's
  fused integer kernels (QLinearConv, QLinearAveragePool) and our float arithmetic may break an exact tie
  ``k + 0.5`` differently; without the widening the bounds could miss the deployed model's output.
- CROWN: within the clip range ``round(v)`` lies in ``[v - 1/2, v + 1/2]``, so ``q`` has the linear bounds
  ``v -/+ (1/2 + QUANT_TOL)`` (slope ``1 / s``). Where the box reaches past the clip range on one side, the
  line on that side is invalid and the constant bound ``q(v_lo)`` (lower) or ``q(v_hi)`` (upper) is used; where
  both are valid, the one with the better mean over the box is chosen (like the adaptive ReLU slope).
  DequantizeLinear is affine and exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.masking import effective_weight
from pipeline.onnx_io import Binary, ConstBinary, GraphModule, Node, Quantize, as_graph

QUANT_TOL = 1e-2
"""Quanta by which interval endpoints are widened before rounding (see the module docstring)."""

Method = Literal["ibp", "crown", "alpha-crown"]


# ----------------------------------------------------------------------------------------------------------------
# Boxes: an interval in (lo, hi) or (centre, radius) form, converted lazily
# ----------------------------------------------------------------------------------------------------------------

class Box:
    """An interval ``[lo, hi]`` kept in whichever form the last op produced; the other form on demand.

    Affine ops want centre/radius (Gowal et al.: ``c' = W c + b``, ``r' = |W| r``); monotone ops want endpoints.
    Converting only when the next op needs it saves elementwise passes, which dominate on small networks.
    """

    __slots__ = ("_lo", "_hi", "_c", "_r")

    def __init__(self, lo: Tensor | None = None, hi: Tensor | None = None, c: Tensor | None = None,
                 r: Tensor | None = None) -> None:
        self._lo, self._hi, self._c, self._r = lo, hi, c, r

    @classmethod
    def cr(cls, c: Tensor, r: Tensor) -> Box:
        return cls(c=c, r=r)

    @property
    def has_lohi(self) -> bool:
        return self._lo is not None

    @property
    def lo(self) -> Tensor:
        if self._lo is None:
            self._lo, self._hi = self._c - self._r, self._c + self._r  # type: ignore[operator]
        return self._lo

    @property
    def hi(self) -> Tensor:
        if self._hi is None:
            self.lo  # noqa: B018 - fills both
        return self._hi  # type: ignore[return-value]

    @property
    def c(self) -> Tensor:
        if self._c is None:
            self._c, self._r = (self._hi + self._lo) * 0.5, (self._hi - self._lo) * 0.5  # type: ignore[operator]
        return self._c

    @property
    def r(self) -> Tensor:
        if self._r is None:
            self.c  # noqa: B018
        return self._r  # type: ignore[return-value]

    @property
    def shape(self) -> torch.Size:
        return (self._lo if self._lo is not None else self._c).shape  # type: ignore[union-attr]

    def map(self, f: Callable[[Tensor], Tensor]) -> Box:
        """Apply a map that commutes with both forms (reshapes, nonnegative linear maps without bias)."""
        if self._lo is not None:
            return Box(lo=f(self._lo), hi=f(self._hi))  # type: ignore[arg-type]
        return Box(c=f(self._c), r=f(self._r))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Affine pieces of the vocabulary, read from the live modules (so gradients reach weights and scores)
# ----------------------------------------------------------------------------------------------------------------

def _channel_affine(node: Node) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel of a BatchNorm (running statistics), Normalize or folded BN node."""
    m = node.module
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.running_mean is None or m.running_var is None:
            raise UnsupportedOpError("BatchNorm without running statistics", node.name)
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        return scale, shift
    if node.op == "Normalize":
        std, mean = m.std.reshape(-1), m.mean.reshape(-1)
        return 1.0 / std, -mean / std
    return m.scale, m.shift  # ChannelAffine


def _per_channel(t: Tensor, ndim: int, lead: int = 0) -> Tensor:
    """View a per-channel vector to broadcast against a tensor of ``ndim`` dims whose channel dim is ``1 + lead``."""
    return t.view((1,) * (1 + lead) + (-1,) + (1,) * (ndim - 2 - lead))


def _check_conv(node: Node) -> nn.Conv2d:
    m = node.module
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedOpError(f"Conv with padding {m.padding!r}/{m.padding_mode}", node.name)
    return m


def _const_scale(node: Node) -> Tensor | None:
    """For ConstBinary Mul / Div(x / c): the constant factor; None for Add / Sub."""
    m: ConstBinary = node.module  # type: ignore[assignment]
    if m.op == "Mul":
        return m.const
    if m.op == "Div":
        if m.const_first:
            raise UnsupportedOpError("Div (constant / tensor)", node.name)
        return 1.0 / m.const
    return None


# ----------------------------------------------------------------------------------------------------------------
# IBP
# ----------------------------------------------------------------------------------------------------------------

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


def _kind(node: Node) -> str:
    """The op as bounds see it: ONNX's Add / Sub / Mul / Div become ConstBinary or Binary by their operands."""
    if isinstance(node.module, ConstBinary):
        return "ConstBinary"
    if isinstance(node.module, Binary):
        return "Binary"
    return node.op


def _ibp_node(node: Node, boxes: list[Box]) -> Box:
    op, m = _kind(node), node.module
    if op == "Conv":
        _check_conv(node)
        w = effective_weight(m)
        b = boxes[0]
        args = (m.stride, m.padding, m.dilation, m.groups)
        return Box.cr(F.conv2d(b.c, w, m.bias, *args), F.conv2d(b.r, w.abs(), None, *args))
    if op == "Gemm":
        w = effective_weight(m)
        b = boxes[0]
        return Box.cr(F.linear(b.c, w, m.bias), F.linear(b.r, w.abs()))
    if op in ("BatchNormalization", "Normalize"):
        scale, shift = _channel_affine(node)
        b = boxes[0]
        nd = len(b.shape)
        return Box.cr(b.c * _per_channel(scale, nd) + _per_channel(shift, nd), b.r * _per_channel(scale.abs(), nd))
    if op == "ConstBinary":
        b = boxes[0]
        k = _const_scale(node)
        if k is not None:
            return Box.cr(b.c * k, b.r * k.abs())
        if m.const_first and m.op == "Sub":  # const - x
            return Box(lo=m.const - b.hi, hi=m.const - b.lo)
        c = b.c + m.const if m.op == "Add" else b.c - m.const
        return Box.cr(c, b.r if b.r.shape == c.shape else b.r.expand_as(c))
    if op in ("Relu", "LeakyRelu", "Clip", "MaxPool"):
        b = boxes[0]
        return Box(lo=m(b.lo), hi=m(b.hi))
    if op in ("AveragePool", "GlobalAveragePool", "AdaptiveAvgPool", "Flatten", "Reshape", "Transpose"):
        out = boxes[0].map(m)
        # bounds keep one row of coefficients per example: the batch dimension must stay where it is
        if out.shape[0] != boxes[0].shape[0] or (op == "Transpose" and m.perm[0] != 0):
            raise UnsupportedOpError(f"{op} that moves the batch dimension", node.name)
        return out
    if op == "Pad":
        b = boxes[0]
        return Box(lo=m(b.lo), hi=m(b.hi))
    if op == "Binary":
        a, b = boxes
        if m.op == "Add":
            return Box.cr(a.c + b.c, a.r + b.r)
        if m.op == "Sub":
            return Box.cr(a.c - b.c, a.r + b.r)
        if m.op == "Mul":
            p = torch.stack([a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi])
            return Box(lo=p.amin(0), hi=p.amax(0))
        raise UnsupportedOpError(f"{m.op} of two tensors", node.name)
    if op == "Concat":
        return Box(lo=m(*[b.lo for b in boxes]), hi=m(*[b.hi for b in boxes]))
    if op == "QuantizeLinear":
        b = boxes[0]
        _, _, q_lo, q_hi = _quant_endpoints(m, b.lo, b.hi)
        return Box(lo=q_lo, hi=q_hi)
    if op == "DequantizeLinear":
        scale, zero = m.params(len(boxes[0].shape))
        return Box(lo=(boxes[0].lo - zero) * scale, hi=(boxes[0].hi - zero) * scale)
    if op == "Constant":
        v = m()
        return Box(lo=v, hi=v)
    raise UnsupportedOpError(op, node.name)


def _ibp(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, refine: Callable[[Node, Box], Box] | None = None
         ) -> dict[str, Box]:
    boxes = _Boxes({graph.input_name: Box(lo=x_lo, hi=x_hi)})
    for node in graph.nodes:
        box = _ibp_node(node, [boxes[i] for i in node.inputs])
        boxes[node.output] = refine(node, box) if refine is not None else box
    return boxes


def _check_box(x_lo: Tensor, x_hi: Tensor) -> None:
    if x_lo.shape != x_hi.shape:
        raise HydraPipeError(f"bounds: x_lo has shape {tuple(x_lo.shape)} but x_hi {tuple(x_hi.shape)}")
    if bool((x_lo > x_hi).any()):
        raise HydraPipeError("bounds: x_lo > x_hi somewhere; expected a non-empty box")


def interval_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor) -> tuple[Tensor, Tensor]:
    """IBP (Gowal et al. 2018): elementwise ``lo <= logits(x) <= hi`` for every ``x`` in ``[x_lo, x_hi]``.

    Affine layers in centre/radius form ``c' = W c + b, r' = |W| r``; monotone ops (ReLU, MaxPool, Clip, rounding
    and clipping of QuantizeLinear) on the endpoints. Differentiable.
    """
    _check_box(x_lo, x_hi)
    graph = as_graph(model)
    box = _ibp(graph, x_lo, x_hi)[graph.output_name]
    return box.lo, box.hi


# ----------------------------------------------------------------------------------------------------------------
# Backward linear bound propagation (CROWN). A linear bound is a coefficient tensor ``A`` of shape
# [N or 1, M, *value_shape] per graph value plus a bias [N, M]; the engine computes lower bounds of
# ``sum(A * value)`` for each of the M rows. Upper bounds are lower bounds of the negated rows.
# ----------------------------------------------------------------------------------------------------------------

def _dot(a: Tensor, t: Tensor) -> Tensor:
    """``sum(a * t)`` over value dims: ``a`` [Na, M, *s] (Na in {1, N}), ``t`` [N or 1, *s] -> [N, M]."""
    af = a.flatten(2)
    tf = t.flatten(1)
    if af.shape[0] == 1:
        return tf @ af[0].T
    if tf.shape[0] == 1:
        return af @ tf[0]
    return torch.bmm(af, tf.unsqueeze(2)).squeeze(2)


def _unbroadcast(a: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``a`` [Na, M, *out] down to [Na, M, *shape[1:]] (undo broadcasting of a value of ``shape``)."""
    target = tuple(shape[1:])
    extra = a.dim() - 2 - len(target)
    if extra > 0:
        a = a.sum(dim=tuple(range(2, 2 + extra)))
    dims = tuple(i + 2 for i, s in enumerate(target) if s == 1 and a.shape[i + 2] != 1)
    if dims:
        a = a.sum(dim=dims, keepdim=True)
    return a


def _value_const(const: Tensor, a: Tensor) -> Tensor:
    """A constant operand broadcast to one example's value shape, with a batch dim of 1 (for :func:`_dot`)."""
    return torch.broadcast_to(const, (1, *a.shape[2:]))


def _as_rows(a: Tensor) -> tuple[Tensor, int, int]:
    na, m = a.shape[:2]
    return a.reshape(na * m, *a.shape[2:]), na, m


def _from_rows(t: Tensor, na: int, m: int) -> Tensor:
    return t.reshape(na, m, *t.shape[1:])


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


def _quant_relaxation(m: Quantize, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear bounds ``ls * x + lb <= q(x) <= us * x + ub`` of QuantizeLinear on ``[lo, hi]`` (module docstring)."""
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


_LINEAR_OPS = {"Conv", "Gemm", "BatchNormalization", "Normalize", "ConstBinary", "AveragePool", "GlobalAveragePool",
               "AdaptiveAvgPool", "Flatten", "Reshape", "Transpose", "Pad", "Binary", "Concat", "DequantizeLinear",
               "Constant"}
_RELAXED_OPS = {"Relu", "QuantizeLinear"}


def _is_linear(node: Node) -> bool:
    op = _kind(node)
    if op == "Binary":
        return node.module.op in ("Add", "Sub")
    if op == "ConstBinary":
        return not (node.module.op == "Div" and node.module.const_first)
    return op in _LINEAR_OPS


def _backward_node(node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None
                   ) -> tuple[list[Tensor | None], Tensor | float]:
    """Pull the coefficients ``a`` of ``node``'s output back onto its inputs; return (input coefficients, bias)."""
    op, m = _kind(node), node.module
    in_shape = boxes[node.inputs[0]].shape if node.inputs else None
    if op == "Gemm":
        w = effective_weight(m)
        bias = _dot(a, m.bias.expand(a.shape[2:]).unsqueeze(0)) if m.bias is not None else 0.0
        return [a @ w], bias
    if op == "Conv":
        w = effective_weight(m)
        rows, na, mm = _as_rows(a)
        out_hw = rows.shape[-2:]
        opad = [in_shape[2 + i] - ((out_hw[i] - 1) * m.stride[i] - 2 * m.padding[i]  # type: ignore[index]
                                   + m.dilation[i] * (w.shape[2 + i] - 1) + 1) for i in range(2)]
        bias = (a.sum((3, 4)) * m.bias).sum(2) if m.bias is not None else 0.0
        dense = _dense_conv(node, w, in_shape, boxes)  # type: ignore[arg-type]
        if dense is not None:
            return [(a.flatten(2) @ dense).view(*a.shape[:2], *in_shape[1:])], bias  # type: ignore[index]
        # transposed convolution; channels-last runs it about 1.5-2x faster on CPU for these shapes
        rows = rows.contiguous(memory_format=torch.channels_last)
        back = F.conv_transpose2d(rows, w, None, m.stride, m.padding, opad, m.groups, m.dilation)
        return [_from_rows(back.contiguous(), na, mm)], bias
    if op in ("BatchNormalization", "Normalize"):
        scale, shift = _channel_affine(node)
        nd = a.dim()
        bias = (a.flatten(3).sum(3) * shift).sum(2) if nd > 3 else (a * shift).sum(2)
        return [a * _per_channel(scale, nd, lead=1)], bias
    if op == "ConstBinary":
        k = _const_scale(node)
        if k is not None:
            return [_unbroadcast(a * k, in_shape)], 0.0  # type: ignore[arg-type]
        const = _value_const(m.const, a)
        if m.op == "Add":
            return [_unbroadcast(a, in_shape)], _dot(a, const)  # type: ignore[arg-type]
        if m.const_first:  # c - x
            return [_unbroadcast(-a, in_shape)], _dot(a, const)  # type: ignore[arg-type]
        return [_unbroadcast(a, in_shape)], -_dot(a, const)  # type: ignore[arg-type]
    if op in ("Flatten", "Reshape"):
        return [a.reshape(*a.shape[:2], *in_shape[1:])], 0.0  # type: ignore[index]
    if op == "Transpose":
        inv = [0] * len(m.perm)
        for i, p in enumerate(m.perm):
            inv[p] = i
        return [a.permute([0, 1] + [p + 1 for p in inv[1:]])], 0.0
    if op == "GlobalAveragePool" or (op == "AdaptiveAvgPool" and tuple(a.shape[-2:]) == (1, 1)):
        hw = in_shape[2] * in_shape[3]  # type: ignore[index]
        return [(a / hw).expand(*a.shape[:3], *in_shape[2:])], 0.0  # type: ignore[index]
    if op in ("AveragePool", "AdaptiveAvgPool"):
        rows, na, mm = _as_rows(a)
        x0 = torch.zeros((rows.shape[0], *in_shape[1:]), dtype=a.dtype, device=a.device)  # type: ignore[index]
        _, vjp = torch.func.vjp(m, x0)
        return [_from_rows(vjp(rows)[0], na, mm)], 0.0
    if op == "Pad":
        inner = F.pad(a, [-p for p in m.pads])
        bias = (a.flatten(2).sum(2) - inner.flatten(2).sum(2)) * m.value if m.value else 0.0
        return [inner], bias
    if op == "Binary":  # Add / Sub
        sa, sb = boxes[node.inputs[0]].shape, boxes[node.inputs[1]].shape
        return [_unbroadcast(a, sa), _unbroadcast(-a if m.op == "Sub" else a, sb)], 0.0
    if op == "Concat":
        sizes = [boxes[i].shape[m.axis] for i in node.inputs]
        axis = m.axis % len(in_shape) + 1  # type: ignore[arg-type]
        return list(torch.split(a, sizes, dim=axis)), 0.0
    if op == "DequantizeLinear":
        scale, zero = m.params(len(in_shape))  # type: ignore[arg-type]
        return [a * scale], -_dot(a, _value_const(zero * scale, a))
    if op == "Constant":
        return [], _dot(a, _value_const(m(), a))
    if op == "Relu":
        box = boxes[node.inputs[0]]
        lower_slope, upper_slope, upper_bias = _relu_relaxation(box.lo, box.hi)
        if alphas is not None and node.output in alphas:
            unstable = ((box.lo < 0) & (box.hi > 0)).unsqueeze(1)
            lower_slope = torch.where(unstable, alphas[node.output], lower_slope.unsqueeze(1))
            neg = a.clamp(max=0)
            pulled = a * torch.where(a > 0, lower_slope, upper_slope.unsqueeze(1))
            return [pulled], _dot(neg, upper_bias)
        return _relu_backward(a, box, lower_slope, upper_slope, upper_bias)
    if op == "QuantizeLinear":
        box = boxes[node.inputs[0]]
        ls, lb, us, ub = _quant_relaxation(m, box.lo, box.hi)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        return [pos * ls.unsqueeze(1) + neg * us.unsqueeze(1)], _dot(pos, lb) + _dot(neg, ub)
    raise AssertionError(op)


class _Boxes(dict):
    """Boxes of one bound computation, plus what its backward passes may reuse (dense forms of small convs)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dense: dict[str, Tensor | None] = {}


def _dense_conv(node: Node, w: Tensor, in_shape: torch.Size, boxes: dict[str, Box]) -> Tensor | None:
    """The convolution as a dense [out_dim, in_dim] matrix when that is cheaper to multiply by than to run
    transposed: small inputs relative to the kernel (matmul runs near peak, tiny transposed convs do not)."""
    cache = getattr(boxes, "dense", None)
    if cache is not None and node.output in cache:
        return cache[node.output]
    m = node.module
    in_dim = math.prod(in_shape[1:])
    out_dim = math.prod(boxes[node.output].shape[1:])
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    dense = None
    # a transposed conv back onto 1-3 channels (the input layer) is far from peak speed; so is any tiny one
    if (in_dim <= 4 * fan_in or w.shape[1] * m.groups <= 3) and in_dim * out_dim <= 1 << 22:
        eye = torch.eye(in_dim, dtype=w.dtype, device=w.device).view(in_dim, *in_shape[1:])
        # row i is the response to e_i: [in_dim, out_dim]; stored transposed for ``coeffs @ dense``
        dense = F.conv2d(eye, w, None, m.stride, m.padding, m.dilation, m.groups).flatten(1).T.contiguous()
    if cache is not None:
        cache[node.output] = dense
    return dense


def _concretize(a: Tensor, box: Box) -> Tensor:
    """Lower bound of ``sum(a * v)`` over ``v`` in ``box``: ``a . c - |a| . r``."""
    return _dot(a, box.c) - _dot(a.abs(), box.r)


def _backward(graph: GraphModule, target: str, spec: Tensor, boxes: dict[str, Box], *, linear_only: bool = False,
              alphas: dict[str, Tensor] | None = None, rows: Tensor | None = None) -> Tensor:
    """Lower bounds [N, M] of ``sum(spec[:, j] * value(target))``: CROWN's backward pass from ``target``.

    ``linear_only`` stops at the first non-affine node (bounded by its box): the specification folded into the
    trailing affine layers, as CROWN-IBP does for the margins.

    ``rows`` ([N, R] indices into the rows of a batch-shared ``spec`` [1, U, ...]): the rows are pulled back
    once for the whole batch through the affine ops next to ``target`` and only split per example (row
    ``rows[n, j]`` for example n) at the first op whose relaxation depends on the example. The result is [N, R].
    """
    coeffs: dict[str, Tensor] = {target: spec}
    shared = {target} if rows is not None else set()
    shared_bias: Tensor | float = 0.0  # [1, U] while rows are shared
    bias: Tensor | float = 0.0
    n = boxes[graph.input_name].shape[0]

    def split(a: Tensor) -> Tensor:
        return a[0][rows]

    started = False
    for node in reversed(graph.nodes):
        if node.output == target:
            started = True
        if not started or node.output not in coeffs:
            continue
        a = coeffs.pop(node.output)
        is_shared = node.output in shared
        shared.discard(node.output)
        relaxed = node.op in _RELAXED_OPS and not linear_only
        linear = _is_linear(node)
        if is_shared and not linear:
            a, is_shared = split(a), False
        if not (linear or relaxed):  # a cut: bound this node's contribution by its box
            bias = bias + _concretize(a, boxes[node.output])
            continue
        pulled, b = _backward_node(node, a, boxes, alphas)
        if is_shared:
            shared_bias = shared_bias + b
        else:
            bias = bias + b
        for name, pa in zip(node.inputs, pulled):
            if pa is None:
                continue
            if name not in coeffs:
                coeffs[name] = pa
                if is_shared:
                    shared.add(name)
                continue
            if (name in shared) != is_shared:  # one shared, one per-example contribution: split the shared one
                if is_shared:
                    pa = split(pa)
                else:
                    coeffs[name] = split(coeffs[name])
                    shared.discard(name)
            coeffs[name] = coeffs[name] + pa
    width = spec.shape[1] if rows is None else rows.shape[1]
    out = torch.zeros(n, width, dtype=spec.dtype, device=spec.device) + bias
    if rows is not None and isinstance(shared_bias, Tensor):
        out = out + shared_bias.expand(n, -1).gather(1, rows)
    for name, a in coeffs.items():  # the input, or values upstream of a cut that nothing else reads
        bound = _concretize(a, boxes[name])
        out = out + (bound.gather(1, rows) if name in shared else bound)
    return out


# ----------------------------------------------------------------------------------------------------------------
# CROWN with CROWN or IBP intermediate bounds
# ----------------------------------------------------------------------------------------------------------------

def _ibp_exact(graph: GraphModule) -> set[str]:
    """Values on which IBP is already exact: reached from the input through diagonal affine ops and at most one
    general affine op (a single linear map of a box is bounded exactly by centre/radius)."""
    general = {graph.input_name: False}
    for node in graph.nodes:
        if len(node.inputs) != 1 or node.inputs[0] not in general:
            continue
        g, op = general[node.inputs[0]], _kind(node)
        if op in ("BatchNormalization", "Normalize", "ConstBinary", "Flatten", "Reshape", "Transpose"):
            if op != "ConstBinary" or _is_linear(node):
                general[node.output] = g
        elif op in ("Conv", "Gemm", "AveragePool", "GlobalAveragePool", "AdaptiveAvgPool") and not g:
            general[node.output] = True
    return set(general)


def _crown_boxes(graph: GraphModule, x_lo: Tensor, x_hi: Tensor, intermediate: Literal["ibp", "crown"],
                 max_elements: int) -> dict[str, Box]:
    """IBP boxes, with the inputs of relaxed nodes (ReLU, QuantizeLinear) tightened by CROWN when asked.

    Each tightened bound is intersected with its IBP bound (both are sound). Only neurons whose relaxation
    depends on their bounds are recomputed, per example: for a ReLU input the unstable neurons (a stable
    neuron's relaxation is exact whatever its bounds), for a QuantizeLinear input those whose box does not
    round to a single level.
    """
    if intermediate == "ibp":
        return _ibp(graph, x_lo, x_hi)
    consumers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.op in _RELAXED_OPS:
            consumers.setdefault(node.inputs[0], []).append(node)
    exact = _ibp_exact(graph)
    boxes: dict[str, Box] = _Boxes({graph.input_name: Box(lo=x_lo, hi=x_hi)})
    for node in graph.nodes:
        box = _ibp_node(node, [boxes[i] for i in node.inputs])
        boxes[node.output] = box
        if node.output in consumers and node.output not in exact:
            chosen = torch.zeros_like(box.lo, dtype=torch.bool)
            for consumer in consumers[node.output]:
                if consumer.op == "Relu":
                    chosen |= (box.lo < 0) & (box.hi > 0)
                else:
                    _, _, q_lo, q_hi = _quant_endpoints(consumer.module, box.lo, box.hi)
                    chosen |= q_lo < q_hi
            boxes[node.output] = _tighten(graph, node.output, box, boxes, chosen, max_elements)
    return boxes


def _tighten(graph: GraphModule, name: str, box: Box, boxes: dict[str, Box], chosen: Tensor,
             max_elements: int) -> Box:
    """Recompute the bounds of value ``name`` by CROWN, one row per (example, neuron) where ``chosen``.

    Rows are chosen per example (an example's unstable neurons), not as the union over the batch: in a trained
    network each example has few unstable neurons but the union covers most of the layer.
    """
    lo, hi = box.lo, box.hi
    n = lo.shape[0]
    flat_lo, flat_hi = lo.reshape(n, -1), hi.reshape(n, -1)
    dim = flat_lo.shape[1]
    chosen = chosen.reshape(n, -1)
    counts = chosen.sum(1)
    k_max = int(counts.max()) if n else 0
    if k_max == 0:
        return box
    # the chosen neurons of each example first (stable sort keeps their order), padded with unused rows
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :k_max]
    valid = torch.arange(k_max, device=lo.device).unsqueeze(0) < counts.unsqueeze(1)
    largest = max(math.prod(b.shape[1:]) for b in boxes.values())
    # rows per chunk so that one coefficient tensor [N, 2 * rows, largest value] stays under max_elements
    chunk = max(1, max_elements // max(1, n * largest * 2))
    position = torch.zeros(dim, dtype=torch.long, device=lo.device)
    new_lo, new_hi = [], []
    for start in range(0, k_max, chunk):
        sel = order[:, start:start + chunk]
        k = sel.shape[1]
        # the union of the chunk's neurons over the batch, pulled back once as +e_i (lower) and -e_i (upper)
        union = torch.unique(sel[valid[:, start:start + chunk]])
        u = union.numel()
        position[union] = torch.arange(u, device=lo.device)
        spec = torch.zeros(1, 2 * u, dim, dtype=lo.dtype, device=lo.device)
        spec[0, torch.arange(u), union] = 1.0
        spec[0, torch.arange(u, 2 * u), union] = -1.0
        pos = torch.where(valid[:, start:start + chunk], position[sel], 0)  # padding rows: any valid row
        res = _backward(graph, name, spec.view(1, 2 * u, *lo.shape[1:]), boxes, rows=torch.cat([pos, pos + u], 1))
        new_lo.append(res[:, :k])
        new_hi.append(-res[:, k:])
    old_lo, old_hi = flat_lo.gather(1, order), flat_hi.gather(1, order)
    cl = torch.where(valid, torch.maximum(old_lo, torch.cat(new_lo, 1)), old_lo)
    ch = torch.where(valid, torch.minimum(old_hi, torch.cat(new_hi, 1)), old_hi)
    out_lo = flat_lo.scatter(1, order, cl)
    out_hi = flat_hi.scatter(1, order, ch)
    return Box(lo=out_lo.view_as(lo), hi=out_hi.view_as(hi))


def _spec_or_identity(C: Tensor | None, n: int, classes: int, like: Tensor) -> Tensor:
    if C is None:
        return torch.eye(classes, dtype=like.dtype, device=like.device).unsqueeze(0)
    if C.dim() != 3 or C.shape[2] != classes or C.shape[0] not in (1, n):
        raise HydraPipeError(f"bounds: C must have shape (N, m, {classes}), got {tuple(C.shape)}")
    return C.to(like.dtype)


def _interval_spec_bounds(graph: GraphModule, spec: Tensor, boxes: dict[str, Box]) -> tuple[Tensor, Tensor]:
    """Interval bounds of ``spec @ logits`` with the spec folded into the trailing affine layers (CROWN-IBP's
    margin bound) on the same boxes. CROWN results are intersected with it: on IBP-trained networks the folded
    interval bound can be the tighter one, and taking the better of two sound bounds is sound."""
    m = spec.shape[1]
    both = _backward(graph, graph.output_name, torch.cat([spec, -spec], 1), boxes, linear_only=True)
    return both[:, :m], -both[:, m:]


DEFAULT_MAX_ELEMENTS = 1 << 25
"""Budget, in tensor elements, for one batch of CROWN coefficients (128 MiB in float32)."""


def crown_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor, C: Tensor | None = None,
                 intermediate: Literal["ibp", "crown"] = "crown",
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[Tensor, Tensor]:
    """CROWN (Zhang et al. 2018): bounds on ``C @ logits`` (``C``: N x m x classes) or on the logits.

    Backward linear relaxation: ReLU upper bound = chord, lower slope 1 if ``u > -l`` else 0 (auto_LiRPA's
    "adaptive"). Intermediate pre-activation bounds from CROWN itself or from IBP (CROWN-IBP). The result is
    intersected with the interval bound of ``C @ logits`` (spec folded into the trailing affine layers), so it is
    never looser than IBP.
    """
    _check_box(x_lo, x_hi)
    graph = as_graph(model)
    boxes = _crown_boxes(graph, x_lo, x_hi, intermediate, max_elements)
    out_box = boxes[graph.output_name]
    n, classes = out_box.shape[0], out_box.shape[1]
    spec = _spec_or_identity(C, n, classes, x_lo)
    m = spec.shape[1]
    lower_upper = _backward(graph, graph.output_name, torch.cat([spec, -spec], 1), boxes)
    lo, hi = lower_upper[:, :m], -lower_upper[:, m:]
    ibp_lo, ibp_hi = _interval_spec_bounds(graph, spec, boxes)
    return torch.maximum(lo, ibp_lo), torch.minimum(hi, ibp_hi)


def alpha_crown_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor, C: Tensor | None = None,
                       iterations: int = 20, lr: float = 0.1, lower_only: bool = False,
                       max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[Tensor, Tensor]:
    """alpha-CROWN (Xu et al. 2021): CROWN whose lower ReLU slopes ``alpha`` in [0, 1] are optimised.

    Intermediate bounds are CROWN's (fixed); one ``alpha`` per (example, output row, neuron) starts at CROWN's
    adaptive slope and follows Adam on the sum of the bounds, projected back to [0, 1]. Any slope in [0, 1] gives
    a sound lower relaxation, so every iterate is a valid bound; the best per row is kept, hence the result is
    never looser than CROWN's. With ``lower_only`` the upper bounds are CROWN's (for margins).
    """
    _check_box(x_lo, x_hi)
    graph = as_graph(model)
    with torch.no_grad():
        boxes = _crown_boxes(graph, x_lo, x_hi, "crown", max_elements)
        boxes = _Boxes({k: Box(lo=b.lo.detach(), hi=b.hi.detach()) for k, b in boxes.items()})
    out_box = boxes[graph.output_name]
    n, classes = out_box.shape[0], out_box.shape[1]
    spec = _spec_or_identity(C, n, classes, x_lo).detach()
    m = spec.shape[1]
    rows = spec if lower_only else torch.cat([spec, -spec], 1)
    relus = [nd for nd in graph.nodes if nd.op == "Relu"]
    alphas: dict[str, Tensor] = {}
    for nd in relus:
        box = boxes[nd.inputs[0]]
        init = _relu_relaxation(box.lo, box.hi)[0]
        alphas[nd.output] = init.unsqueeze(1).expand(n, rows.shape[1], *init.shape[1:]).clone().requires_grad_(True)
    # ``_backward_node`` looks alphas up by the ReLU's output name
    params = list(alphas.values())
    with torch.no_grad():
        best = _backward(graph, graph.output_name, rows, boxes)
    if params:
        # Adam by hand: torch.optim's first use imports the compiler stack, seconds on a small CPU
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        beta1, beta2 = 0.9, 0.999
        for step in range(1, iterations + 1):
            with torch.enable_grad():
                bound = _backward(graph, graph.output_name, rows, boxes, alphas=alphas)
                # a slope can be unused (e.g. a ReLU whose output the backward pass never reaches)
                grads = torch.autograd.grad(-bound.sum(), params, allow_unused=True)
            with torch.no_grad():
                best = torch.maximum(best, bound.detach())
                for p, g, (m1, m2) in zip(params, grads, moments):
                    if g is None:
                        continue
                    m1.mul_(beta1).add_(g, alpha=1 - beta1)
                    m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (m2 / (1 - beta2 ** step)).sqrt_().add_(1e-8)
                    p.addcdiv_(m1, denom, value=-lr / (1 - beta1 ** step)).clamp_(0.0, 1.0)
        with torch.no_grad():
            best = torch.maximum(best, _backward(graph, graph.output_name, rows, boxes, alphas=alphas))
    ibp_lo, ibp_hi = _interval_spec_bounds(graph, spec, boxes)
    lo = torch.maximum(best[:, :m], ibp_lo)
    if lower_only:
        with torch.no_grad():
            hi = -_backward(graph, graph.output_name, -spec, boxes)
    else:
        hi = -best[:, m:]
    return lo, torch.minimum(hi, ibp_hi)


# ----------------------------------------------------------------------------------------------------------------
# Margins and verification
# ----------------------------------------------------------------------------------------------------------------

def margin_spec(y: Tensor, classes: int) -> Tensor:
    """``C`` of shape N x (K-1) x K: row j is ``e_y - e_j`` for each wrong class j in increasing order."""
    n = y.shape[0]
    eye = torch.eye(classes, device=y.device)
    others = torch.arange(classes, device=y.device).expand(n, classes)
    others = others[others != y.unsqueeze(1)].view(n, classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def margin_lower_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor, y: Tensor, method: Method = "ibp",
                        intermediate: Literal["ibp", "crown"] = "crown") -> Tensor:
    """Lower bounds on ``logit[y] - logit[j]`` for every ``j != y``: N x (K-1).

    The specification is folded into the trailing affine layers (CROWN-IBP, Zhang et al. 2020), which is tighter
    than subtracting logit bounds. ``ibp``: IBP boxes up to the last non-affine node; ``crown``: CROWN with
    ``intermediate`` bounds; ``alpha-crown``: optimised slopes.
    """
    _check_box(x_lo, x_hi)
    graph = as_graph(model)
    if method == "ibp":
        boxes = _ibp(graph, x_lo, x_hi)
        out_box = boxes[graph.output_name]
        spec = margin_spec(y, out_box.shape[1]).to(x_lo.dtype)
        folded = _backward(graph, graph.output_name, spec, boxes, linear_only=True)
        return torch.maximum(folded, _concretize(spec, out_box))
    if method == "crown":
        boxes = _crown_boxes(graph, x_lo, x_hi, intermediate, DEFAULT_MAX_ELEMENTS)
        spec = margin_spec(y, boxes[graph.output_name].shape[1]).to(x_lo.dtype)
        lo = _backward(graph, graph.output_name, spec, boxes)
        folded = _backward(graph, graph.output_name, spec, boxes, linear_only=True)
        return torch.maximum(lo, folded)
    if method == "alpha-crown":
        spec = margin_spec(y, _num_classes(graph, x_lo)).to(x_lo.dtype)
        return alpha_crown_bounds(graph, x_lo, x_hi, spec, lower_only=True)[0]
    raise HydraPipeError(f"bounds: unknown method {method!r}; expected ibp, crown or alpha-crown")


def _num_classes(graph: GraphModule, x: Tensor) -> int:
    with torch.no_grad():
        return int(graph(x[:1]).shape[1])


def verified(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: Method = "ibp", lo: float = 0.0,
             hi: float = 1.0, batch_size: int = 256) -> Tensor:
    """Which examples are provably robust: every margin's lower bound > 0 over the L-inf ball of radius ``eps``
    around ``x`` intersected with ``[lo, hi]``. Batched by ``batch_size`` to bound memory. BoolTensor [N]."""
    if eps < 0:
        raise HydraPipeError(f"verified: eps must be >= 0, got {eps}")
    graph = as_graph(model)
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_lo, x_hi = (xb - eps).clamp(lo, hi), (xb + eps).clamp(lo, hi)
            if method == "alpha-crown":
                with torch.enable_grad():
                    m = margin_lower_bounds(graph, x_lo, x_hi, yb, method)
            else:
                m = margin_lower_bounds(graph, x_lo, x_hi, yb, method)
            out.append((m > 0).all(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=x.device)
