"""Fuzzing ``hydra-pipe audit``: random option values and random small ONNX graphs never let a traceback escape.

Every run ends with exit code 0 (a report), 2 (bad input: one line on stderr, nothing written) or 3 (a
``--fail-under`` gate: the report is written). Derandomized, so CI sees the same examples every run; sized to run
in well under a minute on two cores (the CLI is invoked in-process).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.audit.report import AuditReport
from stages.cli import app

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    # typer.Exit / click's usage errors are SystemExit; anything else is a traceback that escaped
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args, result.exception, result.stderr)
    return result


def _check_outcome(result, out: Path, gated: bool) -> None:
    assert result.exit_code in ((0, 2, 3) if gated else (0, 2)), (result.exit_code, result.stderr)
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if lines and lines[0].startswith("error:"):  # ours: exactly one line (click's usage errors have a box)
            assert len(lines) == 1, result.stderr
        else:
            assert "Usage:" in result.stderr or "Invalid value" in result.stderr, result.stderr
        assert not out.exists()
    else:
        AuditReport.read(out)  # written, and a valid report


# ---------------------------------------------------------------------------------------------------------------
# (a) the CLI's options
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 8 x 8 classifier and .npz files good and bad."""
    import torch

    from pipeline.onnx_io import export_onnx

    d = tmp_path_factory.mktemp("fuzz_cli")
    torch.manual_seed(0)
    export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), d / "m.onnx", (1, 8, 8))
    rng = np.random.default_rng(0)
    x = rng.random((5, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 5)
    np.savez(d / "good.npz", x=x, y=y)
    np.savez(d / "range.npz", x=x * 3, y=y)
    np.savez(d / "nan.npz", x=np.where(x > 0.5, np.nan, x).astype(np.float32), y=y)
    np.savez(d / "labels.npz", x=x, y=y + 10)
    np.savez(d / "negative.npz", x=x, y=-y - 1)
    np.savez(d / "shape.npz", x=rng.random((5, 1, 6, 6), dtype=np.float32), y=y)
    np.savez(d / "rank.npz", x=rng.random((5, 64), dtype=np.float32), y=y)
    np.savez(d / "channels.npz", x=rng.random((5, 3, 8, 8), dtype=np.float32), y=y)
    np.savez(d / "ints.npz", x=(x * 255).astype(np.uint8), y=y)
    np.savez(d / "float_labels.npz", x=x, y=y.astype(np.float32))
    np.savez(d / "count.npz", x=x, y=y[:3])
    np.savez(d / "empty.npz", x=x[:0], y=y[:0])
    np.savez(d / "nolabels.npz", x=x)
    np.savez(d / "scalar.npz", x=np.float32(0.5), y=np.int64(1))
    np.savez(d / "objects.npz", x=np.array([{"a": 1}] * 5, dtype=object), y=y)
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "text.npz").write_text("x,y\n0.5,1\n")
    (d / "folder.npz").mkdir()
    return d


BAD_DATA = ["range.npz", "nan.npz", "labels.npz", "negative.npz", "shape.npz", "rank.npz", "channels.npz", "ints.npz",
            "float_labels.npz", "count.npz", "empty.npz", "nolabels.npz", "scalar.npz", "objects.npz", "garbage.npz",
            "text.npz", "folder.npz", "missing.npz", "/dev/null", ""]
VALID = {
    "--eps": ["0", "0.01", "0.3", "1", "1e-30", "2.5"],
    "--steps": ["0", "1", "3"],
    "--restarts": ["1", "2"],
    "--norm": ["linf", "l2"],
    "--batch-size": ["1", "3", "4096"],
    "--seed": ["0", "7", str(2 ** 64 - 1)],
    "--fail-under": ["robust=0.5", "clean=1", "clean=0,pgd=0", "verified=0.0,alpha_crown=1", "robust=-0"],
    "--sweep-eps": ["0.01,0.05", "0", "0.1,"],
    "--smoothing-sigma": ["0.25"],
}
INVALID = {
    "--eps": ["-0.1", "nan", "inf", "-inf", "abc", ""],
    "--steps": ["-1", "x", "2.5"],
    "--restarts": ["0", "-3", "y"],
    "--norm": ["L3", "", "LINF"],
    "--batch-size": ["0", "-1", "b"],
    "--seed": ["-1", str(2 ** 64), "x", "1.5", ""],
    "--fail-under": ["robust", "speed=0.5", "robust=2", "robust=nan", ",", ""],
    "--sweep-eps": ["a", "-1", "nan", "inf", ",", ""],
    "--smoothing-sigma": ["0", "-1", "nan", "inf"],
}
FLAGS = ["--no-ibp", "--no-crown", "--no-alpha-crown", "--ibp", "--crown"]


