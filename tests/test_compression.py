"""Compact storage of the shipped int8 model: exact round trip in plain onnxruntime, checker, real size gains."""

import collections
import lzma
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.compression import archive, compact_file, compact_model, delta_decode, delta_encode
from pipeline.config import PruneParams
from pipeline.data import DatasetInfo
from pipeline.errors import HydraPipeError
from pipeline.models import build_model
from pipeline.onnx_io import export_onnx
from pipeline.onnx_load import load_onnx
from pipeline.pruning import prune
from pipeline.quantization import quantize_int8

INFO = DatasetInfo(1, 16, 10, (0.3,), (0.4,))


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    """A 98%-sparse CNN-large, exported and quantized (U8S8 QDQ) like the quantize stage does."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("compact")
    torch.manual_seed(0)
    model = build_model("cnn_large", INFO)
    prune(model, None, PruneParams(method="lwm", keep_ratio=0.02))
    export_onnx(model.eval(), d / "fp32.onnx", (1, 16, 16))
    x = np.random.default_rng(0).random((32, 1, 16, 16), dtype=np.float32)
    quantize_int8(d / "fp32.onnx", d / "int8.onnx", x)
    return d, x


def session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized=None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = level
    if optimized:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("encoding", ["delta", "sparse_initializer"])
def test_compact_file_gives_exactly_the_dense_int8_logits(int8_model, encoding):
    d, x = int8_model
    stats = compact_file(d / "int8.onnx", d / f"{encoding}.onnx", encoding)
    assert stats.tensors >= 6 and stats.encoded_bytes < stats.dense_bytes
    onnx.checker.check_model(onnx.load(str(d / f"{encoding}.onnx")), full_check=encoding == "delta")
    dense = session(d / "int8.onnx").run(None, {"input": x})[0]
    compact = session(d / f"{encoding}.onnx").run(None, {"input": x})[0]
    assert np.array_equal(compact, dense)
    assert (d / f"{encoding}.onnx").stat().st_size < (d / "int8.onnx").stat().st_size / 3


def test_delta_file_is_far_smaller_than_dense_fp32(int8_model):
    d, _ = int8_model
    compact_file(d / "int8.onnx", d / "delta.onnx")
    fp32 = (d / "fp32.onnx").stat().st_size
    # 98% sparse: ~2 bytes per kept int8 weight against 4 bytes for every fp32 weight
    assert fp32 / (d / "delta.onnx").stat().st_size > 40


def test_decoders_are_folded_away_when_the_session_loads(int8_model, tmp_path):
    """onnxruntime must run the same fused int8 kernels: the decoder ops vanish in its optimised graph."""
    d, _ = int8_model
    compact_file(d / "int8.onnx", tmp_path / "delta.onnx")
    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session(d / "int8.onnx", level, tmp_path / "dense.opt.onnx")
    session(tmp_path / "delta.onnx", level, tmp_path / "delta.opt.onnx")
    ops = [collections.Counter(n.op_type for n in onnx.load(str(tmp_path / f)).graph.node)
           for f in ("dense.opt.onnx", "delta.opt.onnx")]
    assert ops[0] == ops[1]
    assert "ScatterElements" not in ops[1] and ops[1]["QLinearConv"] >= 4


def test_compact_file_keeps_metadata_and_loads_in_the_torch_converter(int8_model, tmp_path):
    d, x = int8_model
    proto = onnx.load(str(d / "int8.onnx"))
    proto.metadata_props.add(key="sparsity", value="0.98")
    onnx.save(proto, str(tmp_path / "with_meta.onnx"))
    compact_file(tmp_path / "with_meta.onnx", tmp_path / "c.onnx")
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "c.onnx")).metadata_props}["sparsity"] == "0.98"
    with torch.no_grad():
        a = load_onnx(d / "int8.onnx")(torch.from_numpy(x[:4]))
        b = load_onnx(tmp_path / "c.onnx")(torch.from_numpy(x[:4]))
    assert torch.equal(a, b)  # the audit reads the shipped file through the same converter


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 900), st.integers(-128, 127)), max_size=40), st.integers(1, 1200))
def test_delta_encoding_round_trips(entries, n):
    flat = np.zeros(n, np.int8)
    for pos, v in entries:
        if pos < n:
            flat[pos] = v
    gaps, values = delta_encode(flat)
    assert gaps.dtype == np.uint8 and values.dtype == np.int8
    assert np.array_equal(delta_decode(gaps, values, n), flat)
    positions = np.cumsum(gaps.astype(np.int64))
    assert len(np.unique(positions)) == len(positions)  # ScatterElements needs distinct indices


def test_long_gaps_and_all_zero_tensors_survive_onnxruntime(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((4, 300), np.int8)
    w[0, 0], w[3, 299], w[1, 7] = 5, -3, 127  # gaps of 0, 7 and > 255 (escapes)
    z = np.zeros((4, 300), np.int8)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["z"], ["zf"], to=TensorProto.FLOAT), helper.make_node("Add", ["wf", "zf"], ["out"])],
        "g", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 300])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(z, "z")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    stats = compact_model(proto)
    assert stats.tensors == 2
    assert not any(i.name in ("w", "z") for i in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(out, w.astype(np.float32))


def test_old_opset_and_unreadable_files_are_refused(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros(1000, np.int8)
    w[3] = 1
    graph = helper.make_graph([helper.make_node("Cast", ["w"], ["out"], to=TensorProto.FLOAT)], "g", [],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1000])],
                              [numpy_helper.from_array(w, "w")])
    with pytest.raises(HydraPipeError, match="opset"):
        compact_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    with pytest.raises(HydraPipeError, match="bad.onnx"):
        compact_file(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_archives_decompress_to_the_file(int8_model, tmp_path):
    d, _ = int8_model
    n = archive(d / "int8.onnx", tmp_path / "m.onnx.xz")
    assert n == (tmp_path / "m.onnx.xz").stat().st_size < (d / "int8.onnx").stat().st_size / 5
    assert lzma.decompress((tmp_path / "m.onnx.xz").read_bytes()) == (d / "int8.onnx").read_bytes()
    archive(d / "int8.onnx", tmp_path / "m.zip", "zip")
    with zipfile.ZipFile(tmp_path / "m.zip") as z:
        assert z.read("int8.onnx") == (d / "int8.onnx").read_bytes()
