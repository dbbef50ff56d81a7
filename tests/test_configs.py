"""The paper's setups as ready params files: each is a complete, valid params file with the paper's threat model
and pruning ratio, and its network builds at its data set's input size."""

from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.data import DatasetInfo
from pipeline.models import build_model

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
INPUT = {"cifar10": (3, 32, 10), "svhn": (3, 32, 10), "imagefolder": (3, 224, 1000)}
EPS = {"pgd": 8 / 255, "crown-ibp": 2 / 255}


def test_every_paper_setup_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {"cifar10_vgg16_bn_pgd", "cifar10_wrn_28_4_pgd", "svhn_vgg16_bn_pgd", "svhn_wrn_28_4_pgd",
            "imagenet_resnet50_pgd", "cifar10_cnn_large_crown_ibp"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_a_complete_valid_params_file_with_the_papers_setup(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    p = load_params(path)
    assert set(raw) == set(p.model_dump())  # complete: DVC needs every listed param in the file
    assert p.prune.keep_ratio == 0.01 and p.prune.method == "hydra" and p.prune.score_init == "scaled"
    eps = 4 / 255 if p.model.arch == "resnet50" else EPS[p.pretrain.objective]
    for stage in (p.pretrain, p.prune, p.finetune):
        assert stage.eps == pytest.approx(eps) and stage.objective == p.pretrain.objective
    assert p.audit.eps == pytest.approx(eps)
    if p.pretrain.objective == "pgd" and p.model.arch != "resnet50":
        assert p.pretrain.attack_steps == 10 and p.pretrain.step_size == pytest.approx(2 / 255)
        assert p.pretrain.epochs == 100
    c, size, classes = INPUT[p.data.name]
    info = DatasetInfo(c, p.data.image_size or size, classes, (0.5,) * c, (0.25,) * c)
    assert build_model(p.model.arch, info) is not None
