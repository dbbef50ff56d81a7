"""One rule per op of the graph form: its interval (IBP) rule and its backward (CROWN) rule side by side.

As auto_LiRPA's ``Bound*`` classes (Xu et al., "Automatic Perturbation Analysis for Scalable Certified Robustness
and Beyond", NeurIPS 2020) do, each op kind is one unit, so the engine (:mod:`pipeline.bounds.crown`) holds no
knowledge of any op and adding one (say a MaxPool relaxation) is adding one class here.

A rule's ``backward`` pulls the coefficients ``a`` [Na, M, *output_shape] of the node's output back onto its
inputs and returns ``(input coefficients, bias)``, the bias [N, M] (or 0.0) collecting the constant terms of lower
bounds of ``sum(a * output)``. A rule is *linear* (the pull-back is exact), *relaxed* (a linear relaxation that
depends on the input box: ReLU, QuantizeLinear), or neither: then it has no linear relaxation here and CROWN cuts
the backward pass at the node, bounding its contribution by its interval box.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.bounds.box import Box, as_rows, dot, from_rows, unbroadcast, value_const
from pipeline.bounds.relax import (QUANT_WIDE, maxpool_relaxation, mul_relaxation, quant_endpoints, quant_relaxation,
                                   relu_backward, relu_relaxation, sigmoid_relaxation)
from pipeline.errors import UnsupportedOpError
from pipeline.graph import Binary, ConstBinary, Node, conv_input_grad
from pipeline.graph import affine_weight as effective_weight

Pulled = tuple[list[Tensor | None], Tensor | float]
"""What a backward rule returns: coefficients per input of the node, and the bias [N, M] (or 0.0)."""

Exactness = Literal["diagonal", "general"] | None

Window = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""Where a row's coefficients on a [C, H, W] value live when they are local to one output position ``(i, j)`` of a
chain of convolutions: the window ``(kh, kw)`` starting at ``(i * sh - ph, j * sw - pw)``, given as
``((kh, kw), (sh, sw), (ph, pw))``: the geometry of ``F.unfold`` (kernel, stride, padding) over the value."""


class OpRule:
    """The bounds of one op kind. Stateless: one instance serves every node of that kind."""

    linear: ClassVar[bool] = False
    """The backward rule is exact (an affine op)."""
    relaxed: ClassVar[bool] = False
    """The backward rule is a linear relaxation that depends on the input box (tightened by CROWN first)."""
    exactness: ClassVar[Exactness] = None
    """For a single-input op: ``"diagonal"`` (elementwise affine or a reshape: IBP through it stays exact) or
    ``"general"`` (an affine map: IBP is exact through one such map of a box, not two)."""

    def is_linear(self, node: Node) -> bool:
        return self.linear

    def has_ibp(self, node: Node) -> bool:
        """Whether :meth:`ibp` bounds this node (a rule may cover some forms of its op only, e.g. ``x / c``)."""
        return True

    def ibp_exactness(self, node: Node) -> Exactness:
        return self.exactness

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        raise NotImplementedError

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        raise AssertionError(f"{node.op} has no linear relaxation: the backward pass cuts at {node.name!r}")

    def unstable(self, node: Node, box: Box) -> Tensor:
        """For a relaxed op: the input neurons (bool, like ``box.lo``) whose relaxation depends on their bounds,
        the only ones worth tightening."""
        raise NotImplementedError

    def elementwise(self, node: Node) -> bool:
        """Whether :meth:`backward` acts entry by entry, with at most per-channel constants: then it gives the same
        coefficients on a window of the value (``a`` [B, 1, C, kh, kw] with the box of that window, [B, C, kh, kw])
        as on the whole value, which CROWN's intermediate bounds use (:func:`pipeline.bounds.crown.window_chain`)."""
        return False

    def input_window(self, node: Node, window: Window) -> Window | None:
        """For an op whose output entries read local windows of its input (a convolution): the input's window
        that a ``window`` of its output reads; None for any other op."""
        return None

    def window_backward(self, node: Node, a: Tensor, window: Window) -> tuple[Tensor, Tensor | float]:
        """For an op with an :meth:`input_window`: ``a`` [B, C_out, kh, kw] on the output's ``window``, pulled back
        onto the input's window, and the bias [B]. Coefficients on entries of the input's window that lie outside
        the input (its padding) are the caller's to drop."""
        raise NotImplementedError


