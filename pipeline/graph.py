"""The graph form that attacks and bounds run on: an ordered list of :class:`Node` over named tensors.

Two roads lead here and both end in a :class:`GraphModule`: :func:`as_graph` for torch models (an
``nn.Sequential`` one node per layer; other modules through a ``torch.fx`` trace whose leaves are vocabulary
layers), sharing the model's modules so gradients reach weights and HYDRA's scores; and
:func:`pipeline.onnx_load.load_onnx` for ONNX files. ``pipeline.bounds`` and ``pipeline.attacks`` only ever see
this form, never ONNX or a particular architecture.

The vocabulary: torch's Conv2d, Linear, ReLU, LeakyReLU, Sigmoid, BatchNorm, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d, Flatten, Identity / Dropout (pass-throughs: no node), plus the modules below for ONNX ops without an exact ``nn``
equivalent (constants are buffers) and :class:`Normalize`, the first layer of every model of the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import HydraPipeError, UnsupportedOpError


# ----------------------------------------------------------------------------------------------------------------
# Nodes and graphs
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """One operation: ``outputs[0] = module(*[value of name for name in inputs])``."""

    name: str
    op: str
    module: nn.Module
    inputs: tuple[str, ...]
    output: str


class GraphModule(nn.Module):
    """A single-input, single-output computation graph of :class:`Node` in topological order."""

    def __init__(self, nodes: Sequence[Node], input_name: str, output_name: str) -> None:
        super().__init__()
        self.nodes: list[Node] = list(nodes)
        self.input_name = input_name
        self.output_name = output_name
        self.ops = nn.ModuleList(n.module for n in self.nodes)
        # a value is dropped after its last consumer, so a long graph keeps few activations alive
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for name in n.inputs:
                last[name] = i
        self._free_after = [[k for k in dict.fromkeys(n.inputs) if last[k] == i and k != output_name]
                            for i, n in enumerate(self.nodes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}
        for node, free in zip(self.nodes, self._free_after):
            env[node.output] = node.module(*[env[i] for i in node.inputs])
            for k in free:
                del env[k]
        return env[self.output_name]


# ----------------------------------------------------------------------------------------------------------------
# Convolution with a faster input gradient on image inputs (attacks, on CPU)
# ----------------------------------------------------------------------------------------------------------------
# Up to this many input channels (a grey or RGB image), pulling a gradient back through a convolution is faster as
# one matmul by the kernel's transpose and a col2im (fold) than as torch's transposed convolution on CPU: 1 x 28 x 28
# into 16 channels (4 x 4, stride 2), 2,000 rows, one thread: 9-13 against 26-29 us per row; 3 x 32 x 32 into 64
# (3 x 3): 85 against 280-340. From 4 channels on the transposed convolution wins (4 -> 32: 90 against 120).
FOLD_CHANNELS = 3


def conv_input_grad(g: torch.Tensor, weight: torch.Tensor, in_hw: Sequence[int], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """The transposed convolution of ``g`` ``[N, C_out, H_o, W_o]`` by a ``groups = 1`` convolution's ``weight``,
    back onto its ``[N, C_in, *in_hw]`` input, as ``weight^T @ g`` and a col2im: the input gradient, or a linear
    bound's coefficients pulled back (:mod:`pipeline.bounds.ops`). Fastest for ``C_in <= FOLD_CHANNELS``."""
    cols = torch.matmul(weight.reshape(weight.shape[0], -1).T, g.reshape(g.shape[0], g.shape[1], -1))
    return F.fold(cols, tuple(in_hw), tuple(weight.shape[2:]), tuple(dilation), tuple(padding), tuple(stride))


