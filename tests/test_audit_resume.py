"""The audit's journal: a SIGKILLed audit, rerun, reports exactly what an uninterrupted one does (but ``seconds``);
a stale or damaged journal is never trusted; the audit stage journals in .resume/audit and removes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.audit.journal import discard_journal
from pipeline.audit.run import run_audit
from pipeline.config import AuditParams
from tests.test_audit import _data, _mlp_onnx

torch.set_num_threads(1)

EXE = [sys.executable, "-c", "from stages.cli import app; app()"]
ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_PIPE_QUIET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*EXE, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _without_seconds(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A model and data whose PGD runs in many chunks for a few seconds: L2 rows rarely settle early, and
    batch size 32 x 8 restarts makes chunks of 16 examples."""
    d = tmp_path_factory.mktemp("resume")
    _mlp_onnx(d / "m.onnx", hidden=64)
    x, y = _data(d / "m.onnx", n=240)
    np.savez(d / "data.npz", x=x, y=y)
    return d


AUDIT = ["audit", "m.onnx", "--data", "data.npz", "--eps", "0.3", "--norm", "l2", "--steps", "400",
         "--restarts", "8", "--batch-size", "32"]


def test_a_killed_audit_resumes_from_its_journal_and_reports_what_an_uninterrupted_one_does(workload):
    d, journal = workload, workload / "journal"
    killed = _cli(*AUDIT, "--out", "killed.json", "--journal", str(journal), cwd=d)
    deadline = time.monotonic() + 120
    while not list(journal.glob("audit-*-pgd-*.npz")):  # a chunk of PGD is journaled: the verifiers are too
        assert killed.poll() is None, f"the audit ended before it could be killed: {killed.stderr.read()}"
        assert time.monotonic() < deadline, "no journal entry appeared"
        time.sleep(0.005)
    assert killed.poll() is None, "the audit ended before it could be killed: make its workload larger"
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert not (d / "killed.json").exists()
    entries = {p.name.split("-", 2)[2] for p in journal.glob("audit-*.npz")}
    assert {"ibp-0.npz", "crown-0.npz", "alpha_crown-0.npz", "pgd-0.npz"} <= entries
    with np.load(next(journal.glob("audit-*-ibp-0.npz"))) as f:
        ibp_seconds = json.loads(str(f["__meta__"]))["seconds"]

    resumed = _cli(*AUDIT, "--out", "resumed.json", "--journal", str(journal), cwd=d)
    assert resumed.wait(300) == 0, resumed.stderr.read()
    uninterrupted = _cli(*AUDIT, "--out", "plain.json", cwd=d)
    assert uninterrupted.wait(300) == 0, uninterrupted.stderr.read()

    got, want = (json.loads((d / name).read_text()) for name in ("resumed.json", "plain.json"))
    assert _without_seconds(got) == _without_seconds(want)
    assert got["seconds"]["ibp"] == round(ibp_seconds, 3)  # reused, not recomputed
    # and so is every example's record (the journal keeps the per-example arrays they are made of)
    records = [[{**json.loads(line), "seconds": None}
                for line in (d / f"{name}.examples.jsonl").read_text().splitlines()] for name in ("resumed", "plain")]
    assert records[0] == records[1] and len(records[0]) == 240
    assert got["settled"]["broken"] + got["settled"]["convergence"] + got["settled"]["full_budget"] > 16
    assert not journal.exists()  # emptied once the report was written


@pytest.fixture
def small(tmp_path):
    _mlp_onnx(tmp_path / "m.onnx")
    x, y = _data(tmp_path / "m.onnx", n=60)
    params = AuditParams(eps=0.05, steps=40, restarts=4, batch_size=16, square_queries=30, sweep_eps=[0.02, 0.1],
                         sweep_steps=20, sweep_restarts=2)
    return tmp_path, x, y, params


def _dump(report) -> dict:
    return report.model_dump(mode="json", exclude={"seconds"})


