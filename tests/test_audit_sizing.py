"""A small audit request is a small audit (issue 27, item 2): the verifiers sized to the network before they start,
every budget settable from the CLI and from --params, the bars' totals and times, Ctrl-C's one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.audit import sizing
from pipeline.audit.run import AuditHooks, run_audit
from pipeline.config import AuditParams
from tests.test_audit import _data

torch.set_num_threads(1)

SMALL = dict(steps=1, restarts=1, apgd_steps=1, apgd_targets=1, square_queries=0)


def _deep_onnx(path) -> None:
    """Flatten and three Gemms with ReLUs on 1 x 4 x 4 inputs: a second hidden layer for CROWN to tighten."""
    from pipeline.onnx_io import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 4))
    export_onnx(net.eval(), path, (1, 4, 4))


@pytest.fixture
def mlp(tmp_path):
    path = tmp_path / "mlp.onnx"
    _deep_onnx(path)
    return path


def _cost(path, eps=0.1):
    from pipeline.onnx_load import load_onnx

    x, _ = _data(path)
    lo, hi = AuditParams(eps=eps).threat.box(torch.as_tensor(x))
    return sizing.network_cost(load_onnx(path), lo, hi)


def test_the_sizing_is_a_pure_function_of_the_network_and_the_requested_budget(mlp):
    cost = _cost(mlp)
    assert cost == _cost(mlp) and cost.forward > 0 and cost.tighten > 0  # no timing: the same every time
    big, small = AuditParams(eps=0.1), AuditParams(eps=0.1, **SMALL)
    assert sizing.plan(cost, big, floor=0) == []  # the card's 1000 x 100: every verifier runs
    assert [s.name for s in sizing.plan(cost, small, floor=0)] == ["crown", "alpha-crown", "bab"]
    assert all(s.work > s.budget for s in sizing.plan(cost, small, floor=0))
    assert sizing.plan(cost, small) == []  # a tiny network's verifiers cost less than FLOOR: they always run
    # the estimates grow CROWN < alpha-CROWN < branch and bound, the last with its domain budget
    work = sizing.verifier_work(cost, big)
    assert work["crown"] < work["alpha-crown"] < work["bab"]
    assert sizing.verifier_work(cost, AuditParams(bab_domains=10))["bab"] < work["bab"]
    assert sizing.plan(cost, small.model_copy(update={"verifier_share": None}), floor=0) == []  # on request
    assert sizing.plan(cost, small.model_copy(update={"steps": 0}), floor=0) == []  # verification alone
    # a bigger request of the attacks keeps what a smaller one skipped
    more = small.model_copy(update={"steps": 1000, "restarts": 100})
    assert sizing.attack_work(cost, more, False) > sizing.attack_work(cost, small, False)


def test_a_small_request_skips_the_costly_verifiers_and_says_so(mlp, monkeypatch):
    monkeypatch.setattr(sizing, "FLOOR", 0.0)  # as if the network were large
    x, y = _data(mlp, n=12)
    said = []
    report = run_audit(mlp, x, y, AuditParams(eps=0.1, **SMALL), progress=False, hooks=AuditHooks(say=said.append))
    assert [s.name for s in report.skipped_verifiers] == ["crown", "alpha-crown", "bab"]
    assert report.crown_verified_accuracy is None and report.alpha_crown_verified_accuracy is None
    assert report.bab is None and report.ibp_verified_accuracy is not None  # IBP always runs
    assert report.seconds.crown is None and report.seconds.bab is None
    assert len(said) == 3 and "CROWN skipped" in said[0] and "multiply-adds" in said[0]
    back = type(report).model_validate_json(report.model_dump_json())
    assert back.skipped_verifiers == report.skipped_verifiers
    full = run_audit(mlp, x, y, AuditParams(eps=0.1, **SMALL, verifier_share=None), progress=False)
    assert full.skipped_verifiers == [] and full.crown_verified_accuracy is not None


def test_branch_and_bound_does_not_run_without_alpha_crown_unless_asked(mlp):
    x, y = _data(mlp, n=12)
    off = run_audit(mlp, x, y, AuditParams(eps=0.1, steps=0, alpha_crown=False), progress=False)
    assert off.bab is None and off.bab_verified_accuracy is None
    assert [s.name for s in off.skipped_verifiers] == ["bab"] and "alpha-CROWN is off" in off.skipped_verifiers[0].reason
    asked = run_audit(mlp, x, y, AuditParams(eps=0.1, steps=0, alpha_crown=False, bab_alone=True), progress=False)
    assert asked.bab is not None and asked.skipped_verifiers == []


def test_the_verifiers_bars_have_totals_start_at_their_first_block_and_show_a_time():
    from pipeline.audit.parts import Bars, EtaColumn, GroupTick, Task, eta_seconds

    assert eta_seconds(None, 0, 5) is None and eta_seconds(10.0, 0, 5) is None
    assert eta_seconds(10.0, 2, 6) == 30.0 and eta_seconds(10.0, 2, 0) == 0.0

    bars = Bars(True)
    shown = []
    with bars:
        tick = bars.task("CROWN bounds", 4)
        tasks = [Task(f"crown-{k}", "crown", AuditParams(), np.arange(k, k + 2)) for k in (0, 2)]
        group = GroupTick(tasks, {"crown": (lambda done, total: (shown.append((done, total)), tick(done, total)),
                                            0, 4)})
        group(0, 0)  # the first block starts: the bar's clock starts
        task = bars.bar.tasks[0]
        assert task.started and task.total == 4 and task.completed == 0
        group(0, 1)
        group(0, 2)
        text = EtaColumn().render(bars.bar.tasks[0]).plain
        assert text != "-:--:--" and text.count(":") == 2  # a time after one example, whatever the pace
    assert shown == [(0, 4), (1, 4), (2, 4)]


def _tiny(tmp_path: Path) -> Path:
    _deep_onnx(tmp_path / "m.onnx")
    x, y = _data(tmp_path / "m.onnx", n=10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return tmp_path


def _cli(*args):
    from stages.cli import app

    return CliRunner().invoke(app, ["audit", *args], env={"HYDRA_PIPE_QUIET": "1"})


def test_params_file_supplies_the_audit_budgets_and_typed_options_override_them(tmp_path):
    d = _tiny(tmp_path)
    (d / "p.yaml").write_text("audit:\n  eps: 0.05\n  steps: 2\n  restarts: 3\n  apgd_steps: 3\n  apgd_targets: 2\n"
                              "  square_queries: 7\n  n_examples: 6\n  bab_domains: 5\n  sweep_eps: []\n")
    res = _cli(str(d / "m.onnx"), "--data", str(d / "d.npz"), "--params", str(d / "p.yaml"), "--restarts", "2",
               "--square-queries", "9", "--verifier-share", "none", "--out", str(d / "r.json"))
    assert res.exit_code == 0, res.output
    r = json.loads((d / "r.json").read_text())
    assert r["n"] == 6 and r["eps"] == 0.05 and r["steps"] == 2 and r["restarts"] == 2  # file, then the options
    budgets = {a["name"]: a["budget"] for a in r["attacks"]}
    assert budgets["apgd-ce"] == "3 steps x 1 restarts" and budgets["apgd-t"].endswith("x 2 targets")
    assert r["bab"] is None or r["bab"]["domains_per_example"] == 5
    assert r["skipped_verifiers"] == []
    # without --params: the options' own defaults, every example; a bad value names its option
    res = _cli(str(d / "m.onnx"), "--data", str(d / "d.npz"), "--eps", "0.05", "--steps", "0", "--out",
               str(d / "s.json"))
    assert res.exit_code == 0, res.output
    assert json.loads((d / "s.json").read_text())["n"] == 10
    res = _cli(str(d / "m.onnx"), "--data", str(d / "d.npz"), "--eps", "0.05", "--apgd-steps", "0", "--out",
               str(d / "t.json"))
    assert res.exit_code == 2 and "--apgd-steps" in res.output


def test_an_explicit_bab_runs_branch_and_bound_without_alpha_crown(tmp_path):
    d = _tiny(tmp_path)
    common = [str(d / "m.onnx"), "--data", str(d / "d.npz"), "--eps", "0.1", "--steps", "0", "--no-alpha-crown"]
    assert _cli(*common, "--out", str(d / "a.json")).exit_code == 0
    assert json.loads((d / "a.json").read_text())["bab"] is None
    assert _cli(*common, "--bab", "--out", str(d / "b.json")).exit_code == 0
    assert json.loads((d / "b.json").read_text())["bab"] is not None


@pytest.mark.parametrize("journal", [False, True])
def test_ctrl_c_is_one_line_saying_whether_a_rerun_resumes(tmp_path, monkeypatch, journal):
    import pipeline.audit.run

    d = _tiny(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.audit.run, "run_audit", interrupted)
    extra = ["--journal", str(d / "j")] if journal else []
    res = _cli(str(d / "m.onnx"), "--data", str(d / "d.npz"), "--eps", "0.1", "--out", str(d / "r.json"), *extra)
    assert res.exit_code == 130 and not (d / "r.json").exists()
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output
    if journal:
        assert f"resumes from {d / 'j'}" in lines[0]
    else:
        assert "nothing will resume" in lines[0] and "--journal" in lines[0]
