"""run_audit on small ONNX graphs written with onnx.helper: the contract's keys, bounds file, errors, int8 numerics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.audit.run import run_audit
from pipeline.audit.report import render_report
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
    assert report.settled.verification == round(report.verified_accuracy * 40)
    assert report.settled.clean_wrong == 3
    assert sum(report.settled.model_dump().values()) == 40
    assert len(report.robust_accuracy_by_restart) == 3
    assert report.robust_accuracy_by_restart[-1] == pytest.approx(pgd)
    assert all(getattr(report.seconds, k) is not None for k in ("pgd", "ibp", "crown", "total"))
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
    on = run_audit(mlp, x, y, AuditParams(eps=eps, steps=0, bab=False), progress=False)
    assert on.crown_verified_accuracy <= on.alpha_crown_verified_accuracy == on.verified_accuracy
    assert on.alpha_crown_verified_accuracy <= on.clean_accuracy
    off = run_audit(mlp, x, y, AuditParams(eps=eps, steps=0, alpha_crown=False, bab=False), progress=False)
    assert off.alpha_crown_verified_accuracy is None
    assert off.verified_accuracy == off.crown_verified_accuracy  # crown >= ibp by construction
    bab = run_audit(mlp, x, y, AuditParams(eps=eps, steps=0), progress=False)  # on what alpha-CROWN left
    assert on.alpha_crown_verified_accuracy <= bab.bab_verified_accuracy == bab.verified_accuracy
    assert bab.bab.attacked == round((on.clean_accuracy - on.alpha_crown_verified_accuracy) * 40)


def test_branch_and_bound_says_which_examples_it_did_not_search(mlp):
    """Examples the shortfall gate keeps out of the search are counted as skipped, not as out of budget."""
    import io

    from rich.console import Console

    x, y = _data(mlp)
    gated = run_audit(mlp, x, y, AuditParams(eps=0.1, steps=0, bab_shortfall=0.0), progress=False)
    every = run_audit(mlp, x, y, AuditParams(eps=0.1, steps=0, bab_shortfall=None, bab_domains=4), progress=False)
    b = gated.bab
    assert b.attacked > 0 and b.skipped == b.undecided > 0 and b.verified == 0  # a gate of 0 searches nothing
    assert every.bab.skipped == 0 and every.bab.attacked == b.attacked
    console = Console(width=300, record=True, file=io.StringIO())
    console.print(render_report(gated))
    assert f"{b.skipped} not searched (root bound out of reach)" in console.export_text()


def test_l2_audit_runs_and_is_bounded_by_clean(mlp):
    x, y = _data(mlp, n=20)
    report = run_audit(mlp, x, y, AuditParams(eps=0.3, norm="l2", **FAST), progress=False)
    assert report.robust_accuracy <= report.pgd_robust_accuracy <= report.clean_accuracy
    assert [a.name for a in report.attacks] == ["apgd-ce", "apgd-t", "pgd", "square"]  # Square has an L2 form


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
    from pipeline.audit.report import AuditReport

    x, y = _data(mlp, n=10)
    report = run_audit(mlp, x, y, AuditParams(eps=0.05, steps=0, crown=False), progress=False)
    assert report.verified_method == "ibp+alpha-crown+bab"
    path = tmp_path / "audit.json"
    path.write_text(report.model_dump_json())
    again = AuditReport.read(path)
    assert again == report and again.verified_method == report.verified_method
    path.write_text('{"n": 3}')
    with pytest.raises(HydraPipeError, match="not an audit report"):
        AuditReport.read(path)


# ---------------------------------------------------------------- what people export (issue 16)

def _labels(path, x: np.ndarray, flip: int = 1) -> np.ndarray:
    """onnxruntime's own predictions, the first ``flip`` of them made wrong."""
    from pipeline.onnx_io import ort_logits, ort_session

    y = ort_logits(ort_session(path, 1), x).argmax(1).astype(np.int64)
    y[:flip] = (y[:flip] + 1) % 3
    return y


