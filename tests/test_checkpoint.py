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


def test_a_missing_checkpoint_or_sidecar_says_which_file_in_plain_words(tmp_path, pruned, digits_info):
    path = tmp_path / "m.safetensors"
    with pytest.raises(HydraPipeError, match=r"m.safetensors: checkpoint not found$"):
        load_checkpoint(path)
    save_checkpoint(pruned, path, "cnn_small", digits_info, "abc")
    path.with_suffix(".json").unlink()
    with pytest.raises(HydraPipeError, match=r"m\.json not found: the JSON that describes the checkpoint .*"):
        load_checkpoint(path)


class _Planted:
    """Unpickling it creates the folder ``marker``: what a malicious "checkpoint" would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_a_planted_pickle_is_refused_with_one_line_and_never_executed(tmp_path, pruned, digits_info):
    import pickle

    from pipeline.checkpoint import read_state
    from pipeline.config import TrainParams
    from pipeline.training import STATE_FILE, train

    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Planted(live)))
    assert live.is_dir()  # the payload is live: unpickling it runs code
    marker = tmp_path / "executed"
    payload = pickle.dumps(_Planted(marker))

    path = tmp_path / "m.safetensors"
    save_checkpoint(pruned, path, "cnn_small", digits_info, "abc")
    path.write_bytes(payload)
    for sidecar_has_hash in (True, False):
        if not sidecar_has_hash:
            meta = json.loads(path.with_suffix(".json").read_text())
            del meta["sha256"]
            path.with_suffix(".json").write_text(json.dumps(meta))
        with pytest.raises(HydraPipeError) as e:
            load_checkpoint(path)
        assert str(e.value).startswith(f"{path}: not a safetensors checkpoint") and "\n" not in str(e.value)

    state = tmp_path / "resume" / STATE_FILE
    state.parent.mkdir()
    state.write_bytes(payload)
    with pytest.raises(HydraPipeError) as e:
        read_state(state)
    assert str(e.value).startswith(f"{state}: not a safetensors resume state") and "\n" not in str(e.value)
    # training that finds it reports it, trains from the start and replaces it with a real state
    data = torch.utils.data.TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    train(build_model("cnn_small", digits_info), data, TrainParams(objective="benign", epochs=1, batch_size=16),
          resume_dir=state.parent)
    assert read_state(state)[1]["epoch"] == 1
    assert not marker.exists()


def test_a_sidecar_that_does_not_describe_its_weights_is_refused_with_one_line(tmp_path, pruned, digits_info):
    path, other = tmp_path / "m.safetensors", tmp_path / "other.safetensors"
    save_checkpoint(pruned, path, "cnn_small", digits_info, "abc")
    torch.manual_seed(1)
    save_checkpoint(build_model("cnn_small", digits_info), other, "cnn_small", digits_info, "abc")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert len(meta["sha256"]) == 64
    # a writer killed between the two renames, or a hand-copied pair: other weights, same architecture
    good = path.read_bytes()
    path.write_bytes(other.read_bytes())
    torn = r"m.safetensors: does not match its sidecar .*m.json \(SHA-256 [0-9a-f]{12}"
    with pytest.raises(HydraPipeError, match=torn):
        load_checkpoint(path)
    path.write_bytes(good)
    path.with_suffix(".json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(HydraPipeError, match="does not match its sidecar"):
        load_checkpoint(path)
    # shapes: a sidecar for another dataset (3 classes) over these weights (10)
    dataset = {**meta["dataset"], "classes": 3, "labels": ["a", "b", "c"]}
    path.with_suffix(".json").write_text(json.dumps({**meta, "dataset": dataset}))
    with pytest.raises(HydraPipeError, match="do not match architecture 'cnn_small'"):
        load_checkpoint(path)
    # sidecars written before the hash (the committed models/*.json) still load
    path.with_suffix(".json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    model, _ = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pruned.state_dict().values()))
