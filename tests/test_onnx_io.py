"""ONNX export and the ONNX -> torch converter, checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
import torch.nn.functional as F
from torch import nn

from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.masking import MaskedConv2d, MaskedLinear
from pipeline.models import Normalize
from pipeline.graph import LRN, as_graph
from pipeline.onnx_io import export_onnx, ort_logits, ort_session, read_metadata, set_metadata
from pipeline.onnx_load import load_onnx

DATA = Path(__file__).parent / "data" / "ibp"


def small_masked_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.4], [0.3]), MaskedConv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        MaskedConv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), MaskedLinear(64, 32), nn.ReLU(),
        MaskedLinear(32, 10))
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.2, 0.2)
        model[2].running_var.uniform_(0.5, 2.0)
        for layer in (model[1], model[5], model[9]):
            layer.fix_mask(torch.empty_like(layer.weight_mask).bernoulli_(0.4))
    return model.eval()


def int8_model(folder: Path) -> Path:
    """``small_masked_model`` exported and quantized with the pipeline's own recipe; returns the int8 file."""
    from pipeline.quantization import quantize_int8

    src, dst = folder / "m.onnx", folder / "q.onnx"
    export_onnx(small_masked_model(), src, (1, 8, 8))
    quantize_int8(src, dst, np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32))
    return dst


def test_export_folds_masks_and_matches_torch_and_onnxruntime(tmp_path):
    model = small_masked_model()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (1, 8, 8), metadata={"sparsity": "0.6"})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.opset_import[0].version == 17
    ops = [n.op_type for n in proto.graph.node]
    assert "Mul" not in ops and ops.count("Conv") == 2 and ops.count("Gemm") == 2  # masks folded, not multiplied
    conv_w = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.dims and list(t.dims) == [8, 1, 3, 3])
    assert np.array_equal(conv_w == 0, (model[1].weight_mask == 0).numpy() | (model[1].weight == 0).numpy())
    session = ort_session(path, threads=1)
    for n in (3, 5):  # dynamic batch
        x = torch.rand(n, 1, 8, 8)
        np.testing.assert_allclose(ort_logits(session, x.numpy(), batch_size=2), model(x).detach().numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert read_metadata(path) == {"sparsity": "0.6"}
    set_metadata(path, {"bits": "8"})
    assert read_metadata(path) == {"sparsity": "0.6", "bits": "8"}
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp file


def test_converter_matches_onnxruntime_on_exported_and_oracle_models(tmp_path):
    model = small_masked_model()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (1, 8, 8))
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    for p in (path, DATA / "mlp.onnx", DATA / "cnn.onnx"):
        module = load_onnx(p)
        assert list(module.parameters()) == []  # constants are buffers: attacks compute no parameter gradients
        ours = module(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(ours, ort_logits(ort_session(p, 1), x), rtol=1e-4, atol=1e-5)


def test_converter_on_int8_qdq_model_matches_onnxruntime_and_passes_gradients(tmp_path):
    dst = int8_model(tmp_path)
    rng = np.random.default_rng(0)
    module = load_onnx(dst)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op for n in module.nodes}
    # weights arrive as int8 + DequantizeLinear: folded at load time, so Conv / Gemm hold float constants
    assert all(n.inputs for n in module.nodes if n.op in ("Conv", "Gemm"))
    x = rng.random((256, 1, 8, 8), dtype=np.float32)
    ref = ort_logits(ort_session(dst, 1), x)
    ours = module(torch.from_numpy(x)).detach().numpy()
    # the logits stay float (the pipeline's recipe); a quantum of the last quantized activation moves them by at
    # most its scale times the head's largest row sum
    last_dq = next(n for n in reversed(module.nodes) if n.op == "DequantizeLinear")
    out_scale = float(last_dq.module.scale) * float(module.nodes[-1].module.weight.abs().sum(1).max())
    diff = np.abs(ours - ref)
    # onnxruntime runs fused integer kernels (QLinearConv, QLinearAveragePool) that break exact rounding ties
    # differently from float arithmetic: a few quanta at most, on a minority of entries, same predictions
    assert diff.max() <= 16 * out_scale + 1e-6
    assert (diff < 1e-6).mean() > 0.5
    assert (ours.argmax(1) == ref.argmax(1)).mean() > 0.95
    xt = torch.from_numpy(x[:4]).requires_grad_(True)
    module(xt).sum().backward()
    assert xt.grad is not None and xt.grad.abs().sum() > 0  # straight-through rounding


