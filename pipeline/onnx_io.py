"""ONNX files: export of our models, metadata, onnxruntime sessions (the deployed numerics).

Loading an ONNX file into the graph form that attacks and bounds run on is :mod:`pipeline.onnx_load`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import HydraPipeError
from pipeline.masking import plain_copy
from pipeline.reporting import atomic_write_bytes
from pipeline.runtime import device_of

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


# ----------------------------------------------------------------------------------------------------------------
# Export, metadata, onnxruntime
# ----------------------------------------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, int, int],
                metadata: dict[str, str] | None = None, opset: int = 17, dynamo: bool = False) -> None:
    """Export ``model`` (inputs in [0, 1], shape ``(C, H, W)``) to ONNX: input ``input``, output ``logits``.

    Eval mode, dynamic batch, at ``opset``, with the legacy TorchScript exporter (``dynamo=False``) or the one
    users get by default (``dynamo=True``: it folds BatchNormalization into the convolutions and writes global
    pooling as ReduceMean + Reshape, which :func:`pipeline.onnx_load.load_onnx` reads; its progress lines and
    warnings are kept off the output). Both give the same logits, int8 QDQ quantization and pruned zeros on every
    model family of the registry. Masked layers are exported as plain Conv / Gemm with the folded weight. The file
    passes ``onnx.checker`` and is written atomically.
    """
    # the pipeline's quantize stage exports with export.exporter (dynamo, opset 18, by default); this function's
    # default stays legacy for the many small exports of tests and benchmarks: dynamo takes 1.4 s warm / 5.4 s
    # cold per CNN-small export (legacy 0.04-0.3 s), and it writes opset 18 for networks with global pooling
    # (ResNet, WRN) when 17 is asked (hence ExportParams' check)
    import io

    import onnx

    path = Path(path)
    folded = plain_copy(model).eval()
    device = next((p.device for p in folded.parameters()), torch.device("cpu"))
    dummy = torch.zeros(1, *input_shape, device=device)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation, the dynamo one's opset notes
        if dynamo:
            with _quiet_dynamo():
                program = torch.onnx.export(folded, (dummy,), None, dynamo=True, opset_version=opset,
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
                                            dynamic_shapes=({0: torch.export.Dim("batch")},))
            proto = program.model_proto
            _strip_trace(proto)
        else:
            buf = io.BytesIO()
            torch.onnx.export(folded, (dummy,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            proto = onnx.load_from_string(buf.getvalue())
    _set_props(proto, metadata or {})
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())


def _strip_trace(proto) -> None:
    """Drop what the dynamo exporter notes per node for debugging (``metadata_props``: stack traces with this
    machine's file paths, FX node text, class hierarchies; ``doc_string``): a third of a small model's bytes, and
    bytes that differ between two checkouts of the same code, so the same weights would not give the same file."""
    for graph in [proto.graph, *(f for f in proto.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""


def _quiet_dynamo():
    """Silence the dynamo exporter while it runs: its progress lines (stdout), torch's and onnxscript's loggers
    (the opset conversion notes) and anything else it prints to stderr from Python."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet():
        loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                                        "onnx_ir", "torch._dynamo", "torch.fx")]
        levels = [lg.level for lg in loggers]
        sink = io.StringIO()
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)

    import io

    return quiet()


def _set_props(proto, metadata: dict[str, str]) -> None:
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({str(k): str(v) for k, v in metadata.items()})
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


MAX_MODEL_BYTES = 2 << 30
"""Largest ONNX model read, file and external data together: 2 GiB, protobuf's own limit for one message. A file
is measured before a byte of it is read, so a wrong path (a disk image, a dataset) fails at once with one line,
not after minutes of parsing or out of memory; a classifier this size is far beyond what the verifiers bound."""
MAX_GRAPH_NODES = 100_000
"""Most nodes a model may have, subgraphs and functions included (a torchvision ResNet-50 has ~120 before folding,
an int8 one ~500): a graph beyond it is refused in one line rather than converted node by node for minutes."""


def _count_nodes(proto) -> int:
    """Nodes of the main graph, its subgraphs (If / Loop / Scan bodies) and its local functions."""
    total, graphs = 0, [proto.graph, *proto.functions]
    while graphs:
        for node in graphs.pop().node:
            total += 1
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    return total


def _external_tensors(proto) -> list:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(proto) if uses_external_data(t)]


def _external_bytes(tensors: list, folder: Path) -> int:
    """Bytes the model's external data will read (declared lengths, else the files' sizes past their offsets).
    Where each file lies is onnx's loader to check (it refuses a location outside the model's folder)."""
    from onnx.external_data_helper import ExternalDataInfo

    total = 0
    for tensor in tensors:
        info = ExternalDataInfo(tensor)
        if info.length:
            total += int(info.length)
            continue
        try:
            total += max(0, (folder / info.location).stat().st_size - int(info.offset or 0))
        except OSError:
            pass  # missing: the loader says so
    return total


