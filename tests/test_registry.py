"""One registry convention: every name the params choose is looked up the same way, and an unknown one is one
line that names the field and lists the choices."""

import pytest

from pipeline.config import DataParams, PruneParams
from pipeline.data import DATASETS, load_dataset
from pipeline.errors import HydraPipeError
from pipeline.models import MODELS, build_model
from pipeline.objectives import OBJECTIVES, get_objective
from pipeline.pruning import PRUNE_METHODS, prune
from pipeline.registry import Registry


@pytest.mark.parametrize("lookup, field, choice", [
    (lambda: load_dataset(DataParams.model_construct(**{**DataParams().model_dump(), "name": "mnist-typo"})),
     "data.name", "digits"),
    (lambda: build_model("resnet-typo", None), "model.arch", "cnn_small"),
    (lambda: get_objective("pgd-typo"), "objective", "crown-ibp"),
    (lambda: prune(None, None, PruneParams.model_construct(**{**PruneParams().model_dump(), "method": "hydra-typo"})),
     "prune.method", "lwm"),
])
def test_unknown_names_are_one_line_naming_the_field_and_the_choices(lookup, field, choice):
    with pytest.raises(HydraPipeError) as err:
        lookup()
    msg = str(err.value)
    assert msg.startswith(f"{field}: unknown") and choice in msg and "\n" not in msg


def test_registries_hold_what_the_params_schema_offers():
    assert {"digits", "cifar10", "svhn", "imagefolder"} <= set(DATASETS.names())
    assert {"cnn_small", "cnn_large", "vgg16_bn", "wrn_28_4", "resnet18"} <= set(MODELS.names())
    assert {"benign", "pgd", "trades", "ibp", "crown-ibp", "mixtrain", "smoothing"} <= set(OBJECTIVES.names())
    assert set(PRUNE_METHODS.names()) == {"hydra", "lwm", "random", "admm"}


def test_a_name_registers_once():
    reg: Registry = Registry("thing", "x.thing")

    @reg.register()
    def alpha():
        return 1

    assert reg.get("alpha")() == 1 and "alpha" in reg and reg.names() == ["alpha"]
    with pytest.raises(ValueError):
        reg.register("alpha")(lambda: 2)
