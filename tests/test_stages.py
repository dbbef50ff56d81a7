"""The six stages on a tiny configuration in a scratch folder (the DVC layout relative to the cwd).

One fixture runs the whole pipeline once per test process; each test then checks that its stage did its job, so
the tests pass in any order and under any distribution (``pytest -n 2``)."""

import importlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

TINY = {
    "pretrain": {"epochs": 2, "attack_steps": 2},
    "prune": {"epochs": 1, "attack_steps": 2, "keep_ratio": 0.1},
    "finetune": {"epochs": 1, "attack_steps": 2},
    "quantize": {"calibration_size": 64},
    "audit": {"steps": 5, "restarts": 2, "n_examples": 24, "sweep_eps": [0.05, 0.1], "sweep_steps": 3,
              "sweep_restarts": 1},
}
STAGES = ("pretrain", "prune", "finetune", "quantize", "audit", "export")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """``(folder, {stage: what its run returned})`` after running all six stages in order."""
    d = tmp_path_factory.mktemp("pipeline")
    (d / "params.yaml").write_text(yaml.safe_dump(TINY))
    old = os.getcwd()
    os.chdir(d)
    try:
        results = {s: importlib.import_module(f"stages.{s}").run("params.yaml") for s in STAGES}
    finally:
        os.chdir(old)
    return d, results


def _metrics(d, stage):
    return json.loads((d / "metrics" / f"{stage}.json").read_text())