_RULES: dict[str, OpRule] = {}


def _rule(*kinds: str):
    """Class decorator: one instance of the rule serves the op kinds ``kinds``."""

    def deco(cls: type[OpRule]) -> type[OpRule]:
        for kind in kinds:
            _RULES[kind] = cls()
        return cls

    return deco


def _kind(node: Node) -> str:
    """The op as bounds see it: ONNX's Add / Sub / Mul / Div become ConstBinary or Binary by their operands."""
    if isinstance(node.module, ConstBinary):
        return "ConstBinary"
    if isinstance(node.module, Binary):
        return "BinaryMul" if node.module.op == "Mul" else "Binary"
    return node.op


def rule_for(node: Node) -> OpRule:
    """The rule of ``node``'s op; :class:`UnsupportedOpError` naming the op and the node when there is none."""
    kind = _kind(node)
    rule = _RULES.get(kind)
    if rule is None:
        raise UnsupportedOpError(kind, node.name)
    return rule


def bound_support(node: Node) -> tuple[bool, Literal["linear", "relaxed", "cut"] | None]:
    """What the bounds can do with ``node``: whether IBP bounds it, and how CROWN's backward pass crosses it
    (``linear``: exactly; ``relaxed``: a linear relaxation; ``cut``: bounded by its interval box; None: not at
    all). The README's table of supported ops and :func:`verification_blockers` read it."""
    rule = _RULES.get(_kind(node))
    if rule is None or not rule.has_ibp(node):
        return False, None
    if rule.is_linear(node):
        return True, "linear"
    return True, "relaxed" if rule.relaxed else "cut"


def verification_blockers(nodes: list[Node]) -> list[str]:
    """The distinct op types among ``nodes`` that no bound rule covers (IBP needs every node, so one of them
    blocks all verification), in graph order; empty when the graph can be verified."""
    return list(dict.fromkeys(n.op for n in nodes if not bound_support(n)[0]))


def _in_shape(node: Node, boxes: dict[str, Box]) -> torch.Size:
    return boxes[node.inputs[0]].shape


def _per_channel(t: Tensor, ndim: int, lead: int = 0) -> Tensor:
    """View a per-channel vector to broadcast against a tensor of ``ndim`` dims whose channel dim is ``1 + lead``."""
    return t.view((1,) * (1 + lead) + (-1,) + (1,) * (ndim - 2 - lead))


# ----------------------------------------------------------------------------------------------------------------
# Affine ops, read from the live modules (so gradients reach weights and, through ``effective_weight``, scores)
# ----------------------------------------------------------------------------------------------------------------

WINDOW_DENSE = 1 << 18
"""Entries (input window x output window) up to which :meth:`ConvRule.window_backward` multiplies by the window's
transposed convolution as a dense matrix."""


