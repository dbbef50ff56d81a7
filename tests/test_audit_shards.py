"""The audit sharded across worker processes (``--workers N``, ``audit.workers``): the report equals the
one-process report but for ``seconds``, and so do the bounds; a worker that dies or fails is one line, no report."""

from __future__ import annotations

import os
import re
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


# --shard K/N across machines, and the merge (issue 26)

def _verdicts(records):  # every per-example verdict, and the attacks' margins (their floats do not depend on a batch)
    return [(r.index, r.label, r.status, r.phase, r.margin_upper) for r in records]


def _assert_merge_is_one_process(one, merged):
    assert merged.model_dump(exclude={"seconds"}) == one.model_dump(exclude={"seconds"})  # every figure, bit for bit
    assert _verdicts(merged.examples) == _verdicts(one.examples)
    # a bound's float sums depend on the batch it ran in (and alpha-CROWN's iterations on the rows beside it)
    lo1 = np.array([np.nan if r.margin_lower is None else r.margin_lower for r in one.examples])
    lo2 = np.array([np.nan if r.margin_lower is None else r.margin_lower for r in merged.examples])
    assert np.array_equal(np.isnan(lo1), np.isnan(lo2)) and np.allclose(lo1, lo2, rtol=1e-3, atol=1e-4, equal_nan=True)


def test_shards_and_their_merge_report_exactly_what_one_process_does(workload, tmp_path):
    from pipeline.audit.shards import Part, Shard, merge_parts, read_part, write_part

    d, x, y = workload
    one = run_audit(d / "m.onnx", x, y, AuditParams(**PARAMS), progress=False)
    paths = []
    for k in (2, 0, 1):  # any order
        part = run_audit(d / "m.onnx", x, y, AuditParams(**PARAMS), progress=False, shard=Shard(k, 3))
        assert [r.index for r in part.examples] == list(range(k, len(x), 3))
        assert part.n == len(x) and part.decided.model_dump() != one.decided.model_dump()
        paths.append(write_part(tmp_path / f"p{k}.json", Part(f"p{k}", Shard(k, 3), "key", part, part.examples)))
    merged = merge_parts([read_part(p) for p in paths])
    _assert_merge_is_one_process(one, merged)
    # the workload decides in every part: proofs by every verifier, breaks by every attack, a sweep
    assert 0 < one.ibp_verified_accuracy < one.crown_verified_accuracy < one.verified_accuracy < one.clean_accuracy
    assert one.bab.verified > 0 and sum(a.broken for a in one.attacks) > 0 and one.decided.broken > 3
    assert one.robust_accuracy_by_restart and len(one.eps_sweep) == 2


