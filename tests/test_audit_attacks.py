"""The audit's attack side: attacks in order on what is undecided, per-attack breaks, the float twin of an int8
graph, confirmation near the boundary, the verdict's independence of batching, and the confidence intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.audit.run import run_audit
from pipeline.audit.report import clopper_pearson
from pipeline.config import AuditParams
from tests.test_audit import _data, _mlp_onnx

torch.set_num_threads(1)

QUICK = dict(steps=30, restarts=3, apgd_steps=20, apgd_targets=2, square_queries=50, batch_size=256, bab=False)


@pytest.fixture
def mlp(tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp_onnx(path)
    return path


def test_clopper_pearson_matches_the_exact_binomial_interval():
    from scipy.stats import binom

    assert clopper_pearson(0, 10) == (0.0, round(1 - 0.025 ** 0.1, 4))  # closed form at k = 0
    assert clopper_pearson(10, 10) == (round(0.025 ** 0.1, 4), 1.0)
    lo, hi = clopper_pearson(37, 50)
    # the interval's ends are where the binomial tail probabilities equal 2.5%
    assert binom.sf(36, 50, lo) == pytest.approx(0.025, abs=1e-3)
    assert binom.cdf(37, 50, hi) == pytest.approx(0.025, abs=1e-3)


def test_each_attack_runs_on_what_is_left_and_the_counts_add_up(mlp):
    x, y = _data(mlp, n=60)
    rep = run_audit(mlp, x, y, AuditParams(eps=0.15, **QUICK), progress=False)
    names = [(a.name, a.model) for a in rep.attacks]
    assert names == [("apgd-ce", "graph"), ("apgd-t", "graph"), ("pgd", "graph"), ("square", "graph")]
    n, clean = rep.n, round(rep.clean_accuracy * rep.n)
    verified = rep.decided.verified
    robust = round(rep.robust_accuracy * n)
    assert clean - verified - sum(a.broken for a in rep.attacks) == robust - verified
    assert rep.attacks[0].attacked == clean - round(rep.crown_verified_accuracy * n)  # after IBP and CROWN
    for before, after in zip(rep.attacks, rep.attacks[1:]):  # each attacks what the ones before left
        assert after.attacked <= before.attacked - before.broken
    assert sum(rep.decided.model_dump().values()) == n and rep.decided.broken == n - robust
    assert rep.attacks[0].broken > 0  # the cheap attack decides most breakable examples
    for key in ("clean_accuracy", "robust_accuracy", "verified_accuracy"):
        lo, hi = rep.confidence_intervals[key]
        assert lo <= getattr(rep, key) <= hi and hi - lo > 0.05  # 60 examples cannot pin a figure down


def test_attacks_option_chooses_the_set(mlp):
    x, y = _data(mlp, n=30)
    rep = run_audit(mlp, x, y, AuditParams(eps=0.15, attacks=["pgd", "apgd-ce"], **QUICK), progress=False)
    assert [a.name for a in rep.attacks] == ["apgd-ce", "pgd"] and rep.square is None
    with pytest.raises(Exception, match="twice"):
        AuditParams(attacks=["pgd", "pgd"])


def test_the_verdict_of_an_example_does_not_depend_on_the_batch(mlp):
    """Every attack seeds its streams by the example's index in the whole set: the same verdicts whatever the
    batch size (chunks) and whoever else is in the set."""
    x, y = _data(mlp, n=48)
    params = AuditParams(eps=0.12, **QUICK)
    small = run_audit(mlp, x, y, params.model_copy(update={"batch_size": 16}), progress=False)
    large = run_audit(mlp, x, y, params.model_copy(update={"batch_size": 4096}), progress=False)
    assert small.model_dump(exclude={"seconds", "attacks", "batch_size"}) == \
        large.model_dump(exclude={"seconds", "attacks", "batch_size"})
    assert [(a.name, a.broken) for a in small.attacks] == [(a.name, a.broken) for a in large.attacks]


def test_the_audits_square_queries_onnxruntime_itself(mlp, monkeypatch):
    """On a CPU the audit's Square asks the deployed model (onnxruntime) for every query, not the graph form: no
    break needs confirming, and its verdicts are onnxruntime's own."""
    import pipeline.audit.attacks as audit_attacks
    from pipeline.attacks import square_attack

    seen = []

    def spy(model, x, y, eps, **kw):
        seen.append((model, kw["options"].confirm))
        return square_attack(model, x, y, eps, **kw)

    monkeypatch.setattr(audit_attacks, "square_attack", spy)
    x, y = _data(mlp, n=30)
    rep = run_audit(mlp, x, y, AuditParams(eps=0.15, attacks=["square"], **QUICK), progress=False)
    assert seen and all(not isinstance(m, torch.nn.Module) and confirm is None for m, confirm in seen)
    square = rep.attacks[-1]
    assert square.name == "square" and square.attacked > 0 and square.rejected_candidates == 0
    assert square.near_boundary_checked == 0