@_rule("Conv")
class ConvRule(OpRule):
    linear, exactness = True, "general"

    @staticmethod
    def _check(node: Node) -> nn.Conv2d:
        m = node.module
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise UnsupportedOpError(f"Conv with padding {m.padding!r}/{m.padding_mode}", node.name)
        return m

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        m = self._check(node)
        w = effective_weight(m)
        b = boxes[0]
        args = (m.stride, m.padding, m.dilation, m.groups)
        return Box.cr(F.conv2d(b.c, w, m.bias, *args), F.conv2d(b.r, w.abs(), None, *args))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        m = node.module
        in_shape = _in_shape(node, boxes)
        w = effective_weight(m)
        rows, na, mm = as_rows(a)
        out_hw = rows.shape[-2:]
        opad = [in_shape[2 + i] - ((out_hw[i] - 1) * m.stride[i] - 2 * m.padding[i]
                                   + m.dilation[i] * (w.shape[2 + i] - 1) + 1) for i in range(2)]
        bias = (a.sum((3, 4)) * m.bias).sum(2) if m.bias is not None else 0.0
        dense = self._dense(node, w, in_shape, boxes)
        if dense is not None:
            return [(a.flatten(2) @ dense).view(*a.shape[:2], *in_shape[1:])], bias
        if m.groups == 1 and w.shape[1] == 1:
            # back onto one input channel (a grey image): the kernel's transpose as one matmul, then col2im (fold),
            # about twice as fast as a transposed conv on CPU (28 x 28 Fashion-MNIST's first layer: 15 vs 28 us
            # per row)
            back = conv_input_grad(rows, w, in_shape[2:], m.stride, m.padding, m.dilation)
            return [from_rows(back, na, mm)], bias
        # transposed convolution; channels-last runs it about 1.5-2x faster on CPU for these shapes
        rows = rows.contiguous(memory_format=torch.channels_last)
        back = F.conv_transpose2d(rows, w, None, m.stride, m.padding, opad, m.groups, m.dilation)
        return [from_rows(back.contiguous(), na, mm)], bias

    def input_window(self, node: Node, window: Window) -> Window:
        """A window [kh, kw] of the output, stride s, padding p, reads a window [(kh - 1) s_c + d (k - 1) + 1, ...]
        of the input (the conv's stride s_c, dilation d, kernel k, padding p_c), stride s s_c, padding p s_c + p_c."""
        m = node.module
        k = m.weight.shape[2:]
        (kh, kw), (sh, sw), (ph, pw) = window
        size = ((kh - 1) * m.stride[0] + m.dilation[0] * (k[0] - 1) + 1,
                (kw - 1) * m.stride[1] + m.dilation[1] * (k[1] - 1) + 1)
        pad = (ph * m.stride[0] + m.padding[0], pw * m.stride[1] + m.padding[1])
        return size, (sh * m.stride[0], sw * m.stride[1]), pad

    def window_backward(self, node: Node, a: Tensor, window: Window) -> tuple[Tensor, Tensor | float]:
        """The transposed convolution without padding, onto :meth:`input_window`. Much cheaper than on the whole
        value for the one-hot rows of intermediate bounds (CNN-small's second conv: a [16, 4, 4] window of its
        16 x 14 x 14 input)."""
        m = self._check(node)
        w = effective_weight(m)
        size = self.input_window(node, window)[0]
        c_in = w.shape[1] * m.groups
        if m.groups == 1 and window[0] == (1, 1) and tuple(m.dilation) == (1, 1):  # one position: the kernels
            back = (a.flatten(1) @ w.flatten(1)).view(a.shape[0], *w.shape[1:])
        elif a[0].numel() * c_in * size[0] * size[1] <= WINDOW_DENSE:
            # the window's transposed conv as one small matrix (its response to each unit coefficient): a GEMM at
            # near peak speed, where col2im pays per row (CNN-small's first conv: [256, 100], about 2x faster)
            eye = torch.eye(a[0].numel(), dtype=a.dtype, device=a.device).view(-1, *a.shape[1:])
            dense = F.conv_transpose2d(eye, w, None, m.stride, 0, 0, m.groups, m.dilation).flatten(1)
            back = (a.flatten(1) @ dense).view(a.shape[0], c_in, *size)
        elif m.groups == 1:  # larger windows: one matmul and a col2im, several times faster than a transposed conv
            back = conv_input_grad(a, w, size, m.stride, (0, 0), m.dilation)
        else:
            back = F.conv_transpose2d(a, w, None, m.stride, 0, 0, m.groups, m.dilation)
        bias = (a.sum((2, 3)) * m.bias).sum(1) if m.bias is not None else 0.0
        return back, bias

    @staticmethod
    def _dense(node: Node, w: Tensor, in_shape: torch.Size, boxes: dict[str, Box]) -> Tensor | None:
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
        # a transposed conv back onto 1-3 channels (the input layer) is far from peak speed; so is any tiny one,
        # but the dense matrix grows as in x out: past 2^18 entries the fold (one channel) or the transposed conv
        # (2-3) win
        if (in_dim <= 4 * fan_in and in_dim * out_dim <= 1 << 22) or \
                (w.shape[1] * m.groups <= 3 and in_dim * out_dim <= 1 << 18):
            eye = torch.eye(in_dim, dtype=w.dtype, device=w.device).view(in_dim, *in_shape[1:])
            # row i is the response to e_i: [in_dim, out_dim]; stored transposed for ``coeffs @ dense``
            dense = F.conv2d(eye, w, None, m.stride, m.padding, m.dilation, m.groups).flatten(1).T.contiguous()
        if cache is not None:
            cache[node.output] = dense
        return dense


