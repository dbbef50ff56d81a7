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


def test_missing_checkpoint_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    assert_one_line_error(cli("prune", cwd=tmp_path), "pretrained")


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