def test_softmax_cnn_is_audited_on_its_logits(tmp_path):
    from pipeline.onnx_io import ort_logits, ort_session
    from pipeline.onnx_load import load_onnx
    from tests.test_onnx_io import export_plain, softmax_cnn

    path = export_plain(softmax_cnn(), tmp_path / "softmax.onnx", (1, 8, 8))
    x = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
    probs = ort_logits(ort_session(path, 1), x)
    y = probs.argmax(1)
    y[:2] = (y[:2] + 1) % 5
    report = run_audit(path, x, y, AuditParams(eps=0.02, **FAST), progress=False)
    assert report.stripped_output_ops == ["Softmax"] and report.verification_blocked_by == []
    assert report.clean_accuracy == pytest.approx(10 / 12)
    assert report.verified_accuracy is not None and report.robust_accuracy is not None
    assert report.verified_accuracy <= report.robust_accuracy <= report.clean_accuracy
    # the graph the attacks and bounds ran on gives logits whose argmax is onnxruntime's
    logits = load_onnx(path)(torch.from_numpy(x)).detach()
    assert np.array_equal(logits.argmax(1).numpy(), probs.argmax(1))
    assert not np.allclose(logits.sum(1).numpy(), 1.0)
    # the parity check compares onnxruntime's probabilities with the graph's logits softmaxed again, and each
    # record's margins are in logit space (none was broken beyond the clean mistakes: the clean margins)
    assert report.parity.ok
    z = logits.double().numpy()
    want = z[np.arange(12), y] - np.where(np.eye(5, dtype=bool)[y], -np.inf, z).max(1)
    np.testing.assert_allclose([r.margin_upper for r in report.examples][2:], want[2:], rtol=1e-5, atol=1e-5)
    render_report(report)


def test_n_k_1_1_output_is_audited_and_bounded_as_n_k(tmp_path):
    from pipeline.onnx_io import ort_logits, ort_session
    from tests.test_onnx_io import conv_head_onnx

    path = conv_head_onnx(tmp_path / "head.onnx", final=None)
    x = np.random.default_rng(1).random((8, 1, 8, 8), dtype=np.float32)
    logits = ort_logits(ort_session(path, 1), x)
    report = run_audit(path, x, logits.argmax(1), AuditParams(eps=0.01, **FAST), bounds_out=tmp_path / "b.npz",
                       progress=False)
    assert report.classes == 6 and report.clean_accuracy == 1.0
    with np.load(tmp_path / "b.npz") as b:
        assert b["crown_lower"].shape == (8, 6)
        assert (b["crown_lower"] <= logits + 1e-5).all() and (logits <= b["crown_upper"] + 1e-5).all()


def test_fixed_batch_export_is_audited_on_five_examples(tmp_path):
    from tests.test_onnx_io import _ViewNet, export_plain

    path = export_plain(_ViewNet().eval(), tmp_path / "fixed.onnx", (1, 8, 8), dynamic=False)
    x = np.random.default_rng(2).random((5, 1, 8, 8), dtype=np.float32)
    y = _labels(path, x)
    report = run_audit(path, x, y, AuditParams(eps=0.01, **FAST), progress=False)
    assert report.n == 5 and report.clean_accuracy == pytest.approx(4 / 5)
    assert report.verified_accuracy is not None and report.robust_accuracy is not None
    assert report.robust_accuracy <= report.clean_accuracy


def test_an_op_without_bound_rule_blocks_verification_not_the_attack(tmp_path):
    from tests.test_onnx_io import lrn_onnx

    path = lrn_onnx(tmp_path / "lrn.onnx", 3)
    x = np.random.default_rng(3).random((10, 1, 6, 6), dtype=np.float32)
    y = _labels(path, x)
    out = tmp_path / "b.npz"
    report = run_audit(path, x, y, AuditParams(eps=0.1, **FAST), bounds_out=out, progress=False)
    assert report.verification_blocked_by == ["LRN"]
    assert report.ibp_verified_accuracy is None and report.crown_verified_accuracy is None
    assert report.alpha_crown_verified_accuracy is None and report.verified_accuracy is None
    assert report.verified_method == "none"
    with np.load(out) as f:  # the declared file, with no bounds in it
        assert f.files == []
    assert report.pgd_robust_accuracy is not None and report.robust_accuracy is not None
    assert report.settled.verification == 0 and sum(report.settled.model_dump().values()) == 10
    assert report.robust_accuracy < report.clean_accuracy == 0.9  # eps 0.1 breaks some: the attack did run
    import io

    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_report(report))
    text = console.export_text()
    assert "verification blocked by" in text and "LRN" in text