@_rule("Gemm")
class GemmRule(OpRule):
    linear, exactness = True, "general"

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        m = node.module
        w = effective_weight(m)
        b = boxes[0]
        return Box.cr(F.linear(b.c, w, m.bias), F.linear(b.r, w.abs()))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        m = node.module
        w = effective_weight(m)
        bias = dot(a, m.bias.expand(a.shape[2:]).unsqueeze(0)) if m.bias is not None else 0.0
        return [a @ w], bias


@_rule("BatchNormalization", "Normalize")
class ChannelAffineRule(OpRule):
    """``x * scale[c] + shift[c]``: BatchNorm at inference (running statistics), Normalize, folded BN."""

    linear, exactness = True, "diagonal"

    def elementwise(self, node: Node) -> bool:
        return True

    @staticmethod
    def scale_shift(node: Node) -> tuple[Tensor, Tensor]:
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

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        scale, shift = self.scale_shift(node)
        b = boxes[0]
        nd = len(b.shape)
        return Box.cr(b.c * _per_channel(scale, nd) + _per_channel(shift, nd), b.r * _per_channel(scale.abs(), nd))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        scale, shift = self.scale_shift(node)
        nd = a.dim()
        bias = (a.flatten(3).sum(3) * shift).sum(2) if nd > 3 else (a * shift).sum(2)
        return [a * _per_channel(scale, nd, lead=1)], bias


@_rule("ConstBinary")
class ConstBinaryRule(OpRule):
    """``x op c`` or ``c op x`` with a constant ``c``: affine except ``c / x`` (unsupported)."""

    def is_linear(self, node: Node) -> bool:
        return not (node.module.op == "Div" and node.module.const_first)

    has_ibp = is_linear  # ``c / x`` has neither rule

    def elementwise(self, node: Node) -> bool:
        """A scalar or per-channel constant (``[C, 1, 1]``, ``[1, C, 1, 1]``) of a linear form."""
        const = node.module.const
        return self.is_linear(node) and const.dim() <= 4 and all(
            n == 1 for i, n in enumerate(const.shape) if i != const.dim() - 3)

    def ibp_exactness(self, node: Node) -> Exactness:
        return "diagonal" if self.is_linear(node) else None

    @staticmethod
    def _scale(node: Node) -> Tensor | None:
        """For Mul / Div(x / c): the constant factor; None for Add / Sub."""
        m: ConstBinary = node.module  # type: ignore[assignment]
        if m.op == "Mul":
            return m.const
        if m.op == "Div":
            if m.const_first:
                raise UnsupportedOpError("Div (constant / tensor)", node.name)
            return 1.0 / m.const
        return None

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        m = node.module
        b = boxes[0]
        k = self._scale(node)
        if k is not None:
            return Box.cr(b.c * k, b.r * k.abs())
        if m.const_first and m.op == "Sub":  # const - x
            return Box(lo=m.const - b.hi, hi=m.const - b.lo)
        c = b.c + m.const if m.op == "Add" else b.c - m.const
        return Box.cr(c, b.r if b.r.shape == c.shape else b.r.expand_as(c))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        m = node.module
        in_shape = _in_shape(node, boxes)
        k = self._scale(node)
        if k is not None:
            return [unbroadcast(a * k, in_shape)], 0.0
        const = value_const(m.const, a)
        if m.op == "Add":
            return [unbroadcast(a, in_shape)], dot(a, const)
        if m.const_first:  # c - x
            return [unbroadcast(-a, in_shape)], dot(a, const)
        return [unbroadcast(a, in_shape)], -dot(a, const)


