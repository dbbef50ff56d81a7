"""ONNX -> the graph form: :func:`load_onnx` turns an ONNX classifier into an :class:`OnnxModule`.

The module computes what onnxruntime computes, so attacks get gradients and the verifier (``pipeline.bounds``)
gets a graph it can propagate bounds through.

Op vocabulary (``SUPPORTED_OPS``): Conv (2-D), Gemm, MatMul (constant right operand), Add, Sub, Mul, Div (two
tensors, or a tensor and a constant), Sum, Relu, LeakyRelu, Clip, Sigmoid, BatchNormalization (inference), MaxPool,
AveragePool, GlobalAveragePool, ReduceMean (constant axes, not the batch's; axes as attribute before opset 18, as
input from 18), LRN, Flatten, Reshape (constant shape), Transpose, GatherND (constant indices, ``batch_dims`` 0),
Pad (constant mode), Concat, Softmax, LogSoftmax, Identity, Dropout (inference), Constant, QuantizeLinear /
DequantizeLinear (uint8 / int8, per-tensor or per-axis). Any node whose inputs are all constants (weights stored as
int8 + DequantizeLinear, int32 biases, shape arithmetic on initializers ...) is folded at load time with ONNX's
reference evaluator, whatever its op type. A model with ops outside the vocabulary is refused with one line naming
every such op and what to try (:func:`refusal_hint`: a fixed input size, the legacy exporter, a rewrite).

Both of torch's exporters are read, opsets 13 to 21. The legacy one (``dynamo=False``) writes global average
pooling as GlobalAveragePool + Flatten; the default (dynamo) one as ReduceMean over axes ``[-1, -2]`` + Reshape
``[-1, C]``, folds BatchNormalization into the convolutions, writes SiLU as Sigmoid + Mul and squeeze-excitation
as a Mul of two computed tensors (EfficientNet), and writes an upsampling ``AdaptiveAvgPool2d`` (torchvision's VGG
at 32 x 32) as Transpose -> GatherND -> Transpose -> ReduceMean; a chain of index-moving ops like that one, which
moves the batch dimension away and back, is fused into one per-example :class:`pipeline.graph.Select`
(:func:`_fuse_batch_moves`) so bounds can cross it. (It also writes opset 18 when 13 or 17 is asked.)

What people export is turned into logits N x classes, the form attacks and bounds need:

- a final Softmax / LogSoftmax over the classes is stripped (``OnnxModule.stripped_output_ops``): it is monotone
  per row, so the argmax and the sign of every margin are unchanged, and onnxruntime's output can still be
  compared by argmax. Bounding the probabilities instead would be wrong for a margin-based verifier (and PGD's
  margin loss saturates on them);
- an N x classes x 1 x 1 output (a classifier ending in a convolution and a global pooling, e.g. SqueezeNet) is
  flattened to N x classes, as :func:`pipeline.onnx_io.ort_logits` flattens onnxruntime's output;
- a QuantizeLinear -> DequantizeLinear pair that requantizes a value already on its grid (onnxruntime's QDQ
  format writes one after Flatten, Reshape, Transpose and MaxPool) is the identity and is dropped
  (:func:`_drop_requantization`), so the bounds do not pay a rounding slack for a rounding that never happens;
- a model exported with a fixed batch (input dim 0 a number, ``torch.onnx.export`` without dynamic axes) gets a
  graph form that runs any batch: a Reshape whose constant target starts with that batch size keeps the input's
  batch dimension instead (:class:`pipeline.graph.Reshape`); ``ort_logits`` runs such models in slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.graph import (LRN, Binary, ChannelAffine, Clip, Concat, Const, ConstBinary, Conv2d, Dequantize,
                            Flatten, GatherND, GraphModule, Node, Pad, Quantize, ReduceMean, Reshape, Select, Softmax,
                            Sum, Transpose)
from pipeline.onnx_io import read_proto


class OnnxModule(GraphModule):
    """An ONNX classifier as a torch module (see :func:`load_onnx`); ``path`` is where it came from,
    ``stripped_output_ops`` the final ops removed from it (Softmax, LogSoftmax), ``fixed_batch`` the batch size
    its input is declared with (None when dynamic)."""

    def __init__(self, nodes: Sequence[Node], input_name: str, output_name: str, path: str,
                 stripped_output_ops: Sequence[str] = (), fixed_batch: int | None = None) -> None:
        super().__init__(nodes, input_name, output_name)
        self.path = path
        self.stripped_output_ops = list(stripped_output_ops)
        self.fixed_batch = fixed_batch


class UnsupportedOpsError(UnsupportedOpError):
    """Every op of a model outside the vocabulary, in one line: each distinct op type with its first node, so a
    user learns at once everything to replace (``op_type`` / ``node_name`` are the first, ``found`` all)."""

    def __init__(self, found: Sequence[tuple[str, str]], path: str) -> None:
        super().__init__(*found[0], path)
        self.found = list(found)
        line = str(self.args[0])
        if len(found) > 1:
            ops = ", ".join(f"{op!r} (node {name!r})" for op, name in found)
            line = f"{path}: {len(found)} unsupported ONNX ops: {ops}"
        self.hint = refusal_hint([op for op, _ in found])
        self.args = (f"{line}; {self.hint}",)


SHAPE_OPS = frozenset({"Shape", "Gather", "Slice", "Expand", "Squeeze", "Unsqueeze", "ConstantOfShape", "Range",
                       "Where", "Equal", "Cast", "Size", "Tile", "ScatterND", "NonZero"})
"""Ops that, on a computed tensor, are mostly shape arithmetic an exporter failed to fold (a dynamic height or
width) or the dynamo exporter's form of an ``AdaptiveAvgPool2d`` whose output size does not divide its input
(Gather + Where; the legacy exporter refuses that pooling)."""
ACTIVATION_OPS = frozenset({"Tanh", "Erf", "Gelu", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Mish",
                            "HardSigmoid", "HardSwish", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Abs", "Neg",
                            "PRelu", "ThresholdedRelu", "Sin", "Cos"})


def refusal_hint(ops: Sequence[str]) -> str:
    """What to try about refused ops, in a few words: a re-export that writes supported ops, or a rewrite."""
    hints = []
    if any(op.split(" ")[0] in SHAPE_OPS for op in ops):
        hints.append("export with a fixed input size (no dynamic height / width) so the exporter folds the shape "
                     "arithmetic, and give every AdaptiveAvgPool2d an output size that divides its input (or use "
                     "AvgPool2d)")
    if any(op.split(" ")[0] in ACTIVATION_OPS for op in ops):
        hints.append("replace the activation by ReLU, LeakyReLU, ReLU6 (Clip), Sigmoid or SiLU (x * sigmoid(x)) "
                     "and retrain")
    if any(op.split(" ")[0] in ("Resize", "Upsample", "ConvTranspose") for op in ops):
        hints.append("feed the model at a size that needs no upsampling, or replace the layer by a convolution")
    hints.append("re-export with torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17) (the legacy "
                 "exporter writes Flatten / GlobalAveragePool), or rewrite the layer with the ops of "
                 "pipeline.onnx_load.SUPPORTED_OPS")
    return "to try: " + "; or ".join(hints)



def buffers_only(module: nn.Module) -> nn.Module:
    """Turn a module's parameters into buffers so attacks compute no parameter gradients."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, p.detach())
    return module



