"""run_audit on small ONNX graphs written with onnx.helper: the contract's keys, bounds file, errors, int8 numerics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.audit import run_audit
from pipeline.audit_report import render_report
from pipeline.config import AuditParams
from pipeline.errors import HydraPipeError
from tests.graphs import qdq_linear_graph

torch.set_num_threads(1)


def _mlp_onnx(path, seed: int = 0, hidden: int = 24, classes: int = 4) -> None:
    """Flatten-Gemm-Relu-Gemm on 1 x 4 x 4 inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (16, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.1, hidden).astype(np.float32)
    w2 = rng.normal(0, 0.5, (hidden, classes)).astype(np.float32)
    b2 = np.zeros(classes, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Flatten", ["input"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _data(path, n: int = 40, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    x = np.random.default_rng(seed).random((n, 1, 4, 4), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x})[0].argmax(1).astype(np.int64)
    y[:3] = (y[:3] + 1) % 4  # a few clean mistakes
    return x, y


FAST = dict(steps=30, restarts=3, square_queries=50, batch_size=256)


@pytest.fixture
def mlp(tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp_onnx(path)
    return path


def test_report_has_the_contract_keys_and_consistent_figures(mlp, tmp_path):
    x, y = _data(mlp)
    report = run_audit(mlp, x, y, AuditParams(eps=0.05, **FAST), bounds_out=tmp_path / "b.npz", progress=False)
    for key in ("n", "eps", "norm", "steps", "restarts", "clean_accuracy", "pgd_robust_accuracy",
                "ibp_verified_accuracy", "crown_verified_accuracy", "seconds"):
        assert key in report.model_dump()
    json.dumps(report.model_dump(mode="json"))  # the CLI writes it as JSON
    assert report.n == 40 and report.clean_accuracy == pytest.approx(37 / 40)
    ibp, crown, pgd = report.ibp_verified_accuracy, report.crown_verified_accuracy, report.pgd_robust_accuracy
    # verified <= robust <= clean, and the attack leaves the verified examples alone
    assert 0 < max(ibp, crown) <= pgd <= report.clean_accuracy
    assert report.robust_accuracy <= pgd
    assert report.settled["verification"] == round(report.verified_accuracy * 40)
    assert report.settled["clean_wrong"] == 3
    assert sum(report.settled.values()) == 40
    assert len(report.robust_accuracy_by_restart) == 3
    assert report.robust_accuracy_by_restart[-1] == pytest.approx(pgd)
    assert {"pgd", "ibp", "crown", "total"} <= set(report.seconds)
    # the bounds contain the deployed model's logits at the clean inputs
    import onnxruntime as ort

    logits = ort.InferenceSession(str(mlp), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with np.load(tmp_path / "b.npz") as b:
        assert set(b.files) == {"ibp_lower", "ibp_upper", "crown_lower", "crown_upper"}
        assert b["ibp_lower"].shape == (40, 4)
        assert (b["ibp_lower"] <= logits + 1e-5).all() and (logits <= b["ibp_upper"] + 1e-5).all()
        assert (b["crown_lower"] <= logits + 1e-5).all() and (logits <= b["crown_upper"] + 1e-5).all()
        assert (b["crown_upper"] - b["crown_lower"]).sum() <= (b["ibp_upper"] - b["ibp_lower"]).sum() + 1e-4
    render_report(report)


def test_steps_zero_runs_no_attack_and_crown_can_be_off(mlp, tmp_path):
    x, y = _data(mlp, n=10)
    report = run_audit(mlp, x, y, AuditParams(eps=0.05, steps=0, crown=False), bounds_out=tmp_path / "b.npz",
                       progress=False)
    assert report.pgd_robust_accuracy is None and report.robust_accuracy is None
    assert report.crown_verified_accuracy is None and report.ibp_verified_accuracy is not None
    with np.load(tmp_path / "b.npz") as b:
        assert set(b.files) == {"ibp_lower", "ibp_upper"}
    render_report(report)


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_alpha_crown_verifies_at_least_what_crown_does_and_can_be_off(mlp, eps):
    x, y = _data(mlp)
    on = run_audit(mlp, x, y, AuditParams(eps=eps, steps=0), progress=False)
    assert on.crown_verified_accuracy <= on.alpha_crown_verified_accuracy == on.verified_accuracy
    assert on.alpha_crown_verified_accuracy <= on.clean_accuracy
    off = run_audit(mlp, x, y, AuditParams(eps=eps, steps=0, alpha_crown=False), progress=False)
    assert off.alpha_crown_verified_accuracy is None
    assert off.verified_accuracy == off.crown_verified_accuracy  # crown >= ibp by construction


def test_l2_audit_runs_and_is_bounded_by_clean(mlp):
    x, y = _data(mlp, n=20)
    report = run_audit(mlp, x, y, AuditParams(eps=0.3, norm="l2", **FAST), progress=False)
    assert report.pgd_robust_accuracy <= report.clean_accuracy
    assert report.square is None  # Square is L-inf only


@pytest.mark.parametrize("change, words", [
    (lambda x, y: (x * 2, y), "[0, 1]"),
    (lambda x, y: (x[:, 0], y), "N x C x H x W"),
    (lambda x, y: (x, y[:-1]), "examples"),
    (lambda x, y: (x, y.astype(np.float32)), "integer"),
    (lambda x, y: (x, y + 10), "labels"),
    (lambda x, y: (x.astype(np.int64), y), "float32"),
])
def test_bad_input_is_one_line_and_writes_nothing(mlp, tmp_path, change, words):
    x, y = change(*_data(mlp, n=5))
    out = tmp_path / "b.npz"
    with pytest.raises(HydraPipeError) as err:
        run_audit(mlp, x, y, AuditParams(eps=0.1, **FAST), bounds_out=out, progress=False)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_negative_eps_and_unreadable_model(mlp, tmp_path):
    x, y = _data(mlp, n=5)
    with pytest.raises(HydraPipeError):
        run_audit(mlp, x, y, AuditParams.model_construct(**{**AuditParams().model_dump(), "eps": -0.1}), progress=False)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(HydraPipeError):
        run_audit(bad, x, y, AuditParams(eps=0.1, **FAST), progress=False)


def test_quantized_graph_verdicts_follow_the_deployed_rounding(tmp_path):
    path = tmp_path / "q.onnx"
    qdq_linear_graph(path)
    x = np.full((4, 1, 1, 1), 0.5, np.float32)
    y = np.zeros(4, np.int64)
    # eps 0.12: every point of the ball rounds to 0.5 on the deployed model, so nothing can break it (a float
    # model would be broken at x > 0.6); eps 0.2: x = 0.7 rounds to 0.75 > 0.6
    small = run_audit(path, x, y, AuditParams(eps=0.12, **FAST), progress=False)
    assert small.pgd_robust_accuracy == 1.0 and small.robust_accuracy == 1.0
    large = run_audit(path, x, y, AuditParams(eps=0.2, ibp=False, crown=False, **FAST), progress=False)
    assert large.pgd_robust_accuracy == 0.0


def test_the_report_round_trips_through_its_json_and_names_its_proofs(mlp, tmp_path):
    from pipeline.audit_report import AuditReport

    x, y = _data(mlp, n=10)
    report = run_audit(mlp, x, y, AuditParams(eps=0.05, steps=0, crown=False), progress=False)
    assert report.verified_method == "ibp+alpha-crown"
    path = tmp_path / "audit.json"
    path.write_text(report.model_dump_json())
    again = AuditReport.read(path)
    assert again == report and again.verified_method == report.verified_method
    path.write_text('{"n": 3}')
    with pytest.raises(HydraPipeError, match="not an audit report"):
        AuditReport.read(path)