@_rule("Binary")
class BinaryRule(OpRule):
    """``a op b`` of two computed tensors: Add / Sub are linear; Div has no rule; Mul is :class:`BinaryMulRule`."""

    def is_linear(self, node: Node) -> bool:
        return node.module.op in ("Add", "Sub")

    def has_ibp(self, node: Node) -> bool:
        return node.module.op in ("Add", "Sub", "Mul")

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        m = node.module
        a, b = boxes
        if m.op == "Add":
            return Box.cr(a.c + b.c, a.r + b.r)
        if m.op == "Sub":
            return Box.cr(a.c - b.c, a.r + b.r)
        if m.op == "Mul":
            p = torch.stack([a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi])
            return Box(lo=p.amin(0), hi=p.amax(0))
        raise UnsupportedOpError(f"{m.op} of two tensors", node.name)

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        sa, sb = boxes[node.inputs[0]].shape, boxes[node.inputs[1]].shape
        return [unbroadcast(a, sa), unbroadcast(-a if node.module.op == "Sub" else a, sb)], 0.0


@_rule("BinaryMul")
class BinaryMulRule(OpRule):
    """``x * y`` of two computed tensors (SiLU's ``x * sigmoid(x)``, squeeze-excitation's channel scaling): IBP
    by the four corner products; CROWN by McCormick's planes (:func:`pipeline.bounds.relax.mul_relaxation`), the
    lower plane for positive coefficients, the upper one for negative. The planes treat ``x`` and ``y`` as
    independent, so on ``x * sigmoid(x)`` they are sound but loose."""

    relaxed = True

    def unstable(self, node: Node, box: Box) -> Tensor:
        return torch.zeros_like(box.lo, dtype=torch.bool)  # the operands are tightened for their other readers

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        a, b = boxes
        p = torch.stack(torch.broadcast_tensors(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi))
        return Box(lo=p.amin(0), hi=p.amax(0))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        bx, by = boxes[node.inputs[0]], boxes[node.inputs[1]]
        lx_c, ly_c, l0, ux_c, uy_c, u0 = mul_relaxation(bx, by)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        cx = pos * lx_c.unsqueeze(1) + neg * ux_c.unsqueeze(1)
        cy = pos * ly_c.unsqueeze(1) + neg * uy_c.unsqueeze(1)
        return [unbroadcast(cx, bx.shape), unbroadcast(cy, by.shape)], dot(pos, l0) + dot(neg, u0)


@_rule("Sum")
class SumRule(OpRule):
    """ONNX Sum of computed tensors (the loader folds constant operands into one ConstBinary Add): linear."""

    linear = True

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        c, r = boxes[0].c, boxes[0].r
        for b in boxes[1:]:
            c, r = c + b.c, r + b.r
        return Box.cr(c, r if r.shape == c.shape else r.expand_as(c))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        return [unbroadcast(a, boxes[i].shape) for i in node.inputs], 0.0


# ----------------------------------------------------------------------------------------------------------------
# Pooling and reshapes: bounds keep one row of coefficients per example, so the batch dimension must stay put
# ----------------------------------------------------------------------------------------------------------------

class _BatchKeeping(OpRule):
    linear = True

    def moves_batch(self, node: Node) -> bool:
        return False

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        out = boxes[0].map(node.module)
        if out.shape[0] != boxes[0].shape[0] or self.moves_batch(node):
            raise UnsupportedOpError(f"{node.op} that moves the batch dimension", node.name)
        return out


@_rule("Flatten", "Reshape")
class ReshapeRule(_BatchKeeping):
    exactness = "diagonal"

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        return [a.reshape(*a.shape[:2], *_in_shape(node, boxes)[1:])], 0.0


@_rule("Transpose")
class TransposeRule(_BatchKeeping):
    exactness = "diagonal"

    def moves_batch(self, node: Node) -> bool:
        return node.module.perm[0] != 0

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        perm = node.module.perm
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        return [a.permute([0, 1] + [p + 1 for p in inv[1:]])], 0.0


@_rule("GlobalAveragePool")
class GlobalAveragePoolRule(_BatchKeeping):
    exactness = "general"

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        in_shape = _in_shape(node, boxes)
        hw = in_shape[2] * in_shape[3]
        return [(a / hw).expand(*a.shape[:3], *in_shape[2:])], 0.0


