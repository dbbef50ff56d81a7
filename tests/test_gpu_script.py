"""benchmarks/gpu.sh (issue 26, item 4) runs on CUDA machines, never in the suite: here only its refusal without
CUDA (one line, exit code 2, nothing written) and the table it prints from a results file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs instead of refusing")
@pytest.mark.skipif(shutil.which("bash") is None, reason="the script is a bash script")
def test_gpu_script_refuses_in_one_line_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_GPU_SMOKE"}
    env.update(PYTHON=sys.executable, GPU_OUT=str(tmp_path / "gpu.json"), GPU_WORK=str(tmp_path / "work"))
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == ["gpu.sh: torch sees no CUDA device; run it on a CUDA machine, or pass "
                                     "--cpu-smoke (or set HYDRA_GPU_SMOKE=1) for a tiny CPU check"]
    assert list(tmp_path.iterdir()) == []


def test_gpu_table_names_each_contender_and_what_stopped(tmp_path):
    row = dict(measured="2026-12-06 22:00 UTC", mode="cuda", device="NVIDIA H100", torch="2.14.1", cuda="13.0",
               total_seconds=400.0,
               audit=dict(data="fashion_mnist", n=50, eps=2 / 255, stopped_by_time_limit=True,
                          contenders=dict(ours_aa_part=dict(seconds=10.0, robust=0.42),
                                          autoattack=dict(seconds=20.0, robust=0.42))),
               ddp=dict(world=1, backend="nccl", data="fashion_mnist", arch="cnn_small", objective="pgd",
                        attack_steps=10, seconds=30.0, clean_accuracy=0.8, pgd_robust_accuracy=0.6))
    results = tmp_path / "gpu.json"
    results.write_text(json.dumps({"rows": [row]}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "table", str(results)],
                       capture_output=True, text=True, timeout=60, check=True)
    lines = r.stdout.splitlines()
    assert "| 10.0 | 0.50 | 42.0% |" in lines[3]
    assert "| 20.0 | 1.00 | 42.0% |" in lines[4]
    assert lines[5].endswith("| - | - | stopped by the time limit |")  # the quick preset did not finish
    assert lines[6].endswith("| 30.0 | - | clean 80.0%, PGD-20 60.0% |")