def _cli(*args):
    from stages.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_audit_shard_and_merge_on_the_command_line(workload, tmp_path):
    import json

    d, x, y = workload
    np.savez(tmp_path / "d.npz", x=x, y=y)
    opts = ["--data", tmp_path / "d.npz", "--eps", "0.06", "--steps", "40", "--restarts", "4", "--batch-size", "8",
            "--square-queries", "60"]
    r = _cli("audit", d / "m.onnx", *opts, "--out", tmp_path / "one.json")
    assert r.exit_code == 0, r.output
    for k in range(2):
        r = _cli("audit", d / "m.onnx", *opts, "--shard", f"{k}/2", "--out", tmp_path / f"part{k}.json")
        assert r.exit_code == 0, r.output
        assert f"shard {k}/2" in r.output and "hydra-pipe audit merge" in r.output
    r = _cli("audit", "merge", tmp_path / "part1.json", tmp_path / "part0.json", "--out", tmp_path / "merged.json",
             "--fail-under", "clean=0.99")
    assert r.exit_code == 3 and "below the release floor" in r.output  # the gate applies to the merged report
    one, merged = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "merged.json"))
    assert {k: v for k, v in merged.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
    lines = [(tmp_path / f).read_text().splitlines() for f in ("one.examples.csv", "merged.examples.csv")]
    assert len(lines[0]) == len(lines[1]) == len(x) + 1
    assert [ln.split(",")[:4] for ln in lines[0]] == [ln.split(",")[:4] for ln in lines[1]]  # index .. phase


def test_merge_refuses_parts_that_are_not_one_audit(workload, tmp_path):
    from pipeline.audit.shards import Part, Shard, merge_parts, read_part, write_part
    from pipeline.errors import HydraPipeError

    d, x, y = workload
    runs = {k: run_audit(d / "m.onnx", x, y, AuditParams(eps=0.06, steps=5, restarts=1), progress=False,
                         shard=Shard(k, 2)) for k in range(2)}
    p0, p1 = (Part(f"p{k}.json", Shard(k, 2), "key", r, r.examples) for k, r in runs.items())
    cases = {"shard(s) 1 of 2 missing": [p0], "are both shard 0/2": [p0, p0],
             "parts of different audits": [p0, Part("q.json", Shard(1, 2), "other", p1.report, p1.records)]}
    for words, parts in cases.items():
        with pytest.raises(HydraPipeError, match=re.escape(words)):
            merge_parts(parts)
    (tmp_path / "foreign.json").write_text('{"n": 3}')
    for path, words in ((tmp_path / "foreign.json", "not an audit part"), (tmp_path / "none.json", "not found")):
        with pytest.raises(HydraPipeError, match=re.escape(words)):
            read_part(path)
    write_part(tmp_path / "p0.json", p0)
    r = _cli("audit", "merge", tmp_path / "p0.json", "--out", tmp_path / "r.json")
    assert r.exit_code == 2 and "shard(s) 1 of 2 missing" in r.output and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("extra, words", [
    (["--shard", "2/2"], "expected K/N with 0 <= K < N"),
    (["--shard", "a/2"], "expected K/N"),
    (["--shard", "0/2", "--bounds-out", "b.npz"], "not sharded"),
    (["--shard", "0/2", "--fail-under", "robust=0.5"], "give it to `hydra-pipe audit merge`"),
])
def test_bad_shard_requests_are_one_line(workload, tmp_path, extra, words):
    d, x, y = workload
    np.savez(tmp_path / "d.npz", x=x, y=y)
    r = _cli("audit", d / "m.onnx", "--data", tmp_path / "d.npz", "--eps", "0.06", "--steps", "5", "--restarts", "1",
             "--out", tmp_path / "p.json", *extra)
    assert r.exit_code == 2 and words in r.output and not (tmp_path / "p.json").exists(), r.output
    r = _cli("audit", "merge", tmp_path / "p.json", "--eps", "0.1", "--out", tmp_path / "r.json")
    assert r.exit_code == 2 and "--eps applies to an audit" in r.output


def test_under_torchrun_the_ranks_shard_and_rank_0_merges(workload, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    d, x, y = workload
    np.savez(tmp_path / "d.npz", x=x, y=y)
    opts = ["--data", str(tmp_path / "d.npz"), "--eps", "0.06", "--steps", "20", "--restarts", "2",
            "--square-queries", "30"]
    r = _cli("audit", d / "m.onnx", *opts, "--out", tmp_path / "one.json")
    assert r.exit_code == 0, r.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "stages", "audit", str(d / "m.onnx"), *opts,
                          "--out", str(tmp_path / "ranks.json")], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    one, ranks = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "ranks.json"))
    assert {k: v for k, v in ranks.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
    assert len((tmp_path / "ranks.examples.csv").read_text().splitlines()) == len(x) + 1


def test_shards_sharing_a_journal_folder_keep_their_own(workload, tmp_path):
    """torchrun's ranks on one node share --journal DIR: a finished shard empties its own entries, not a sibling's
    that is still running (or was killed and will resume)."""
    d, x, y = workload
    np.savez(tmp_path / "d.npz", x=x, y=y)
    sibling = tmp_path / "j" / "shard-1-of-2"
    sibling.mkdir(parents=True)
    for folder in (sibling, tmp_path / "j"):  # where a sibling keeps its parts, and the folder all were given
        (folder / "audit-0123456789abcdef-ibp-0.npz").write_bytes(b"a sibling's finished part")
    r = _cli("audit", d / "m.onnx", "--data", tmp_path / "d.npz", "--eps", "0.06", "--steps", "5", "--restarts", "1",
             "--shard", "0/2", "--journal", tmp_path / "j", "--out", tmp_path / "p0.json")
    assert r.exit_code == 0, r.output
    assert (sibling / "audit-0123456789abcdef-ibp-0.npz").exists()
    assert (tmp_path / "j" / "audit-0123456789abcdef-ibp-0.npz").exists()
    assert not (tmp_path / "j" / "shard-0-of-2").exists()  # its own, emptied once its part was written