@_rule("AveragePool", "AdaptiveAvgPool")
class AveragePoolRule(GlobalAveragePoolRule):
    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        if node.op == "AdaptiveAvgPool" and tuple(a.shape[-2:]) == (1, 1):
            return super().backward(node, a, boxes, alphas)
        in_shape = _in_shape(node, boxes)
        rows, na, mm = as_rows(a)
        x0 = torch.zeros((rows.shape[0], *in_shape[1:]), dtype=a.dtype, device=a.device)
        _, vjp = torch.func.vjp(node.module, x0)
        return [from_rows(vjp(rows)[0], na, mm)], 0.0


@_rule("ReduceMean")
class ReduceMeanRule(OpRule):
    """The mean over constant non-batch axes (the dynamo exporter's global average pooling): affine, exact."""

    linear, exactness = True, "general"

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        m, b = node.module, boxes[0]
        dims = m.dims(len(b.shape))
        return Box.cr(b.c.mean(dims, keepdim=m.keepdims), b.r.mean(dims, keepdim=m.keepdims))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        m, in_shape = node.module, _in_shape(node, boxes)
        dims = m.dims(len(in_shape))
        if not m.keepdims:
            for d in dims:  # ascending: each unsqueeze puts a reduced dim back where it was
                a = a.unsqueeze(d + 1)
        count = math.prod(in_shape[d] for d in dims)
        return [(a / count).expand(*a.shape[:2], *in_shape[1:])], 0.0


@_rule("Select")
class SelectRule(OpRule):
    """A constant selection within each example (:class:`pipeline.graph.Select`): linear; IBP maps both forms;
    CROWN sums the coefficients of the output entries that read each input entry."""

    linear = True

    def ibp_exactness(self, node: Node) -> Exactness:
        return "diagonal" if node.module.injective else None  # a duplicated entry is no independent coordinate

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        return boxes[0].map(node.module)

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        in_shape = _in_shape(node, boxes)
        flat = a.flatten(2)
        index = node.module.index.flatten().expand_as(flat)
        pulled = torch.zeros(*a.shape[:2], math.prod(in_shape[1:]), dtype=a.dtype, device=a.device)
        return [pulled.scatter_add(2, index, flat).view(*a.shape[:2], *in_shape[1:])], 0.0


@_rule("Pad")
class PadRule(OpRule):
    linear = True

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        b = boxes[0]
        return Box(lo=node.module(b.lo), hi=node.module(b.hi))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        m = node.module
        inner = F.pad(a, [-p for p in m.pads])
        bias = (a.flatten(2).sum(2) - inner.flatten(2).sum(2)) * m.value if m.value else 0.0
        return [inner], bias


@_rule("Concat")
class ConcatRule(OpRule):
    linear = True

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        return Box(lo=node.module(*[b.lo for b in boxes]), hi=node.module(*[b.hi for b in boxes]))

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        m = node.module
        sizes = [boxes[i].shape[m.axis] for i in node.inputs]
        axis = m.axis % len(_in_shape(node, boxes)) + 1
        return list(torch.split(a, sizes, dim=axis)), 0.0


@_rule("Constant")
class ConstantRule(OpRule):
    linear = True

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        v = node.module()
        return Box(lo=v, hi=v)

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        return [], dot(a, value_const(node.module(), a))


# ----------------------------------------------------------------------------------------------------------------
# Nonlinear ops
# ----------------------------------------------------------------------------------------------------------------

@_rule("LeakyRelu", "Clip")
class MonotoneRule(OpRule):
    """Monotone in every input: IBP maps the endpoints. No linear relaxation here: CROWN cuts at the node."""

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        b = boxes[0]
        if getattr(node.module, "inplace", False):
            # ``nn.ReLU(inplace=True)`` (torchvision's models) would overwrite the input's box, which the backward
            # pass reads to relax this very node: a pre-activation box clamped at 0 reads as a stable neuron
            return Box(lo=node.module(b.lo.clone()), hi=node.module(b.hi.clone()))
        return Box(lo=node.module(b.lo), hi=node.module(b.hi))