@settings(FUZZ, max_examples=150)
@given(data=st.one_of(st.just("good.npz"), st.just("digits"), st.sampled_from(BAD_DATA)),
       options=st.lists(st.sampled_from(sorted(VALID)), max_size=5, unique=True),
       flags=st.lists(st.sampled_from(FLAGS), max_size=3, unique=True), draw=st.data())
def test_audit_options_never_escape_as_a_traceback(files, data, options, flags, draw):
    out = files / "report.json"
    out.unlink(missing_ok=True)
    args = ["audit", str(files / "m.onnx"), "--out", str(out), "--steps", "2", "--restarts", "1", "--eps", "0.05"]
    if data != "":
        args += ["--data", data if data in ("digits", "/dev/null") else str(files / data)]
    for name in options:
        if data == "digits" and name in ("--smoothing-sigma", "--sweep-eps"):
            continue  # 450 examples x 10,000 noise draws, or x 2 more attacks: too slow for a fuzzer
        bad = draw.draw(st.integers(0, 3), label=f"{name} invalid?") == 0
        args += [name, draw.draw(st.sampled_from((INVALID if bad else VALID)[name]), label=name)]
    result = _invoke(args + flags)
    _check_outcome(result, out, gated="--fail-under" in args)
    if result.exit_code in (0, 3) and data == "good.npz":
        report = AuditReport.read(out)
        assert report.n == 5 and math.isfinite(report.eps)
        assert (report.verified_accuracy or 0) <= (report.robust_accuracy if report.robust_accuracy is not None
                                                    else report.clean_accuracy)


# ---------------------------------------------------------------------------------------------------------------
# (b) random small ONNX graphs
# ---------------------------------------------------------------------------------------------------------------

SPATIAL = ["Conv", "Relu", "LeakyRelu", "Clip", "AddConst", "MulConst", "SubConst", "DivConst", "MaxPool",
           "AveragePool", "BatchNormalization", "Pad", "Identity", "Dropout", "ConcatSelf", "ConcatConst", "SumSelf",
           "QDQ", "AddSelf", "MulSelf", "Transpose", "Softmax", "LRN", "DivSelf", "ConstDiv", "ConstSub"]
UNSUPPORTED = ["Tanh", "Erf", "Sigmoid", "Loop", "Resize", "ConvTranspose", "ReduceMean", "Where"]
FLAT = ["Relu", "Gemm", "MatMul", "AddConst", "LeakyRelu", "Identity"]
TAIL = ["none", "Softmax", "LogSoftmax", "ReluAfter"]


