"""Verdicts that hold in every execution mode (issue 24): a journal written by other code is discarded, workers
give the one-process records at the audit's thread count, a graph form that does not compute what onnxruntime
computes proves nothing, and every example gets a record whose status never folds an error into undecided."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.audit.deployed as deployed_module
import pipeline.audit.journal as journal_module
from pipeline.audit.records import STATUSES, cactus, read_results, results_paths, write_results
from pipeline.audit.report import clopper_pearson
from pipeline.audit.compute import compute_task
from pipeline.audit.run import AuditHooks, run_audit
from pipeline.config import AuditParams
from pipeline.onnx_io import export_onnx
from tests.test_audit import _data, _mlp_onnx

PARAMS = dict(eps=0.06, steps=20, restarts=2, batch_size=16, square_queries=30)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("modes")
    _mlp_onnx(d / "m.onnx", hidden=32)
    x, y = _data(d / "m.onnx", n=48)
    return d, x, y


def test_a_journal_written_by_other_code_is_discarded_with_one_line(mlp, tmp_path, monkeypatch):
    d, x, y = mlp
    journal, params = tmp_path / "journal", AuditParams(**PARAMS)
    said: list[str] = []
    first = run_audit(d / "m.onnx", x, y, params, progress=False, journal=journal, hooks=AuditHooks(say=said.append))
    entries = sorted(journal.glob("audit-*.npz"))
    assert entries and not said
    # the same audit after a change of the pipeline's sources: nothing of the old journal may be reused
    monkeypatch.setattr(journal_module, "code_fingerprint", lambda: "other code")
    computed: list[str] = []

    def compute(*a):
        computed.append(a[3].part)
        return compute_task(*a)

    again = run_audit(d / "m.onnx", x, y, params, progress=False, journal=journal,
                      hooks=AuditHooks(say=said.append, compute=compute))
    assert len(said) == 1 and "other code" in said[0] and f"{len(entries)} entries discarded" in said[0]
    assert len(computed) == len(entries)  # every part computed again
    assert not any(p.exists() for p in entries)
    assert again.model_dump(exclude={"seconds"}) == first.model_dump(exclude={"seconds"})
    # a journal of other inputs (another seed) is ignored and left, and said so
    said.clear()
    run_audit(d / "m.onnx", x, y, params.model_copy(update={"seed": 3}), progress=False, journal=journal,
              hooks=AuditHooks(say=said.append))
    assert len(said) == 1 and "ignored" in said[0]
    assert any(journal.glob("audit-*.npz"))


def _conv_onnx(path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 4, 2, 1),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 2 * 2, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 4)).eval()  # CNN-small's shape: its sums differ at 1 and 2 threads
    export_onnx(net, path, (1, 8, 8))
    return net


def _threads_compute(deployed, xt, yt, task, tick):  # in a worker: the torch threads each part ran with
    out = compute_task(deployed, xt, yt, task, tick)
    threads = torch.get_num_threads()  # after the part: attacks set their own count while they run
    (Path(os.environ["THREADS_LOG"]) / f"{os.getpid()}-{task.part}-{threads}").touch()
    return out


def test_two_workers_give_the_one_process_records_at_two_threads(tmp_path, monkeypatch):
    """Workers run with the audit's own thread count: torch's sums differ between 1 and 2 threads (a small batch
    through CNN-small's shape: up to 1.5e-8), so a worker with threads // workers could change margins and
    borderline verdicts."""
    net = _conv_onnx(tmp_path / "c.onnx")
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    y[:4] = (y[:4] + 1) % 4  # a few clean mistakes
    params = AuditParams(eps=0.03, steps=10, restarts=2, batch_size=8, square_queries=20, threads=2, bab_domains=10)
    one = run_audit(tmp_path / "c.onnx", x, y, params, progress=False)
    log = tmp_path / "log"
    log.mkdir()
    monkeypatch.setenv("THREADS_LOG", str(log))  # the spawned workers inherit it
    two = run_audit(tmp_path / "c.onnx", x, y, params.model_copy(update={"workers": 2}), progress=False,
                    hooks=AuditHooks(compute=_threads_compute))
    ran = list(log.iterdir())
    assert ran and {p.name.rsplit("-", 1)[1] for p in ran} == {"2"}  # every part, in a worker, at 2 threads
    assert len({p.name.split("-", 1)[0] for p in ran}) == 2
    assert two.model_dump(exclude={"seconds"}) == one.model_dump(exclude={"seconds"})
    strip = [r.as_json() | {"seconds": None} for r in one.examples]
    assert [r.as_json() | {"seconds": None} for r in two.examples] == strip  # bit for bit, margins included
    assert {r["status"] for r in strip} >= {"clean-wrong", "proven"}


def test_a_graph_form_that_differs_from_onnxruntime_proves_nothing(mlp, monkeypatch):
    d, x, y = mlp
    params = AuditParams(**PARAMS)
    honest = run_audit(d / "m.onnx", x, y, params, progress=False)
    assert honest.parity.ok and honest.parity.max_logit_difference <= honest.parity.tolerance
    assert honest.verified_accuracy > 0 and honest.verification_refused is None
    real = deployed_module.load_onnx

    def skewed(path):  # a loader that is wrong for this model: its last bias off by 0.05
        graph = real(path)
        last = [t for t in graph.state_dict().values() if t.is_floating_point()][-1]  # a reference: the bias
        last += 0.05
        return graph

    monkeypatch.setattr(deployed_module, "load_onnx", skewed)
    report = run_audit(d / "m.onnx", x, y, params, progress=False, bounds_out=d / "refused.npz")
    with np.load(d / "refused.npz") as f:  # written all the same (a DVC stage declares it), with no bounds in it
        assert f.files == []
    assert not report.parity.ok and report.parity.max_logit_difference > 0.04
    assert report.verified_accuracy is None and report.ibp_verified_accuracy is None
    assert "differs from onnxruntime" in report.verification_refused
    assert report.robust_accuracy is not None and report.decided.verified == 0  # the attacks still ran
    assert all(r.status != "proven" for r in report.examples)


def test_every_example_has_one_record_and_an_error_is_never_undecided(mlp, tmp_path):
    d, x, y = mlp
    poisoned = {}

    def compute(deployed, xt, yt, task, tick):  # a bound that came out NaN for one example
        arrays, meta = compute_task(deployed, xt, yt, task, tick)
        if task.kind == "ibp" and "row" not in poisoned:
            ok = ~arrays["verified"]
            if ok.any():
                i = int(np.flatnonzero(ok)[0])
                poisoned["row"] = int(task.rows[i])
                arrays = {**arrays, "margin": arrays["margin"].copy()}
                arrays["margin"][i] = np.nan
        return arrays, meta

    params = AuditParams(**{**PARAMS, "crown": False, "alpha_crown": False, "bab": False, "attacks": ["apgd-ce"]})
    report = run_audit(d / "m.onnx", x, y, params, progress=False, hooks=AuditHooks(compute=compute))
    records = report.examples
    assert [r.index for r in records] == list(range(len(x))) and all(r.status in STATUSES for r in records)
    row = records[poisoned["row"]]
    assert row.status in ("error", "broken")  # an attack's break still counts; otherwise error, never undecided
    counts = report.decided.model_dump()
    assert sum(counts.values()) == len(x)
    assert counts["error"] == sum(r.status == "error" for r in records)
    assert counts["verified"] == sum(r.status == "proven" for r in records)
    assert counts["broken"] == sum(r.status in ("broken", "clean-wrong") for r in records)
    for r in records:  # the margins agree with the verdicts
        if r.status == "proven":
            assert r.margin_lower > 0 and r.phase == "ibp"
        if r.status == "broken":
            assert r.margin_upper <= 0 and r.phase.startswith("apgd-ce")
        if r.status == "clean-wrong":
            assert r.margin_upper <= 0 and r.phase == "clean"
    csv_path, jsonl_path = write_results(records, tmp_path / "report.json")
    assert (csv_path, jsonl_path) == results_paths(tmp_path / "report.json")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("index,label,status,phase,margin_lower,margin_upper,seconds_") and len(lines) == 49
    assert read_results(jsonl_path) == records
    assert json.loads(jsonl_path.read_text().splitlines()[0])["index"] == 0
    curve = cactus(records)
    decided = sum(r.status in ("proven", "broken", "clean-wrong") for r in records)
    assert [k for _, k in curve] == list(range(1, decided + 1))
    assert all(a[0] <= b[0] for a, b in zip(curve, curve[1:]))


def test_confidence_intervals_are_rounded_outward():
    from scipy.stats import beta

    for n in (7, 40, 200, 1000):
        for k in range(0, n + 1, max(1, n // 9)):
            lo, hi = clopper_pearson(k, n)
            exact_lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
            exact_hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
            assert lo <= exact_lo and hi >= exact_hi and round(lo, 4) == lo and round(hi, 4) == hi


def _qdq_onnx(path):
    """input [N,1,2,2] -> Flatten -> QuantizeLinear (scale 1/4, U8) -> DequantizeLinear -> Gemm: inputs at odd
    eighths sit exactly on a rounding tie."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[1.0, -2.0, 0.5], [-1.0, 1.5, 2.0], [0.5, 1.0, -1.0], [2.0, -0.5, 1.0]], np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["f"]),
             helper.make_node("QuantizeLinear", ["f", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Gemm", ["d", "w"], ["logits"])]
    inits = [numpy_helper.from_array(np.array(0.25, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z"), numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_rounding_tie_decided_the_other_way_is_parity_but_a_wrong_loader_is_not(tmp_path, monkeypatch):
    from pipeline.graph import Quantize

    _qdq_onnx(tmp_path / "q.onnx")
    x = np.full((6, 1, 2, 2), 0.5, np.float32)
    x[:3, 0, 0, 0] = [0.125, 0.625, 0.875]  # 0.5 and 2.5 quanta: ties that half-to-even and half-up break apart
    y = np.zeros(6, np.int64)
    params = AuditParams(eps=0.01, steps=5, restarts=1, square_queries=10)
    real = deployed_module.load_onnx

    def half_up(path):  # a graph form that breaks ties upwards: one quantum off at a tie, exact elsewhere
        graph = real(path)
        for m in graph.modules():
            if isinstance(m, Quantize):
                m.forward = lambda v, m=m: torch.clamp(torch.floor(v / m.scale + 0.5) + m.zero_point, m.qmin, m.qmax)
        return graph

    monkeypatch.setattr(deployed_module, "load_onnx", half_up)
    tie = run_audit(tmp_path / "q.onnx", x, y, params, progress=False)
    assert tie.parity.max_logit_difference > tie.parity.tolerance  # one quantum (0.25) times a weight
    assert tie.parity.ok and tie.parity.rounding_ties == 2 and tie.verification_refused is None

    def skewed(path):  # and a tie-breaking graph whose weights are also off: no bound contains onnxruntime
        graph = half_up(path)
        [t for t in graph.state_dict().values() if t.is_floating_point() and t.dim() == 2][0].mul_(1.01)
        return graph

    monkeypatch.setattr(deployed_module, "load_onnx", skewed)
    wrong = run_audit(tmp_path / "q.onnx", x, y, params, progress=False)
    assert not wrong.parity.ok and wrong.verification_refused and wrong.verified_accuracy is None


def test_run_audit_takes_a_model_in_memory_and_returns_its_records(mlp):
    import onnx

    d, x, y = mlp
    params = AuditParams(**PARAMS)
    on_file = run_audit(d / "m.onnx", x, y, params, progress=False)
    in_memory = run_audit(onnx.load(str(d / "m.onnx")), x, y, params, progress=False)
    assert in_memory.model == "<onnx.onnx_ml_pb2.ModelProto>"
    assert in_memory.model_dump(exclude={"seconds", "model"}) == on_file.model_dump(exclude={"seconds", "model"})
    assert [r.status for r in in_memory.examples] == [r.status for r in on_file.examples]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():
        labels = net(torch.from_numpy(x)).argmax(1).numpy()
    report = run_audit(net, x, labels, params, progress=False)  # exported on the fly for x's shape
    assert report.clean_accuracy == 1.0 and report.model.endswith("Sequential>") and len(report.examples) == len(x)
    from pipeline.errors import HydraPipeError

    with pytest.raises(HydraPipeError, match="must be the path of an ONNX file"):
        run_audit(42, x, y, params, progress=False)