def test_a_stale_journal_is_ignored(small):
    d, x, y, params = small
    journal = d / "journal"
    run_audit(d / "m.onnx", x, y, params.model_copy(update={"seed": 7}), progress=False, journal=journal)
    stale = sorted(journal.glob("audit-*.npz"))
    assert stale
    got = run_audit(d / "m.onnx", x, y, params, progress=False, journal=journal)
    assert _dump(got) == _dump(run_audit(d / "m.onnx", x, y, params, progress=False))
    # other data, same params: stale too
    other = run_audit(d / "m.onnx", x[:50], y[:50], params, progress=False, journal=journal)
    assert _dump(other) == _dump(run_audit(d / "m.onnx", x[:50], y[:50], params, progress=False))
    assert all(p.exists() for p in stale)  # ignored, not removed: they may be another audit's
    discard_journal(journal)
    assert not journal.exists()


def test_a_complete_journal_gives_the_report_without_recomputing(small):
    d, x, y, params = small
    journal = d / "journal"
    first = run_audit(d / "m.onnx", x, y, params, bounds_out=d / "b1.npz", progress=False, journal=journal)
    from pipeline.audit.run import AuditHooks

    def no_work(*args, **kwargs):
        raise AssertionError("a journaled part was recomputed")

    again = run_audit(d / "m.onnx", x, y, params, bounds_out=d / "b2.npz", progress=False, journal=journal,
                      hooks=AuditHooks(compute=no_work))
    assert _dump(again) == _dump(first)
    with np.load(d / "b1.npz") as b1, np.load(d / "b2.npz") as b2:
        assert b1.files == b2.files and all((b1[k] == b2[k]).all() for k in b1.files)


def test_a_damaged_entry_is_recomputed(small):
    d, x, y, params = small
    journal = d / "journal"
    want = run_audit(d / "m.onnx", x, y, params, progress=False, journal=journal)
    for entry in journal.glob("audit-*-pgd-0.npz"):
        entry.write_bytes(b"not an npz")
    for entry in journal.glob("audit-*-crown-0.npz"):
        entry.write_bytes(entry.read_bytes()[:40])
    for entry in journal.glob("audit-*-ibp-0.npz"):  # whole, but not what the part holds
        np.savez(entry, verified=np.ones(3, bool), __meta__=np.array(json.dumps({"seconds": 0.0})))
    for entry in journal.glob("audit-*-square-0.npz"):
        np.savez(entry, broken=np.ones(1, bool), __meta__=np.array("[1, 2]"))
    assert _dump(run_audit(d / "m.onnx", x, y, params, progress=False, journal=journal)) == _dump(want)


def test_the_audit_stage_journals_in_resume_and_removes_it(tmp_path, monkeypatch):
    from pipeline.onnx_io import export_onnx
    from stages import audit as stage

    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), tmp_path / "models/quantized.onnx",
                (1, 8, 8))
    (tmp_path / "params.yaml").write_text("audit:\n  steps: 5\n  restarts: 2\n  n_examples: 24\n"
                                          "  square_queries: 10\n  sweep_eps: [0.01, 0.05]\n  sweep_steps: 3\n"
                                          "  sweep_restarts: 1\n")
    monkeypatch.chdir(tmp_path)
    entries = []
    real = stage.run_audit

    def spy(*args, **kwargs):
        report = real(*args, **kwargs)
        entries.extend(Path(kwargs["journal"]).glob("audit-*.npz"))
        return report

    monkeypatch.setattr(stage, "run_audit", spy)
    report = stage.run(tmp_path / "params.yaml")
    assert entries and all(str(p).startswith(".resume/audit/") for p in entries)
    assert not Path(".resume").exists()
    rows = (tmp_path / "plots/audit_eps.csv").read_text().splitlines()
    assert rows[0] == "eps,clean,pgd_robust,ibp_verified,crown_verified,alpha_crown_verified"
    assert [float(r.split(",")[0]) for r in rows[1:]] == [0.01, 0.05]
    assert [p.eps for p in report.eps_sweep] == [0.01, 0.05]