SUPPORTED_OPS = frozenset({
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Sum", "Relu", "LeakyRelu", "Clip", "Sigmoid",
    "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "LRN", "Flatten", "Reshape",
    "Transpose", "GatherND", "Pad", "Concat", "Softmax", "LogSoftmax", "Identity", "Dropout", "Constant",
    "QuantizeLinear", "DequantizeLinear"})
PASS_THROUGH_OPS = frozenset({"Identity", "Dropout"})
"""Ops that become no node of the graph form (an alias of their input)."""
OUTPUT_STRIPPED_OPS = frozenset({"Softmax", "LogSoftmax"})
"""Ops removed when they are the model's last, over the classes (elsewhere they run as they are)."""
GRAPH_OP = {"MatMul": "Gemm"}
"""ONNX ops the graph form holds as another op (MatMul as a Gemm node); every other op keeps its name (a Constant
is folded, then a Constant node where a computed op reads it)."""

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
        self.fixed_batch: int | None = None

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
        batch = _dims(inputs[0])
        self.fixed_batch = batch[0] if batch and batch[0] else None
        self.convert_nodes()
        output_name = self.name_of(self.graph.output[0].name)
        if output_name in self.consts:
            raise HydraPipeError(f"{self.path}: the output does not depend on the input")
        # drop nodes whose results never reach the output (e.g. extra outputs)
        needed, kept = {output_name}, []
        for n in reversed(self.nodes):
            if n.output in needed:
                kept.append(n)
                needed.update(n.inputs)
        nodes = _fuse_batch_moves(kept[::-1], input_name, _dims(inputs[0]))
        nodes, output_name = _drop_requantization(nodes, output_name)
        nodes, output_name, stripped = self.logits_form(nodes, output_name)
        return OnnxModule(nodes, input_name, output_name, self.path, stripped, self.fixed_batch)

    def convert_nodes(self) -> None:
        """Map every node; collect the unsupported ones (op types outside the vocabulary, or forms of an op the
        handler refuses) and raise once, naming each distinct op with its first node."""
        found: dict[str, str] = {}
        skipped: set[str] = set()  # outputs of refused nodes: what reads them cannot be converted either
        for node in self.graph.node:
            standard = node.domain in ("", "ai.onnx")
            op = node.op_type if standard else f"{node.domain}.{node.op_type}"
            ins = [self.name_of(n) for n in node.input if n]
            if any(n in skipped for n in ins):
                # downstream of a refused node only an unknown op type is certain to be unsupported
                if not (standard and node.op_type in SUPPORTED_OPS):
                    found.setdefault(op, node.name)
                skipped.update(node.output)
                continue
            if standard and (node.op_type == "Constant" or (ins and all(n in self.consts for n in ins))):
                self.fold(node)  # whatever its op type: shape arithmetic, int8 weights + DequantizeLinear, ...
                continue
            if not (standard and node.op_type in SUPPORTED_OPS):
                found.setdefault(op, node.name)
                skipped.update(node.output)
                continue
            try:
                getattr(self, f"op_{node.op_type}")(node)
            except UnsupportedOpError as exc:
                found.setdefault(exc.op_type, exc.node_name)
                skipped.update(node.output)
        if found:
            raise UnsupportedOpsError(list(found.items()), self.path)

    def logits_form(self, nodes: list[Node], output: str) -> tuple[list[Node], str, list[str]]:
        """Strip a final Softmax / LogSoftmax over the classes and flatten an N x K x 1 x 1 output (see the
        module's docstring); returns the nodes, the output's name and the stripped op types."""
        dims = _output_dims(self.proto, self.graph.output[0].name)
        stripped: list[str] = []
        while len(nodes) > 1 and nodes[-1].op in OUTPUT_STRIPPED_OPS and _over_classes(nodes[-1].module, dims):
            if any(output in n.inputs for n in nodes[:-1]):  # the probabilities are read elsewhere too
                break
            stripped.append(nodes[-1].op)
            output, nodes = nodes[-1].inputs[0], nodes[:-1]
        if dims is not None and len(dims) > 2 and all(d == 1 for d in dims[2:]):
            rows = f"{output}::rows"
            nodes = [*nodes, Node(rows, "Flatten", Flatten(1), (output,), rows)]
            output = rows
        return nodes, output, stripped

    # ----- op handlers -----
    def op_Identity(self, node) -> None:
        self.alias[node.output[0]] = self.name_of(node.input[0])

    op_Dropout = op_Identity  # inference: identity (its mask output is never consumed by classifiers)

    def op_Sum(self, node) -> None:
        names = [self.name_of(n) for n in node.input if n]
        computed = [n for n in names if n not in self.consts]
        consts = [self.consts[n] for n in names if n in self.consts]
        if len(computed) == 1 and not consts:
            self.alias[node.output[0]] = computed[0]
            return
        # constant operands summed into one ConstBinary Add: bounds need every Sum operand to carry a batch dim
        const = sum(c.astype(np.float32) for c in consts) if consts else None
        if len(computed) == 1:
            self.emit(node, "Add", ConstBinary("Add", _tensor(const)), computed)
            return
        if const is None:
            self.emit(node, "Sum", Sum(), computed)
            return
        partial = f"{node.output[0]}::sum"
        self.nodes.append(Node(partial, "Sum", Sum(), tuple(computed), partial))
        self.produced.add(partial)
        self.emit(node, "Add", ConstBinary("Add", _tensor(const)), [partial])

    def op_LRN(self, node) -> None:
        a = self.attrs(node)
        self.emit(node, "LRN", LRN(a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)),
                  [node.input[0]])

    def op_Softmax(self, node) -> None:
        # before opset 13: axis 1 by default, over the input coerced to 2-D; from 13: axis -1, that axis only
        coerce = self.opset < 13
        axis = self.attrs(node).get("axis", 1 if coerce else -1)
        self.emit(node, node.op_type, Softmax(axis, coerce, log=node.op_type == "LogSoftmax"), [node.input[0]])

    op_LogSoftmax = op_Softmax

    def op_Conv(self, node) -> None:
        a = self.attrs(node)
        w = self.const(node, 1, "weight")
        b = self.opt_const(node, 2)
        if w.ndim != 4:
            raise UnsupportedOpError(f"Conv{w.ndim - 2}d", node.name, self.path)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise UnsupportedOpError("Conv with auto_pad SAME", node.name, self.path)
        pads = list(a.get("pads", [0, 0, 0, 0]))
        conv = Conv2d(w.shape[1] * a.get("group", 1), w.shape[0], tuple(w.shape[2:]),
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

    def op_ReduceMean(self, node) -> None:
        a = self.attrs(node)
        if self.opset < 18:
            axes = a.get("axes")
        else:  # an input from opset 18 on
            c = self.opt_const(node, 1)
            axes = None if c is None or c.size == 0 else c.reshape(-1).tolist()
        if axes is None and a.get("noop_with_empty_axes", 0):
            self.alias[node.output[0]] = self.name_of(node.input[0])
            return
        if axes is None or 0 in axes:  # all axes, or the batch's: a mean across examples
            raise UnsupportedOpError("ReduceMean over the batch axis", node.name, self.path)
        self.emit(node, "ReduceMean", ReduceMean(axes, bool(a.get("keepdims", 1))), [node.input[0]])

    def op_Sigmoid(self, node) -> None:
        self.emit(node, "Sigmoid", nn.Sigmoid(), [node.input[0]])

    def op_GatherND(self, node) -> None:
        if self.attrs(node).get("batch_dims", 0):
            raise UnsupportedOpError("GatherND with batch_dims", node.name, self.path)
        self.emit(node, "GatherND", GatherND(torch.from_numpy(self.const(node, 1, "indices").astype(np.int64))),
                  [node.input[0]])

    def op_Flatten(self, node) -> None:
        self.emit(node, "Flatten", Flatten(self.attrs(node).get("axis", 1)), [node.input[0]])

    def op_Reshape(self, node) -> None:
        a = self.attrs(node)
        shape = list(a["shape"]) if self.opset < 5 and "shape" in a else self.const(node, 1, "shape").tolist()
        # a fixed-batch export writes its batch size as the target's first dim: keep the input's batch instead
        keep_batch = self.fixed_batch is not None and len(shape) > 0 and shape[0] == self.fixed_batch
        self.emit(node, "Reshape", Reshape(shape, bool(a.get("allowzero", 0)), keep_batch), [node.input[0]])

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
        if self.opset < 11:  # attributes; opset 1 calls them paddings
            pads, value = list(a.get("pads", a.get("paddings", []))), float(a.get("value", 0.0))
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
        self.emit(node, "Concat", Concat(self.attrs(node).get("axis", 1)), list(node.input))  # axis 1 before opset 4

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


INDEX_OPS = frozenset({"Transpose", "GatherND", "Reshape", "Flatten", "Select"})
"""Single-input ops that only move or select elements: a chain of them is one constant :class:`Select`."""


def _moves_batch(node: Node) -> bool:
    return (node.op == "Transpose" and node.module.perm[0] != 0) or node.op == "GatherND"


def _fuse_batch_moves(nodes: list[Node], input_name: str, input_dims: list[int | None] | None) -> list[Node]:
    """Replace each chain of index-moving ops (:data:`INDEX_OPS`) that moves the batch dimension away from dim 0
    and back by one :class:`pipeline.graph.Select`: bounds keep one row per example and refuse the parts of such a
    chain, though the whole is a selection within each example. The dynamo exporter writes one for an
    ``AdaptiveAvgPool2d`` that upsamples (VGG at 32 x 32: Transpose [2, 3, 0, 1] -> GatherND -> Transpose
    [4, 5, 0, 1, 2, 3]).

    The selection is found by running the chain on probe inputs whose entries are their own positions, batches of
    2 and 3: it is fused only when every output row reads its own example's entries, the same positions in both.
    Needs the input's per-example shape (declared, static); otherwise the chain is left as it is."""
    if not any(_moves_batch(n) for n in nodes) or input_dims is None or len(input_dims) < 2 \
            or not all(input_dims[1:]):
        return nodes
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            readers[i] = readers.get(i, 0) + 1
    shapes = _value_shapes(nodes, input_name, tuple(input_dims[1:]))  # type: ignore[arg-type]
    by_input: dict[str, list[Node]] = {}
    for n in nodes:
        if n.inputs:
            by_input.setdefault(n.inputs[0], []).append(n)
    replaced: dict[str, Node] = {}  # the chain's last node's output -> the Select
    removed: set[str] = set()
    for start in nodes:
        if not _moves_batch(start) or start.output in removed or start.inputs[0] not in shapes:
            continue
        chain, walk = [start], start
        while True:
            index = _probe_selection(chain, shapes[start.inputs[0]])
            if index is not None:
                break
            nxt = by_input.get(walk.output, [])
            if readers.get(walk.output) != 1 or len(nxt) != 1 or nxt[0].op not in INDEX_OPS:
                break
            walk = nxt[0]
            chain.append(walk)
        if index is None:
            continue
        last = chain[-1]
        replaced[last.output] = Node(last.name, "Select", Select(index), (start.inputs[0],), last.output)
        removed.update(n.output for n in chain[:-1])
    if not replaced:
        return nodes
    return [replaced.get(n.output, n) for n in nodes if n.output not in removed]


def _value_shapes(nodes: list[Node], input_name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Every value's shape (batch dim included) on a zero input of batch 1; empty where the graph cannot run."""
    env = {input_name: torch.zeros(1, *shape)}
    try:
        with torch.no_grad():
            for n in nodes:
                env[n.output] = n.module(*[env[i] for i in n.inputs])
    except Exception:  # shapes are a nicety here: without them nothing is fused
        return {}
    return {k: tuple(v.shape) for k, v in env.items()}


def _probe_selection(chain: list[Node], shape: tuple[int, ...]) -> torch.Tensor | None:
    """The constant per-example selection ``chain`` computes (flat positions, the output's per-example shape),
    or None when it is not one (mixes examples, drops the batch dimension, depends on the batch size)."""
    per = int(np.prod(shape[1:]))
    found = None
    for batch in (2, 3):
        v = torch.arange(batch * per, dtype=torch.float64).view(batch, *shape[1:])
        try:
            with torch.no_grad():
                for n in chain:
                    v = n.module(v)
        except Exception:
            return None
        if v.dim() < 1 or v.shape[0] != batch:
            return None
        rows = v - per * torch.arange(batch, dtype=torch.float64).view(-1, *([1] * (v.dim() - 1)))
        if bool((rows != rows[:1]).any()) or bool((rows < 0).any()) or bool((rows >= per).any()):
            return None
        if found is not None and (found.shape != rows[0].shape or bool((found != rows[0]).any())):
            return None
        found = rows[0]
    return None if found is None else found.long()


GRID_PRESERVING_OPS = frozenset({"Flatten", "Reshape", "Transpose", "MaxPool"})
"""Ops that map a tensor of values on a quantization grid ``(q - z) * s`` onto values of the same grid (they move
or select elements), so a QuantizeLinear with the grid's parameters after them is exact."""


def _drop_requantization(nodes: list[Node], output: str) -> tuple[list[Node], str]:
    """Remove the QuantizeLinear -> DequantizeLinear pairs that requantize a value already on their grid.

    onnxruntime's QDQ format writes ``Q -> DQ -> Flatten -> Q -> DQ`` (and the same around Reshape, Transpose,
    MaxPool) with the second pair's parameters equal to the first's. The first DequantizeLinear's output is
    ``(q - z) * s`` with ``q`` an integer in ``[qmin, qmax]``; the ops between only move or select its elements;
    the second QuantizeLinear computes ``round(((q - z) * s) / s) + z = q`` (the float quotient is within an ulp
    of the integer ``q - z``, far from a rounding tie) and the second DequantizeLinear gives back ``(q - z) * s``,
    the same float. So the pair is the identity, bit for bit, as onnxruntime computes it too; dropping it changes
    no output, and the bounds no longer pay a second rounding slack for a rounding that never happens. Only
    per-tensor parameters (positive scale) are matched, as onnxruntime's activations have.
    """
    by_output = {n.output: n for n in nodes}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            readers[i] = readers.get(i, 0) + 1
    alias: dict[str, str] = {}
    dropped: set[str] = set()

    def same_grid(q: Quantize, dq: Dequantize) -> bool:
        return (q.axis is None and dq.axis is None and q.scale.numel() == 1 and dq.scale.numel() == 1
                and float(q.scale) > 0 and float(q.scale) == float(dq.scale)
                and float(q.zero_point) == float(dq.zero_point))

    for n in nodes:
        if n.op != "DequantizeLinear" or readers.get(n.inputs[0]) != 1:
            continue
        q2 = by_output.get(n.inputs[0])
        if q2 is None or q2.op != "QuantizeLinear" or not same_grid(q2.module, n.module):
            continue
        walk = by_output.get(q2.inputs[0])
        while walk is not None and walk.op in GRID_PRESERVING_OPS and len(walk.inputs) == 1:
            walk = by_output.get(walk.inputs[0])
        if walk is None or walk.op != "DequantizeLinear" or not same_grid(q2.module, walk.module):
            continue
        q1 = by_output.get(walk.inputs[0])
        if q1 is None or q1.op != "QuantizeLinear" or (q1.module.qmin, q1.module.qmax) != (q2.module.qmin,
                                                                                           q2.module.qmax):
            continue
        alias[n.output] = q2.inputs[0]
        dropped.update((q2.output, n.output))
    if not alias:
        return nodes, output

    def ref(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    kept = [Node(n.name, n.op, n.module, tuple(ref(i) for i in n.inputs), n.output) for n in nodes
            if n.output not in dropped]
    return kept, ref(output)


def _dims(value_info) -> list[int | None] | None:
    """A graph value's declared dims (None where symbolic), or None when it declares no shape."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _output_dims(proto, name: str) -> list[int | None] | None:
    """The output's dims as declared, else as ONNX's shape inference finds them, else None."""
    declared = next((_dims(v) for v in proto.graph.output if v.name == name), None)
    if declared is not None:
        return declared
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # inference is a nicety here: without it nothing is stripped or flattened
        return None
    return next((_dims(v) for v in [*inferred.output, *inferred.value_info] if v.name == name), None)


def _over_classes(softmax: Softmax, dims: list[int | None] | None) -> bool:
    """Whether a Softmax on the model's output normalises each row over all its classes (axis 1 of N x K, or of
    N x K x 1 x 1, or any rank before opset 13, where the input is coerced to 2-D at the axis). Over any other
    axis it is no monotone map of the logits (over a size-1 axis it is constant 1), so it stays."""
    if dims is not None and len(dims) < 2:
        return False
    axis = softmax.axis % len(dims) if dims is not None else softmax.axis
    if axis != 1:
        return False
    return softmax.coerce or (dims is not None and all(d == 1 for d in dims[2:]))


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    return torch.from_numpy(np.array(a, copy=True))


def load_onnx(path: Path) -> OnnxModule:
    """Load an ONNX classifier (one float input, logits first output) as a torch module.

    Its forward computes what onnxruntime computes (float tolerance; QuantizeLinear rounds half to even, with a
    straight-through gradient), up to the logits form of the module's docstring (a final Softmax stripped, an
    N x K x 1 x 1 output flattened). All constants are buffers. Ops outside ``SUPPORTED_OPS`` raise
    :class:`UnsupportedOpsError` naming every such op and its first node; an unreadable file raises
    :class:`HydraPipeError`.
    """
    return _Loader(read_proto(Path(path)), str(path)).load()
