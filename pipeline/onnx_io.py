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
                metadata: dict[str, str] | None = None, opset: int = 17) -> None:
    """Export ``model`` (inputs in [0, 1], shape ``(C, H, W)``) to ONNX: input ``input``, output ``logits``.

    Eval mode, dynamic batch, TorchScript exporter (``dynamo=False``) at ``opset``; masked layers are exported as
    plain Conv / Gemm with the folded weight. The file passes ``onnx.checker`` and is written atomically.
    """
    import io

    import onnx

    path = Path(path)
    folded = plain_copy(model).eval()
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


def read_proto(path: Path):
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
    proto = read_proto(path)
    _set_props(proto, metadata)
    atomic_write_bytes(Path(path), proto.SerializeToString())


def read_metadata(path: Path) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in read_proto(path).metadata_props}


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


@torch.no_grad()
def torch_logits(model: nn.Module, x, batch_size: int = 512):
    """Logits of ``model`` on a numpy batch, as numpy (for parity checks against onnxruntime)."""
    model.eval()
    dev = device_of(model)
    outs = [model(torch.from_numpy(x[i:i + batch_size]).to(dev)).cpu().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)