@_rule("Relu")
class ReluRule(MonotoneRule):
    """CROWN (Zhang et al. 2018) with the adaptive lower slope, or alpha-CROWN's optimised slopes (Xu et al.
    2021) when ``alphas`` holds this node's output."""

    relaxed = True

    def unstable(self, node: Node, box: Box) -> Tensor:
        return (box.lo < 0) & (box.hi > 0)

    def elementwise(self, node: Node) -> bool:
        return True

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        box = boxes[node.inputs[0]]
        lower_slope, upper_slope, upper_bias = relu_relaxation(box.lo, box.hi)
        if alphas is not None and node.output in alphas:
            unstable = ((box.lo < 0) & (box.hi > 0)).unsqueeze(1)
            lower_slope = torch.where(unstable, alphas[node.output], lower_slope.unsqueeze(1))
            neg = a.clamp(max=0)
            pulled = a * torch.where(a > 0, lower_slope, upper_slope.unsqueeze(1))
            return [pulled], dot(neg, upper_bias)
        return relu_backward(a, box, lower_slope, upper_slope, upper_bias)


@_rule("MaxPool")
class MaxPoolRule(MonotoneRule):
    """``y = max`` over each window: IBP maps the endpoints (monotone); CROWN uses auto_LiRPA's ``BoundMaxPool``
    relaxation (Xu et al., NeurIPS 2020; see :func:`pipeline.bounds.relax.maxpool_relaxation`): ``y >= x_i`` for
    the input ``i`` with the largest lower bound, ``y <= x_i`` where that input dominates the window (exact), else
    ``y <=`` the window's largest upper bound. Any kernel, stride (overlapping windows too), padding (``-inf``, as
    MaxPool pads), dilation and ``ceil_mode``."""

    relaxed = True

    @staticmethod
    def _relax(node: Node, box: Box, out_shape: torch.Size):
        return maxpool_relaxation(node.module, box.lo, box.hi, (int(out_shape[-2]), int(out_shape[-1])))

    def unstable(self, node: Node, box: Box) -> Tensor:
        """Inputs of windows whose relaxation is not exact and whose lower bound is negative.

        A nonnegative value is, in the networks we meet, a ReLU's output (or a QuantizeLinear's with the ReLU
        fused into its clip): its box is already the exact image of its own input's CROWN-tightened box, and a
        backward pass from it cannot do better (the ReLU's chord meets its upper bound, its lower line lies below
        ``max(0, lo)``), so only the others are worth a backward pass each."""
        from torch.nn.modules.utils import _pair

        m = node.module
        out_hw = tuple(m(box.lo[:1]).shape[-2:])
        _, exact, _, (hp, wp, pad) = self._relax(node, box, torch.Size(out_hw))
        n, c, h, w = box.shape
        kk = math.prod(_pair(m.kernel_size))
        loose = (~exact).to(box.lo.dtype).reshape(n * c, 1, -1).expand(n * c, kk, exact.shape[-1])
        members = F.fold(loose, (hp, wp), _pair(m.kernel_size), _pair(m.dilation), 0, _pair(m.stride))
        members = members.view(n, c, hp, wp)[..., pad[0]:pad[0] + h, pad[1]:pad[1] + w] > 0
        return members & (box.lo < 0)

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        box = boxes[node.inputs[0]]
        index, exact, upper, (hp, wp, pad) = self._relax(node, box, boxes[node.output].shape)
        n, c, h, w = box.shape
        length = index.shape[-1]
        af = a.flatten(3).expand(n, -1, c, length)  # [N, M, C, L]
        m = af.shape[1]
        # a > 0: the lower line y >= x_i; a < 0: y <= x_i where exact, else the constant upper bound
        coef = torch.where(exact.unsqueeze(1), af, af.clamp(min=0))
        bias = (af.clamp(max=0) * torch.where(exact, 0.0, upper).unsqueeze(1)).sum((2, 3))
        pulled = torch.zeros(n, m, c, hp * wp, dtype=a.dtype, device=a.device)
        pulled = pulled.scatter_add(3, index.unsqueeze(1).expand(n, m, c, length), coef)
        pulled = pulled.view(n, m, c, hp, wp)[..., pad[0]:pad[0] + h, pad[1]:pad[1] + w]
        return [pulled], bias


