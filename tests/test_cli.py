"""The CLI's errors: one line on stderr, exit code 2, no traceback, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXE = [sys.executable, "-c", "from stages.cli import app; app()"]


def cli(*args, cwd):
    env = {**os.environ, "HYDRA_PIPE_QUIET": "1"}
    return subprocess.run([*EXE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_lists_the_six_stages(tmp_path):
    res = cli("--help", cwd=tmp_path)
    assert res.returncode == 0
    for stage in ("pretrain", "prune", "finetune", "quantize", "audit", "export"):
        assert stage in res.stdout


def test_bad_params_stop_the_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("prune:\n  keep_ratio: 2\n")
    res = cli("prune", cwd=tmp_path)
    assert_one_line_error(res, "params.yaml", "prune.keep_ratio")
    assert not (tmp_path / "models").exists()


def test_missing_checkpoint_is_one_line_naming_the_stage_to_run_first(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    assert_one_line_error(cli("prune", cwd=tmp_path), "error: models/pretrained.safetensors not found: run the "
                          "pretrain stage first (hydra-pipe pretrain, or dvc repro pretrain)")
    (tmp_path / "models").mkdir()
    (tmp_path / "models/pruned.safetensors").write_bytes(b"")  # the weights without their sidecar
    assert_one_line_error(cli("finetune", cwd=tmp_path), "models/pruned.json not found: run the prune stage first")


def test_images_of_integers_say_how_to_scale_them(tmp_path):
    from pipeline.audit.deployed import validate
    from pipeline.errors import HydraPipeError

    y = np.zeros(2, np.int64)
    with pytest.raises(HydraPipeError, match=r"got dtype uint8: divide by 255: x.astype\(np.float32\) / 255"):
        validate(np.zeros((2, 1, 8, 8), np.uint8), y)
    with pytest.raises(HydraPipeError, match=r"found \[0, 255\]; pixel values 0..255\? divide by 255"):
        validate(np.full((2, 1, 8, 8), 255.0, np.float32) * np.array([0, 1]).reshape(2, 1, 1, 1), y)
    with pytest.raises(HydraPipeError, match="got dtype int64: scale it into"):
        validate(np.zeros((2, 1, 8, 8), np.int64), y)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    from pipeline.onnx_io import export_onnx

    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    export_onnx(model, d / "m.onnx", (1, 8, 8))
    rng = np.random.default_rng(0)
    np.savez(d / "ok.npz", x=rng.random((6, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 6))
    np.savez(d / "range.npz", x=rng.random((6, 1, 8, 8), dtype=np.float32) * 3, y=rng.integers(0, 10, 6))
    np.savez(d / "nolabels.npz", x=rng.random((6, 1, 8, 8), dtype=np.float32))
    (d / "garbage.onnx").write_bytes(b"not a model")
    return d


@pytest.mark.parametrize("args, needles", [
    (["missing.onnx", "--data", "ok.npz", "--eps", "0.1"], ["missing.onnx"]),
    (["garbage.onnx", "--data", "ok.npz", "--eps", "0.1"], ["garbage.onnx"]),
    (["m.onnx", "--data", "ok.npz", "--eps", "-0.1"], ["--eps"]),
    (["m.onnx", "--data", "ok.npz", "--eps", "8"], ["--eps", "8/255"]),
    (["m.onnx", "--data", "ok.npz", "--eps", "0.1", "--sweep-eps", "0.1,4"], ["--sweep-eps", "4/255"]),
    (["m.onnx", "--data", "range.npz", "--eps", "0.1"], ["range.npz" , "[0, 1]"]),
    (["m.onnx", "--data", "nolabels.npz", "--eps", "0.1"], ["nolabels.npz", "y"]),
    (["m.onnx", "--data", "nowhere.npz", "--eps", "0.1"], ["nowhere.npz"]),
    (["m.onnx", "--data", "ok.npz"], ["--eps"]),
])
def test_audit_bad_input_is_one_line_and_writes_nothing(tiny_onnx, args, needles):
    out = tiny_onnx / "report.json"
    res = cli("audit", *args, "--steps", "2", "--restarts", "1", "--out", str(out), "--bounds-out",
              str(tiny_onnx / "b.npz"), cwd=tiny_onnx)
    assert_one_line_error(res, *needles)
    assert not out.exists() and not (tiny_onnx / "b.npz").exists()


def test_audit_of_a_valid_model_writes_the_report(tiny_onnx):
    import json

    out = tiny_onnx / "good.json"
    res = cli("audit", "m.onnx", "--data", "ok.npz", "--eps", "0.01", "--steps", "3", "--restarts", "2",
              "--out", str(out), cwd=tiny_onnx)
    assert res.returncode == 0, res.stderr
    report = json.loads(Path(out).read_text())
    assert report["n"] == 6 and report["steps"] == 3 and report["restarts"] == 2
    # a verdict per example beside the report, in CSV and JSON lines, whose counts are the report's
    rows = [json.loads(line) for line in (tiny_onnx / "good.examples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert len((tiny_onnx / "good.examples.csv").read_text().splitlines()) == 7
    status = [r["status"] for r in rows]
    assert status.count("proven") == report["decided"]["verified"]
    assert status.count("broken") + status.count("clean-wrong") == report["decided"]["broken"]


def test_the_quick_budget_runs_autoattack_s_attacks_and_crown_only_and_says_so(tiny_onnx):
    """`--budget quick` (issue 26's CI-gate preset): APGD-CE, APGD-T and Square, IBP and CROWN; not the card's PGD,
    alpha-CROWN or branch and bound; the report, its table and the headline a model carries name the budget."""
    import json

    out = tiny_onnx / "quick.json"
    res = cli("audit", "m.onnx", "--data", "ok.npz", "--eps", "0.05", "--budget", "quick", "--square-queries", "20",
              "--out", str(out), cwd=tiny_onnx)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["budget"] == "quick"
    ran = {a["name"] for a in report["attacks"]}
    assert "pgd" not in ran and {"apgd-ce"} <= ran, ran
    assert report["crown_verified_accuracy"] is not None and report["ibp_verified_accuracy"] is not None
    assert report["alpha_crown_verified_accuracy"] is None and report["bab_verified_accuracy"] is None
    assert any(line.split("│")[1:3] and "budget" in line.split("│")[1] and "quick" in line.split("│")[2]
               for line in res.stdout.splitlines() if line.count("│") >= 3), res.stdout  # the table's budget row
    from pipeline.audit.report import AuditReport

    assert AuditReport.read(out).headline()["budget"] == "quick"
    card = cli("audit", "m.onnx", "--data", "ok.npz", "--eps", "0.05", "--steps", "2", "--restarts", "1",
               "--square-queries", "20", "--out", str(tiny_onnx / "card.json"), cwd=tiny_onnx)
    assert card.returncode == 0, card.stderr
    default = json.loads((tiny_onnx / "card.json").read_text())
    assert default["budget"] == "card" and default["alpha_crown_verified_accuracy"] is not None


def test_audit_gate_fails_with_its_own_exit_code_when_a_figure_is_below_its_floor(tiny_onnx):
    import json

    out = tiny_onnx / "gate.json"
    common = ["audit", "m.onnx", "--data", "ok.npz", "--eps", "0.01", "--steps", "2", "--restarts", "1",
              "--out", str(out)]
    passed = cli(*common, "--fail-under", "clean=0.0", cwd=tiny_onnx)
    assert passed.returncode == 0, passed.stderr
    clean = json.loads(out.read_text())["clean_accuracy"]
    failed = cli(*common, "--fail-under", f"robust=0,clean={min(1.0, clean + 0.01):.3f}", cwd=tiny_onnx)
    assert failed.returncode == 3, failed.stderr
    lines = [l for l in failed.stderr.strip().splitlines() if l.strip() and "release floor" in l]
    assert len(lines) == 1 and "clean" in lines[0] and "robust" not in lines[0].split(":")[-1]
    assert out.exists()  # the report is written: the gate judges it, it does not hide it


@pytest.mark.parametrize("spec", ["robust", "speed=0.5", "robust=1.5", "robust=high"])
def test_a_bad_gate_is_one_line_before_any_work(tiny_onnx, spec):
    out = tiny_onnx / "bad_gate.json"
    res = cli("audit", "m.onnx", "--data", "ok.npz", "--eps", "0.01", "--out", str(out), "--fail-under", spec,
              cwd=tiny_onnx)
    assert_one_line_error(res, "--fail-under")
    assert not out.exists()


def test_info_reads_the_metadata_through_its_schema(tiny_onnx):
    import shutil

    from pipeline.metadata import ModelMetadata
    from pipeline.onnx_io import set_metadata

    ours = tiny_onnx / "ours.onnx"
    shutil.copy(tiny_onnx / "m.onnx", ours)
    meta = ModelMetadata(input_shape=(1, 8, 8), labels=["zero", "one"], sparsity=0.25, audit={"eps": 0.05})
    set_metadata(ours, {**meta.to_onnx_props(), "author": "someone"})
    res = cli("info", "ours.onnx", cwd=tiny_onnx)
    assert res.returncode == 0, res.stderr
    for needle in ("input_shape", "1 x 8 x 8", "zero, one", "sparsity", "0.25", "audit.eps", "author", "someone"):
        assert needle in res.stdout, needle
    bad = tiny_onnx / "bad.onnx"
    shutil.copy(ours, bad)
    set_metadata(bad, {"sparsity": "most"})
    assert_one_line_error(cli("info", "bad.onnx", cwd=tiny_onnx), "bad.onnx", "sparsity", "a number in [0, 1]",
                          "'most'")


def test_model_options_without_a_model_are_refused_not_ignored(tmp_path):
    res = cli("audit", "--steps", "20", "--eps", "0.1", cwd=tmp_path)
    assert_one_line_error(res, "--steps", "--eps", "MODEL")


def test_stage_help_lists_every_objective(tmp_path):
    from typing import get_args

    from pipeline.config import Objective

    res = subprocess.run([*EXE, "pretrain", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "300"}, timeout=60)
    assert all(o in res.stdout for o in get_args(Objective))


def test_the_stage_command_runs_without_the_venv_on_path(tmp_path):
    """dvc.yaml's command works however DVC was started (a bare `.venv/bin/dvc repro` leaves PATH alone)."""
    root = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HYDRA_PIPE_QUIET": "1"}
    if not (root / ".venv/bin/python").exists():
        pytest.skip("no project .venv (installed elsewhere); the launcher then uses the active python")
    res = subprocess.run([str(root / "bin/hydra-pipe"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pretrain" in res.stdout
    import yaml

    cmds = [s["cmd"] for s in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values()]
    assert all(c.startswith("bin/hydra-pipe ") for c in cmds)


def test_stages_pin_the_thread_count_from_params(tmp_path, monkeypatch):
    import torch

    from stages.common import setup

    (tmp_path / "params.yaml").write_text("compute:\n  threads: 1\n")
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        setup(tmp_path / "params.yaml")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
