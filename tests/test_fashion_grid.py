"""The benchmarks' generated tables and ``benchmarks/fashion.py``'s grid: several processes on one results file, the
dense networks' cache, the README's tables generated from the committed results (the grid's, ``rates_digits.py``'s)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fashion():
    spec = importlib.util.spec_from_file_location("bench_fashion", ROOT / "benchmarks" / "fashion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method: str, bits: int = 32, seed: int = 0, **extra) -> dict:
    return {"experiment": "adversarial", "arch": "cnn_small", "method": method, "rates": "uniform", "sparsity": 0.99,
            "seed": seed, "bits": bits, "clean_accuracy": 0.5, "robust_accuracy": 0.4, "pgd_robust_accuracy": 0.45,
            "verified_accuracy": None, "eps": 0.1, "n_test": 10, "seconds": 1.0, **extra}


def key(r: dict) -> dict:
    return {k: r[k] for k in ("experiment", "arch", "method", "rates", "sparsity", "seed")}


def test_two_writers_on_one_file_keep_every_row(fashion, tmp_path):
    out = tmp_path / "grid.json"
    a, b = fashion.Results(out, {"benchmark": "a"}), fashion.Results(out, {"benchmark": "b"})
    a.add([row("hydra"), row("hydra", 8)], 1.0)
    b.add([row("lwm")], 2.0)  # b read the file before a wrote: the merge keeps a's rows
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["method"], r["bits"]) for r in rows) == [("hydra", 8), ("hydra", 32), ("lwm", 32)]
    assert fashion.Results(out, {}).has(**key(row("lwm")), bits=32)


def test_a_model_is_claimed_once_and_a_dead_process_s_claim_taken_over(fashion, tmp_path):
    out = tmp_path / "grid.json"
    results = fashion.Results(out, {})
    k = key(row("admm"))
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        claims = {json.dumps(results.key({**k, "bits": 0})): other.pid}
        out.with_name(out.name + ".claims").write_text(json.dumps(claims))
        assert not results.claim(k, [32, 8])  # another live process is on it
    finally:
        other.communicate(b"")
    assert results.claim(k, [32, 8])  # its process ended without writing: taken over
    assert results.claim(k, [32, 8])  # ours, still
    results.add([row("admm"), row("admm", 8)], 1.0)
    assert json.loads(out.with_name(out.name + ".claims").read_text()) == {}  # written: the claim is gone
    assert not fashion.Results(out, {}).claim(k, [32, 8])  # its rows are there
    assert fashion.Results(out, {}).claim(k, [32, 8, 16])  # a row missing: measure it


def test_the_dense_network_is_trained_once_and_loads_equal(fashion, tmp_path):
    calls = []

    def blank():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))

    def fit():
        calls.append(1)
        model = blank()
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.add_(2.0)
        return model, 12.5, 11.0

    path = tmp_path / "cache" / "dense.safetensors"
    first = fashion.cached_dense(path, fit, blank)
    again = fashion.cached_dense(path, fit, blank)
    assert len(calls) == 1 and path.is_file() and not path.with_name(path.name + ".part").exists()
    assert again[1:] == (12.5, 11.0)
    for name, value in first[0].state_dict().items():
        assert torch.equal(value, again[0].state_dict()[name]), name


def test_cpu_hours_count_each_training_once(fashion):
    rows = [row("hydra", 32, train_cpu_seconds=3600.0, measure_cpu_seconds=360.0),
            row("hydra", 8, train_cpu_seconds=3600.0, measure_cpu_seconds=720.0),
            row("lwm", 32)]  # written before CPU time was recorded
    hours, unknown = fashion.cpu_hours(rows)
    assert hours == pytest.approx(1.3) and unknown == 1


def test_the_readme_table_is_the_committed_results_file(fashion):
    """benchmarks/README.md's fashion-full block is ``fashion.py --table ... --readme``'s output."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    rows = json.loads((ROOT / "benchmarks" / "results" / "fashion_full.json").read_text())["rows"]
    assert fashion.readme_with_table(readme, rows) == readme, \
        "run: python benchmarks/fashion.py --table benchmarks/results/fashion_full.json --readme benchmarks/README.md"


def test_the_readme_rates_table_is_the_committed_results_file():
    spec = importlib.util.spec_from_file_location("bench_rates_digits", ROOT / "benchmarks" / "rates_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    rows = module.read_rows(ROOT / "benchmarks" / "results" / "rates_digits.jsonl")
    assert rows and module.readme_with_table(readme, rows) == readme, \
        "run: python benchmarks/rates_digits.py --table benchmarks/results/rates_digits.jsonl --readme benchmarks/README.md"
