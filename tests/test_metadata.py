"""The ONNX metadata schema (README "Contracts", 2): what export writes reads back the same, another tool's keys are
kept, and a value of the wrong form is one line naming the key and the form expected."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import HydraPipeError
from pipeline.metadata import ModelMetadata, expected_form

SHIPPED = ModelMetadata(
    warning="below the export floor: clean 22.5% < 50.0%", arch="cnn_small", dataset="digits", classes=10, input_shape=(1, 8, 8), bits=8, weight_range=64, labels=[str(i) for i in range(10)],
    input_range=(0.0, 1.0), preprocessing="divided by 16 into [0, 1]", sparsity=0.900123,
    sparsity_per_layer={"1": 0.85, "4": 0.95}, granularity="weight", channels_per_layer={"1": "8/8"},
    encoding="delta", verified_method="ibp+crown", audit={"n": 450, "eps": 0.05, "norm": "linf", "clean_accuracy": 0.97,
                                                          "bab_verified_accuracy": None},
    smoothing={"sigma": 0.25, "certified_accuracy": {"0.0": 0.9, "0.25": 0.5}}, prune_method="hydra", prune_rates="learned",
    pretrain_objective="pgd", prune_objective="pgd", finetune_objective="pgd", params_hash="abc", data_hash="def")


def test_every_field_round_trips_through_the_string_props():
    props = SHIPPED.to_onnx_props()
    assert all(isinstance(v, str) for v in props.values())
    assert set(props) == {k for k in ModelMetadata.model_fields if k != "other"}
    assert ModelMetadata.from_onnx_props(props) == SHIPPED
    # the forms other tools read: plain numbers, CxHxW, JSON
    assert props["classes"] == "10" and props["bits"] == "8" and props["sparsity"] == "0.900123"
    assert props["input_shape"] == "1x8x8" and props["granularity"] == "weight"
    assert json.loads(props["labels"]) == SHIPPED.labels and json.loads(props["input_range"]) == [0.0, 1.0]
    assert json.loads(props["audit"])["bab_verified_accuracy"] is None
    assert isinstance(ModelMetadata.from_onnx_props(props).audit["n"], int)


def test_another_tools_keys_are_kept_and_a_model_without_metadata_reads_as_empty():
    meta = ModelMetadata.from_onnx_props({"sparsity": "0.5", "author": "someone", "labels_url": "http://x"})
    assert meta.sparsity == 0.5 and meta.other == {"author": "someone", "labels_url": "http://x"}
    assert meta.to_onnx_props() == {"sparsity": "0.5", "author": "someone", "labels_url": "http://x"}
    empty = ModelMetadata.from_onnx_props({})
    assert empty == ModelMetadata() and empty.to_onnx_props() == {}


@pytest.mark.parametrize("key, raw, form", [
    ("sparsity", "high", "a number in [0, 1]"), ("sparsity", "1.5", "a number in [0, 1]"),
    ("classes", "ten", "an integer >= 1"), ("bits", "8.5", "an integer >= 1"),
    ("labels", "cat, dog", "a JSON list of strings"), ("labels", "[0, 1]", "a JSON list of strings"),
    ("input_range", "[0]", "a JSON list of 2 numbers"), ("input_shape", "8x8", "CxHxW"),
    ("granularity", "channel", "one of weight, filter"), ("sparsity_per_layer", '{"1": "most"}', "a JSON object"),
])
def test_a_malformed_value_is_one_line_naming_the_key_and_the_form(key, raw, form):
    with pytest.raises(HydraPipeError) as e:
        ModelMetadata.from_onnx_props({**SHIPPED.to_onnx_props(), key: raw}, source="deploy/model.onnx")
    line = str(e.value)
    assert "\n" not in line and line.startswith("deploy/model.onnx: ") and f"metadata {key}:" in line
    assert form in line and repr(raw) in line
    assert form in expected_form(key)


def test_a_consumer_names_the_keys_it_lacks():
    ModelMetadata.from_onnx_props(SHIPPED.to_onnx_props()).require("arch", "labels")
    with pytest.raises(HydraPipeError, match="lacks labels, params_hash"):
        ModelMetadata(arch="x").require("arch", "labels", "params_hash", source="m.onnx")
