"""The ONNX metadata of a shipped model (README "Contracts", 2): one typed schema and its string form.

ONNX ``metadata_props`` holds strings only. :class:`ModelMetadata` says what each key means and how its value is
written: text as is, integers and numbers as decimals, ``input_shape`` as ``CxHxW``, lists and mappings as JSON.
The export writes through it and the model card and ``hydra-pipe info`` read through it, so the three cannot
drift apart. Every field is optional (a model exported by another tool carries none of them, or some), keys the
schema does not know are kept as written (:attr:`ModelMetadata.other`), and a value of the wrong form is one line
naming the key and the form expected.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import HydraPipeError

Figure = Optional[Union[int, float, str]]


class ModelMetadata(BaseModel):
    """What a model exported by hydra-pipe says about itself in its ONNX metadata (each key is a field's name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # said first: the export's floor (export.floor) was not met, the model shipped anyway (export.below_floor: warn)
    warning: Optional[str] = Field(None, description="why this model should not be trusted as is (an audited "
                                                    "figure below the export's floor)")
    # what it is
    arch: Optional[str] = Field(None, description="architecture name (pipeline.models), e.g. cnn_small")
    dataset: Optional[str] = Field(None, description="dataset name (pipeline.data), e.g. digits")
    classes: Optional[int] = Field(None, ge=1, description="number of classes: the logits' width")
    # how to feed it, how to read it
    input_shape: Optional[tuple[int, int, int]] = Field(None, description="one input's C x H x W, written CxHxW")
    bits: Optional[int] = Field(None, ge=1, description="bit width of the weights (8: int8)")
    weight_range: Optional[int] = Field(None, ge=0, description="largest int8 weight magnitude: 64 (7 bits, "
                                                               "onnxruntime's reduce_range) computes exactly on every "
                                                               "CPU, beyond it x86 CPUs without VNNI can saturate")
    labels: Optional[list[str]] = Field(None, description="class index -> name")
    input_range: Optional[tuple[float, float]] = Field(None, description="[low, high] of the input values the "
                                                                         "threat model is defined on")
    preprocessing: Optional[str] = Field(None, description="how a raw image becomes one input")
    # how it was compressed
    sparsity: Optional[float] = Field(None, ge=0.0, le=1.0, description="fraction of weights pruned")
    sparsity_per_layer: Optional[dict[str, float]] = Field(None, description="layer -> fraction of weights pruned")
    granularity: Optional[Literal["weight", "filter"]] = Field(None, description="what pruning removed")
    channels_per_layer: Optional[dict[str, str]] = Field(None, description="layer -> 'kept/channels'")
    encoding: Optional[str] = Field(None, description="compact storage of the int8 weights (pipeline.compression)")
    # what the audit found
    verified_method: Optional[str] = Field(None, description="the verifiers whose proofs make verified_accuracy")
    audit: Optional[dict[str, Figure]] = Field(None, description="the audit's headline figures and settings")
    smoothing: Optional[dict[str, Any]] = Field(None, description="randomized smoothing's certificates")
    # provenance
    prune_method: Optional[str] = Field(None, description="prune.method")
    prune_rates: Optional[str] = Field(None, description="prune.rates: how the kept weights were split across layers "
                                                          "(uniform, global or learned)")
    pretrain_objective: Optional[str] = Field(None, description="pretrain.objective")
    prune_objective: Optional[str] = Field(None, description="prune.objective")
    finetune_objective: Optional[str] = Field(None, description="finetune.objective")
    params_hash: Optional[str] = Field(None, description="hash of the params that made the model")
    data_hash: Optional[str] = Field(None, description="hash of the data params (the split)")

    other: dict[str, str] = Field(default_factory=dict, description="keys this schema does not know, as written")

    def to_onnx_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries: the set fields in the schema's order, then :attr:`other`."""
        props = {}
        for key in _keys():
            value = getattr(self, key)
            if value is None:
                continue
            if key == "input_shape":
                props[key] = "x".join(str(d) for d in value)
            elif isinstance(value, str):
                props[key] = value
            else:  # numbers as JSON writes them (the shortest decimal that reads back the same), the rest as JSON
                props[key] = json.dumps(self.model_dump(mode="json", include={key})[key])
        return {**props, **{k: v for k, v in self.other.items() if k not in props}}

    @classmethod
    def from_onnx_props(cls, props: dict[str, str], source: str | Path | None = None) -> ModelMetadata:
        """Read ``metadata_props`` (as a dict); a known key whose value has the wrong form is one line naming
        ``source`` (the file), the key and the form expected."""
        known = set(_keys())
        values: dict[str, Any] = {"other": {k: v for k, v in props.items() if k not in known}}
        for key in known & set(props):
            raw = props[key]
            if key == "input_shape":
                values[key] = raw.split("x")
            elif _is_json(key):
                try:
                    values[key] = json.loads(raw)
                except ValueError:
                    raise _malformed(source, key, raw) from None
            else:
                values[key] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            key = str(e.errors()[0]["loc"][0])
            raise _malformed(source, key, props[key]) from None

    def require(self, *keys: str, source: str | Path | None = None) -> None:
        """One line naming the keys among ``keys`` the metadata lacks (what a consumer cannot do without)."""
        missing = [k for k in keys if getattr(self, k) is None]
        if missing:
            where = f"{source}: " if source is not None else ""
            raise HydraPipeError(f"{where}ONNX metadata lacks {', '.join(missing)} (not exported by hydra-pipe?)")


def _keys() -> list[str]:
    return [k for k in ModelMetadata.model_fields if k != "other"]


def _bare(annotation):
    """``Optional[X]`` -> ``X``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_json(key: str) -> bool:
    return typing.get_origin(_bare(ModelMetadata.model_fields[key].annotation)) in (list, tuple, dict)


_NAMES = {str: "text", int: "an integer", float: "a number"}
_PLURAL = {str: "strings", int: "integers", float: "numbers"}


def expected_form(key: str) -> str:
    """How the value of metadata key ``key`` is written, for people: "a number in [0, 1]", "a JSON list of
    strings", ..."""
    field = ModelMetadata.model_fields[key]
    t = _bare(field.annotation)
    origin, args = typing.get_origin(t), typing.get_args(t)
    if key == "input_shape":
        return "C x H x W as CxHxW, e.g. 1x8x8"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a JSON list of {_PLURAL.get(args[0], 'values')}"
    if origin is tuple:
        return f"a JSON list of {len(args)} {_PLURAL.get(args[0], 'values')}"
    if origin is dict:
        return f"a JSON object of {_PLURAL.get(args[1], 'values')}" if args[1] in _PLURAL else "a JSON object"
    bounds = {type(m).__name__: m for m in field.metadata}
    if "Ge" in bounds and "Le" in bounds:
        return f"{_NAMES[t]} in [{bounds['Ge'].ge:g}, {bounds['Le'].le:g}]"
    if "Ge" in bounds:
        return f"{_NAMES[t]} >= {bounds['Ge'].ge:g}"
    return _NAMES.get(t, str(t))


def _malformed(source: str | Path | None, key: str, raw: str) -> HydraPipeError:
    shown = raw if len(raw) <= 60 else raw[:57] + "..."
    where = f"{source}: " if source is not None else ""
    return HydraPipeError(f"{where}ONNX metadata {key}: expected {expected_form(key)}, got {' '.join(shown.split())!r}")