def test_misclassified_examples_are_verified_only_when_bounds_are_asked_for(mlp, tmp_path):
    from pipeline.audit.compute import compute_task
    from pipeline.audit.run import AuditHooks

    x, y = _data(mlp)  # 3 of 40 misclassified
    rows: list[tuple[str, int, bool]] = []

    def compute(deployed, xt, yt, task, tick):
        if not task.is_attack:
            rows.append((task.kind, len(task.rows), task.keeps_bounds))
        return compute_task(deployed, xt, yt, task, tick)

    params, hooks = AuditParams(eps=0.05, steps=0), AuditHooks(compute=compute)
    with_bounds = run_audit(mlp, x, y, params, bounds_out=tmp_path / "b.npz", progress=False, hooks=hooks)
    asked = rows[:]
    rows.clear()
    without = run_audit(mlp, x, y, params, progress=False, hooks=hooks)
    assert [r[:2] for r in asked[:2]] == [("ibp", 40), ("crown", 40)] and asked[0][2]
    assert [r[:2] for r in rows[:2]] == [("ibp", 37), ("crown", 37)] and not rows[0][2]
    assert asked[2:] == rows[2:] and all(r[0] in ("alpha-crown", "bab") for r in rows[2:])  # clean-correct rows
    for key in ("ibp_verified_accuracy", "crown_verified_accuracy", "alpha_crown_verified_accuracy",
                "verified_accuracy"):
        assert getattr(with_bounds, key) == getattr(without, key)
    with np.load(tmp_path / "b.npz") as b:
        assert b["crown_lower"].shape == (40, 4)


def test_crown_and_alpha_crown_report_progress_per_image_on_deep_networks(mlp):
    from pipeline.audit.parts import Bars, Layout
    from pipeline.audit.run import AuditHooks

    calls: dict[str, list[tuple[int, int]]] = {}

    class Recording(Bars):
        def task(self, description, total):
            bar = super().task(description, total)
            return lambda done, total_: (calls.setdefault(description, []).append((done, total_)),
                                         bar(done, total_))

    x, y = _data(mlp, n=8)  # 3 misclassified, 5 to verify
    # as if every example were a ResNet: one per bounds call
    hooks = AuditHooks(bars=Recording, layout=Layout(bounds_work=1))
    report = run_audit(mlp, x, y, AuditParams(eps=0.1, steps=0), progress=True, hooks=hooks)
    assert calls["CROWN bounds"] == [(i, 5) for i in range(0, 6)]  # 0: its clock starts with its first block
    todo = round((report.clean_accuracy - report.crown_verified_accuracy) * 8)
    assert todo > 0 and calls["alpha-CROWN bounds"] == [(i, todo) for i in range(0, todo + 1)]


def test_bounds_batches_are_one_image_on_deep_networks_and_full_on_small_ones(mlp):
    from pipeline.audit.parts import Layout
    from pipeline.audit.verify import bounds_batch
    from pipeline.data import DatasetInfo
    from pipeline.graph import as_graph
    from pipeline.models import build_model
    from pipeline.onnx_load import load_onnx

    layout = Layout()
    assert bounds_batch(load_onnx(mlp), torch.rand(1, 1, 4, 4), layout.bounds_work, layout.bounds_batch) == 256
    resnet = as_graph(build_model("resnet18", DatasetInfo(3, 32, 10, (0.5,) * 3, (0.25,) * 3)).eval())
    assert bounds_batch(resnet, torch.rand(1, 3, 32, 32), layout.bounds_work, layout.bounds_batch) == 1


# ---------------------------------------------------------------- eps sweep, chunked PGD, shapes (issue 15)

def test_the_eps_sweep_reports_every_verifier_and_pgd_per_radius(mlp):
    x, y = _data(mlp)
    params = AuditParams(eps=0.05, **FAST, sweep_eps=[0.0, 0.02, 0.05, 0.2], sweep_steps=FAST["steps"],
                         sweep_restarts=FAST["restarts"])
    report = run_audit(mlp, x, y, params, progress=False)
    points = report.eps_sweep
    assert [p.eps for p in points] == [0.0, 0.02, 0.05, 0.2]
    for p in points:
        assert p.clean == report.clean_accuracy and (p.steps, p.restarts) == (FAST["steps"], FAST["restarts"])
        assert p.ibp_verified <= p.crown_verified <= p.alpha_crown_verified <= p.pgd_robust <= p.clean
    # interval bounds only widen with the radius; at eps 0 everything correct is proven
    assert [p.ibp_verified for p in points] == sorted((p.ibp_verified for p in points), reverse=True)
    assert points[0].ibp_verified == points[0].pgd_robust == report.clean_accuracy
    # at the audit's own radius and budget the sweep is the audit
    same = points[2]
    assert (same.ibp_verified, same.crown_verified, same.alpha_crown_verified, same.pgd_robust) == (
        report.ibp_verified_accuracy, report.crown_verified_accuracy, report.alpha_crown_verified_accuracy,
        report.pgd_robust_accuracy)
    assert report.seconds.sweep is not None
    render_report(report)
    off = run_audit(mlp, x, y, params.model_copy(update={"sweep_steps": 0, "crown": False}), progress=False)
    assert all(p.pgd_robust is None and p.crown_verified is None and p.ibp_verified is not None
               for p in off.eps_sweep)


