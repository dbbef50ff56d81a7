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

import pipeline.audit.run as audit_run
from pipeline.audit.parts import Layout
from pipeline.audit.compute import compute_task
from pipeline.audit.run import AuditHooks, run_audit
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


def _recording_compute(deployed, xt, yt, task, tick):  # in a worker: the task, then who computed it
    out = compute_task(deployed, xt, yt, task, tick)
    if "SHARDS_LOG" in os.environ:
        (Path(os.environ["SHARDS_LOG"]) / f"{os.getpid()}-{task.part}").touch()
    return out


def test_two_workers_report_exactly_what_one_process_does(workload, monkeypatch):
    d, x, y = workload
    here = []

    def compute(*a):
        here.append(a[3].part)
        return compute_task(*a)

    layout = Layout(bounds_batch=16)  # 5 blocks of bounds per verifier: the workers share them
    one = run_audit(d / "m.onnx", x, y, AuditParams(**PARAMS), bounds_out=d / "one.npz", progress=False,
                    hooks=AuditHooks(compute=compute, layout=layout))
    parts, here[:] = list(here), []
    log = d / "log"
    log.mkdir()
    monkeypatch.setenv("SHARDS_LOG", str(log))  # the spawned workers inherit it
    monkeypatch.setattr(tempfile, "tempdir", str(d / "tmp"))  # where the workers' temporary journal goes
    (d / "tmp").mkdir()
    two = run_audit(d / "m.onnx", x, y, AuditParams(**PARAMS, workers=2), bounds_out=d / "two.npz", progress=False,
                    hooks=AuditHooks(compute=_recording_compute, layout=layout))
    assert not list((d / "tmp").iterdir())  # removed once merged
    assert not here  # every block and chunk ran in a worker, each once
    assert sorted(p.name.split("-", 1)[1] for p in log.iterdir()) == sorted(parts)
    assert len(parts) > 20 and any(p.startswith("sweep1-pgd-") for p in parts)
    assert two.model_dump(exclude={"seconds"}) == one.model_dump(exclude={"seconds"})
    assert [r.as_json() | {"seconds": None} for r in two.examples] == \
        [r.as_json() | {"seconds": None} for r in one.examples]
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


def _dies(*args):  # a worker killed (the OOM killer, a segfault): the process is gone
    os._exit(9)


def _fails(*args):  # a bug in a worker
    raise RuntimeError("boom\nin a worker")


@pytest.mark.parametrize("compute, words", [(_dies, "a worker process died"), (_fails, "a worker failed on")])
def test_a_worker_that_dies_or_fails_is_one_line_and_no_report(workload, compute, words):
    from pipeline.errors import HydraPipeError

    d, x, y = workload
    with pytest.raises(HydraPipeError) as err:  # the compute is pickled by reference: the workers import it
        run_audit(d / "m.onnx", x, y, AuditParams(eps=0.15, steps=20, restarts=2, workers=2), progress=False,
                  bounds_out=d / "b.npz", journal=d / "journal", hooks=AuditHooks(compute=compute))
    assert words in str(err.value) and "no report written" in str(err.value) and "\n" not in str(err.value)
    assert not (d / "b.npz").exists()


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

    monkeypatch.setattr(audit_run, "Pool", no_pool)
    report = run_audit(d / "m.onnx", x, y, AuditParams(eps=0.15, steps=10, restarts=2), progress=False)
    assert report.pgd_robust_accuracy is not None
    with pytest.raises(AssertionError, match="a pool was started"):
        run_audit(d / "m.onnx", x, y, AuditParams(eps=0.15, steps=10, restarts=2, workers=2), progress=False)
