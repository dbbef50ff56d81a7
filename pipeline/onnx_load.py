"""ONNX -> the graph form: :func:`load_onnx` turns an ONNX classifier into an :class:`OnnxModule`.

The module computes what onnxruntime computes, so attacks get gradients and the verifier (``pipeline.bounds``)
gets a graph it can propagate bounds through.

Op vocabulary (``SUPPORTED_OPS``): Conv (2-D), Gemm, MatMul (constant right operand), Add, Sub, Mul, Div (two
tensors, or a tensor and a constant), Relu, LeakyRelu, Clip, BatchNormalization (inference), MaxPool, AveragePool,
GlobalAveragePool, Flatten, Reshape (constant shape), Transpose, Pad (constant mode), Concat, Identity, Dropout
(inference), Constant, QuantizeLinear / DequantizeLinear (uint8 / int8, per-tensor or per-axis). Any node whose
inputs are all constants (weights stored as int8 + DequantizeLinear, int32 biases, shape arithmetic on
initializers ...) is folded at load time with ONNX's reference evaluator, whatever its op type.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.graph import (Binary, ChannelAffine, Clip, Concat, Const, ConstBinary, Dequantize, Flatten, GraphModule,
                            Node, Pad, Quantize, Reshape, Transpose)
from pipeline.onnx_io import read_proto


class OnnxModule(GraphModule):
    """An ONNX classifier as a torch module (see :func:`load_onnx`); ``path`` is where it came from."""

    def __init__(self, nodes: Sequence[Node], input_name: str, output_name: str, path: str) -> None:
        super().__init__(nodes, input_name, output_name)
        self.path = path



def buffers_only(module: nn.Module) -> nn.Module:
    """Turn a module's parameters into buffers so attacks compute no parameter gradients."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, p.detach())
    return module



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
        self.nodes.append(Node(node.name or node.output[0], op, buffers_only(module), tuple(names), node.output[0]))
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
    return _Loader(read_proto(Path(path)), str(path)).load()
