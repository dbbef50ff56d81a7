"""CERTIFY (Cohen et al. 2019) against a case with a known answer, and its abstentions."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pipeline.errors import HydraPipeError
from pipeline.smoothing import ABSTAIN, certify, certify_report, clopper_pearson_lower, sample_counts

W = torch.tensor([3.0, -4.0])  # |W| = 5
B = 0.5


def linear(x: torch.Tensor) -> torch.Tensor:
    """Binary linear classifier: class 1 where w.x + b > 0. Its Gaussian-smoothed version is itself, and the
    smoothed top-class probability is Phi(|w.x + b| / (sigma |w|)), so CERTIFY's radius with an exact p_A would be
    sigma Phi^-1(p_A) = |w.x + b| / |w|: the distance to the decision boundary."""
    s = x.flatten(1) @ W + B
    return torch.stack([-s, s], 1)


def boundary_distance(x: torch.Tensor) -> np.ndarray:
    return ((x.flatten(1) @ W + B).abs() / W.norm()).numpy()


def points(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, 2)


def test_linear_classifier_radius_matches_the_closed_form():
    sigma = 0.5
    x = points([0.3, 0.1], [1.0, 1.0], [0.9, 0.2], [0.2, 0.3], [0.5, 0.2])
    true = boundary_distance(x)
    cert = certify(linear, x, sigma, n0=100, n=100_000, alpha=0.001, seed=3)
    expected_class = (x.flatten(1) @ W + B > 0).long().numpy()
    assert np.array_equal(cert.prediction, expected_class)
    # sound: never above the true radius (holds with probability 1 - alpha; the seed is fixed)
    assert np.all(cert.radius <= true)
    # and tight: the Clopper-Pearson gap at n = 100,000 costs less than 0.05 sigma here
    assert np.all(cert.radius >= true - 0.05 * sigma)


def test_radius_grows_with_sigma_for_a_far_point_until_the_bound_caps_it():
    x = points([1.0, 0.0])  # distance 0.7
    r_small = certify(linear, x, 0.1, n=2000, seed=0).radius[0]
    r_large = certify(linear, x, 0.5, n=2000, seed=0).radius[0]
    # with sigma 0.1 every draw agrees, so the radius is sigma Phi^-1(alpha^(1/n)), far below 0.7
    assert r_small == pytest.approx(0.1 * norm.ppf(0.001 ** (1 / 2000)), rel=1e-6)
    assert r_small < r_large <= 0.7


def test_abstains_on_the_decision_boundary():
    x = points([0.0, 0.125], [0.4, 0.425])  # w.x + b = 0 for both
    cert = certify(linear, x, 0.25, n=10_000, seed=0)
    assert np.all(cert.prediction == ABSTAIN)
    assert np.all(cert.radius == 0.0)


def test_abstains_when_too_few_samples_to_be_confident():
    x = points([1.0, 0.0])  # every draw agrees, but 5 draws cannot show p_A > 1/2 at alpha = 0.001
    cert = certify(linear, x, 0.01, n=5, alpha=0.001)
    assert cert.prediction[0] == ABSTAIN
    assert certify(linear, x, 0.01, n=20, alpha=0.001).prediction[0] == 1


def test_clopper_pearson_closed_forms_and_coverage():
    # all successes: the bound solves p^n = alpha; no success: 0
    assert clopper_pearson_lower(np.array([50]), 50, 0.01)[0] == pytest.approx(0.01 ** (1 / 50))
    assert clopper_pearson_lower(np.array([0]), 50, 0.01)[0] == 0.0
    # coverage: the lower bound exceeds the true proportion in at most ~alpha of the experiments
    rng = np.random.default_rng(0)
    p, n, alpha = 0.7, 200, 0.05
    k = rng.binomial(n, p, size=20_000)
    miss = float((clopper_pearson_lower(k, n, alpha) > p).mean())
    assert miss <= alpha


def test_counts_do_not_depend_on_how_draws_are_batched():
    x = points([0.3, 0.1], [0.1, 0.4], [0.5, 0.5])
    for batch_size in (7, 100, 10_000):
        counts = sample_counts(linear, x, 0.3, 250, 2, batch_size=batch_size, generator=torch.Generator().manual_seed(0))
        assert counts.shape == (3, 2) and np.all(counts.sum(1) == 250)


def test_report_certified_accuracy_is_monotone_in_the_radius():
    x = points([0.3, 0.1], [1.0, 1.0], [0.9, 0.2], [0.2, 0.3], [0.0, 0.125])
    y = (x.flatten(1) @ W + B > 0).long().numpy()
    y[1] = 1 - y[1]  # one wrong label: its certificate is for the other class
    rep = certify_report(linear, x, y, 0.25, [0.1, 0.2, 0.5], n=5000)
    acc = [rep["certified_accuracy"][k] for k in ("0", "0.1", "0.2", "0.5")]
    assert acc == sorted(acc, reverse=True)
    assert acc[0] == pytest.approx(3 / 5)  # the boundary point abstains, the mislabelled one is wrong
    assert rep["abstain_rate"] == pytest.approx(1 / 5)


def test_certifies_a_torch_network_under_its_own_training_noise():
    """A multi-class network: an input far from every other class is certified with its own label."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]]))
        net[1].bias.zero_()
    cert = certify(net, points([3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]), 0.25, n=2000)
    assert list(cert.prediction) == [0, 1, 2] and np.all(cert.radius > 0.5)


@pytest.mark.parametrize("kwargs", [dict(sigma=0.0), dict(sigma=-1.0), dict(n=0), dict(alpha=0.7)])
def test_bad_settings_are_one_line_errors(kwargs):
    args = dict(sigma=0.25, n0=10, n=100, alpha=0.001) | kwargs
    with pytest.raises(HydraPipeError):
        certify(linear, points([0.3, 0.1]), **args)


def test_cli_audit_certifies_the_smoothed_deployed_model(tmp_path):
    """``hydra-pipe audit --smoothing-sigma``: the report's smoothing block is CERTIFY on the ONNX model's numerics,
    so it matches CERTIFY on the torch model it was exported from (same seed, same noise)."""
    import json
    import os
    import subprocess
    import sys

    from pipeline.onnx_io import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    export_onnx(net, tmp_path / "m.onnx", (1, 2, 2))
    rng = np.random.default_rng(0)
    x, y = rng.random((12, 1, 2, 2), dtype=np.float32), rng.integers(0, 3, 12).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    args = ["audit", "m.onnx", "--data", "d.npz", "--eps", "0.01", "--steps", "0", "--no-crown",
            "--smoothing-sigma", "0.5", "--out", "r.json"]
    res = subprocess.run([sys.executable, "-c", "from stages.cli import app; app()", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_PIPE_QUIET": "1"})
    assert res.returncode == 0, res.stderr
    sm = json.loads((tmp_path / "r.json").read_text())["smoothing"]
    assert sm["sigma"] == 0.5 and sm["n"] == 10_000
    expected = certify_report(net, torch.from_numpy(x), y, 0.5, [0.25, 0.5, 0.75, 1.0], n=10_000, seed=0)
    for r, acc in expected["certified_accuracy"].items():
        assert sm["certified_accuracy"][r] == pytest.approx(acc, abs=1 / 12 + 1e-9)
