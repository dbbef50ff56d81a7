"""Compact storage of a pruned (int8) ONNX model that any plain ``onnxruntime.InferenceSession`` loads as is.

A dense ONNX file stores every pruned weight as an explicit zero, so 99% sparsity saves nothing on disk. Two
encodings of a weight initializer ``W`` (shape ``S``, ``N`` entries) are offered; both are standard ONNX, pass
``onnx.checker`` and rebuild *exactly* the same tensor, so the graph gives exactly the dense graph's logits:

- ``delta`` (the default, smallest): the non-zero entries in row-major order as two byte arrays, ``gaps`` (uint8,
  distance from the previous non-zero; the first is the position itself) and ``values`` (the tensor's own dtype,
  int8 weights staying int8). A gap longer than 255 is split by inserting explicit zeros (gap 255, value 0),
  which costs ~``exp(-255 / mean gap)`` extra entries. The dense tensor is rebuilt by five standard ops::

      positions = CumSum(Cast(gaps, int64));  flat = ScatterElements(ConstantOfShape([N], 0), positions, values)
      W = Reshape(flat, S)

  All their inputs are initializers, so onnxruntime's constant folding (on at its default optimisation level)
  evaluates them once when the session is created: ``W`` becomes an initializer again *before* the QDQ fusions
  run, so the int8 kernels and the inference latency are those of the dense file. About 2 bytes per non-zero.
- ``sparse_initializer``: ONNX's own ``SparseTensorProto`` (values + int64 linear indices, 9 bytes per non-zero
  for int8), densified by onnxruntime at load. It passes ``onnx.checker`` but not its strict shape inference
  (``full_check``), which rejects a sparse tensor feeding DequantizeLinear; int32 indices fail the checker outright.

A tensor is encoded only when that is smaller than storing it densely. :func:`archive` compresses the file for
distribution (xz / LZMA, in the standard library).
"""

from __future__ import annotations

import lzma
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import HydraPipeError
from pipeline.reporting import atomic_write_bytes

Encoding = Literal["delta", "sparse_initializer"]
ENCODINGS: tuple[str, ...] = ("delta", "sparse_initializer")
_MAX_GAP = 255  # gaps are stored as uint8
_OPSET_NEEDED = 16  # ScatterElements-16, CumSum-14, Reshape-14


@dataclass(frozen=True)
class CompactStats:
    """What :func:`compact_model` did: tensors encoded and bytes of their dense vs encoded storage."""

    encoding: str
    tensors: int
    dense_bytes: int
    encoded_bytes: int


def delta_encode(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(gaps uint8, values)`` of a 1-D array: non-zeros in order, gaps between positions, long gaps split."""
    pos = np.flatnonzero(flat)
    if len(pos) == 0:
        return np.zeros(0, np.uint8), np.zeros(0, flat.dtype)
    gaps = np.diff(pos, prepend=0)  # first gap = first position (it may be 0); later gaps >= 1
    # a gap g > 255 becomes ceil(g / 255) - 1 explicit zeros at distance 255 and a last gap in [1, 255]
    extra = np.maximum((gaps - 1) // _MAX_GAP, 0)
    total = len(pos) + int(extra.sum())
    out_gaps = np.full(total, _MAX_GAP, dtype=np.int64)
    out_vals = np.zeros(total, dtype=flat.dtype)
    real = np.arange(len(pos)) + np.cumsum(extra)  # where each real entry lands after its escapes
    out_gaps[real] = gaps - extra * _MAX_GAP
    out_vals[real] = flat[pos]
    return out_gaps.astype(np.uint8), out_vals


def delta_decode(gaps: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`delta_encode` (what the ONNX subgraph computes)."""
    flat = np.zeros(n, dtype=values.dtype)
    flat[np.cumsum(gaps.astype(np.int64))] = values
    return flat


def _delta_nodes(name: str, array: np.ndarray, prefix: str):
    """Initializers and nodes that compute the tensor ``name`` (= ``array``) from its delta encoding."""
    from onnx import TensorProto, helper, numpy_helper

    gaps, values = delta_encode(array.ravel())
    p = f"{prefix}{name}"
    inits = [numpy_helper.from_array(np.asarray(array.shape, np.int64), f"{p}.shape")]
    zero = numpy_helper.from_array(np.zeros(1, array.dtype))
    if len(gaps) == 0:
        return inits, [helper.make_node("ConstantOfShape", [f"{p}.shape"], [name], value=zero, name=f"{p}.zeros")]
    inits += [numpy_helper.from_array(gaps, f"{p}.gaps"), numpy_helper.from_array(values, f"{p}.values"),
              numpy_helper.from_array(np.asarray([array.size], np.int64), f"{p}.size")]
    nodes = [
        helper.make_node("Cast", [f"{p}.gaps"], [f"{p}.gaps64"], to=TensorProto.INT64, name=f"{p}.cast"),
        helper.make_node("CumSum", [f"{p}.gaps64", f"{p}.axis"], [f"{p}.positions"], name=f"{p}.cumsum"),
        helper.make_node("ConstantOfShape", [f"{p}.size"], [f"{p}.zeros"], value=zero, name=f"{p}.zeros"),
        helper.make_node("ScatterElements", [f"{p}.zeros", f"{p}.positions", f"{p}.values"], [f"{p}.flat"], axis=0,
                         name=f"{p}.scatter"),
        helper.make_node("Reshape", [f"{p}.flat", f"{p}.shape"], [name], name=f"{p}.reshape"),
    ]
    inits.append(numpy_helper.from_array(np.asarray(0, np.int64), f"{p}.axis"))
    return inits, nodes


def _sparse_initializer(name: str, array: np.ndarray):
    from onnx import helper, numpy_helper

    flat = array.ravel()
    idx = np.flatnonzero(flat).astype(np.int64)
    return helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], name), numpy_helper.from_array(idx, ""),
                                     list(array.shape))