def test_sweep_radii_are_validated():
    from pydantic import ValidationError

    for bad in ([-0.1], [float("nan")], [float("inf")]):
        with pytest.raises(ValidationError):
            AuditParams(sweep_eps=bad)


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.3)])
def test_attacks_in_chunks_give_the_verdicts_of_one_pass(mlp, norm, eps):
    """Random streams are seeded by each example's index in the whole set, so chunks change nothing."""
    from pipeline.audit.parts import Layout
    from pipeline.audit.run import AuditHooks

    x, y = _data(mlp, n=60)
    params = AuditParams(eps=eps, norm=norm, steps=40, restarts=4, batch_size=8, square_queries=20, ibp=False)
    chunked = run_audit(mlp, x, y, params, progress=False)  # chunks of 4 * 8 // 4 = 8 examples
    whole = run_audit(mlp, x, y, params, progress=False, hooks=AuditHooks(layout=Layout(chunk_batches=10 ** 6)))
    assert chunked.model_dump(exclude={"seconds"}) == whole.model_dump(exclude={"seconds"})
    # each example's verdict and verifier bound exactly; the adversarial point's margin up to float rounding (an
    # attack's iterates are rounded differently in a batch of other rows)
    assert [(r.status, r.phase, r.margin_lower) for r in chunked.examples] == \
        [(r.status, r.phase, r.margin_lower) for r in whole.examples]
    assert np.allclose([r.margin_upper for r in chunked.examples], [r.margin_upper for r in whole.examples],
                       rtol=1e-3, atol=1e-4)
    assert sum(a.broken for a in chunked.attacks) > 0 and chunked.attacks[0].attacked > 8  # several chunks


def test_a_model_whose_input_does_not_fit_the_data_is_one_line(mlp):
    x, y = _data(mlp, n=5)
    for bad in (np.concatenate([x, x], axis=1), x[:, :, :3, :3], np.zeros((5, 1, 4, 5), np.float32)):
        with pytest.raises(HydraPipeError, match="cannot run on x of shape") as err:
            run_audit(mlp, bad, y, AuditParams(eps=0.1, **FAST), progress=False)
        assert "\n" not in str(err.value)


def test_a_model_that_mixes_the_examples_of_a_batch_is_one_line(tmp_path):
    """Fixed batch 1 and Flatten over axis 0: onnxruntime runs it one example at a time, the graph form (which
    attacks and bounds run on many examples at once) cannot; found by tests/test_fuzz.py (it was a traceback)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"], axis=0),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"])]
    inits = [numpy_helper.from_array(np.ones((2, 3), np.float32), "w"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits)
    path = tmp_path / "mix.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(0).random((4, 2, 4, 4), dtype=np.float32)
    with pytest.raises(HydraPipeError, match="batch") as err:
        run_audit(path, x, np.zeros(4, np.int64), AuditParams(eps=0.1, **FAST), progress=False)
    assert "\n" not in str(err.value)


def test_nan_logits_are_one_line(tmp_path):
    """Relu then x / x: 0 / 0 wherever the Relu is off. The fuzzer's x / x showed the audit ran on NaN logits
    without a word (argmax of NaN, NaN gradients), reporting figures that meant nothing."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Sub", ["input", "half"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Div", ["r", "r"], ["d"]), helper.make_node("Flatten", ["d"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["logits"])]
    inits = [numpy_helper.from_array(np.float32(0.5), "half"), numpy_helper.from_array(np.ones((4, 2), np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], inits)
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.full((6, 1, 2, 2), 0.2, np.float32)  # every Relu off: 0 / 0
    x[:2] = 0.8  # every Relu on: finite logits for these two
    with pytest.raises(HydraPipeError, match="NaN logits on 4 of the 6 examples") as err:
        run_audit(path, x, np.zeros(6, np.int64), AuditParams(eps=0.1, **FAST), progress=False)
    assert "\n" not in str(err.value)
