import json

import pytest
import torch

from pipeline.checkpoint import MASK_PREFIX, load_checkpoint, save_checkpoint
from pipeline.errors import HydraPipeError
from pipeline.masking import apply_fixed_masks, masked_layers
from pipeline.models import build_model


@pytest.fixture
def pruned(digits_info):
    torch.manual_seed(0)
    model = build_model("cnn_small", digits_info)
    layers = masked_layers(model)
    apply_fixed_masks(layers, [l.weight.abs() for _, l in layers], 0.1)
    return model


def test_round_trip_keeps_outputs_masks_and_zeros(tmp_path, pruned, digits_info):
    path = tmp_path / "m.safetensors"
    x = torch.rand(8, 1, 8, 8)
    expected = pruned.eval()(x)
    save_checkpoint(pruned, path, "cnn_small", digits_info, "abc", parent="p.safetensors")
    model, meta = load_checkpoint(path)
    assert torch.equal(model.eval()(x), expected)
    assert meta["params_hash"] == "abc" and meta["parent"] == "p.safetensors" and 0.89 < meta["sparsity"] < 0.91
    for (_, a), (_, b) in zip(masked_layers(pruned), masked_layers(model)):
        assert b.mode == "fixed" and torch.equal(a.weight_mask, b.weight_mask)
        assert torch.all(b.weight[b.weight_mask == 0] == 0)  # folded: zeros exactly where pruned


def test_standard_layers_load_the_folded_weights(tmp_path, pruned, digits_info):
    from safetensors.torch import load_file
    from torch import nn

    path = tmp_path / "m.safetensors"
    save_checkpoint(pruned, path, "cnn_small", digits_info, "abc")
    tensors = load_file(str(path))
    plain = nn.Linear(100, 10)
    plain.load_state_dict({"weight": tensors["8.weight"], "bias": tensors["8.bias"]})
    assert (plain.weight == 0).float().mean() == pytest.approx(0.9, abs=0.01)
    assert any(k.startswith(MASK_PREFIX) for k in tensors)


def test_no_temporary_files_left(tmp_path, pruned, digits_info):
    save_checkpoint(pruned, tmp_path / "m.safetensors", "cnn_small", digits_info, "abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_untrusted_checkpoints_are_refused_with_one_line(tmp_path, pruned, digits_info):
    path = tmp_path / "m.safetensors"
    save_checkpoint(pruned, path, "cnn_small", digits_info, "abc")
    path.write_bytes(b"\x80\x04pickle-bytes")
    with pytest.raises(HydraPipeError, match="not a safetensors checkpoint"):
        load_checkpoint(path)
    save_checkpoint(pruned, path, "cnn_small", digits_info, "abc")
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "arch": "cnn_large"}))
    with pytest.raises(HydraPipeError, match="do not match architecture"):
        load_checkpoint(path)
    path.with_suffix(".json").write_text("{")
    with pytest.raises(HydraPipeError, match="not valid JSON"):
        load_checkpoint(path)