def test_pretrain_learns(pipeline):
    d, r = pipeline
    m = r["pretrain"]
    assert m["clean_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert 0.0 <= m["pgd_robust_accuracy"] <= m["clean_accuracy"]
    assert (d / "models/pretrained.safetensors").exists()
    assert _metrics(d, "pretrain") == {k: m[k] for k in ("clean_accuracy", "pgd_robust_accuracy")}
    assert json.loads((d / "reports/pretrain.json").read_text())["parameters"] > 0


def test_prune_reaches_the_asked_sparsity_in_every_layer(pipeline):
    d, r = pipeline
    m = r["prune"]
    assert m["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert all(s == pytest.approx(0.9, abs=0.02) for s in m["layers"].values())
    assert (d / "plots/prune_layers.csv").read_text().count("\n") == len(m["layers"]) + 1
    assert "layers" not in _metrics(d, "prune")  # per-layer figures are a plot, not DVC metrics


def test_finetune_trains_the_kept_weights_and_keeps_the_mask(pipeline):
    from pipeline.checkpoint import load_checkpoint
    from pipeline.masking import masked_layers

    d, r = pipeline
    pruned, _ = load_checkpoint(d / "models/pruned.safetensors")
    tuned, _ = load_checkpoint(d / "models/finetuned.safetensors")
    moved = False
    for (n, a), (_, b) in zip(masked_layers(pruned), masked_layers(tuned)):
        assert np.array_equal(a.weight_mask.numpy(), b.weight_mask.numpy()), n
        assert (b.weight.detach()[a.weight_mask == 0] == 0).all(), n
        moved |= not np.array_equal(a.weight.detach().numpy(), b.weight.detach().numpy())
    assert moved
    assert r["finetune"]["sparsity"] == pytest.approx(r["prune"]["sparsity"])


def test_quantize_keeps_pruned_weights_exactly_zero_and_agrees_with_fp32(pipeline):
    d, r = pipeline
    m = r["quantize"]
    assert m["fp32_parity_max_abs"] < 1e-4
    assert m["int8_zero_weights"] >= m["pruned_weights"] > 0
    assert m["int8_bytes"] < m["fp32_bytes"]
    assert m["prediction_agreement"] >= 0.9
    graph = onnx.load(str(d / "models/quantized.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}


def test_audit_on_the_deployed_int8_model(pipeline):
    d, r = pipeline
    report = r["audit"].model_dump()
    for key in ("n", "eps", "norm", "steps", "restarts", "clean_accuracy", "pgd_robust_accuracy",
                "ibp_verified_accuracy", "crown_verified_accuracy", "seconds"):
        assert key in report, key
    assert report["n"] == 24
    assert report["ibp_verified_accuracy"] <= report["pgd_robust_accuracy"] <= report["clean_accuracy"]
    assert json.loads((d / "reports/audit.json").read_text())["robust_accuracy"] == report["robust_accuracy"]
    assert set(_metrics(d, "audit")) == {"clean_accuracy", "pgd_robust_accuracy", "robust_accuracy",
                                          "verified_accuracy"}
    bounds = np.load(d / "reports/bounds.npz")
    assert bounds["ibp_lower"].shape == (24, 10) and (bounds["ibp_lower"] <= bounds["ibp_upper"]).all()


def test_a_rerun_of_the_audit_stage_rewrites_its_tracked_files_byte_for_byte(pipeline):
    """`make repro` on a clone must leave git clean: the files git and dvc.lock track hold no wall time; this
    machine's seconds go to reports/audit.timing.json (ignored by git, not a DVC output)."""
    d, _ = pipeline
    tracked = ["reports/audit.json", "reports/audit.examples.csv", "reports/audit.examples.jsonl",
               "metrics/audit.json", "plots/audit_restarts.csv", "plots/audit_eps.csv"]
    before = {p: (d / p).read_bytes() for p in tracked}
    timings = json.loads((d / "reports/audit.timing.json").read_text())
    assert timings["seconds"]["total"] > 0 and len(timings["examples"]) == 24
    assert any(sum(e["seconds"].values()) > 0 for e in timings["examples"])
    report = json.loads(before["reports/audit.json"])
    assert all(v is None for v in report["seconds"].values())
    assert "seconds" not in before["reports/audit.examples.csv"].decode().splitlines()[0]
    old = os.getcwd()
    os.chdir(d)
    try:
        importlib.import_module("stages.audit").run("params.yaml")
    finally:
        os.chdir(old)
    assert {p: (d / p).read_bytes() for p in tracked} == before
    root = Path(__file__).resolve().parent.parent
    for run in (root, root / "runs/fashion"):
        ignore = (run / "reports/.gitignore").read_text().split()
        assert "/audit.timing.json" in ignore and "/report.html" in ignore
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["report"]
    assert stage.get("always_changed") and not stage.get("outs")


def test_export_ships_the_audited_graph_with_metadata_and_card(pipeline):
    from pipeline.onnx_io import read_metadata

    d, r = pipeline
    m = r["export"]
    shipped = d / "deploy/model.onnx"
    onnx.checker.check_model(onnx.load(str(shipped)), full_check=True)
    meta = read_metadata(shipped)
    assert float(meta["sparsity"]) == pytest.approx(0.9, abs=0.01) and meta["bits"] == "8"
    audit = json.loads((d / "reports/audit.json").read_text())
    assert json.loads(meta["audit"])["clean_accuracy"] == audit["clean_accuracy"]
    assert m["agreement_with_pytorch"] > 0.8
    card = (d / "deploy/MODEL_CARD.md").read_text()
    assert meta["params_hash"] in card and "Verified robust accuracy" in card
    model = onnx.load(str(shipped))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]


def test_metrics_fit_a_terminal(pipeline):
    d, _ = pipeline
    headline = [k for s in STAGES for k in _metrics(d, s)]
    assert len(headline) <= 20
    for s in STAGES:
        assert all(isinstance(v, (int, float)) for v in _metrics(d, s).values()), s


def test_report_is_one_self_contained_page_whose_every_figure_draws(pipeline, tmp_path):
    import re
    import shutil
    import subprocess

    d, _ = pipeline
    old = os.getcwd()
    os.chdir(d)
    try:
        page_path = importlib.import_module("stages.report").run("params.yaml")
    finally:
        os.chdir(old)
    page = (d / page_path).read_text()
    # self-contained: nothing is fetched from anywhere, no script at all
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<script" not in page
    charts = re.findall(r'<figure class="chart( empty)?" data-chart="(\w+)"', page)
    names = {name for _, name in charts}
    assert {"eps", "budget", "cactus", "sparsity", "weights", "layers", "size", "latency"} <= names
    assert not [name for empty, name in charts if empty]  # every figure has data in this run
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no headless Chromium here (Debian: apt-get install chromium); the page was checked as text")
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'c'}"]
    url = (d / page_path).resolve().as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    # the browser parsed every chart into an SVG with at least one drawn series (polyline with points, or a bar)
    for name in names:
        block = dom.split(f'data-chart="{name}"', 1)[1].split("</figure>", 1)[0]
        assert re.search(r'class="series"[^>]*(points="[\d.]+,[\d.]+|height="[\d.]+")', block), name
    subprocess.run([chromium, *flags, "--window-size=1240,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in re.findall(r'stroke="(#[0-9a-f]{6})"', page)}
    for colour in colours:  # every series colour the page uses is on screen
        assert (np.abs(pixels.astype(int) - colour).sum(1) < 30).any(), colour