class _FoldGradConv(torch.autograd.Function):
    """conv2d whose backward gives the input's gradient only (the weights need none), by :func:`conv_input_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape[2:], stride, padding, dilation)
        ctx.dtype = x.dtype
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        # in the weights' precision (an autocast forward hands back a lower-precision g), returned in the input's
        gx = conv_input_grad(g.to(weight.dtype), weight, *ctx.geometry).to(ctx.dtype)
        return gx, None, None, None, None, None


def _own_backward(x: torch.Tensor) -> bool:
    """Whether a module may run its own autograd Function on ``x``: a gradient is wanted and no tracer or ONNX
    exporter is recording the plain ops."""
    return (x.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export())


class Conv2d(nn.Conv2d):
    """The convolution of graphs loaded from ONNX: ``nn.Conv2d``, except that where only its input needs a gradient
    (an attack: the weights are frozen), on CPU, reading at most ``FOLD_CHANNELS`` channels (the input image), the
    backward is :func:`conv_input_grad` instead of torch's transposed convolution: the same sums in another order.
    On a Fashion-MNIST CNN-small (1 -> 16 -> 32 channels) an attack's forward + backward row costs 61 instead of 80
    us on one thread (ResNet-18 at 32 x 32: 2.17 against 2.35 ms). A transposed convolution in channels-last layout
    for the strided layers, 2-3x faster alone, gained nothing in the whole backward of either network: not used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.groups == 1 and self.in_channels <= FOLD_CHANNELS and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple) and x.dim() == 4 and x.device.type == "cpu" and _own_backward(x)
                and not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)):
            return _FoldGradConv.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return super().forward(x)


# ----------------------------------------------------------------------------------------------------------------
# Torch modules for ops without an exact nn equivalent (all constants are buffers)
# ----------------------------------------------------------------------------------------------------------------

class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, inside the model so the deployed graph takes inputs in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def affine_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a Conv / Linear computes with: a masked layer's ``weight * mask`` (``effective_weight``), else
    ``weight``. Read live, so bounds and exports see the current mask and gradients reach HYDRA's scores."""
    effective = getattr(layer, "effective_weight", None)
    return effective() if callable(effective) else layer.weight  # type: ignore[return-value]

class Const(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}


class ConstBinary(nn.Module):
    """``x op const`` (or ``const op x`` when ``const_first``), ``op`` in Add, Sub, Mul, Div."""

    def __init__(self, op: str, const: torch.Tensor, const_first: bool = False) -> None:
        super().__init__()
        self.op, self.const_first = op, const_first
        self.register_buffer("const", const)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = _BINARY[self.op]
        return f(self.const, x) if self.const_first else f(x, self.const)


class Binary(nn.Module):
    """``a op b`` for two computed tensors."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _BINARY[self.op](a, b)


class ChannelAffine(nn.Module):
    """``x * scale[c] + shift[c]`` along dim 1: BatchNormalization at inference, folded."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


class Clip(nn.Module):
    def __init__(self, lo: float | None, hi: float | None) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


class Flatten(nn.Module):
    """ONNX Flatten: 2-D output ``(prod(shape[:axis]), prod(shape[axis:]))``."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim() if self.axis < 0 else self.axis
        return x.reshape(int(np.prod(x.shape[:axis])), -1)


class Reshape(nn.Module):
    """ONNX Reshape with a constant target (``0`` copies the input's dimension unless ``allowzero``).

    ``keep_batch``: the first target dimension is the input's, whatever the constant says. A model exported with
    a fixed batch (``torch.onnx.export`` without dynamic axes) bakes its batch size into the target, e.g.
    ``[1, 9216]``; the graph form must still run a batch of any size (attack rows, bounds)."""

    def __init__(self, shape: Sequence[int], allowzero: bool = False, keep_batch: bool = False) -> None:
        super().__init__()
        self.shape, self.allowzero, self.keep_batch = [int(s) for s in shape], allowzero, keep_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.shape if self.allowzero else [x.shape[i] if s == 0 else s for i, s in enumerate(self.shape)]
        if self.keep_batch:
            shape = [x.shape[0], *shape[1:]]
        return x.reshape(shape)


class Transpose(nn.Module):
    def __init__(self, perm: Sequence[int]) -> None:
        super().__init__()
        self.perm = [int(p) for p in perm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.perm)


class Pad(nn.Module):
    """Constant padding; ``pads`` in torch's order (last dim first)."""

    def __init__(self, pads: Sequence[int], value: float = 0.0) -> None:
        super().__init__()
        self.pads, self.value = [int(p) for p in pads], float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads, value=self.value)


class Concat(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.axis)