class _Builder:
    """Builds a graph op by op, tracking the current tensor's name and (static) shape."""

    def __init__(self, draw, shape: list[int]) -> None:
        from onnx import TensorProto, helper

        self.draw, self.helper, self.TensorProto = draw, helper, TensorProto
        self.nodes, self.inits, self.cur, self.shape = [], [], "input", list(shape)
        self.rng = np.random.default_rng(draw(st.integers(0, 2 ** 16), label="weights"))

    def name(self) -> str:
        return f"t{len(self.nodes)}_{len(self.inits)}"

    def const(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        n = self.name() + "_c"
        self.inits.append(numpy_helper.from_array(np.asarray(array), n))
        return n

    def node(self, op: str, inputs: list[str], shape: list[int] | None = None, **attrs) -> None:
        out = self.name() + "_o"
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=f"n{len(self.nodes)}_{op}", **attrs))
        self.cur = out
        if shape is not None:
            self.shape = list(shape)

    def weights(self, *shape: int) -> np.ndarray:
        return (self.rng.normal(0, 0.5, shape)).astype(np.float32)

    def spatial(self, op: str) -> None:
        d, (n, c, h, w) = self.draw, self.shape
        if op == "Conv":
            k = d(st.integers(1, min(3, h, w)), label="kernel")
            pads = d(st.lists(st.integers(0, 1), min_size=4, max_size=4), label="pads")  # asymmetric too
            stride, dil = d(st.integers(1, 2), label="stride"), d(st.integers(1, 2), label="dilation")
            group = c if c > 1 and d(st.booleans(), label="depthwise") else 1
            oc = group * d(st.integers(1, 2), label="channels per group")
            span = dil * (k - 1) + 1
            oh, ow = (h + pads[0] + pads[2] - span) // stride + 1, (w + pads[1] + pads[3] - span) // stride + 1
            bias = [self.const(self.weights(oc))] if d(st.booleans(), label="bias") else []
            self.node("Conv", [self.cur, self.const(self.weights(oc, c // group, k, k)), *bias],
                      [n, oc, oh, ow] if min(oh, ow) > 0 else None, kernel_shape=[k, k], pads=pads,
                      strides=[stride] * 2, dilations=[dil] * 2, group=group)
            if min(oh, ow) <= 0:
                self.shape = None  # dilated past the input: onnxruntime refuses it
        elif op in ("Relu", "Identity", "Dropout"):
            self.node(op, [self.cur])
        elif op == "LeakyRelu":
            self.node(op, [self.cur], alpha=d(st.sampled_from([0.01, 0.2, 1.5]), label="alpha"))
        elif op == "Clip":
            lo = d(st.sampled_from([-1.0, 0.0, 0.2, None]), label="lo")
            hi = d(st.sampled_from([1.0, 0.5, None]), label="hi")
            ins = [self.cur, "" if lo is None else self.const(np.float32(lo))]
            if hi is not None:
                ins.append(self.const(np.float32(max(hi, lo or 0.0))))
            self.node("Clip", ins)
        elif op == "DivSelf":
            self.node("Div", [self.cur, self.cur])  # 0 / 0 where the input is 0: NaN logits, on purpose
        elif op in ("ConstDiv", "ConstSub"):
            self.node(op[5:], [self.const(np.float32(self.rng.normal())), self.cur])
        elif op.endswith("Const"):
            shape = d(st.sampled_from([(), (c, 1, 1), (1, c, h, w), (w,)]), label="const shape")
            value = self.weights(*shape) if shape else np.float32(self.rng.normal())
            if op == "DivConst":
                value = np.where(np.abs(value) < 0.1, 1.0, value).astype(np.float32)
            self.node(op[:-5], [self.cur, self.const(value)])
        elif op in ("AddSelf", "MulSelf"):
            self.node(op[:-4], [self.cur, self.cur])
        elif op == "SumSelf":
            self.node("Sum", [self.cur, self.cur, self.cur])
        elif op in ("MaxPool", "AveragePool"):
            k = d(st.integers(1, min(2, h, w)), label="pool")
            pad = d(st.integers(0, k // 2), label="pool pad")
            ceil = d(st.integers(0, 1), label="ceil")
            extra = {"count_include_pad": d(st.integers(0, 1), label="count pad")} if op == "AveragePool" else {}
            rnd = math.ceil if ceil else math.floor
            oh, ow = (rnd((h + 2 * pad - k) / k) + 1 for h in (h, w))
            self.node(op, [self.cur], [n, c, oh, ow], kernel_shape=[k, k], strides=[k, k], pads=[pad] * 4,
                      ceil_mode=ceil, **extra)
        elif op == "BatchNormalization":
            var = np.abs(self.weights(c)) + 0.1
            self.node(op, [self.cur, *(self.const(a) for a in (self.weights(c), self.weights(c), self.weights(c), var))])
        elif op == "Pad":
            p = d(st.integers(0, 2), label="pad")
            self.node("Pad", [self.cur, self.const(np.array([0, 0, p, p, 0, 0, p, p], np.int64))],
                      [n, c, h + 2 * p, w + 2 * p])
        elif op == "ConcatSelf":
            self.node("Concat", [self.cur, self.cur], [n, 2 * c, h, w], axis=1)
        elif op == "ConcatConst":
            self.node("Concat", [self.cur, self.const(self.weights(1, 1, h, w))], None, axis=1)
            self.shape = None  # a constant without the batch: onnxruntime refuses a batch > 1 (one-line error)
        elif op == "QDQ":
            if d(st.booleans(), label="per channel"):
                scale = self.const(np.abs(self.weights(c)) / 10 + 0.01)
                zero = self.const(np.zeros(c, np.int8))
            else:
                scale, zero = self.const(np.float32(0.05)), self.const(np.uint8(128))
            self.node("QuantizeLinear", [self.cur, scale, zero])
            self.node("DequantizeLinear", [self.cur, scale, zero])
        elif op == "Transpose":
            self.node("Transpose", [self.cur], [n, c, w, h], perm=[0, 1, 3, 2])
        elif op == "Softmax":
            self.node("Softmax", [self.cur], axis=1)
        elif op == "LRN":
            self.node("LRN", [self.cur], size=3)

    def unsupported(self, op: str) -> None:
        if op == "Loop":  # one iteration carrying the tensor through: a real control-flow op on the input
            h, f = self.helper, self.TensorProto.FLOAT
            body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]),
                                 h.make_node("Identity", ["x_in"], ["x_out"])], "body",
                                [h.make_tensor_value_info("i", self.TensorProto.INT64, []),
                                 h.make_tensor_value_info("cond_in", self.TensorProto.BOOL, []),
                                 h.make_tensor_value_info("x_in", f, None)],
                                [h.make_tensor_value_info("cond_out", self.TensorProto.BOOL, []),
                                 h.make_tensor_value_info("x_out", f, None)])
            self.node("Loop", [self.const(np.int64(1)), self.const(np.bool_(True)), self.cur], body=body)
        elif op == "Resize":
            self.node("Resize", [self.cur, "", self.const(np.array([1, 1, 2, 2], np.float32))])
            self.shape = None
        elif op == "ConvTranspose":
            c = self.shape[1]
            self.node("ConvTranspose", [self.cur, self.const(self.weights(c, 2, 2, 2))], None)
            self.shape = None
        elif op == "ReduceMean":
            self.node("ReduceMean", [self.cur], keepdims=1)
            self.shape = None
        elif op == "Where":
            self.node("Where", [self.const(np.array(True)), self.cur, self.cur])
        else:
            self.node(op, [self.cur])


@st.composite
def onnx_models(draw):
    """(model bytes, input shape C x H x W, classes): a random op sequence from the loader's vocabulary, an
    occasional unsupported op or a shape mistake, then Flatten / Reshape, dense ops, the classes, a final op."""
    import onnx
    from onnx import TensorProto, helper

    c, h = draw(st.integers(1, 3), label="C"), draw(st.integers(2, 6), label="H")
    b = _Builder(draw, [1, c, h, h])
    for _ in range(draw(st.integers(0, 4), label="spatial ops")):
        if b.shape is None:
            break
        if draw(st.integers(0, 9), label="unsupported?") == 0:
            b.unsupported(draw(st.sampled_from(UNSUPPORTED), label="unsupported op"))
        else:
            b.spatial(draw(st.sampled_from(SPATIAL), label="op"))
    if draw(st.integers(0, 3), label="global pool?") == 0 and b.shape is not None:
        b.node("GlobalAveragePool", [b.cur], [b.shape[0], b.shape[1], 1, 1])
    features = int(np.prod(b.shape[1:])) if b.shape is not None else 7  # unknown: a likely mismatch, on purpose
    how = draw(st.sampled_from(["flatten", "flatten axis", "reshape", "reshape 0"]), label="to rows")
    if how == "flatten":
        b.node("Flatten", [b.cur], [1, features])
    elif how == "flatten axis":  # N*C x H*W: no longer one row per example, a one-line refusal
        b.node("Flatten", [b.cur], [1, features], axis=draw(st.sampled_from([0, 2]), label="axis"))
    else:
        target = [-1, features] if how == "reshape" else [0, -1]
        b.node("Reshape", [b.cur, b.const(np.array(target, np.int64))], [1, features])
    classes = draw(st.integers(2, 5), label="classes")
    for _ in range(draw(st.integers(0, 2), label="dense ops")):
        op = draw(st.sampled_from(FLAT), label="dense op")
        width = draw(st.integers(2, 6), label="width")
        if op == "Gemm":
            trans = draw(st.booleans(), label="transB")
            weight = b.weights(width, features) if trans else b.weights(features, width)
            b.node("Gemm", [b.cur, b.const(weight), b.const(b.weights(width))], transB=int(trans),
                   alpha=draw(st.sampled_from([1.0, 0.5]), label="alpha"), beta=draw(st.sampled_from([1.0, 2.0])))
            features = width
        elif op == "MatMul":
            b.node("MatMul", [b.cur, b.const(b.weights(features, width))])
            features = width
        elif op == "AddConst":
            b.node("Add", [b.cur, b.const(b.weights(features))])
        elif op == "LeakyRelu":
            b.node("LeakyRelu", [b.cur])
        else:
            b.node(op, [b.cur])
    if draw(st.integers(0, 9), label="wrong width?") == 0:
        features += 1  # a weight that does not fit: onnxruntime refuses the graph, in one line
    b.node("Gemm", [b.cur, b.const(b.weights(features, classes)), b.const(b.weights(classes))])
    tail = draw(st.sampled_from(TAIL), label="tail")
    if tail in ("Softmax", "LogSoftmax"):
        b.node(tail, [b.cur], axis=draw(st.sampled_from([1, -1, 0]), label="axis"))
    elif tail == "ReluAfter":
        b.node("Relu", [b.cur])
    batch = draw(st.sampled_from(["n", 1]), label="batch")
    graph = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              [batch, c, h, h])],
                              [helper.make_tensor_value_info(b.cur, TensorProto.FLOAT, None)], b.inits)
    opset = draw(st.sampled_from([13, 17]), label="opset")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString() if draw(st.booleans(), label="infer") \
        else model.SerializeToString(), (c, h, h), classes


