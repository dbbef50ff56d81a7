"""ONNX export and the ONNX -> torch converter, checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pipeline.errors import HydraPipeError, UnsupportedOpError
from pipeline.masking import MaskedConv2d, MaskedLinear
from pipeline.models import Normalize
from pipeline.graph import as_graph
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
    path = tmp_path / "bad.onnx"
    _helper_mlp(path, helper.make_node("Softmax", ["out"], ["prob"], name="the_softmax", axis=1))
    with pytest.raises(UnsupportedOpError) as err:
        load_onnx(path)
    assert err.value.op_type == "Softmax" and err.value.node_name == "the_softmax"
    assert "Softmax" in str(err.value) and "the_softmax" in str(err.value) and str(path) in str(err.value)


def test_unreadable_file_names_the_file(tmp_path):
    for path, content in ((tmp_path / "junk.onnx", b"this is not a protobuf \xff\xfe"), (tmp_path / "empty.onnx", b"")):
        path.write_bytes(content)
        with pytest.raises(HydraPipeError, match=str(path.name)):
            load_onnx(path)
    with pytest.raises(HydraPipeError, match="missing.onnx"):
        load_onnx(tmp_path / "missing.onnx")