def _stored_bytes(array: np.ndarray, encoding: str) -> int:
    nnz = int(np.count_nonzero(array))
    if encoding == "sparse_initializer":
        return nnz * (array.itemsize + 8)
    gaps, _ = delta_encode(array.ravel())
    return len(gaps) * (1 + array.itemsize) + 64  # + shapes and the five nodes, roughly


def compact_model(proto, encoding: Encoding = "delta", min_elements: int = 64, prefix: str = "compact/"):
    """Re-encode every large, sparse weight initializer of ``proto`` (in place); returns :class:`CompactStats`.

    Only initializers of at least ``min_elements`` entries whose encoding is smaller than their dense storage
    are touched; graph inputs, outputs and every other node are unchanged.
    """
    from onnx import numpy_helper

    if encoding not in ENCODINGS:
        raise HydraPipeError(f"compression: unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    graph = proto.graph
    graph_inputs = {i.name for i in graph.input}
    new_inits, new_nodes, kept = [], [], []
    stats = {"tensors": 0, "dense": 0, "encoded": 0}
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if (init.name in graph_inputs or array.size < min_elements or array.dtype.kind not in "iuf"
                or _stored_bytes(array, encoding) >= array.nbytes):
            kept.append(init)
            continue
        stats["tensors"] += 1
        stats["dense"] += array.nbytes
        if encoding == "sparse_initializer":
            sparse = _sparse_initializer(init.name, array)
            graph.sparse_initializer.append(sparse)
            stats["encoded"] += sparse.ByteSize()
        else:
            inits, nodes = _delta_nodes(init.name, array, prefix)
            new_inits += inits
            new_nodes += nodes
            stats["encoded"] += sum(t.ByteSize() for t in inits) + sum(n.ByteSize() for n in nodes)
    if encoding == "delta" and new_nodes:
        _require_opset(proto, _OPSET_NEEDED)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    nodes = new_nodes + list(graph.node)  # the decoders first: the graph stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    return CompactStats(encoding, stats["tensors"], stats["dense"], stats["encoded"])


def _require_opset(proto, version: int) -> None:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if imp.version < version:
                raise HydraPipeError(f"compression: the delta encoding needs ONNX opset >= {version} "
                                     f"(ScatterElements-16), the model has {imp.version}; export with a newer opset "
                                     f"or use encoding 'sparse_initializer'")
            return


def compact_file(src: Path, dst: Path, encoding: Encoding = "delta", min_elements: int = 64) -> CompactStats:
    """Write the compact form of the ONNX model ``src`` to ``dst`` (atomically; ``dst`` may be ``src``).

    The result passes ``onnx.checker`` (with strict shape inference for ``delta``; without it for
    ``sparse_initializer``, see :func:`compact_file`'s comment); metadata, inputs and outputs are those of ``src``.
    """
    import onnx

    try:
        proto = onnx.load(str(src))
    except Exception as exc:
        raise HydraPipeError(f"{src}: cannot read an ONNX model ({type(exc).__name__}: {exc})") from None
    stats = compact_model(proto, encoding, min_elements)
    try:
        # onnx's strict shape inference types a sparse initializer as sparse_tensor(int8), which
        # DequantizeLinear's type constraint rejects, though onnxruntime densifies it at load
        onnx.checker.check_model(proto, full_check=encoding == "delta")
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise HydraPipeError(f"{src}: the compact encoding fails onnx.checker ({first})") from None
    atomic_write_bytes(Path(dst), proto.SerializeToString())
    return stats


def archive(path: Path, out: Path, fmt: Literal["xz", "zip"] = "xz") -> int:
    """Compress ``path`` for distribution (``xz``: LZMA preset 9e; ``zip``: deflate level 9); returns the bytes."""
    data = Path(path).read_bytes()
    if fmt == "xz":
        blob = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    elif fmt == "zip":
        import io

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            info = zipfile.ZipInfo(Path(path).name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible bytes
            z.writestr(info, data, zipfile.ZIP_DEFLATED, 9)
        blob = buf.getvalue()
    else:
        raise HydraPipeError(f"archive: unknown format {fmt!r}; expected xz or zip")
    atomic_write_bytes(Path(out), blob)
    return len(blob)