class Sum(nn.Module):
    """ONNX Sum: the n-ary, broadcasting ``a + b + ...`` of computed tensors (Caffe2-era residual joins)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class ReduceMean(nn.Module):
    """ONNX ReduceMean over constant ``axes`` (negative ones count from the end; None: all of them), keeping the
    reduced dims as size 1 when ``keepdims``. The dynamo exporter writes torch's global average pooling
    (``AdaptiveAvgPool2d(1)``, ``x.mean((2, 3))``) as ``ReduceMean`` over axes ``[-1, -2]``. Averaging over the
    batch axis would mix examples: refused at run time (the loader refuses it where it can see it)."""

    def __init__(self, axes: Sequence[int] | None, keepdims: bool = True) -> None:
        super().__init__()
        self.axes = None if axes is None else [int(a) for a in axes]
        self.keepdims = bool(keepdims)

    def dims(self, ndim: int) -> list[int]:
        dims = sorted({a % ndim for a in self.axes}) if self.axes is not None else list(range(ndim))
        if 0 in dims:
            raise UnsupportedOpError("ReduceMean over the batch axis", "ReduceMean")
        return dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean(x, dim=self.dims(x.dim()), keepdim=self.keepdims)


class GatherND(nn.Module):
    """ONNX GatherND with constant ``indices`` and ``batch_dims = 0``: ``out[i...] = data[indices[i...]]``, the
    last axis of ``indices`` indexing the first dims of ``data``. The dynamo exporter writes it for an
    ``AdaptiveAvgPool2d`` whose output is larger than its input (a VGG at 32 x 32: 1 x 1 -> 7 x 7), between two
    Transposes that move the spatial dims first and back; the loader fuses that chain into a :class:`Select`."""

    def __init__(self, indices: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("indices", indices.long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.indices.shape[-1]
        return x[tuple(self.indices[..., j] for j in range(k))]


class Select(nn.Module):
    """A constant selection within each example: ``out[n] = x[n].flatten()[index]``, ``index`` a constant tensor
    of flat positions (the output's per-example shape). The loader fuses a chain of index-moving ops that moves
    the batch dimension away and back (Transpose -> GatherND -> Transpose, the dynamo exporter's upsampling
    ``AdaptiveAvgPool2d``) into one, so bounds see an op that keeps the batch dimension. ``injective``: no
    position is read twice."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.long())
        self.injective = int(torch.unique(self.index).numel()) == self.index.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, self.index.flatten()].view(x.shape[0], *self.index.shape)


class LRN(nn.Module):
    """ONNX LRN (AlexNet's local response normalisation) across channels:
    ``y = x / (bias + alpha / size * sum(x[c'] ** 2)) ** beta``, ``c'`` from ``c - floor((size - 1) / 2)`` to
    ``c + ceil((size - 1) / 2)``.

    Not ``nn.LocalResponseNorm``: torch centres an even window the other way (``size // 2`` channels before,
    ``(size - 1) // 2`` after), so for even ``size`` it normalises over other channels than ONNX defines
    (onnxruntime's CPU kernel refuses even sizes; other runtimes follow the definition)."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.bias = int(size), float(alpha), float(beta), float(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = (self.size - 1) // 2, self.size // 2  # floor and ceil of (size - 1) / 2
        sq = F.pad(x * x, [0, 0] * (x.dim() - 2) + [before, after])  # zero channels outside the range
        channels = x.shape[1]
        window = sum(sq[:, i:i + channels] for i in range(self.size))
        return x / (self.bias + (self.alpha / self.size) * window) ** self.beta


class Softmax(nn.Module):
    """ONNX Softmax / LogSoftmax. Before opset 13 (``coerce``) the input is flattened to 2-D at ``axis`` and the
    softmax taken over the whole second dimension; from opset 13 it is taken along ``axis`` alone."""

    def __init__(self, axis: int, coerce: bool, log: bool = False) -> None:
        super().__init__()
        self.axis, self.coerce, self.log = int(axis), bool(coerce), bool(log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.log_softmax if self.log else F.softmax
        if not self.coerce:
            return f(x, dim=self.axis)
        axis = self.axis % x.dim()
        rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return f(rows, dim=1).reshape(x.shape)


class _QuantizeSTE(torch.autograd.Function):
    """QuantizeLinear's ``clip(round(x / scale) + zero_point, qmin, qmax)`` (``rounding``: round half to even,
    ONNX's rule; without it the float twin's ``clip(x / scale + zero_point, ...)``) as one autograd node with the
    straight-through gradient: ``grad / scale`` wherever the clip leaves the value as it is (``qmin <= q <= qmax``,
    the edges included), 0 where it clips.

    The edges matter: a U8 activation after a fused Conv-Relu has ``qmin`` at its zero point, and every value that
    rounds onto it (within half a quantum) sits on the edge. torch's clamp passes no gradient there (its backward
    is 0 at ``x == min``), which blocked the attacks' gradient through every barely active neuron: on the default
    pipeline's int8 graph (435 correctly classified digits, eps 0.1) APGD-CE, APGD-T and PGD 1000 x 10 broke 65
    examples with torch's rule and 75 with this one (no example the other way). One node also saves a bool mask
    instead of the clamp's float input and skips three backward nodes (forward + backward 5-10% faster)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                rounding: bool) -> torch.Tensor:  # type: ignore[override]
        q = x / scale
        if rounding:
            q = torch.round(q)
        q = q + zero
        ctx.save_for_backward((q >= qmin) & (q <= qmax), scale)
        return torch.clamp(q, qmin, qmax)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        inside, scale = ctx.saved_tensors
        return torch.where(inside, grad, 0) / scale, None, None, None, None, None


