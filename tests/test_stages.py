"""Each stage on a tiny configuration, in order, in a scratch folder (the DVC layout relative to the cwd)."""

import json

import numpy as np
import onnx
import pytest
import yaml

TINY = {
    "pretrain": {"epochs": 2, "attack_steps": 2},
    "prune": {"epochs": 1, "attack_steps": 2, "keep_ratio": 0.1},
    "finetune": {"epochs": 1, "attack_steps": 2},
    "quantize": {"calibration_size": 64},
    "audit": {"steps": 5, "restarts": 2, "n_examples": 24},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    (d / "params.yaml").write_text(yaml.safe_dump(TINY))
    return d


@pytest.fixture(autouse=True)
def _cwd(workdir, monkeypatch):
    monkeypatch.chdir(workdir)


def run(stage):
    import importlib

    return importlib.import_module(f"stages.{stage}").run("params.yaml")


def test_1_pretrain(workdir):
    m = run("pretrain")
    assert 0.0 <= m["pgd_robust_accuracy"] <= m["clean_accuracy"] <= 1.0
    assert (workdir / "models/pretrained.safetensors").exists()
    assert json.loads((workdir / "metrics/pretrain.json").read_text())["parameters"] > 0


def test_2_prune_reports_per_layer_sparsity(workdir):
    m = run("prune")
    assert m["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert all(s == pytest.approx(0.9, abs=0.02) for s in m["layers"].values())
    assert (workdir / "plots/prune_layers.csv").read_text().count("\n") == len(m["layers"]) + 1


def test_3_finetune_keeps_the_mask(workdir):
    from pipeline.checkpoint import load_checkpoint

    run("finetune")
    pruned, _ = load_checkpoint(workdir / "models/pruned.safetensors")
    tuned, _ = load_checkpoint(workdir / "models/finetuned.safetensors")
    from pipeline.masking import masked_layers

    for (n, a), (_, b) in zip(masked_layers(pruned), masked_layers(tuned)):
        assert np.array_equal(a.weight_mask.numpy(), b.weight_mask.numpy()), n
        assert (b.weight.detach()[a.weight_mask == 0] == 0).all(), n


def test_4_quantize_keeps_pruned_weights_exactly_zero_in_int8(workdir):
    m = run("quantize")
    assert m["fp32_parity_max_abs"] < 1e-4
    assert m["int8_zero_weights"] >= m["pruned_weights"] > 0
    assert m["int8_bytes"] < m["fp32_bytes"]
    graph = onnx.load(str(workdir / "models/quantized.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}


def test_5_audit_on_the_deployed_int8_model(workdir):
    report = run("audit").model_dump()
    for key in ("n", "eps", "norm", "steps", "restarts", "clean_accuracy", "pgd_robust_accuracy",
                "ibp_verified_accuracy", "crown_verified_accuracy", "seconds"):
        assert key in report, key
    assert report["n"] == 24
    assert report["ibp_verified_accuracy"] <= report["pgd_robust_accuracy"] <= report["clean_accuracy"]
    bounds = np.load(workdir / "reports/bounds.npz")
    assert bounds["ibp_lower"].shape == (24, 10) and (bounds["ibp_lower"] <= bounds["ibp_upper"]).all()


def test_6_export_ships_the_audited_graph_with_metadata_and_card(workdir):
    from pipeline.onnx_io import read_metadata

    m = run("export")
    shipped = workdir / "deploy/model.onnx"
    onnx.checker.check_model(onnx.load(str(shipped)), full_check=True)
    meta = read_metadata(shipped)
    assert float(meta["sparsity"]) == pytest.approx(0.9, abs=0.01) and meta["bits"] == "8"
    audit = json.loads((workdir / "reports/audit.json").read_text())
    assert json.loads(meta["audit"])["clean_accuracy"] == audit["clean_accuracy"]
    assert m["agreement_with_pytorch"] > 0.8
    card = (workdir / "deploy/MODEL_CARD.md").read_text()
    assert meta["params_hash"] in card and "Verified robust accuracy" in card
    model = onnx.load(str(shipped))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
