"""ONNX in and out: export, metadata, onnxruntime inference, and the ONNX -> torch converter.

The converter (:func:`load_onnx`) turns any ONNX classifier written in a small, documented op vocabulary into an
:class:`OnnxModule`: a torch module that computes what onnxruntime computes, so attacks get gradients and the
verifier (``pipeline.bounds``) gets a graph it can propagate bounds through. Both the converter and
:func:`as_graph` (for our own ``nn.Sequential`` / residual models) produce the same internal form, a
:class:`GraphModule` whose ``nodes`` are an ordered list of :class:`Node` (op type, torch module, input and output
tensor names); ``pipeline.bounds`` only ever sees that form.

Op vocabulary of :func:`load_onnx` (``SUPPORTED_OPS``): Conv (2-D), Gemm, MatMul (constant right operand), Add, Sub,
Mul, Div (two tensors, or a tensor and a constant), Relu, LeakyRelu, Clip, BatchNormalization (inference),
MaxPool, AveragePool, GlobalAveragePool, Flatten, Reshape (constant shape), Transpose, Pad (constant mode),
Concat, Identity, Dropout (inference), Constant, QuantizeLinear / DequantizeLinear (uint8 / int8, per-tensor or
per-axis). Any node whose inputs are all constants (weights stored as int8 + DequantizeLinear, int32 biases,
shape arithmetic on initializers ...) is folded at load time with ONNX's reference evaluator, whatever its op type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.masking import effective_weight, masked_layers
from pipeline.reporting import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


# ----------------------------------------------------------------------------------------------------------------
# Export, metadata, onnxruntime
# ----------------------------------------------------------------------------------------------------------------

def _folded_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose masked layers are plain Conv2d / Linear holding ``weight * mask``.

    Exporting the masked layers themselves would put a Mul by the mask (or HYDRA's top-k) into the graph; the
    deployed model only needs the folded weight, whose pruned entries are exact zeros.
    """
    import copy

    clone = copy.deepcopy(model)
    for name, layer in masked_layers(clone):
        weight = effective_weight(layer).detach().clone()
        if isinstance(layer, nn.Conv2d):
            plain: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                         layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                         layer.padding_mode)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias.detach())
        plain.to(weight.device)
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, plain)
    return clone


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, int, int],
                metadata: dict[str, str] | None = None, opset: int = 17) -> None:
    """Export ``model`` (inputs in [0, 1], shape ``(C, H, W)``) to ONNX: input ``input``, output ``logits``.

    Eval mode, dynamic batch, TorchScript exporter (``dynamo=False``) at ``opset``; masked layers are exported as
    plain Conv / Gemm with the folded weight. The file passes ``onnx.checker`` and is written atomically.
    """
    import io

    import onnx

    path = Path(path)
    folded = _folded_copy(model).eval()
    device = next((p.device for p in folded.parameters()), torch.device("cpu"))
    dummy = torch.zeros(1, *input_shape, device=device)
    buf = io.BytesIO()
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated but is the one that honours opset 17 (see issue 2)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(folded, (dummy,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    _set_props(proto, metadata or {})
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())


def _set_props(proto, metadata: dict[str, str]) -> None:
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({str(k): str(v) for k, v in metadata.items()})
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _read_proto(path: Path):
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several unrelated types
        raise HydraPipeError(f"{path}: cannot read an ONNX model ({type(exc).__name__}: {exc})") from None
    # protobuf happily parses many non-ONNX byte strings into an empty message
    if not proto.graph.node or not proto.graph.output:
        raise HydraPipeError(f"{path}: not an ONNX model (no graph nodes or outputs)")
    return proto


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add or overwrite ONNX ``metadata_props`` entries of the model at ``path`` (atomic rewrite)."""
    proto = _read_proto(path)
    _set_props(proto, metadata)
    atomic_write_bytes(Path(path), proto.SerializeToString())


def read_metadata(path: Path) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in _read_proto(path).metadata_props}


def ort_session(path: Path, threads: int | None = None):
    """An onnxruntime session on ``path``: CUDA when available, else CPU; ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:
        raise HydraPipeError(f"{path}: onnxruntime cannot load the model ({type(exc).__name__}: {exc})") from None


def ort_logits(session, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Run ``session`` on ``x`` in batches; the first output (the logits) as float32."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        return session.run(None, {name: x})[0].astype(np.float32)
    out = [session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------------------------
# The internal graph form
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


class OnnxModule(GraphModule):
    """An ONNX classifier as a torch module (see :func:`load_onnx`); ``path`` is where it came from."""

    def __init__(self, nodes: Sequence[Node], input_name: str, output_name: str, path: str) -> None:
        super().__init__(nodes, input_name, output_name)
        self.path = path


# ----- torch modules for ONNX ops without an exact nn equivalent (all constants are buffers) -----

def _buffers_only(module: nn.Module) -> nn.Module:
    """Turn a module's parameters into buffers so attacks compute no parameter gradients."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, p.detach())
    return module


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
    """ONNX Reshape with a constant target (``0`` copies the input's dimension unless ``allowzero``)."""

    def __init__(self, shape: Sequence[int], allowzero: bool = False) -> None:
        super().__init__()
        self.shape, self.allowzero = [int(s) for s in shape], allowzero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.shape if self.allowzero else [x.shape[i] if s == 0 else s for i, s in enumerate(self.shape)]
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


class _RoundSTE(torch.autograd.Function):
    """Round half to even (ONNX's rule) with a straight-through gradient, so attacks see through quantization."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def _axis_view(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    axis = axis % ndim
    return t.view([-1 if d == axis else 1 for d in range(ndim)])


class Quantize(nn.Module):
    """ONNX QuantizeLinear: ``clip(round(x / scale) + zero_point, qmin, qmax)``, kept as a float tensor."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 axis: int | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.qmin, self.qmax, self.axis = qmin, qmax, axis

    def params(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _axis_view(self.scale, self.axis, ndim), _axis_view(self.zero_point, self.axis, ndim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.params(x.dim())
        return torch.clamp(_RoundSTE.apply(x / scale) + zero, self.qmin, self.qmax)


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


# ----------------------------------------------------------------------------------------------------------------
# ONNX -> GraphModule
# ----------------------------------------------------------------------------------------------------------------

SUPPORTED_OPS = frozenset({
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Clip", "BatchNormalization",
    "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Pad", "Concat", "Identity",
    "Dropout", "Constant", "QuantizeLinear", "DequantizeLinear"})

_QRANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127), np.dtype(np.uint16): (0, 65535),
           np.dtype(np.int16): (-32768, 32767)}


class _Loader:
    """Walks an ONNX graph once: folds constants, maps every other node to a torch module."""

    def __init__(self, proto, path: str) -> None:
        import onnx.numpy_helper as nph

        self.proto, self.path = proto, path
        self.graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.consts: dict[str, np.ndarray] = {t.name: nph.to_array(t) for t in self.graph.initializer}
        self.alias: dict[str, str] = {}
        self.nodes: list[Node] = []
        self.produced: set[str] = set()

    def name_of(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def attrs(self, node) -> dict:
        import onnx.helper as oh

        return {a.name: oh.get_attribute_value(a) for a in node.attribute}

    def const(self, node, i: int, what: str) -> np.ndarray:
        if i >= len(node.input) or not node.input[i]:
            raise HydraPipeError(f"{self.path}: node {node.name!r} ({node.op_type}) lacks its {what} input")
        name = self.name_of(node.input[i])
        if name not in self.consts:
            raise UnsupportedOpError(f"{node.op_type} with a computed {what}", node.name, self.path)
        return self.consts[name]

    def opt_const(self, node, i: int) -> np.ndarray | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        return self.const(node, i, f"input #{i}")

    def fold(self, node) -> None:
        from onnx.reference import ReferenceEvaluator

        feeds = {n: self.consts[self.name_of(n)] for n in node.input if n}
        try:
            outs = ReferenceEvaluator(node).run(None, feeds)
        except Exception as exc:
            raise HydraPipeError(f"{self.path}: cannot fold constant node {node.name!r} ({node.op_type}): {exc}") from None
        for name, value in zip(node.output, outs):
            self.consts[name] = np.asarray(value)

    def emit(self, node, op: str, module: nn.Module, inputs: Sequence[str]) -> None:
        names = []
        for n in inputs:
            n = self.name_of(n)
            if n in self.consts:  # a constant operand of a computed op (e.g. Concat with a constant)
                const_name = f"{n}::const"
                if const_name not in self.produced:
                    self.nodes.append(Node(const_name, "Constant", Const(_tensor(self.consts[n])), (), const_name))
                    self.produced.add(const_name)
                n = const_name
            names.append(n)
        self.nodes.append(Node(node.name or node.output[0], op, _buffers_only(module), tuple(names), node.output[0]))
        self.produced.add(node.output[0])

    def load(self) -> OnnxModule:
        init = set(self.consts)
        inputs = [i for i in self.graph.input if i.name not in init]
        if len(inputs) != 1:
            raise HydraPipeError(f"{self.path}: expected one input tensor, found {len(inputs)}")
        input_name = inputs[0].name
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedOpError(f"{node.domain}.{node.op_type}", node.name, self.path)
            ins = [self.name_of(n) for n in node.input if n]
            if node.op_type == "Constant" or (ins and all(n in self.consts for n in ins)):
                self.fold(node)
                continue
            if node.op_type not in SUPPORTED_OPS:
                raise UnsupportedOpError(node.op_type, node.name, self.path)
            getattr(self, f"op_{node.op_type}")(node)
        output_name = self.name_of(self.graph.output[0].name)
        if output_name in self.consts:
            raise HydraPipeError(f"{self.path}: the output does not depend on the input")
        # drop nodes whose results never reach the output (e.g. extra outputs)
        needed, kept = {output_name}, []
        for n in reversed(self.nodes):
            if n.output in needed:
                kept.append(n)
                needed.update(n.inputs)
        return OnnxModule(kept[::-1], input_name, output_name, self.path)

    # ----- op handlers -----
    def op_Identity(self, node) -> None:
        self.alias[node.output[0]] = self.name_of(node.input[0])

    op_Dropout = op_Identity  # inference: identity (its mask output is never consumed by classifiers)

    def op_Conv(self, node) -> None:
        a = self.attrs(node)
        w = self.const(node, 1, "weight")
        b = self.opt_const(node, 2)
        if w.ndim != 4:
            raise UnsupportedOpError(f"Conv{w.ndim - 2}d", node.name, self.path)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise UnsupportedOpError("Conv with auto_pad SAME", node.name, self.path)
        pads = list(a.get("pads", [0, 0, 0, 0]))
        conv = nn.Conv2d(w.shape[1] * a.get("group", 1), w.shape[0], tuple(w.shape[2:]),
                         stride=tuple(a.get("strides", [1, 1])), dilation=tuple(a.get("dilations", [1, 1])),
                         groups=a.get("group", 1), bias=b is not None)
        inp = node.input[0]
        if pads[:2] == pads[2:]:
            conv.padding = tuple(pads[:2])
        else:  # asymmetric: pad first, then a valid convolution
            pad_name = f"{node.output[0]}::pad"
            self.nodes.append(Node(pad_name, "Pad", Pad([pads[1], pads[3], pads[0], pads[2]]),
                                   (self.name_of(inp),), pad_name))
            inp = pad_name
        conv.weight.data = _tensor(w)
        if b is not None:
            conv.bias.data = _tensor(b)
        self.emit(node, "Conv", conv, [inp])

    def _linear(self, node, weight: np.ndarray, bias: np.ndarray | None) -> None:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        lin.weight.data = _tensor(np.ascontiguousarray(weight))
        if bias is not None:
            lin.bias.data = _tensor(np.broadcast_to(bias, (weight.shape[0],)).copy())
        self.emit(node, "Gemm", lin, [node.input[0]])

    def op_Gemm(self, node) -> None:
        a = self.attrs(node)
        if a.get("transA", 0):
            raise UnsupportedOpError("Gemm with transA", node.name, self.path)
        w = self.const(node, 1, "weight").astype(np.float32)
        w = w if a.get("transB", 0) else w.T
        c = self.opt_const(node, 2)
        bias = None if c is None else (a.get("beta", 1.0) * c.astype(np.float32)).reshape(-1)
        self._linear(node, a.get("alpha", 1.0) * w, bias)

    def op_MatMul(self, node) -> None:
        name = self.name_of(node.input[0])
        if name in self.consts:
            raise UnsupportedOpError("MatMul with a constant left operand", node.name, self.path)
        w = self.const(node, 1, "weight")
        if w.ndim != 2:
            raise UnsupportedOpError(f"MatMul with a {w.ndim}-D weight", node.name, self.path)
        self._linear(node, w.T.astype(np.float32), None)

    def _binary(self, node) -> None:
        a, b = (self.name_of(n) for n in node.input[:2])
        if b in self.consts:
            self.emit(node, node.op_type, ConstBinary(node.op_type, _tensor(self.consts[b])), [a])
        elif a in self.consts:
            self.emit(node, node.op_type, ConstBinary(node.op_type, _tensor(self.consts[a]), const_first=True), [b])
        else:
            self.emit(node, node.op_type, Binary(node.op_type), [a, b])

    op_Add = op_Sub = op_Mul = op_Div = _binary

    def op_Relu(self, node) -> None:
        self.emit(node, "Relu", nn.ReLU(), [node.input[0]])

    def op_LeakyRelu(self, node) -> None:
        self.emit(node, "LeakyRelu", nn.LeakyReLU(self.attrs(node).get("alpha", 0.01)), [node.input[0]])

    def op_Clip(self, node) -> None:
        a = self.attrs(node)
        if self.opset < 11:
            lo, hi = a.get("min"), a.get("max")
        else:
            lo_c, hi_c = self.opt_const(node, 1), self.opt_const(node, 2)
            lo = None if lo_c is None else float(lo_c)
            hi = None if hi_c is None else float(hi_c)
        self.emit(node, "Clip", Clip(lo, hi), [node.input[0]])

    def op_BatchNormalization(self, node) -> None:
        a = self.attrs(node)
        if a.get("training_mode", 0):
            raise UnsupportedOpError("BatchNormalization in training mode", node.name, self.path)
        gamma, beta, mean, var = (self.const(node, i, w).astype(np.float64)
                                  for i, w in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
        scale = gamma / np.sqrt(var + a.get("epsilon", 1e-5))
        self.emit(node, "BatchNormalization",
                  ChannelAffine(_tensor(scale.astype(np.float32)), _tensor((beta - mean * scale).astype(np.float32))),
                  [node.input[0]])

    def _pool_args(self, node) -> tuple[dict, list[int]]:
        a = self.attrs(node)
        k = list(a["kernel_shape"])
        if len(k) != 2:
            raise UnsupportedOpError(f"{node.op_type} over {len(k)} dims", node.name, self.path)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise UnsupportedOpError(f"{node.op_type} with auto_pad SAME", node.name, self.path)
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:]:
            raise UnsupportedOpError(f"{node.op_type} with asymmetric pads", node.name, self.path)
        return a, k

    def op_MaxPool(self, node) -> None:
        a, k = self._pool_args(node)
        if len(node.output) > 1 and node.output[1]:
            raise UnsupportedOpError("MaxPool with indices", node.name, self.path)
        pool = nn.MaxPool2d(k, stride=list(a.get("strides", [1, 1])), padding=list(a.get("pads", [0, 0, 0, 0]))[:2],
                            dilation=list(a.get("dilations", [1, 1])), ceil_mode=bool(a.get("ceil_mode", 0)))
        self.emit(node, "MaxPool", pool, [node.input[0]])

    def op_AveragePool(self, node) -> None:
        a, k = self._pool_args(node)
        if list(a.get("dilations", [1, 1])) != [1, 1]:
            raise UnsupportedOpError("AveragePool with dilations", node.name, self.path)
        pool = nn.AvgPool2d(k, stride=list(a.get("strides", [1, 1])), padding=list(a.get("pads", [0, 0, 0, 0]))[:2],
                            ceil_mode=bool(a.get("ceil_mode", 0)),
                            count_include_pad=bool(a.get("count_include_pad", 0)))
        self.emit(node, "AveragePool", pool, [node.input[0]])

    def op_GlobalAveragePool(self, node) -> None:
        self.emit(node, "GlobalAveragePool", nn.AdaptiveAvgPool2d(1), [node.input[0]])

    def op_Flatten(self, node) -> None:
        self.emit(node, "Flatten", Flatten(self.attrs(node).get("axis", 1)), [node.input[0]])

    def op_Reshape(self, node) -> None:
        shape = self.const(node, 1, "shape")
        self.emit(node, "Reshape", Reshape(shape.tolist(), bool(self.attrs(node).get("allowzero", 0))),
                  [node.input[0]])

    def op_Transpose(self, node) -> None:
        perm = self.attrs(node).get("perm")
        if perm is None:
            raise UnsupportedOpError("Transpose without perm", node.name, self.path)
        self.emit(node, "Transpose", Transpose(perm), [node.input[0]])

    def op_Pad(self, node) -> None:
        a = self.attrs(node)
        mode = a.get("mode", b"constant")
        if mode not in (b"constant", "constant"):
            raise UnsupportedOpError(f"Pad mode {mode!r}", node.name, self.path)
        if self.opset < 11:
            pads, value = list(a["pads"]), float(a.get("value", 0.0))
        else:
            pads = self.const(node, 1, "pads").tolist()
            v = self.opt_const(node, 2)
            value = 0.0 if v is None else float(v)
            if self.opt_const(node, 3) is not None:
                raise UnsupportedOpError("Pad with axes", node.name, self.path)
        n = len(pads) // 2
        torch_pads: list[int] = []
        for d in reversed(range(n)):  # torch: last dim first, (begin, end) pairs
            torch_pads += [pads[d], pads[d + n]]
        self.emit(node, "Pad", Pad(torch_pads, value), [node.input[0]])

    def op_Concat(self, node) -> None:
        self.emit(node, "Concat", Concat(self.attrs(node)["axis"]), list(node.input))

    def _qparams(self, node) -> tuple[torch.Tensor, np.ndarray, int | None]:
        scale = self.const(node, 1, "scale").astype(np.float32)
        zero = self.opt_const(node, 2)
        if zero is None:
            zero = np.zeros_like(scale, dtype=np.uint8)
        axis = self.attrs(node).get("axis", 1) if scale.ndim > 0 and scale.size > 1 else None
        if self.attrs(node).get("block_size", 0):
            raise UnsupportedOpError(f"blocked {node.op_type}", node.name, self.path)
        return _tensor(scale), zero, axis

    def op_QuantizeLinear(self, node) -> None:
        scale, zero, axis = self._qparams(node)
        if zero.dtype not in _QRANGE:
            raise UnsupportedOpError(f"QuantizeLinear to {zero.dtype}", node.name, self.path)
        qmin, qmax = _QRANGE[zero.dtype]
        self.emit(node, "QuantizeLinear", Quantize(scale, _tensor(zero.astype(np.float32)), qmin, qmax, axis),
                  [node.input[0]])

    def op_DequantizeLinear(self, node) -> None:
        scale, zero, axis = self._qparams(node)
        self.emit(node, "DequantizeLinear", Dequantize(scale, _tensor(zero.astype(np.float32)), axis),
                  [node.input[0]])


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    return torch.from_numpy(np.array(a, copy=True))


def load_onnx(path: Path) -> OnnxModule:
    """Load an ONNX classifier (one float input, logits first output) as a torch module.

    Its forward computes what onnxruntime computes (float tolerance; QuantizeLinear rounds half to even, with a
    straight-through gradient). All constants are buffers. An op outside ``SUPPORTED_OPS`` raises
    :class:`UnsupportedOpError` naming the op and the node; an unreadable file raises :class:`HydraPipeError`.
    """
    return _Loader(_read_proto(Path(path)), str(path)).load()


# ----------------------------------------------------------------------------------------------------------------
# Our own torch models -> GraphModule (sharing their modules, so gradients reach weights and scores)
# ----------------------------------------------------------------------------------------------------------------

def _is_normalize(m: nn.Module) -> bool:
    return type(m).__name__ == "Normalize" and hasattr(m, "mean") and hasattr(m, "std")


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
        (Dequantize, "DequantizeLinear"), (Const, "Constant")]
    for cls, op in table:
        if isinstance(m, cls):
            if op == "GlobalAveragePool" and tuple(np.broadcast_to(m.output_size, 2)) != (1, 1):  # type: ignore[arg-type]
                return "AdaptiveAvgPool"
            return op
    if _is_normalize(m):
        return "Normalize"
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
    for n in traced.nodes:
        args = [a.name for a in n.args if isinstance(a, fx.Node)]
        if n.op == "placeholder":
            if input_name:
                raise HydraPipeError(f"as_graph: {type(model).__name__} takes more than one input")
            input_name = n.name
        elif n.op == "output":
            output_name = n.args[0].name  # type: ignore[union-attr]
        elif n.op == "call_module":
            m = modules[str(n.target)]
            op = module_op(m)
            if op is None:
                raise UnsupportedOpError(type(m).__name__, str(n.target))
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
                nodes.append(Node(n.name, "Concat", Concat(int(dim)), tuple(a.name for a in n.args[0]), n.name))
            else:
                raise UnsupportedOpError(getattr(t, "__name__", str(t)), n.name)
        else:
            raise UnsupportedOpError(n.op, n.name)
    return GraphModule(nodes, input_name, output_name)