def test_converter_on_torchvision_resnet18(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "r18.onnx"
    export_onnx(net, path, (3, 32, 32))
    module = load_onnx(path)
    assert {"Add", "MaxPool", "GlobalAveragePool", "BatchNormalization"} & {n.op for n in module.nodes}
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    ours = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, ort_logits(ort_session(path, 1), x), rtol=1e-4, atol=1e-5)
    # the same network traced from torch (residual blocks via torch.fx) gives the same logits
    np.testing.assert_allclose(as_graph(net)(torch.from_numpy(x)).detach().numpy(), ours, rtol=1e-4, atol=1e-5)


def _helper_mlp(path: Path, extra_node=None) -> None:
    """An MLP written by hand with onnx.helper, using ops torch's exporter never emits in this form."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0.5], np.float32), "mean"),
        numpy_helper.from_array(np.array([4.0], np.float32), "inv_std"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((64, 20)).astype(np.float32), "W1"),  # Gemm, transB = 0
        numpy_helper.from_array(rng.standard_normal(20).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((20, 12)).astype(np.float32), "W2"),  # MatMul + Add
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
        numpy_helper.from_array(np.array(2.0, np.float32), "hi"),
        numpy_helper.from_array(rng.standard_normal((24, 10)).astype(np.float32), "W3"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["s"], name="sub"),
        helper.make_node("Mul", ["s", "inv_std"], ["n"], name="scale"),
        helper.make_node("Reshape", ["n", "shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W1", "b1"], ["h1"], name="fc1", alpha=0.5, beta=2.0),
        helper.make_node("LeakyRelu", ["h1"], ["a1"], name="act1", alpha=0.1),
        helper.make_node("MatMul", ["a1", "W2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["h2"], name="bias2"),
        helper.make_node("Clip", ["h2", "lo", "hi"], ["c2"], name="clip"),
        helper.make_node("Relu", ["h2"], ["r2"], name="act2"),
        helper.make_node("Concat", ["c2", "r2"], ["cat"], name="concat", axis=1),
        helper.make_node("Identity", ["cat"], ["cat_id"], name="id"),
        helper.make_node("MatMul", ["cat_id", "W3"], ["out"], name="fc3"),
    ]
    if extra_node is not None:
        nodes.append(extra_node)
    out_name = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_converter_on_onnx_helper_mlp(tmp_path):
    path = tmp_path / "mlp.onnx"
    _helper_mlp(path)
    module = load_onnx(path)
    x = np.random.default_rng(2).random((7, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), ort_logits(ort_session(path, 1), x),
                               rtol=1e-5, atol=1e-5)


def test_unsupported_op_names_op_and_node(tmp_path):
    # (a final Softmax is supported now: stripped, see test_final_softmax_is_stripped_and_argmax_agrees)
    path = tmp_path / "bad.onnx"
    _helper_mlp(path, helper.make_node("Tanh", ["out"], ["prob"], name="the_tanh"))
    with pytest.raises(UnsupportedOpError) as err:
        load_onnx(path)
    assert err.value.op_type == "Tanh" and err.value.node_name == "the_tanh"
    assert "Tanh" in str(err.value) and "the_tanh" in str(err.value) and str(path) in str(err.value)


def test_unreadable_file_names_the_file(tmp_path):
    for path, content in ((tmp_path / "junk.onnx", b"this is not a protobuf \xff\xfe"), (tmp_path / "empty.onnx", b"")):
        path.write_bytes(content)
        with pytest.raises(HydraPipeError, match=str(path.name)):
            load_onnx(path)
    with pytest.raises(HydraPipeError, match="missing.onnx"):
        load_onnx(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- what people export (issue 16)

def export_plain(model: nn.Module, path: Path, shape: tuple[int, ...], dynamic: bool = True, opset: int = 17) -> Path:
    """``torch.onnx.export`` as a user calls it: no masks, no metadata, the default (dynamo) exporter; ``dynamic=False``
    fixes the batch at 1. Before opset 13 the legacy exporter (the dynamo one writes nothing older)."""
    import contextlib
    import io
    import warnings

    dynamo = opset >= 13
    axes = ({"dynamic_shapes": ({0: torch.export.Dim("n")},)} if dynamo else
            {"dynamic_axes": {"input": {0: "n"}, "out": {0: "n"}}}) if dynamic else {}
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *shape),), str(path), dynamo=dynamo, opset_version=opset,
                          input_names=["input"], output_names=["out"], **axes)
    return path


def softmax_cnn(final: type[nn.Module] = nn.Softmax, seed: int = 0) -> nn.Sequential:
    """A CNN on 1 x 8 x 8 inputs whose last op turns its 5 logits into (log-)probabilities."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5),
                         final(dim=1)).eval()