def read_proto(path: Path):
    """The ONNX model at ``path`` with its external data, within ``MAX_MODEL_BYTES`` and ``MAX_GRAPH_NODES``;
    every problem (unreadable, not ONNX, too large, external data outside the model's folder) is one line."""
    import onnx

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise HydraPipeError(f"{path}: cannot read an ONNX model ({exc.strerror or exc})") from None
    if not path.is_file():  # a folder, a FIFO, /dev/zero: nothing onnx.load should try to read to its end
        raise HydraPipeError(f"{path}: not a regular file")
    if size > MAX_MODEL_BYTES:
        raise HydraPipeError(f"{path}: {size:,} bytes, over the {MAX_MODEL_BYTES:,}-byte limit of a model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise HydraPipeError(f"{path}: cannot read an ONNX model ({type(exc).__name__}: {exc})") from None
    # protobuf happily parses many non-ONNX byte strings into an empty message
    if not proto.graph.node or not proto.graph.output:
        raise HydraPipeError(f"{path}: not an ONNX model (no graph nodes or outputs)")
    nodes = _count_nodes(proto)
    if nodes > MAX_GRAPH_NODES:
        raise HydraPipeError(f"{path}: {nodes:,} nodes, over the limit of {MAX_GRAPH_NODES:,}")
    tensors = _external_tensors(proto)
    if not tensors:
        return proto
    external = _external_bytes(tensors, path.parent)
    if size + external > MAX_MODEL_BYTES:
        raise HydraPipeError(f"{path}: {size + external:,} bytes with its external data, over the "
                             f"{MAX_MODEL_BYTES:,}-byte limit of a model")
    try:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:  # a location outside the folder (onnx refuses it), a missing or short file
        raise HydraPipeError(f"{path}: cannot read its external data ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())})") from None
    return proto


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add or overwrite ONNX ``metadata_props`` entries of the model at ``path`` (atomic rewrite)."""
    proto = read_proto(path)
    _set_props(proto, metadata)
    atomic_write_bytes(Path(path), proto.SerializeToString())


def used_opsets_only(proto) -> list[str]:
    """Drop the ``opset_import`` entries no node uses (in the graph, its subgraphs or local functions); returns the
    dropped domains. Quantizers import ``com.microsoft``, ``ai.onnx.ml``, ... whether or not they emit such nodes,
    and a consumer reads the imports as what its runtime must provide. The default domain always stays."""
    used = {"", "ai.onnx"}
    graphs = [proto.graph, *proto.functions]
    while graphs:
        for node in graphs.pop().node:
            used.add(node.domain)
            for attr in node.attribute:  # If / Loop / Scan bodies
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    dropped = [imp.domain for imp in proto.opset_import if imp.domain not in used]
    kept = [(imp.domain, imp.version) for imp in proto.opset_import if imp.domain in used]
    del proto.opset_import[:]
    for domain, version in kept:
        proto.opset_import.add(domain=domain, version=version)
    return dropped


def read_metadata(path: Path) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in read_proto(path).metadata_props}


CUDA_OPTIONS = {"use_tf32": "0"}
"""The CUDA execution provider's options: TF32 off. onnxruntime's CUDA provider computes float32 convolutions and
matrix products in TF32 by default on Ampere and later GPUs (10 bits of mantissa), so a confirmation run there would
not be the float32 arithmetic the audit's verdicts are about; the CPU provider has no such mode."""


def ort_session(path: Path, threads: int | None = None):
    """An onnxruntime session on ``path``: CUDA (TF32 off, :data:`CUDA_OPTIONS`) when onnxruntime has it, the CPU
    for what CUDA does not run and otherwise; ``threads`` intra-op threads.

    Its threads sleep between runs instead of spinning: the audit interleaves onnxruntime's confirmations with
    torch's attack steps, and a pool that keeps spinning after each run takes the cores torch's next step needs
    (measured on the digits network, 2 threads each: a torch forward plus a 3-row confirmation 4.3 ms spinning,
    1.0 ms sleeping).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers: list = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", dict(CUDA_OPTIONS)))
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:
        raise HydraPipeError(f"{path}: onnxruntime cannot load the model ({type(exc).__name__}: {exc})") from None


def ort_logits(session, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Run ``session`` on ``x`` in batches; the first output (the logits) as float32, N x classes.

    A model whose input declares a fixed batch (``torch.onnx.export`` without dynamic axes: often 1) runs in
    slices of exactly that batch, the last one padded with copies of its last row (their outputs dropped). An
    N x K x 1 x 1 output (a classifier ending in a convolution and a global pooling) comes back as N x K. A model
    ending in Softmax gives probabilities here: the audit compares them by argmax only, which Softmax keeps
    (see :mod:`pipeline.onnx_load`, which strips it from the graph form).
    """
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    x = np.ascontiguousarray(x, dtype=np.float32)
    if fixed is None:
        if len(x) == 0:
            return _class_rows(session.run(None, {inp.name: x})[0]).astype(np.float32)
        out = [session.run(None, {inp.name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    else:
        out = []
        for i in range(0, max(len(x), 1), fixed):
            part = x[i:i + fixed]
            filler = part[-1:] if len(part) else np.zeros((1, *x.shape[1:]), np.float32)
            padded = np.concatenate([part, np.repeat(filler, fixed - len(part), 0)]) if len(part) < fixed else part
            out.append(session.run(None, {inp.name: padded})[0][:len(part)])
    return _class_rows(np.concatenate(out)).astype(np.float32, copy=False)


def _class_rows(out: np.ndarray) -> np.ndarray:
    """N x K x 1 x 1 -> N x K; any other shape unchanged (the audit refuses what is not N x K)."""
    if out.ndim > 2 and all(s == 1 for s in out.shape[2:]):
        return out.reshape(out.shape[0], -1)
    return out


@torch.no_grad()
def torch_logits(model: nn.Module, x, batch_size: int = 512):
    """Logits of ``model`` on a numpy batch, as numpy (for parity checks against onnxruntime)."""
    model.eval()
    dev = device_of(model)
    outs = [model(torch.from_numpy(x[i:i + batch_size]).to(dev)).cpu().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)
