"""Filter pruning (HYDRA filter scores, LWM by L1 norm) and the physical removal of pruned channels."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import FinetuneParams, PruneParams
from pipeline.data import DatasetInfo
from pipeline.errors import HydraPipeError
from pipeline.masking import masked_layers
from pipeline.models import build_model
from pipeline.pruning import prune
from pipeline.channels import channel_groups, channel_report, dead_channels, narrow, prunable_groups
from pipeline.structured import channel_keep, filter_norms
from pipeline.training import train

DIGITS = DatasetInfo(1, 8, 10, (0.3,), (0.4,))
CIFAR = DatasetInfo(3, 8, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # CIFAR-like, small side to stay fast


def model_with_live_bn(arch, info, seed=0):
    """A fresh model whose BatchNorms have non-trivial statistics, so a pruned channel's BN(0) is not 0."""
    torch.manual_seed(seed)
    model = build_model(arch, info)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return model


def toy_data(info, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, info.channels, info.size, info.size, generator=g),
                         torch.randint(0, info.classes, (n,), generator=g))


def quick(method, keep=0.5, **kw):
    return PruneParams(method=method, granularity="filter", keep_ratio=keep, epochs=1, batch_size=8,
                       attack_steps=1, **kw)


def test_groups_follow_the_architecture():
    vgg = build_model("vgg16_bn", CIFAR)
    groups = channel_groups(vgg)
    # 13 convolutions and the 2 hidden Linear layers; the classifier's outputs are the logits
    assert len(groups) == 15
    assert groups[0].batchnorms and groups[0].consumers[0].per_channel == 1
    res = build_model("resnet18", CIFAR)
    producers = [g.producer for g in channel_groups(res)]
    # only the inner channel of each basic block: conv2 and shortcuts feed a residual sum
    assert producers and all(p.endswith("conv1") for p in producers)
    assert len(producers) == 8
    small = build_model("cnn_small", DIGITS)
    flat = [g for g in channel_groups(small) if g.producer == "3"][0]
    assert flat.consumers[0].per_channel == 4  # 32 channels of 2x2 flattened into the first Linear


@pytest.mark.parametrize("arch,info", [("cnn_small", DIGITS), ("vgg16_bn", CIFAR), ("resnet18", CIFAR)])
@pytest.mark.parametrize("method", ["lwm", "hydra"])
def test_narrowed_network_equals_masked_network(arch, info, method):
    torch.set_num_threads(1)
    model = model_with_live_bn(arch, info)
    prune(model, toy_data(info), quick(method))
    model.eval()
    slim = narrow(model)
    x = torch.rand(6, info.channels, info.size, info.size)
    with torch.no_grad():
        assert torch.allclose(slim(x), model(x), atol=1e-5, rtol=1e-5)
    for name, rep in channel_report(model).items():
        assert rep["kept"] == -(-rep["channels"] // 2), name  # ceil(50%) of every group's channels survive
    before = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))
    after = sum(p.numel() for n, p in slim.named_parameters() if not n.endswith("scores"))
    assert after < 0.75 * before
    assert channel_groups(slim) and all(not dead_channels(slim, g).any() for g in channel_groups(slim))


def test_pruned_channels_are_zero_not_batchnorm_constants():
    """Zeroing a filter leaves BN's shift; the pruned channel must be exactly 0 so removing it changes nothing."""
    model = model_with_live_bn("vgg16_bn", CIFAR)
    prune(model, toy_data(CIFAR), quick("lwm"))
    seen = {}
    bn = model.get_submodule(channel_groups(model)[0].batchnorms[0])
    bn.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    model.eval()(torch.rand(2, 3, 8, 8))
    keep = channel_keep(model, prunable_groups(model))[0]
    assert (~keep).sum() == 32
    assert torch.count_nonzero(seen["out"][:, ~keep]) == 0
    assert torch.count_nonzero(seen["out"][:, keep]) > 0