def _onnx_model(path: Path, nodes, inits, in_shape, out_name: str, out_shape, opset: int = 17) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_head_onnx(path: Path, final: str | None = "Softmax", opset: int = 12, axis: int = 1) -> Path:
    """A SqueezeNet-style head: Conv to 6 class maps, GlobalAveragePool, optionally Softmax: N x 6 x 1 x 1 out."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["logits"])]
    if final:
        nodes.append(helper.make_node(final, ["logits"], ["prob"], axis=axis))
    inits = {"w": rng.normal(0, 0.5, (6, 1, 3, 3)), "b": rng.normal(0, 0.1, 6)}
    return _onnx_model(path, nodes, inits, ["N", 1, 8, 8], "prob" if final else "logits", ["N", 6, 1, 1], opset)


def test_final_softmax_is_stripped_and_argmax_agrees(tmp_path):
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    for final, opset in ((nn.Softmax, 17), (nn.LogSoftmax, 17), (nn.Softmax, 11)):
        net = softmax_cnn(final)
        path = export_plain(net, tmp_path / f"{final.__name__}{opset}.onnx", (1, 8, 8), opset=opset)
        assert onnx.load(str(path)).graph.node[-1].op_type == final.__name__
        module = load_onnx(path)
        assert module.stripped_output_ops == [final.__name__]
        assert final.__name__ not in {n.op for n in module.nodes}
        # the graph form gives the logits, onnxruntime the (log-)probabilities of the whole file: same argmax
        ours = module(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(ours, net[:-1](torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
        ort = ort_logits(ort_session(path, 1), x)
        assert np.array_equal(ours.argmax(1), ort.argmax(1))
        np.testing.assert_allclose(torch.from_numpy(ours).softmax(1).numpy(), np.exp(ort) if final is nn.LogSoftmax
                                   else ort, rtol=1e-4, atol=1e-6)


def test_n_k_1_1_output_is_flattened_in_both_numerics(tmp_path):
    x = np.random.default_rng(1).random((7, 1, 8, 8), dtype=np.float32)
    plain = conv_head_onnx(tmp_path / "plain.onnx", final=None)
    module = load_onnx(plain)
    ort = ort_logits(ort_session(plain, 1), x)
    assert ort.shape == (7, 6) and module.stripped_output_ops == []
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), ort, rtol=1e-5, atol=1e-6)
    # SqueezeNet from the ONNX zoo: Softmax (opset < 13: over the input coerced to N x 6) then N x 6 x 1 x 1
    squeeze = load_onnx(conv_head_onnx(tmp_path / "squeeze.onnx"))
    assert squeeze.stripped_output_ops == ["Softmax"]
    np.testing.assert_allclose(squeeze(torch.from_numpy(x)).detach().numpy(), ort, rtol=1e-5, atol=1e-6)
    # from opset 13 a Softmax along axis -1 of N x 6 x 1 x 1 normalises a size-1 axis: no monotone map of the
    # logits (the output is 1 everywhere), so it stays, run as it is
    odd = conv_head_onnx(tmp_path / "odd.onnx", opset=13, axis=-1)
    kept = load_onnx(odd)
    assert kept.stripped_output_ops == [] and "Softmax" in {n.op for n in kept.nodes}
    np.testing.assert_allclose(kept(torch.from_numpy(x)).detach().numpy(), ort_logits(ort_session(odd, 1), x))


class _ViewNet(nn.Module):
    """Flattens with ``x.view(x.size(0), -1)``: exported with a fixed batch, that is Reshape to [1, 64]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(h.view(h.size(0), -1))


def test_fixed_batch_export_runs_any_batch(tmp_path):
    net = _ViewNet().eval()
    path = export_plain(net, tmp_path / "fixed.onnx", (1, 8, 8), dynamic=False)
    session = ort_session(path, 1)
    assert session.get_inputs()[0].shape[0] == 1
    module = load_onnx(path)
    assert module.fixed_batch == 1
    reshape = next(n.module for n in module.nodes if n.op == "Reshape")
    assert reshape.shape[0] == 1 and reshape.keep_batch  # the exporter baked the batch in
    x = np.random.default_rng(2).random((5, 1, 8, 8), dtype=np.float32)
    ref = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ort_logits(session, x), ref, rtol=1e-5, atol=1e-5)  # 5 slices of 1
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert ort_logits(session, x[:0]).shape == (0, 3)