@_rule("Sigmoid")
class SigmoidRule(MonotoneRule):
    """Monotone for IBP; for CROWN two lines parallel to the chord, each touching the curve over the box
    (:func:`pipeline.bounds.relax.sigmoid_relaxation`). Every neuron with a box of some width is worth
    tightening (the lines depend on both bounds)."""

    relaxed = True

    def unstable(self, node: Node, box: Box) -> Tensor:
        return box.hi > box.lo

    def elementwise(self, node: Node) -> bool:
        return True

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        box = boxes[node.inputs[0]]
        k, lower, upper = sigmoid_relaxation(box.lo, box.hi)
        return [a * k.unsqueeze(1)], dot(a.clamp(min=0), lower) + dot(a.clamp(max=0), upper)


def _per_channel_params(node: Node) -> bool:
    """A QuantizeLinear / DequantizeLinear whose scale and zero point are scalars or per-channel (axis 1)."""
    m = node.module
    return m.axis is None or (m.scale.dim() == 0 and m.zero_point.dim() == 0) or m.axis in (1, -3)


@_rule("QuantizeLinear")
class QuantizeRule(OpRule):
    """``q(v) = clip(round(v), qmin, qmax)``, ``v = x / s + z``: monotone for IBP; for CROWN the chords of the
    clipped lines ``clip(v -/+ (1/2 + QUANT_TOL), q(v_lo), q(v_hi))`` that enclose the staircase, across the clip
    too (see :func:`pipeline.bounds.relax.quant_relaxation`); on the input, its exact box."""

    relaxed = True

    def unstable(self, node: Node, box: Box) -> Tensor:
        """Whose relaxation can depend on their bounds: not a box that rounds to one level (bounded exactly), nor
        one at least :data:`QUANT_WIDE` quanta wide and that far from both clip edges (the lines ``v -/+ h``)."""
        m = node.module
        v_lo, v_hi, q_lo, q_hi = quant_endpoints(m, box.lo, box.hi)
        lines = (v_hi - v_lo >= QUANT_WIDE) & (v_lo >= m.qmin + QUANT_WIDE) & (v_hi <= m.qmax - QUANT_WIDE)
        return (q_lo < q_hi) & ~lines

    def elementwise(self, node: Node) -> bool:
        return _per_channel_params(node)

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        b = boxes[0]
        _, _, q_lo, q_hi = quant_endpoints(node.module, b.lo, b.hi)
        return Box(lo=q_lo, hi=q_hi)

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        box = boxes[node.inputs[0]]
        if node.inputs[0] == getattr(boxes, "input_name", None):
            # QuantizeLinear of the input (the deployed graph's first op): elementwise on a box whose coordinates
            # vary independently, so its own box [q(lo), q(hi)] is the exact range of every sum(a * q): no line
            # (which pays the rounding slack on top) can do better. The box is sound wherever the node is.
            _, _, q_lo, q_hi = quant_endpoints(node.module, box.lo, box.hi)
            return [None], dot(a.clamp(min=0), q_lo) + dot(a.clamp(max=0), q_hi)
        ls, lb, us, ub = quant_relaxation(node.module, box.lo, box.hi)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        return [pos * ls.unsqueeze(1) + neg * us.unsqueeze(1)], dot(pos, lb) + dot(neg, ub)


@_rule("DequantizeLinear")
class DequantizeRule(OpRule):
    """``(q - z) * s``: affine and exact."""

    linear = True

    def elementwise(self, node: Node) -> bool:
        return _per_channel_params(node)

    def ibp(self, node: Node, boxes: list[Box]) -> Box:
        scale, zero = node.module.params(len(boxes[0].shape))
        return Box(lo=(boxes[0].lo - zero) * scale, hi=(boxes[0].hi - zero) * scale)

    def backward(self, node: Node, a: Tensor, boxes: dict[str, Box], alphas: dict[str, Tensor] | None) -> Pulled:
        scale, zero = node.module.params(len(_in_shape(node, boxes)))
        return [a * scale], -dot(a, value_const(zero * scale, a))
