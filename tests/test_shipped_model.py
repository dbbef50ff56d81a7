"""What a shipped model says about itself: the card and the ONNX metadata state the preprocessing, the labels, the
threat model and every verified figure with its method; the graph names its producer and imports only the opsets
its nodes use; `hydra-pipe info` reads any ONNX file. One tiny pipeline run (digits, a few seconds) serves them all."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper
from typer.testing import CliRunner

import pipeline
from pipeline.data import DIGIT_LABELS, PREPROCESSING, DatasetInfo, preprocessing
from stages.cli import app

TINY = {"pretrain": {"epochs": 1, "objective": "benign"},
        "prune": {"epochs": 1, "objective": "benign"},
        "finetune": {"epochs": 1, "attack_steps": 1},
        "quantize": {"calibration_size": 32},
        "audit": {"steps": 2, "restarts": 1, "n_examples": 8, "square_queries": 0}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The six stages on digits with tiny budgets (CROWN, alpha-CROWN and branch and bound on, as in the default
    run)."""
    d = tmp_path_factory.mktemp("shipped")
    (d / "params.yaml").write_text(yaml.safe_dump(TINY))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        for stage in ("pretrain", "prune", "finetune", "quantize", "audit", "export"):
            importlib.import_module(f"stages.{stage}").run("params.yaml")
    return d


@pytest.fixture(scope="module")
def meta(run_dir) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(run_dir / "deploy/model.onnx")).metadata_props}


def _info(*args: str):
    return CliRunner().invoke(app, ["info", *args], terminal_width=240)


def test_card_states_preprocessing_labels_threat_model_and_every_verified_figure(run_dir):
    card = (run_dir / "deploy/MODEL_CARD.md").read_text()
    audit = json.loads((run_dir / "reports/audit.json").read_text())
    assert "load_digits" in card and "divided by 16 into [0, 1]" in card  # preprocessing
    assert "N x C x H x W = batch x 1 x 8 x 8" in card and "normalisation is inside the graph" in card
    assert ", ".join(f"{i} `{i}`" for i in range(10)) in card  # labels, index and name
    assert "L-inf" in card and f"eps = {audit['eps']:g}" in card and "input range [0, 1]" in card
    for name, key in (("IBP", "ibp"), ("CROWN", "crown"), ("alpha-CROWN", "alpha_crown"), ("branch and bound", "bab")):
        assert f"| verified, {name} | {100 * audit[f'{key}_verified_accuracy']:.1f}% |" in card
    assert f"`{audit['verified_method']}`" in card and audit["verified_method"] == "ibp+crown+alpha-crown+bab"
    assert f"hydra-pipe {pipeline.__version__}" in card