def lrn_onnx(path: Path, size: int = 4) -> Path:
    """AlexNet's Conv -> Relu -> LRN -> MaxPool, then a Gemm to 4 classes, on 1 x 6 x 6 inputs."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("LRN", ["r"], ["n"], size=size, alpha=0.5, beta=0.75, bias=2.0),
             helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    inits = {"w": rng.normal(0, 1.0, (5, 1, 3, 3)), "fc": rng.normal(0, 0.5, (4, 45))}
    return _onnx_model(path, nodes, inits, ["N", 1, 6, 6], "logits", ["N", 4])


def _lrn_spec(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """ONNX's LRN formula, channel by channel (onnx.reference's own LRN loops over the batch instead)."""
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    sq = np.stack([(x[:, max(0, c - lo):c + hi + 1] ** 2).sum(1) for c in range(x.shape[1])], 1)
    return x / (bias + alpha / size * sq) ** beta


def test_lrn_matches_onnxruntime_and_the_onnx_formula(tmp_path):
    x = np.random.default_rng(4).random((6, 1, 6, 6), dtype=np.float32)
    path = lrn_onnx(tmp_path / "lrn.onnx", 3)
    module = load_onnx(path)
    ours = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, ort_logits(ort_session(path, 1), x), rtol=1e-5, atol=1e-5)
    # onnxruntime refuses even windows, which ONNX centres one channel later than torch's nn.LocalResponseNorm
    h = np.random.default_rng(5).normal(size=(3, 7, 2, 2)).astype(np.float32)
    for size in (1, 2, 3, 4, 5, 8):
        got = LRN(size, 0.5, 0.75, 2.0)(torch.from_numpy(h)).numpy()
        np.testing.assert_allclose(got, _lrn_spec(h, size, 0.5, 0.75, 2.0), rtol=1e-5, atol=1e-6)


def sum3_onnx(path: Path) -> Path:
    """Three branches of a Gemm joined by one Sum, plus a constant operand (Caffe2-era residual join)."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Flatten", ["input"], ["f"]),
             helper.make_node("Gemm", ["f", "w1"], ["a"], transB=1),
             helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Gemm", ["f", "w2"], ["b"], transB=1),
             helper.make_node("Gemm", ["ra", "w3"], ["c"], transB=1),
             helper.make_node("Sum", ["ra", "b", "c", "k"], ["s"]),
             helper.make_node("Relu", ["s"], ["rs"]),
             helper.make_node("Gemm", ["rs", "w4"], ["logits"], transB=1)]
    inits = {"w1": rng.normal(0, 0.5, (8, 16)), "w2": rng.normal(0, 0.5, (8, 16)), "w3": rng.normal(0, 0.5, (8, 8)),
             "k": rng.normal(0, 0.2, 8), "w4": rng.normal(0, 0.5, (3, 8))}
    return _onnx_model(path, nodes, inits, ["N", 1, 4, 4], "logits", ["N", 3])


def test_sum_of_three_matches_onnxruntime(tmp_path):
    path = sum3_onnx(tmp_path / "sum.onnx")
    module = load_onnx(path)
    assert "Sum" in {n.op for n in module.nodes}
    x = np.random.default_rng(6).random((9, 1, 4, 4), dtype=np.float32)
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), ort_logits(ort_session(path, 1), x),
                               rtol=1e-5, atol=1e-5)