def test_lwm_keeps_the_filters_of_largest_l1_norm():
    model = build_model("cnn_small", DIGITS)
    norms = {g.producer: filter_norms(model.get_submodule(g.producer)) for g in channel_groups(model)}
    prune(model, toy_data(DIGITS), quick("lwm", keep=0.25))
    for g, keep in zip(prunable_groups(model), channel_keep(model, prunable_groups(model))):
        n = norms[g.producer]
        assert int(keep.sum()) == -(-len(n) // 4)
        assert n[keep].min() >= n[~keep].max()


def test_hydra_filter_scores_train_and_leave_weights_alone():
    model = model_with_live_bn("vgg16_bn", CIFAR)
    norms = [filter_norms(model.get_submodule(g.producer)) for g in channel_groups(model)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() > 1}
    prune(model, toy_data(CIFAR, n=32), quick("hydra", keep=0.5, lr=0.05, objective="benign").model_copy(
        update={"epochs": 2}))
    moved = 0
    for n, keep in zip(norms, channel_keep(model, prunable_groups(model))):
        l1 = torch.zeros_like(keep)
        l1[n.topk(int(keep.sum())).indices] = True
        moved += int((l1 != keep).sum())
    assert moved > 0  # scaled init starts at the L1 mask; the loss moved it
    for k, v in model.state_dict().items():
        if k in weights:
            layer = model.get_submodule(k.rsplit(".", 1)[0])
            assert torch.equal(v, weights[k]), k  # the weights themselves never train during pruning
            assert layer.mode == "fixed"
    for _, layer in masked_layers(model):
        assert not layer.scores.requires_grad and layer.scores.shape == layer.weight.shape


def test_dead_channels_stay_dead_through_finetuning_and_checkpoint(tmp_path):
    model = model_with_live_bn("vgg16_bn", CIFAR)
    data = toy_data(CIFAR)
    prune(model, data, quick("lwm"))
    train(model, data, FinetuneParams(epochs=1, batch_size=8, attack_steps=1, lr=0.05))
    save_checkpoint(model, tmp_path / "m.safetensors", "vgg16_bn", CIFAR, "test")
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    loaded.eval()
    report = channel_report(loaded)
    assert all(r["kept"] == r["channels"] // 2 for r in report.values())
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(narrow(loaded)(x), loaded(x), atol=1e-5, rtol=1e-5)


def test_narrow_leaves_live_channels_and_the_original_alone():
    model = model_with_live_bn("resnet18", CIFAR)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    slim = narrow(model)
    assert sum(p.numel() for p in slim.parameters()) == sum(p.numel() for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_a_zero_filter_with_a_live_bias_is_not_removed():
    """Removing a channel that carries a non-zero constant would change the function: narrow must keep it."""
    model = build_model("cnn_small", DIGITS).eval()
    conv = model.get_submodule("1")
    with torch.no_grad():
        conv.weight[:3] = 0
        conv.bias[:3] = torch.tensor([0.5, -0.5, 0.0])  # relu(0.5) > 0 stays; relu(-0.5) = 0 and 0 go
    g = [g for g in channel_groups(model) if g.producer == "1"][0]
    assert dead_channels(model, g)[:3].tolist() == [False, True, True]
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(narrow(model)(x), model(x), atol=1e-6)
    assert narrow(model).get_submodule("1").out_channels == 14


def test_architecture_without_removable_channels_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(HydraPipeError, match="no removable channels"):
        prunable_groups(model)


def test_filter_pipeline_ships_a_narrower_compact_graph(tmp_path, monkeypatch):
    """prune.granularity: filter through the stages: the int8 graph is narrower, the shipped file compact and
    identical in logits to the audited one, and `hydra-pipe info` prints the carried figures."""
    import importlib
    import json

    import onnx
    import yaml
    from onnx import numpy_helper
    from typer.testing import CliRunner

    from stages.cli import app

    tiny = {"pretrain": {"epochs": 1, "objective": "benign"},
            "prune": {"granularity": "filter", "method": "lwm", "keep_ratio": 0.5},
            "finetune": {"epochs": 1, "attack_steps": 1},
            "quantize": {"calibration_size": 32},
            "audit": {"steps": 2, "restarts": 1, "n_examples": 8, "crown": False, "square_queries": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny))
    monkeypatch.chdir(tmp_path)
    for stage in ("pretrain", "prune", "finetune", "quantize", "audit", "export"):
        importlib.import_module(f"stages.{stage}").run("params.yaml")
    weights = {i.name: numpy_helper.to_array(i).shape for i in onnx.load("models/quantized.onnx").graph.initializer
               if i.data_type == onnx.TensorProto.INT8}
    assert sorted(s[0] for s in weights.values() if len(s) == 4) == [8, 16]  # conv filters 16 -> 8, 32 -> 16
    meta = {p.key: p.value for p in onnx.load("deploy/model.onnx").metadata_props}
    assert meta["granularity"] == "filter" and meta["encoding"] == "delta" and meta["verified_method"] == "ibp+alpha-crown+bab"
    assert json.loads(meta["channels_per_layer"])["1"] == "8/16"
    assert json.loads(meta["audit"])["steps"] == 2
    assert (tmp_path / "deploy/model.onnx.xz").stat().st_size < (tmp_path / "deploy/model.onnx").stat().st_size
    assert "channels kept" in (tmp_path / "deploy/MODEL_CARD.md").read_text()
    out = CliRunner().invoke(app, ["info", "deploy/model.onnx"], terminal_width=200)
    assert out.exit_code == 0 and "channels_per_layer.1" in out.output and "8/16" in out.output
    bad = CliRunner().invoke(app, ["info", "params.yaml"])
    assert bad.exit_code == 2 and "params.yaml" in bad.output