def _axis_view(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    axis = axis % ndim
    return t.view([-1 if d == axis else 1 for d in range(ndim)])


class Quantize(nn.Module):
    """ONNX QuantizeLinear: ``clip(round(x / scale) + zero_point, qmin, qmax)``, kept as a float tensor.

    ``rounding = False`` makes it the *float twin* of the op, ``clip(x / scale + zero_point, qmin, qmax)``: the
    same graph without rounding (:func:`float_twin`), smooth where the deployed op is a staircase, so an attack's
    gradient there is the true gradient of a nearby function rather than a straight-through guess.
    """

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 axis: int | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.qmin, self.qmax, self.axis = qmin, qmax, axis
        self.rounding = True

    def params(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _axis_view(self.scale, self.axis, ndim), _axis_view(self.zero_point, self.axis, ndim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.params(x.dim())
        if _own_backward(x):
            return _QuantizeSTE.apply(x, scale, zero, self.qmin, self.qmax, self.rounding)
        q = torch.round(x / scale) if self.rounding else x / scale
        return torch.clamp(q + zero, self.qmin, self.qmax)


class Dequantize(nn.Module):
    """ONNX DequantizeLinear: ``(q - zero_point) * scale``."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.axis = axis

    def params(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _axis_view(self.scale, self.axis, ndim), _axis_view(self.zero_point, self.axis, ndim)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        scale, zero = self.params(q.dim())
        return (q - zero) * scale


def float_twin(graph: nn.Module) -> nn.Module | None:
    """A copy of ``graph`` whose QuantizeLinear ops do not round (see :class:`Quantize`), or None when it has none:
    the int8 graph's float twin, which an audit attacks besides the graph itself and confirms on the deployed one."""
    if not any(isinstance(m, Quantize) for m in graph.modules()):
        return None
    import copy

    twin = copy.deepcopy(graph)
    for m in twin.modules():
        if isinstance(m, Quantize):
            m.rounding = False
    return twin


# ----------------------------------------------------------------------------------------------------------------
# Torch models -> GraphModule (sharing their modules, so gradients reach weights and scores)
# ----------------------------------------------------------------------------------------------------------------
def module_op(m: nn.Module) -> str | None:
    """The ONNX op type a vocabulary module stands for, or None when it is outside the vocabulary."""
    if isinstance(m, GraphModule):
        return None
    table: list[tuple[type, str]] = [
        (nn.Conv2d, "Conv"), (nn.Linear, "Gemm"), (nn.ReLU, "Relu"), (nn.LeakyReLU, "LeakyRelu"),
        (nn.BatchNorm2d, "BatchNormalization"), (nn.BatchNorm1d, "BatchNormalization"), (nn.MaxPool2d, "MaxPool"),
        (nn.AvgPool2d, "AveragePool"), (nn.AdaptiveAvgPool2d, "GlobalAveragePool"), (nn.Flatten, "Flatten"),
        (nn.Identity, "Identity"), (nn.Dropout, "Identity"), (Flatten, "Flatten"), (ConstBinary, "ConstBinary"),
        (Binary, "Binary"), (ChannelAffine, "BatchNormalization"), (Clip, "Clip"), (Reshape, "Reshape"),
        (Transpose, "Transpose"), (Pad, "Pad"), (Concat, "Concat"), (Quantize, "QuantizeLinear"),
        (Dequantize, "DequantizeLinear"), (Const, "Constant"), (Normalize, "Normalize"), (Sum, "Sum"), (LRN, "LRN"),
        (Softmax, "Softmax"), (ReduceMean, "ReduceMean"), (nn.Sigmoid, "Sigmoid"), (GatherND, "GatherND"),
        (Select, "Select")]
    for cls, op in table:
        if isinstance(m, cls):
            if op == "GlobalAveragePool" and tuple(np.broadcast_to(m.output_size, 2)) != (1, 1):  # type: ignore[arg-type]
                return "AdaptiveAvgPool"
            if op == "Softmax" and m.log:  # type: ignore[union-attr]
                return "LogSoftmax"
            return op
    return None


def as_graph(model: nn.Module) -> GraphModule:
    """The graph form of ``model``: itself when already a :class:`GraphModule`; for an ``nn.Sequential`` one node
    per layer; for other modules a ``torch.fx`` trace whose leaves are vocabulary layers and whose functions are
    ``+``, ``torch.flatten``, ``relu`` and ``torch.cat``. Nodes share the model's modules (no copy)."""
    if isinstance(model, GraphModule):
        return model
    if isinstance(model, nn.Sequential):
        nodes: list[Node] = []
        prev = "input"
        for name, m in _sequential_leaves(model, ""):
            if isinstance(m, (nn.Identity, nn.Dropout)):
                continue
            op = module_op(m)
            if op is None:
                if not list(m.children()):
                    raise UnsupportedOpError(type(m).__name__, name)
                sub = as_graph(m)  # a residual block inside a Sequential
                mapping = {sub.input_name: prev}
                for n in sub.nodes:
                    out = f"{name}.{n.output}"
                    mapping[n.output] = out
                    nodes.append(Node(f"{name}.{n.name}", n.op, n.module, tuple(mapping[i] for i in n.inputs), out))
                prev = mapping[sub.output_name]
                continue
            nodes.append(Node(name, op, m, (prev,), name))
            prev = name
        if not nodes:
            raise HydraPipeError("as_graph: the model has no layers")
        return GraphModule(nodes, "input", prev)
    return _fx_graph(model)


def _sequential_leaves(seq: nn.Sequential, prefix: str):
    for name, m in seq.named_children():
        full = f"{prefix}{name}"
        if isinstance(m, nn.Sequential):
            yield from _sequential_leaves(m, f"{full}.")
        else:
            yield full, m


def _fx_graph(model: nn.Module) -> GraphModule:
    import operator

    import torch.fx as fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return module_op(m) is not None or super().is_leaf_module(m, qualname)

    try:
        traced = _Tracer().trace(model)
    except Exception as exc:
        raise HydraPipeError(f"as_graph: cannot trace {type(model).__name__} ({type(exc).__name__}: {exc})") from None
    modules = dict(model.named_modules())
    nodes: list[Node] = []
    input_name = output_name = ""
    alias: dict[str, str] = {}  # pass-through modules (nn.Identity shortcuts, Dropout): their input's name

    def ref(a: fx.Node) -> str:
        return alias.get(a.name, a.name)

    for n in traced.nodes:
        args = [ref(a) for a in n.args if isinstance(a, fx.Node)]
        if n.op == "placeholder":
            if input_name:
                raise HydraPipeError(f"as_graph: {type(model).__name__} takes more than one input")
            input_name = n.name
        elif n.op == "output":
            output_name = ref(n.args[0])  # type: ignore[arg-type]
        elif n.op == "call_module":
            m = modules[str(n.target)]
            op = module_op(m)
            if op is None:
                raise UnsupportedOpError(type(m).__name__, str(n.target))
            if op == "Identity":
                alias[n.name] = args[0]
                continue
            nodes.append(Node(str(n.target), op, m, (args[0],), n.name))
        elif n.op in ("call_function", "call_method"):
            t = n.target
            if t in (operator.add, torch.add, "add") and len(args) == 2 and len(n.args) == 2:
                nodes.append(Node(n.name, "Binary", Binary("Add"), tuple(args), n.name))
            elif t in (torch.flatten, "flatten") and tuple(n.args[1:]) in ((1,), ()) and not n.kwargs:
                nodes.append(Node(n.name, "Flatten", Flatten(1), (args[0],), n.name))
            elif t in (F.relu, torch.relu, "relu") and len(args) == 1:
                nodes.append(Node(n.name, "Relu", nn.ReLU(), (args[0],), n.name))
            elif t is torch.cat and isinstance(n.args[0], (list, tuple)):
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                nodes.append(Node(n.name, "Concat", Concat(int(dim)), tuple(ref(a) for a in n.args[0]), n.name))
            else:
                raise UnsupportedOpError(getattr(t, "__name__", str(t)), n.name)
        else:
            raise UnsupportedOpError(n.op, n.name)
    return GraphModule(nodes, input_name, output_name)