def test_every_unsupported_op_is_named_in_one_line(tmp_path):
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["h"], name="fc", transB=1),
             helper.make_node("Tanh", ["h"], ["t"], name="first_tanh"),
             helper.make_node("Erf", ["t"], ["e"], name="the_erf"),  # downstream of the Tanh: still named
             helper.make_node("Tanh", ["e"], ["t2"], name="second_tanh"),  # a repeat: named once
             helper.make_node("Gemm", ["t2", "w2"], ["logits"], name="head", transA=1)]  # its input is refused
    inits = {"w": np.ones((4, 16)), "w2": np.ones((4, 4))}
    path = _onnx_model(tmp_path / "two.onnx", nodes, inits, ["N", 1, 4, 4], "logits", ["N", 4])
    with pytest.raises(UnsupportedOpError) as err:
        load_onnx(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "'Tanh' (node 'first_tanh')" in msg and "'Erf' (node 'the_erf')" in msg
    assert "second_tanh" not in msg and "transA" not in msg
    assert err.value.found == [("Tanh", "first_tanh"), ("Erf", "the_erf")]
    assert err.value.op_type == "Tanh" and err.value.node_name == "first_tanh"
    # a refused form of a supported op counts as well
    nodes[-1] = helper.make_node("Gemm", ["f", "w"], ["logits"], name="head", transA=1)
    nodes = [nodes[0], nodes[1], nodes[2], nodes[-1]]
    path = _onnx_model(tmp_path / "form.onnx", nodes, inits, ["N", 1, 4, 4], "logits", ["N", 4])
    with pytest.raises(UnsupportedOpError, match=r"2 unsupported ONNX ops: 'Tanh' .*'Gemm with transA'"):
        load_onnx(path)


# ---------------------------------------------------------------- hostile files (issue 15)

def _with_external_weights(path: Path, location: str, folder: Path | None = None) -> None:
    """``_helper_mlp`` with its weights saved as external data at ``location`` (relative to the model's folder)."""
    from onnx.external_data_helper import convert_model_to_external_data

    _helper_mlp(path)
    model = onnx.load(str(path))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    onnx.save(model, str(path))  # writes weights.bin beside it
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


def test_external_data_in_the_models_folder_loads(tmp_path):
    path = tmp_path / "ext.onnx"
    _with_external_weights(path, "weights.bin")
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(load_onnx(path)(torch.from_numpy(x)).detach().numpy(),
                               ort_logits(ort_session(path, 1), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["outside", "absolute", "symlink", "missing"])
def test_external_data_outside_the_models_folder_is_refused_in_one_line(tmp_path, where):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "ext.onnx"
    _with_external_weights(path, "weights.bin")
    secret = tmp_path / "secret.bin"
    (folder / "weights.bin").rename(secret)
    location = {"outside": "../secret.bin", "absolute": str(secret), "symlink": "link.bin", "missing": "nowhere.bin"}
    if where == "symlink":
        (folder / "link.bin").symlink_to(secret)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location[where]
    onnx.save(model, str(path))
    with pytest.raises(HydraPipeError, match="external data") as err:
        load_onnx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_size_and_node_limits_are_checked_before_the_model_is_parsed(tmp_path, monkeypatch):
    import pipeline.onnx_io as onnx_io
    from pipeline.onnx_io import read_proto

    path = tmp_path / "mlp.onnx"
    _helper_mlp(path)
    size = path.stat().st_size
    monkeypatch.setattr(onnx_io, "MAX_MODEL_BYTES", size - 1)

    def never(*args, **kwargs):
        raise AssertionError("the file was read")

    with monkeypatch.context() as m:
        m.setattr(onnx, "load", never)
        with pytest.raises(HydraPipeError, match="over the") as err:
            read_proto(path)
    assert f"{size:,} bytes" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(onnx_io, "MAX_MODEL_BYTES", size)
    read_proto(path)
    # external data counts too
    ext = tmp_path / "ext" / "ext.onnx"
    ext.parent.mkdir()
    _with_external_weights(ext, "weights.bin")
    monkeypatch.setattr(onnx_io, "MAX_MODEL_BYTES", ext.stat().st_size + 100)
    with pytest.raises(HydraPipeError, match="with its external data"):
        read_proto(ext)
    monkeypatch.setattr(onnx_io, "MAX_MODEL_BYTES", 2 << 30)
    monkeypatch.setattr(onnx_io, "MAX_GRAPH_NODES", 11)  # _helper_mlp has 12 nodes
    with pytest.raises(HydraPipeError, match="12 nodes, over the limit of 11"):
        read_proto(path)
    for odd in (tmp_path, Path("/dev/zero")):  # never read to its end
        with pytest.raises(HydraPipeError, match="not a regular file"):
            read_proto(odd)


@pytest.mark.parametrize("channels,stride,padding,dilation", [(1, 2, 1, 1), (3, 1, 0, 1), (2, 3, 2, 2)])
def test_loaded_convolution_input_gradient_equals_torchs(tmp_path, channels, stride, padding, dilation):
    """The loader's convolution gives an attack (frozen weights) the input gradient by matmul + col2im: the same as
    torch's transposed convolution, and that path is the one taken."""
    from pipeline.graph import Conv2d

    torch.manual_seed(channels)
    ref = nn.Sequential(nn.Conv2d(channels, 8, 3, stride=stride, padding=padding, dilation=dilation), nn.ReLU(),
                        nn.Flatten(), nn.LazyLinear(5))
    x = torch.rand(6, channels, 13, 13)
    ref(x)
    path = tmp_path / "c.onnx"
    export_onnx(ref.eval(), path, (channels, 13, 13))
    module = load_onnx(path).eval()
    conv = next(n.module for n in module.nodes if n.op == "Conv")
    assert isinstance(conv, Conv2d)
    for p in list(module.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    g = torch.randn(6, 5)
    grads = []
    for m in (ref, module):
        xr = x.clone().requires_grad_(True)
        z = m(xr)
        grads.append(torch.autograd.grad(z, xr, g)[0])
    xr = x.clone().requires_grad_(True)
    assert type(conv(xr).grad_fn).__name__ == "_FoldGradConvBackward"
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_loaded_convolution_still_trains_its_weights(tmp_path):
    """Where the weights need a gradient, the loader's convolution is torch's (the fast path gives none)."""
    from pipeline.graph import Conv2d

    conv = Conv2d(1, 4, 3, padding=1)
    x = torch.rand(2, 1, 6, 6, requires_grad=True)
    out = conv(x)
    assert type(out.grad_fn).__name__ != "_FoldGradConvBackward"
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_loaded_convolution_input_gradient_under_autocast():
    """Under a bf16 autocast the fast path hands back the input gradient in the input's dtype, close to fp32's."""
    from pipeline.graph import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(1, 4, 3, stride=2, padding=1).requires_grad_(False)
    x = torch.rand(3, 1, 9, 9)
    g = torch.randn(3, 4, 5, 5)
    grads = []
    for enabled in (False, True):
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = conv(xr)
        assert type(out.grad_fn).__name__ == "_FoldGradConvBackward"
        grads.append(torch.autograd.grad(out, xr, g.to(out.dtype))[0])
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("threads", [None, 2])
def test_onnxruntime_threads_sleep_between_runs(tmp_path, threads):
    """The audit interleaves onnxruntime's confirmations with torch's attack steps: the session's thread pools must
    not keep spinning on the cores after a run (onnxruntime's default), and the session still computes."""
    path = tmp_path / "mlp.onnx"
    _helper_mlp(path)
    session = ort_session(path, threads=threads)
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(ort_logits(session, x), load_onnx(path)(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("available, expected", [
    (["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]),
])
def test_onnxruntime_sessions_run_exact_float32_on_cuda(tmp_path, monkeypatch, available, expected):
    """With onnxruntime-gpu and a GPU, confirmations run on CUDA with TF32 off (onnxruntime's CUDA provider has it
    on by default: 10-bit mantissas in convolutions and matrix products), the CPU behind it; otherwise the CPU."""
    import onnxruntime

    made = []

    class Recorded:
        def __init__(self, path, sess_options=None, providers=None, provider_options=None):
            made.append((path, providers, provider_options))

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
    monkeypatch.setattr(onnxruntime, "InferenceSession", Recorded)
    ort_session(tmp_path / "m.onnx", threads=1)
    assert made == [(str(tmp_path / "m.onnx"), expected, None)]


@pytest.mark.parametrize("rounding", [True, False])
@pytest.mark.parametrize("axis", [None, 1])
def test_quantize_straight_through_gradient(rounding, axis):
    """The graph form's QuantizeLinear (and its float twin, without rounding): the values of
    ``clip(round(x / scale) + zero, qmin, qmax)``, and the straight-through gradient ``grad / scale`` wherever the
    clip leaves the value as it is, its edges included (torch's clamp passes none there), 0 where it clips."""
    from pipeline.graph import Quantize

    scale = torch.tensor([0.125, 0.25, 0.5]) if axis else torch.tensor(0.25)
    zero = torch.tensor([0.0, 10.0, 3.0]) if axis else torch.tensor(5.0)
    m = Quantize(scale, zero, 0, 25, axis=axis)
    m.rounding = rounding
    x = torch.arange(-40, 80, dtype=torch.float32).view(4, 3, 10) / 8  # exact multiples: lands on both clip edges
    x.requires_grad_(True)
    out = m(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(g)
    s, z = (scale.view(1, 3, 1), zero.view(1, 3, 1)) if axis else (scale, zero)
    q = (x.detach() / s).round() + z if rounding else x.detach() / s + z
    assert ((q == 0).any() and (q == 25).any() and ((q > 0) & (q < 25)).any() and (q < 0).any() and (q > 25).any())
    assert torch.equal(out.detach(), q.clamp(0, 25))
    assert torch.equal(x.grad, torch.where((q >= 0) & (q <= 25), g, 0) / s)
    assert (x.grad[(q == 0) | (q == 25)] != 0).all()
    with torch.no_grad():
        assert torch.equal(m(x), q.clamp(0, 25))


# ---------------------------------------------------------------- both of torch's exporters (issue 27, item 1)

class _SqueezeExcite(nn.Module):
    """EfficientNet's squeeze-excitation: global pool, 1 x 1 convs with SiLU, a sigmoid gate times the input."""

    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.pool, self.a, self.b = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.b(F.silu(self.a(self.pool(x)))))


class _EfficientLike(nn.Module):
    """The ops torchvision's EfficientNet / MobileNet export to, small: SiLU (Sigmoid * x), squeeze-excitation
    (Mul of two computed tensors), ReLU6 (Clip) and ``x.mean((2, 3))`` (ReduceMean, keepdims 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.se, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), _SqueezeExcite(4, 2), \
            nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu6(self.se(F.silu(self.bn(self.conv(x))))).mean((2, 3)))


def tiny_net(kind: str) -> nn.Module:
    """Tiny nets (3 x 8 x 8 inputs, 5 classes) that export to the op forms of torchvision's classifiers:
    ``gap`` ResNet's AdaptiveAvgPool2d(1) + flatten, ``eff`` EfficientNet's SiLU and squeeze-excitation, ``up``
    VGG's AdaptiveAvgPool2d(7) on a 1 x 1 map (at 32 x 32), here 3 x 3."""
    torch.manual_seed(0)
    if kind == "gap":
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    elif kind == "eff":
        net = _EfficientLike()
    else:
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(8), nn.AdaptiveAvgPool2d(3),
                            nn.Flatten(), nn.Linear(36, 5))
    for m in net.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def export_with(net: nn.Module, path: Path, dynamo: bool, opset: int, shape=(3, 8, 8)) -> Path:
    """``torch.onnx.export`` with either exporter, dynamic batch (the dynamo exporter's output kept quiet)."""
    import contextlib
    import io
    import warnings

    kw = ({"dynamic_shapes": ({0: torch.export.Dim("n")},)} if dynamo else
          {"dynamic_axes": {"input": {0: "n"}, "logits": {0: "n"}}})
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, *shape),), str(path), dynamo=dynamo, opset_version=opset,
                          input_names=["input"], output_names=["logits"], **kw)
    return path


EXPORTS = [("gap", True, 18), ("gap", True, 21), ("gap", False, 13), ("gap", False, 21), ("eff", True, 17),
           ("eff", True, 21), ("eff", False, 13), ("eff", False, 17), ("up", True, 18), ("up", True, 21)]
"""(net, dynamo, opset): the legacy exporter refuses ``up`` (an AdaptiveAvgPool2d that upsamples), and the dynamo
exporter writes opset 18 where 13 or 17 is asked."""
FORMS = {("gap", True): {"ReduceMean", "Reshape"}, ("gap", False): {"GlobalAveragePool", "Flatten"},
         ("eff", True): {"Sigmoid", "Mul", "ReduceMean", "Clip"}, ("eff", False): {"Sigmoid", "Mul", "ReduceMean"},
         ("up", True): {"Select", "ReduceMean", "MaxPool"}}


@pytest.mark.parametrize("kind,dynamo,opset", EXPORTS, ids=lambda v: str(v))
def test_both_exporters_load_and_match_onnxruntime(kind, dynamo, opset, tmp_path):
    net = tiny_net(kind)
    path = export_with(net, tmp_path / "m.onnx", dynamo, opset)
    module = load_onnx(path)
    ops = {n.op for n in module.nodes}
    assert FORMS[kind, dynamo] <= ops, ops
    assert "Transpose" not in ops and "GatherND" not in ops  # the upsampling chain is one Select
    x = np.random.default_rng(3).random((5, 3, 8, 8), dtype=np.float32)
    ours = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, ort_logits(ort_session(path, 1), x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    xt = torch.from_numpy(x).requires_grad_(True)
    module(xt).sum().backward()  # attacks: a gradient reaches the input
    assert xt.grad is not None and float(xt.grad.abs().sum()) > 0


def test_dynamo_fixed_batch_export_runs_any_batch(tmp_path):
    """``torch.onnx.export(model, (x,), path)`` as users call it today: dynamo, batch fixed at 1 (Reshape [1, C])."""
    import contextlib
    import io

    net = tiny_net("gap")
    path = tmp_path / "fixed.onnx"
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(net, (torch.rand(1, 3, 8, 8),), str(path))
    module = load_onnx(path)
    assert module.fixed_batch == 1 and "ReduceMean" in {n.op for n in module.nodes}
    x = np.random.default_rng(4).random((6, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), ort_logits(ort_session(path, 1), x),
                               rtol=1e-5, atol=1e-6)


def test_reduce_mean_forms_and_refusals(tmp_path):
    """ReduceMean's axes as an attribute (before opset 18) or an input (from 18), keepdims 0 / 1, negative axes;
    over the batch axis (or all axes) it is refused, saying what to try."""
    rng = np.random.default_rng(5)
    x = rng.random((4, 2, 3, 3), dtype=np.float32)
    for opset, axes, keep in ((13, [2, 3], 1), (13, [-1, -2], 0), (18, [-2, -1], 1), (21, [1, 3], 0)):
        if opset < 18:
            nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=axes, keepdims=keep)]
            inits = {}
        else:
            nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["m"], keepdims=keep)]
            inits = {"axes": np.array(axes, np.int64)}
        nodes.append(helper.make_node("Flatten", ["m"], ["logits"]))
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["N", 2, 3, 3])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        path = tmp_path / f"rm{opset}.onnx"
        onnx.save(model, str(path))
        np.testing.assert_allclose(load_onnx(path)(torch.from_numpy(x)).detach().numpy(),
                                   ort_logits(ort_session(path, 1), x), rtol=1e-6, atol=1e-6)
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[0, 2], keepdims=1, name="batch_mean"),
             helper.make_node("Flatten", ["m"], ["logits"])]
    path = _onnx_model(tmp_path / "batch.onnx", nodes, {}, ["N", 2, 3, 3], "logits", [1, 2], opset=13)
    with pytest.raises(UnsupportedOpError, match=r"'ReduceMean over the batch axis' at node 'batch_mean'; to try: "):
        load_onnx(path)