def _staircase_onnx(path) -> None:
    """An int8 graph whose rounding hides the way to its adversarial examples from a straight-through gradient:
    h = round(mean(x)) (QuantizeLinear, scale 1), logits (0.4, 1.5 relu(h - 0.2)). At mean(x) = 0.3 the deployed
    h is 0, the ReLU is off and every gradient through the rounded graph is 0; the float twin's h is 0.3, its ReLU
    is on and its gradient leads to mean(x) = 0.6, where the deployed h is 1 and class 1 wins."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.full((64, 1), 1 / 64, np.float32), "w"),
             numpy_helper.from_array(np.float32(1.0), "s"), numpy_helper.from_array(np.uint8(0), "z"),
             numpy_helper.from_array(np.array([0.2], np.float32), "b"),
             numpy_helper.from_array(np.array([[0.0, 1.5]], np.float32), "w2"),
             numpy_helper.from_array(np.array([0.4, 0.0], np.float32), "b2")]
    nodes = [helper.make_node("Flatten", ["input"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["h"]),
             helper.make_node("Sub", ["h", "b"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(nodes, "staircase", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_only_the_float_twin_finds_the_int8_graphs_adversarial_example(tmp_path):
    path = tmp_path / "staircase.onnx"
    _staircase_onnx(path)
    x, y = np.full((1, 1, 8, 8), 0.3, np.float32), np.zeros(1, np.int64)
    params = AuditParams(eps=0.3, steps=50, restarts=2, apgd_steps=20, attacks=["apgd-ce", "pgd"], bab=False,
                         alpha_crown=False)
    without = run_audit(path, x, y, params.model_copy(update={"float_twin": False}), progress=False)
    assert without.clean_accuracy == 1.0 and without.robust_accuracy == 1.0
    found = run_audit(path, x, y, params, progress=False)
    assert found.robust_accuracy == 0.0
    twin = [a for a in found.attacks if a.model == "float twin"]
    assert [a.name for a in twin] == ["apgd-ce"] and twin[0].broken == 1
    assert found.verified_accuracy == 0.0  # the bounds never proved what an attack breaks


def test_the_cli_takes_the_attack_set_and_refuses_an_unknown_name_in_one_line(mlp, tmp_path):
    import json

    from typer.testing import CliRunner

    from stages.cli import app

    x, y = _data(mlp, n=12)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    base = ["audit", str(mlp), "--data", str(tmp_path / "d.npz"), "--eps", "0.1", "--steps", "20", "--restarts", "2",
            "--no-bab", "--out", str(tmp_path / "r.json")]
    bad = CliRunner().invoke(app, base + ["--attacks", "apgd-ce,fab"])
    assert bad.exit_code == 2 and "fab" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
    ok = CliRunner().invoke(app, base + ["--attacks", "apgd-t,apgd-ce"])
    assert ok.exit_code == 0, ok.output
    assert [a["name"] for a in json.loads((tmp_path / "r.json").read_text())["attacks"]] == ["apgd-ce", "apgd-t"]
