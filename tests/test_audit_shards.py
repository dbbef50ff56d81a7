"""The audit sharded across worker processes (``--workers N``, ``audit.workers``): the report equals the
one-process report but for ``seconds``, and so do the bounds; a worker that dies or fails is one line, no report."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import pipeline.audit as audit
from pipeline.audit import run_audit
from pipeline.config import AuditParams
from tests.test_audit import _data, _mlp_onnx

torch.set_num_threads(1)

# the attacks (PGD: chunks of 4 * 8 // 4 = 8 examples), alpha-CROWN, branch and bound and a two-radius sweep,
# in several parts each
PARAMS = dict(eps=0.06, steps=40, restarts=4, batch_size=8, square_queries=60, sweep_eps=[0.02, 0.1],
              sweep_steps=20, sweep_restarts=2)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    _mlp_onnx(d / "m.onnx", hidden=32)
    x, y = _data(d / "m.onnx", n=72)
    return d, x, y


def _bounds(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _recording_work(task):  # in a worker: the task, then who computed it
    out = audit._work(task)
    (Path(os.environ["SHARDS_LOG"]) / f"{os.getpid()}-{task.part}").touch()
    return out


def test_two_workers_report_exactly_what_one_process_does(workload, monkeypatch):
    d, x, y = workload
    monkeypatch.setattr(audit, "BOUNDS_BATCH", 16)  # 5 blocks of bounds per verifier: the workers share them
    here = []
    compute = audit._compute
    monkeypatch.setattr(audit, "_compute", lambda *a: (here.append(a[3].part), compute(*a))[1])
    one = run_audit(d / "m.onnx", x, y, AuditParams(**PARAMS), bounds_out=d / "one.npz", progress=False)
    parts, here[:] = list(here), []
    log = d / "log"
    log.mkdir()
    monkeypatch.setenv("SHARDS_LOG", str(log))  # the spawned workers inherit it
    monkeypatch.setattr(audit, "_work", _recording_work)
    monkeypatch.setattr(tempfile, "tempdir", str(d / "tmp"))  # where the workers' temporary journal goes
    (d / "tmp").mkdir()
    two = run_audit(d / "m.onnx", x, y, AuditParams(**PARAMS, workers=2), bounds_out=d / "two.npz", progress=False)
    assert not list((d / "tmp").iterdir())  # removed once merged
    assert not here  # every block and chunk ran in a worker, each once
    assert sorted(p.name.split("-", 1)[1] for p in log.iterdir()) == sorted(parts)
    assert len(parts) > 20 and any(p.startswith("sweep1-pgd-") for p in parts)
    assert two.model_dump(exclude={"seconds"}) == one.model_dump(exclude={"seconds"})
    b1, b2 = _bounds(d / "one.npz"), _bounds(d / "two.npz")
    assert b1.keys() == b2.keys() == {"ibp_lower", "ibp_upper", "crown_lower", "crown_upper"}
    assert all(np.array_equal(b1[k], b2[k]) for k in b1)
    # every part ran and decided something, in more than one block or chunk
    assert 0 < one.ibp_verified_accuracy < one.crown_verified_accuracy < one.alpha_crown_verified_accuracy
    assert one.verified_accuracy < one.clean_accuracy
    undecided = round((one.clean_accuracy - one.verified_accuracy) * one.n)
    assert undecided > 8 and sum(a.broken for a in one.attacks) > 0 and one.bab.attacked > 0
    assert one.attacks[0].attacked > 32  # APGD-CE in two chunks or more (4 * 8 // 1 = 32 examples each)
    assert [p.pgd_robust for p in one.eps_sweep][0] > [p.pgd_robust for p in one.eps_sweep][1]


def _dies(task):  # a worker killed (the OOM killer, a segfault): the process is gone
    os._exit(9)


def _fails(task):  # a bug in a worker
    raise RuntimeError("boom\nin a worker")


@pytest.mark.parametrize("work, words", [(_dies, "a worker process died"), (_fails, "a worker failed on")])
def test_a_worker_that_dies_or_fails_is_one_line_and_no_report(workload, monkeypatch, work, words):
    from stages.cli import app

    d, x, y = workload
    np.savez(d / "data.npz", x=x, y=y)
    monkeypatch.setattr(audit, "_work", work)  # pickled by reference: the spawned workers import it from here
    result = CliRunner().invoke(app, ["audit", str(d / "m.onnx"), "--data", str(d / "data.npz"), "--eps", "0.15",
                                      "--steps", "20", "--restarts", "2", "--workers", "2",
                                      "--out", str(d / "r.json"), "--bounds-out", str(d / "b.npz"),
                                      "--journal", str(d / "journal")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "no report written" in lines[0], result.output
    assert not (d / "r.json").exists() and not (d / "b.npz").exists()


def test_workers_is_validated_and_refused_without_model():
    from stages.cli import app

    with pytest.raises(Exception):
        AuditParams(eps=0.1, workers=0)
    result = CliRunner().invoke(app, ["audit", "--workers", "2"])
    assert result.exit_code == 2 and "--workers" in result.output


def test_one_worker_never_starts_a_process(workload, monkeypatch):
    d, x, y = workload

    def no_pool(*args, **kwargs):
        raise AssertionError("a pool was started")

    monkeypatch.setattr(audit, "_Pool", no_pool)
    report = run_audit(d / "m.onnx", x, y, AuditParams(eps=0.15, steps=10, restarts=2), progress=False)
    assert report.pgd_robust_accuracy is not None
    with pytest.raises(AssertionError, match="a pool was started"):
        run_audit(d / "m.onnx", x, y, AuditParams(eps=0.15, steps=10, restarts=2, workers=2), progress=False)