def test_refusal_line_says_what_to_try(tmp_path):
    """A refused model's one line ends with what to try: a fixed input size for shape arithmetic, another
    activation, the legacy exporter or a rewrite."""
    path = tmp_path / "bad.onnx"
    _helper_mlp(path, helper.make_node("Tanh", ["out"], ["prob"], name="the_tanh"))
    with pytest.raises(UnsupportedOpError) as err:
        load_onnx(path)
    msg = str(err.value)
    assert "\n" not in msg and "to try: replace the activation" in msg and "dynamo=False" in msg
    import contextlib
    import io

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.AdaptiveAvgPool2d(3),
                        nn.Flatten(), nn.Linear(36, 5)).eval()  # 2 x 2 -> 3 x 3: Gather + Where on the features
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(net, (torch.rand(1, 3, 8, 8),), str(tmp_path / "up.onnx"))
    with pytest.raises(UnsupportedOpError, match=r"to try: .*output size that divides its input"):
        load_onnx(tmp_path / "up.onnx")


def test_export_onnx_with_the_dynamo_exporter_matches_and_quantizes(tmp_path):
    """``export_onnx(dynamo=True)``: same logits as the legacy export, quantized to int8 QDQ with pruned zeros kept
    (BatchNormalization folded into the convolutions: a zero weight stays zero), graph form = onnxruntime."""
    from pipeline.data import DatasetInfo
    from pipeline.models import build_model
    from pipeline.quantization import int8_weight_zeros, quantize_int8

    torch.manual_seed(0)
    net = build_model("resnet18", DatasetInfo(3, 8, 10, (0.5,) * 3, (0.25,) * 3)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.mul_((torch.rand_like(p) < 0.5).float())
    x = np.random.default_rng(7).random((16, 3, 8, 8), dtype=np.float32)
    outs = []
    for dynamo in (True, False):
        path = tmp_path / f"m{dynamo}.onnx"
        export_onnx(net, path, (3, 8, 8), {"stage": "t"}, dynamo=dynamo)
        outs.append(ort_logits(ort_session(path, 1), x))
        assert read_metadata(path)["stage"] == "t"
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    path = tmp_path / "mTrue.onnx"
    assert "ReduceMean" in {n.op_type for n in onnx.load(str(path)).graph.node}
    quantize_int8(path, tmp_path / "q.onnx", x)
    pruned = sum(int((w == 0).sum()) for k, w in net.state_dict().items() if k.endswith("weight") and w.dim() > 1)
    assert sum(int8_weight_zeros(tmp_path / "q.onnx").values()) >= pruned > 0
    q = load_onnx(tmp_path / "q.onnx")
    assert "QuantizeLinear" in {n.op for n in q.nodes}
    np.testing.assert_allclose(q(torch.from_numpy(x)).detach().numpy(), ort_logits(ort_session(tmp_path / "q.onnx", 1), x),
                               rtol=1e-4, atol=1e-4)


def test_a_dynamo_export_carries_no_trace_of_the_machine_that_made_it(tmp_path):
    """The dynamo exporter notes stack traces (this checkout's file paths) on every node: the same weights exported
    from two checkouts gave two files, and a third of a small model's bytes."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72, 3))
    export_onnx(net, tmp_path / "m.onnx", (1, 8, 8), dynamo=True)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert not any(n.metadata_props or n.doc_string for n in proto.graph.node)
    here = str(Path(__file__).resolve().parent.parent)
    assert here.encode() not in (tmp_path / "m.onnx").read_bytes()
