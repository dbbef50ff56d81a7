"""``hydra-pipe info MODEL.onnx``: what any ONNX model is (inputs, outputs, opset imports, producer), then what its
metadata says, read through :class:`pipeline.metadata.ModelMetadata` (a malformed value of a known key is one line;
keys of other tools are shown as they are). Registered on the app by :mod:`stages.cli`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import HydraPipeError


def info(model: Annotated[Path, typer.Argument(help="an ONNX model, e.g. deploy/model.onnx")]) -> None:
    """Print what any ONNX model is (inputs, outputs, opset imports, producer), then what it carries in its
    metadata (for ours: preprocessing, labels, sparsity, bit width, audit figures and settings, provenance)."""
    from onnx import TensorProto, helper
    from rich.markup import escape
    from rich.table import Table

    from pipeline.metadata import ModelMetadata
    from pipeline.onnx_io import read_proto
    from pipeline.reporting import show

    if not model.is_file():
        raise HydraPipeError(f"{model}: model file not found")
    proto = read_proto(model)
    meta = ModelMetadata.from_onnx_props({p.key: p.value for p in proto.metadata_props}, model)

    def type_of(value) -> str:  # "float32 [batch, 1, 8, 8]"; a sequence / map / optional by its kind
        t = value.type
        if t.WhichOneof("value") != "tensor_type":
            return t.WhichOneof("value") or "unknown type"
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type))
        except (KeyError, ValueError, TypeError):
            dtype = TensorProto.DataType.Name(t.tensor_type.elem_type).lower()
        if not t.tensor_type.HasField("shape"):
            return f"{dtype}, shape not declared"
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.tensor_type.shape.dim]
        return f"{dtype} [{', '.join(dims)}]"

    def rows(table: Table, *pairs: tuple[str, str]) -> None:  # as text: "[batch, 1, 8, 8]" is no markup
        for key, value in pairs:
            table.add_row(escape(key), escape(value))

    graph = Table(title=escape(f"{model} ({model.stat().st_size:,} bytes)"))
    graph.add_column("graph")
    graph.add_column("value")
    weights = {i.name for i in proto.graph.initializer}  # old IR versions list initializers as inputs too
    rows(graph, *((f"input {i.name}", type_of(i)) for i in proto.graph.input if i.name not in weights),
         *((f"output {o.name}", type_of(o)) for o in proto.graph.output),
         ("opset imports", ", ".join(f"{imp.domain or 'ai.onnx'} {imp.version}" for imp in proto.opset_import)),
         ("producer", f"{proto.producer_name} {proto.producer_version}".strip() or "(not named)"),
         ("ir version", str(proto.ir_version)))
    show(graph)

    table = Table(title="metadata")
    table.add_column("key")
    table.add_column("value")
    entries = _metadata_rows(meta)
    if not entries:
        rows(table, ("(no metadata)", "this model was not exported by hydra-pipe"))
    rows(table, *entries)
    show(table)


def _metadata_rows(meta) -> list[tuple[str, str]]:
    """(key, value) rows of ``meta`` (a :class:`ModelMetadata`): its fields in the schema's order, a mapping one
    row per entry (``audit.clean_accuracy``), then the keys the schema does not know (JSON decoded where it is)."""
    typed = {k: v for k, v in meta.model_dump(exclude={"other"}).items() if v is not None}
    if "input_shape" in typed:
        typed["input_shape"] = " x ".join(map(str, typed["input_shape"]))
    for key, raw in meta.other.items():
        try:
            typed[key] = json.loads(raw)
        except ValueError:
            typed[key] = raw
    entries = []
    for key, value in typed.items():
        if isinstance(value, dict):  # per-layer figures and the audit: one row each
            entries += [(f"{key}.{sub}", _fmt(v)) for sub, v in value.items()]
        else:
            entries.append((key, _fmt(value)))
    return entries


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)