@settings(FUZZ, max_examples=250)
@given(model=onnx_models(), n=st.integers(1, 4), wrong_data=st.integers(0, 9), bounds=st.booleans())
def test_random_graphs_never_escape_as_a_traceback(tmp_path_factory, model, n, wrong_data, bounds):
    import onnxruntime as ort

    raw, (c, h, w), classes = model
    d = tmp_path_factory.mktemp("g", numbered=True)
    (d / "m.onnx").write_bytes(raw)
    rng = np.random.default_rng(n)
    shape = (n, c, h + 1, w) if wrong_data == 0 else (n, c, h, w)
    np.savez(d / "x.npz", x=rng.random(shape, dtype=np.float32), y=rng.integers(0, classes, n))
    out = d / "r.json"
    args = ["audit", str(d / "m.onnx"), "--data", str(d / "x.npz"), "--eps", "0.05", "--steps", "2",
            "--restarts", "1", "--out", str(out)]
    if bounds:
        args += ["--bounds-out", str(d / "b.npz")]
    result = _invoke(args)
    _check_outcome(result, out, gated=False)
    if result.exit_code == 0 and bounds and (d / "b.npz").exists():
        # soundness on whatever the fuzzer built: the bounds contain onnxruntime's logits at the clean inputs
        report = AuditReport.read(out)
        with np.load(d / "x.npz") as f:
            x = f["x"]
        sess = ort.InferenceSession(str(d / "m.onnx"), providers=["CPUExecutionProvider"])
        if report.stripped_output_ops:
            return  # onnxruntime's output is probabilities then; the bounds are on the logits
        logits = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0].reshape(1, -1) for i in range(n)])
        with np.load(d / "b.npz") as b:
            for m in ("ibp", "crown"):
                if f"{m}_lower" in b.files:
                    tol = 1e-3 * (1 + np.abs(logits))
                    assert (b[f"{m}_lower"] <= logits + tol).all() and (logits <= b[f"{m}_upper"] + tol).all(), m


# ---------------------------------------------------------------------------------------------------------------
# what the fuzzers found, kept as plain cases
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, needle", [
    ("--data", "zipjunk.npz", "not a readable .npz file"),  # BadZipFile escaped as a traceback
    ("--data", "/dev/null", "not a readable .npz file"),  # EOFError too
    ("--seed", "-1", "--seed"),  # numpy's SeedSequence raised ValueError mid-attack
    ("--seed", str(2 ** 64), "--seed"),  # torch's generators overflow past 64 bits
    ("--eps", "inf", "--eps"),  # refused by the threat model, without naming the option
    ("--sweep-eps", "0.1,x", "--sweep-eps"),
    ("--sweep-eps", "0.1,-0.2", "--sweep-eps"),
])
def test_fuzzer_findings_stay_one_line(files, option, value, needle):
    (files / "zipjunk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    out = files / "finding.json"
    args = ["audit", str(files / "m.onnx"), "--data", str(files / "good.npz"), "--eps", "0.05", "--steps", "2",
            "--restarts", "1", "--out", str(out)]
    if value == "zipjunk.npz":
        value = str(files / value)
    i = args.index(option) if option in args else len(args)
    args[i:i + 2] = [option, value]
    result = _invoke(args)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not out.exists()