def test_card_snippet_turns_a_raw_image_into_the_predicted_label(run_dir):
    """The card's code runs as written beside the model and prints what onnxruntime predicts for that image."""
    from sklearn.datasets import load_digits

    from pipeline.onnx_io import ort_logits, ort_session

    card = (run_dir / "deploy/MODEL_CARD.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(run_dir / "deploy")
        with contextlib.redirect_stdout(out):
            exec(compile(code, "MODEL_CARD.md", "exec"), {})
    finally:
        os.chdir(cwd)
    x = (load_digits().images[:1] / 16.0).astype(np.float32)[:, None]
    expected = DIGIT_LABELS[int(ort_logits(ort_session(run_dir / "deploy/model.onnx"), x).argmax(1)[0])]
    assert out.getvalue().strip() == expected


def test_card_snippet_needs_only_numpy_and_onnxruntime(run_dir, tmp_path):
    """The card says "numpy and onnxruntime": its code runs, as a script beside the model, where importing
    scikit-learn (or anything else of ours) fails."""
    from pipeline.onnx_io import ort_logits, ort_session

    card = (run_dir / "deploy/MODEL_CARD.md").read_text()
    assert "**How to run it** (numpy and onnxruntime;" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    stubs = tmp_path / "stubs"
    for name in ("sklearn", "torch", "PIL", "pipeline"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('the card snippet imported {name}')\n")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(stubs)}
    res = subprocess.run([sys.executable, str(script)], cwd=run_dir / "deploy", env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    from sklearn.datasets import load_digits

    x = (load_digits().images[:1] / 16.0).astype(np.float32)[:, None]  # the sample image the card embeds
    expected = DIGIT_LABELS[int(ort_logits(ort_session(run_dir / "deploy/model.onnx"), x).argmax(1)[0])]
    assert res.stdout.strip() == expected


def test_card_names_the_layers_for_people(run_dir):
    card = (run_dir / "deploy/MODEL_CARD.md").read_text()
    for label, name in (("conv1", "1"), ("conv2", "3"), ("fc1", "6"), ("fc2", "8")):
        assert f"| {label} (`{name}`) |" in card


def _floored(run_dir, dest, floor, below_floor="warn"):
    """A copy of the run whose params set ``export.floor``; its export outputs removed."""
    shutil.copytree(run_dir, dest)
    for out in ("deploy", "reports/export.json", "metrics/export.json"):
        path = dest / out
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["export"] = {"floor": floor, "below_floor": below_floor}
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


def _lowest_figure(run_dir) -> tuple[str, float]:
    from stages.export import FLOOR_FIGURES

    audit = json.loads((run_dir / "reports/audit.json").read_text())
    return min(((name, audit[field] or 0.0) for name, (_, field) in FLOOR_FIGURES.items()), key=lambda t: t[1])


def test_a_model_below_the_export_floor_ships_with_a_loud_warning(run_dir, tmp_path, monkeypatch, capsys):
    name, value = _lowest_figure(run_dir)
    floor = round(value + 0.05, 4)
    d = _floored(run_dir, tmp_path / "below", {name: floor})
    monkeypatch.chdir(d)
    importlib.import_module("stages.export").run("params.yaml")
    console = " ".join(capsys.readouterr().err.split())
    assert "WARNING: export: this model is below the floor set for shipping it (export.floor)" in console
    assert f"< floor {100 * floor:.1f}%" in console and "chance on 10 classes is 10.0%" in console
    card = (d / "deploy/MODEL_CARD.md").read_text()
    top = card.split("\n\n")[1]  # the first paragraph after the title
    assert top.startswith("> **WARNING: this model is below the floor set for shipping it") and "do not deploy" in top
    meta = {p.key: p.value for p in onnx.load(str(d / "deploy/model.onnx")).metadata_props}
    assert meta["warning"].startswith("below the floor") and f"< floor {100 * floor:.1f}%" in meta["warning"]
    shown = _info(str(d / "deploy/model.onnx")).output
    assert "below the floor" in shown and shown.index("warning") < shown.index("arch")  # info says it first
    page = importlib.import_module("stages.report").build(d)
    assert '<p class="warning"><strong>WARNING: the shipped model is below the floor' in page


def test_a_model_at_or_above_the_export_floor_ships_without_a_warning(run_dir, tmp_path, monkeypatch, capsys):
    name, value = _lowest_figure(run_dir)
    d = _floored(run_dir, tmp_path / "above", {name: value})  # at the floor is not below it
    monkeypatch.chdir(d)
    importlib.import_module("stages.export").run("params.yaml")
    assert "WARNING" not in capsys.readouterr().err
    assert "WARNING" not in (d / "deploy/MODEL_CARD.md").read_text()
    assert "warning" not in {p.key for p in onnx.load(str(d / "deploy/model.onnx")).metadata_props}
    assert 'class="warning"' not in importlib.import_module("stages.report").build(d)


def test_below_floor_refuse_is_one_line_exit_code_3_and_writes_nothing(run_dir, tmp_path):
    name, value = _lowest_figure(run_dir)
    d = _floored(run_dir, tmp_path / "refuse", {name: round(value + 0.05, 4)}, below_floor="refuse")
    env = {**os.environ, "HYDRA_PIPE_QUIET": "1"}
    res = subprocess.run([sys.executable, "-c", "from stages.cli import app; app()", "export"], cwd=d, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 3 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "export refused (export.below_floor: refuse)" in lines[0] and "nothing was written" in lines[0]
    assert not (d / "deploy").exists()
    assert not (d / "reports/export.json").exists() and not (d / "metrics/export.json").exists()


def test_metadata_states_labels_input_and_stores_each_figure_once(meta):
    assert json.loads(meta["labels"]) == list(DIGIT_LABELS)
    assert json.loads(meta["input_range"]) == [0.0, 1.0]
    assert "divided by 16" in meta["preprocessing"] and "N x C x H x W" in meta["preprocessing"]
    audit = json.loads(meta["audit"])
    assert {"ibp_verified_accuracy", "crown_verified_accuracy", "alpha_crown_verified_accuracy",
            "verified_accuracy", "eps", "norm"} <= set(audit)
    assert meta["verified_method"] == "ibp+crown+alpha-crown+bab"
    assert not set(audit) & set(meta)  # no audit figure repeated at the top level


def test_weights_stay_in_the_range_every_cpu_computes_exactly_and_the_card_says_so(meta, run_dir):
    from pipeline.quantization import SATURATION_FREE, int8_weight_range, saturating_layers

    assert 0 < int(meta["weight_range"]) == int8_weight_range(run_dir / "models/quantized.onnx") <= SATURATION_FREE
    assert saturating_layers(run_dir / "models/quantized.onnx") == {}
    card = (run_dir / "deploy/MODEL_CARD.md").read_text()
    assert f"within +-{meta['weight_range']} (7 bits)" in " ".join(card.split())


def test_shipped_graph_names_its_producer_and_imports_only_used_opsets(run_dir):
    model = onnx.load(str(run_dir / "deploy/model.onnx"))
    assert (model.producer_name, model.producer_version) == ("hydra-pipe", pipeline.__version__)
    used = {n.domain for n in model.graph.node} | {""}
    assert {imp.domain for imp in model.opset_import} == used
    assert "com.microsoft" in {imp.domain for imp in onnx.load(str(run_dir / "models/quantized.onnx")).opset_import}
    onnx.checker.check_model(model, full_check=True)


def test_used_opsets_only_keeps_domains_of_subgraphs_and_the_default():
    from pipeline.onnx_io import used_opsets_only

    body = helper.make_graph([helper.make_node("Foo", ["a"], ["b"], domain="custom.sub")], "body", [], [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, 1) for d in
                                                    ("", "ai.onnx.ml", "com.microsoft", "custom.sub")])
    assert used_opsets_only(model) == ["ai.onnx.ml", "com.microsoft"]
    assert [imp.domain for imp in model.opset_import] == ["", "custom.sub"]


def test_info_shows_the_graph_first_then_the_metadata(run_dir):
    from pipeline.config import ExportParams  # the opset the pipeline exports at

    res = _info(str(run_dir / "deploy/model.onnx"))
    assert res.exit_code == 0, res.output
    out = res.output
    for needle in ("input input", "float32 [batch, 1, 8, 8]", "output logits", "float32 [batch, 10]",
                   f"ai.onnx {ExportParams().opset}", f"hydra-pipe {pipeline.__version__}", "labels", "0, 1, 2, 3", "input_range",
                   "preprocessing", "audit.alpha_crown_verified_accuracy", "verified_method"):
        assert needle in out, needle
    assert "com.microsoft" not in out
    assert out.index("opset imports") < out.index("producer") < out.index("metadata") < out.index("labels")


def test_info_reads_a_foreign_model(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 3])])
    model = helper.make_model(graph, producer_name="other-tool", producer_version="9.9",
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 3)])
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    res = _info(str(tmp_path / "foreign.onnx"))
    assert res.exit_code == 0, res.output
    for needle in ("input x", "float16 [N, 3]", "output y", "ai.onnx 13, ai.onnx.ml 3", "other-tool 9.9",
                   "(no metadata)"):
        assert needle in res.output, needle


