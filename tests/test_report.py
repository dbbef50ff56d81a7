"""The report page's parts: charts that draw what they are given, and DVC experiments read from their git refs."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx

from pipeline.reporting import layer_labels
from stages.report import (H, PAD, bar_chart, eps_chart, experiments, latency_chart, layers_chart, line_chart,
                           onnx_layer_kinds, sparsity_chart)

ROOT = Path(__file__).resolve().parent.parent


def test_line_chart_draws_one_series_per_entry_inside_the_frame():
    svg = line_chart("c", "t", {"a": [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)], "b": [(0.0, 1.0), (1.0, 0.0)]}, "x", "y")
    lines = re.findall(r'<polyline class="series"[^>]*points="([^"]+)"', svg)
    assert len(lines) == 2
    coords = [tuple(map(float, p.split(","))) for pts in lines for p in pts.split()]
    assert all(0 <= x <= 560 and 0 <= y <= 300 for x, y in coords)
    assert coords[0][1] > coords[2][1]  # y grows upwards
    assert 'class="chart empty"' in line_chart("e", "t", {}, "x", "y")


def test_bar_chart_bar_heights_follow_the_values():
    svg = bar_chart("b", "t", [("low", 0.25), ("high", 1.0)], "y")
    heights = [float(h) for h in re.findall(r'<rect class="series"[^>]*height="([\d.]+)"', svg)]
    assert len(heights) == 2 and abs(heights[1] / heights[0] - 4.0) < 0.01


def _commit(git, root, sparsity, robust, method, message):
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/prune.json").write_text(json.dumps({"sparsity": sparsity}))
    (root / "metrics/audit.json").write_text(json.dumps({"clean_accuracy": 0.9, "robust_accuracy": robust}))
    (root / "params.yaml").write_text(f"prune:\n  method: {method}\n")
    git("add", "metrics", "params.yaml")
    git("commit", "-q", "-m", message)
    return git("rev-parse", "HEAD").strip()


def test_experiments_are_read_from_their_git_refs_and_only_real_experiments_count(tmp_path):
    """DVC's refs: ``refs/exps/<baseline sha[:2]>/<baseline sha[2:]>/<name>`` per experiment, and its machinery
    (``refs/exps/exec/EXEC_*``, pointing at the baseline or an experiment again): only the first are drawn, each
    commit once, never the baseline (the workspace's HEAD, drawn as the workspace)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    baseline = _commit(git, tmp_path, 0.9, 0.7, "hydra", "baseline")
    shas = {name: _commit(git, tmp_path, sparsity, robust, method, name)
            for sparsity, robust, method, name in ((0.99, 0.5, "hydra", "exp-a"), (0.99, 0.2, "lwm", "exp-b"))}
    git("checkout", "-q", baseline)  # the workspace is the baseline, as after `dvc exp run`
    prefix = f"refs/exps/{baseline[:2]}/{baseline[2:]}"
    for name, sha in shas.items():
        git("update-ref", f"{prefix}/{name}", sha)
    git("update-ref", "refs/exps/exec/EXEC_BASELINE", baseline)
    git("update-ref", "refs/exps/exec/EXEC_HEAD", shas["exp-a"])
    git("update-ref", "refs/exps/exec/EXEC_BRANCH", shas["exp-a"])
    git("update-ref", f"{prefix}/baseline-again", baseline)
    git("update-ref", "refs/exps/celery/stash", shas["exp-b"])
    rows = sorted(experiments(tmp_path), key=lambda r: r["name"])
    assert [(r["name"], r["sparsity"], r["robust"], r["method"]) for r in rows] == [
        ("exp-a", 0.99, 0.5, "hydra"), ("exp-b", 0.99, 0.2, "lwm")]
    assert experiments(tmp_path.parent / "not-a-repo-at-all") == []


def test_sparsity_chart_draws_one_labelled_series_pair_per_method():
    runs = [{"sparsity": 0.9, "clean": 0.95, "robust": 0.8, "method": "hydra"},
            {"sparsity": 0.99, "clean": 0.9, "robust": 0.6, "method": "hydra"},
            {"sparsity": 0.99, "clean": 0.22, "robust": 0.05, "method": "lwm"}]
    svg = sparsity_chart(runs, 2)
    series = re.findall(r'<polyline class="series" data-series="([^"]+)"[^>]*points="([^"]*)"', svg)
    assert [name for name, _ in series] == ["hydra: clean", "hydra: robust (audit)", "lwm: clean",
                                            "lwm: robust (audit)"]
    assert [len(points.split()) for _, points in series] == [2, 2, 1, 1]  # no line joins a hydra and an lwm point
    legend = re.findall(r'<text class="legend"[^>]*>([^<]+)</text>', svg)
    assert legend == ["hydra: clean", "hydra: robust (audit) (dashed)", "lwm: clean", "lwm: robust (audit) (dashed)"]
    assert "2 experiments besides the workspace" in svg and "1 experiment besides" in sparsity_chart(runs[:2], 1)


def test_latency_chart_says_why_only_when_int8_is_slower():
    slower = latency_chart(0.008, 0.012)
    assert '<p class="note">' in slower and "quantize and dequantize" in slower and "batch 1" in slower
    assert '<p class="note">' not in latency_chart(0.012, 0.008)


def test_eps_chart_has_the_audit_s_headline_verified_figure():
    from pipeline.audit.report import AuditReport

    audit = AuditReport.read(ROOT / "reports/audit.json")
    assert audit.verified_method.endswith("bab") and audit.eps_sweep  # the committed run: a sweep and branch and bound
    svg = eps_chart(audit)
    series = dict(re.findall(r'<polyline class="series" data-series="([^"]+)"[^>]*points="([^"]*)"', svg))
    label = f"verified ({audit.verified_method}) at eps {audit.eps:g}"
    assert label in series and len(series[label].split()) == 1
    y = float(series[label].split(",")[1])  # the dot's height is the verified accuracy (y axis 0..1)
    assert abs((H - PAD - y) / (H - PAD - 16) - audit.verified_accuracy) < 0.005
    assert {"PGD (sweep)", "IBP", "CROWN", "alpha-CROWN", f"robust, all attacks at eps {audit.eps:g}"} <= set(series)


def test_layers_are_labelled_by_name_not_by_position(tmp_path):
    from onnx import TensorProto, helper

    def init(name, shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, [0.0] * int(np.prod(shape)))

    nodes = [helper.make_node("Conv", ["input", "1.weight", "1.bias"], ["a"]),
             helper.make_node("Flatten", ["a"], ["b"]),
             helper.make_node("Gemm", ["b", "4.weight", "4.bias"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
                              [init("1.weight", [2, 1, 3, 3]), init("1.bias", [2]), init("4.weight", [3, 8]),
                               init("4.bias", [3])])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    kinds = onnx_layer_kinds(tmp_path / "m.onnx")
    assert kinds == {"1": "conv", "4": "fc"}
    svg = layers_chart([{"layer": "1", "sparsity": "0.9"}, {"layer": "4", "sparsity": "0.8"}], kinds)
    labels = re.findall(r'text-anchor="middle">([^<]+)</text>', svg)
    assert "conv1" in labels and "fc1" in labels and "1" not in labels and "4" not in labels
    # names with words stay; a position is ranked among all layers of its kind; a clash keeps the position
    assert layer_labels({"layer1.0.conv1": "conv", "fc": "fc", "3": "fc"}) == {
        "layer1.0.conv1": "layer1.0.conv1", "fc": "fc", "3": "fc2"}
    assert layer_labels({"3": "fc", "fc1": "fc"}) == {"3": "fc1 (3)", "fc1": "fc1"}