@pytest.mark.parametrize("name, content, needle", [("garbage.onnx", b"not a model", "garbage.onnx"),
                                                    ("missing.onnx", None, "not found")])
def test_info_on_an_unreadable_file_is_one_line(tmp_path, name, content, needle):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    res = _info(str(tmp_path / name))
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output


def test_every_builtin_dataset_says_how_to_preprocess_and_the_digit_labels():
    assert {"digits", "cifar10", "svhn", "imagefolder"} <= set(PREPROCESSING)
    info = DatasetInfo(3, 24, 5, (0.5,) * 3, (0.25,) * 3)
    assert "Resize(24), CenterCrop(24)" in preprocessing("imagefolder", info).text
    assert "not recorded" in preprocessing("someone-elses", info).text  # a dataset registered elsewhere


@pytest.mark.parametrize("name, size, raw", [("cifar10", 32, (32, 32)), ("imagefolder", 24, (50, 37)),
                                             ("imagefolder", 24, (31, 60))])
def test_the_card_preprocessing_is_what_the_dataset_loader_computes(tmp_path, monkeypatch, name, size, raw):
    """The card's numpy / PIL lines give exactly the tensor torchvision's transforms give the training loader."""
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    monkeypatch.chdir(tmp_path)
    for file in ("image.png", "image.jpg"):
        Image.fromarray(rng.integers(0, 256, (raw[1], raw[0], 3), dtype=np.uint8)).save(file)
    scope = {"np": np}
    exec(preprocessing(name, DatasetInfo(3, size, 10, (0.5,) * 3, (0.25,) * 3)).code, scope)
    file = "image.png" if name == "cifar10" else "image.jpg"
    tf = transforms.ToTensor() if name == "cifar10" else transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    expected = tf(Image.open(file).convert("RGB")).numpy()[None]
    assert scope["x"].dtype == np.float32 and np.array_equal(scope["x"], expected)


def test_a_sidecar_written_before_labels_still_loads_with_the_same_weights(tmp_path):
    import torch

    from pipeline.checkpoint import load_checkpoint, save_checkpoint, sidecar_path
    from pipeline.models import build_model

    info = DatasetInfo(1, 8, 10, (0.3,), (0.4,), DIGIT_LABELS)
    torch.manual_seed(0)
    save_checkpoint(build_model("cnn_small", info), tmp_path / "m.safetensors", "cnn_small", info, "h")
    side = json.loads(sidecar_path(tmp_path / "m.safetensors").read_text())
    assert side["dataset"]["labels"] == list(DIGIT_LABELS)
    new, _ = load_checkpoint(tmp_path / "m.safetensors")
    del side["dataset"]["labels"]
    sidecar_path(tmp_path / "m.safetensors").write_text(json.dumps(side))
    old, meta = load_checkpoint(tmp_path / "m.safetensors")
    assert DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["dataset"].items()}).labels == ()
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
