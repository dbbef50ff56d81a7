"""Trustworthy under interruption: training stages killed with SIGKILL resume to the same weights bit for bit,
a kill during a write never leaves a partial file, a diverging loss stops with one line, and a failed write is
one line with nothing half written.

The child processes run the real CLI (``python -c "from stages.cli import app; app()" pretrain``) in a scratch
folder on a tiny digits configuration, one thread each."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import read_state
from pipeline.config import PruneParams, TrainParams
from pipeline.errors import HydraPipeError
from pipeline.reporting import atomic_write_bytes
from pipeline.training import STATE_FILE, train
from tests.scratch import scratch

ROOT = Path(__file__).resolve().parent.parent
CLI = "from stages.cli import app; app()"
# pgd draws its random starts from torch's global RNG and the loader shuffles with its own generator: a resume
# that restored either wrongly would give other weights
TINY = {"compute": {"threads": 1},
        "pretrain": {"epochs": 4, "objective": "pgd", "attack_steps": 1, "batch_size": 32}}


def _env() -> dict[str, str]:
    return {**os.environ, "HYDRA_PIPE_QUIET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _start(folder: Path, stage: str = "pretrain") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI, stage], cwd=folder, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(folder: Path, stage: str = "pretrain") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, stage], cwd=folder, env=_env(), capture_output=True,
                          text=True, timeout=300)




def _temp_files(folder: Path) -> list[Path]:
    return list(folder.rglob("*.tmp"))


def _partly_written(folder: Path, n: int) -> bool:
    for p in _temp_files(folder):
        try:
            if 0 < p.stat().st_size < n:
                return True
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return False


def test_a_killed_pretrain_resumes_to_the_same_weights_bit_for_bit(tmp_path):
    reference = scratch(tmp_path, "reference", TINY)
    killed = scratch(tmp_path, "killed", TINY)
    # the previous run's outputs, which a killed run must leave as they are
    (killed / "models").mkdir()
    previous = {killed / "models/pretrained.safetensors": b"previous weights",
                killed / "models/pretrained.json": b'{"previous": true}'}
    for path, content in previous.items():
        path.write_bytes(content)
    child = _start(killed)
    state = killed / ".resume/pretrain" / STATE_FILE
    deadline = time.monotonic() + 240
    while not state.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)  # epoch 2 of 4 is running: the state after epoch 1 was just written
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the child was not killed mid-training: {err}"
    assert read_state(state)[1]["epoch"] < TINY["pretrain"]["epochs"]
    assert {p: p.read_bytes() for p in previous} == previous
    assert not _temp_files(killed)

    done = _run(reference)
    assert done.returncode == 0, done.stderr
    resumed = _run(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "pretrain: resuming after epoch" in resumed.stderr
    want = (reference / "models/pretrained.safetensors").read_bytes()
    assert (killed / "models/pretrained.safetensors").read_bytes() == want
    assert (killed / "plots/pretrain.csv").read_text() == (reference / "plots/pretrain.csv").read_text()
    assert not (killed / ".resume").exists() and not (reference / ".resume").exists()
    assert not _temp_files(killed)


_WRITER = """
import sys
from pathlib import Path
from pipeline.reporting import atomic_write_bytes
path, n = Path(sys.argv[1]), int(sys.argv[2])
i = 0
while True:
    i = i % 255 + 1
    atomic_write_bytes(path, bytes([i]) * n)
"""


def test_a_kill_during_a_write_leaves_the_old_file_or_the_new_one_never_a_partial_one(tmp_path):
    path, n = tmp_path / "weights.safetensors", 16 << 20
    path.write_bytes(b"old")
    caught_mid_write = 0
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n)], env=_env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None and not _partly_written(tmp_path, n):
            pass
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        content = path.read_bytes()
        assert content == b"old" or (len(content) == n and content == content[:1] * n), "a partial file"
        caught_mid_write += bool(_temp_files(tmp_path))
        if caught_mid_write:
            break
    assert caught_mid_write, "no kill landed during a write"
    # the dead writer's temporary file is swept by the next write of the same file
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and not _temp_files(tmp_path)


def test_a_diverging_pretrain_exits_2_with_one_line_naming_the_stage_epoch_and_step(tmp_path):
    folder = scratch(tmp_path, "nan", {"compute": {"threads": 1},
                                        "pretrain": {"epochs": 2, "objective": "benign", "lr": 1e30}})
    (folder / "models").mkdir()
    (folder / "models/pretrained.safetensors").write_bytes(b"previous weights")
    r = _run(folder)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pretrain: training diverged at epoch 1, step "), r.stderr
    assert (folder / "models/pretrained.safetensors").read_bytes() == b"previous weights"
    assert not _temp_files(folder)


# ------------------------------------------------------------------------------------------------------------
# In-process: the loop's own resume and divergence paths on a tiny model (fast, every optimizer and schedule)
# ------------------------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Stands for a kill: raised from inside the loop after a given number of steps."""


def _tiny():
    from torch.utils.data import TensorDataset

    from pipeline.models import build_model

    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    torch.manual_seed(0)
    return build_model("cnn_small", _info()), TensorDataset(x, y)


def _info():
    from pipeline.data import DatasetInfo

    return DatasetInfo(1, 8, 10, (0.3,), (0.4,))


def _objective_failing(monkeypatch, after: int, how: str = "raise"):
    """Patch the loop's objectives so that call number ``after`` raises (a kill) or returns NaN."""
    import pipeline.training as training

    real = training.get_objective
    calls = {"n": 0}

    def get(name):
        fn = real(name)

        def wrapped(model, x, y, p, progress):
            calls["n"] += 1
            if calls["n"] == after:
                if how == "raise":
                    raise _Stop
                return torch.tensor(float("nan"), requires_grad=True)
            return fn(model, x, y, p, progress)
        return wrapped

    monkeypatch.setattr(training, "get_objective", get)


@pytest.mark.parametrize("objective,optimizer", [("pgd", "sgd"), ("mixtrain", "adam"), ("smoothing", "sgd")])
def test_train_resumes_bit_for_bit_for_every_rng_consumer(tmp_path, monkeypatch, objective, optimizer):
    p = TrainParams(objective=objective, optimizer=optimizer, epochs=3, batch_size=32, attack_steps=1, lr=0.01,
                    eps_ramp=0.0, mixtrain_k=2)
    ref, data = _tiny()
    ref_hist = train(ref, data, p)

    model, _ = _tiny()
    _objective_failing(monkeypatch, after=5)  # epoch 2 of 3 (3 batches per epoch)
    with pytest.raises(_Stop):
        train(model, data, p, resume_dir=tmp_path)
    assert read_state(tmp_path / STATE_FILE)[1]["epoch"] == 1
    monkeypatch.undo()
    model, _ = _tiny()  # a fresh process: the starting weights again
    hist = train(model, data, p, resume_dir=tmp_path)
    assert hist == ref_hist
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


def test_hydra_resumes_each_step_of_its_schedule_bit_for_bit(tmp_path, monkeypatch):
    from pipeline.pruning import prune

    p = PruneParams(keep_ratio=0.2, schedule_keep=[0.5], epochs=2, batch_size=32, attack_steps=1)
    ref, data = _tiny()
    prune(ref, data, p)
    model, _ = _tiny()
    _objective_failing(monkeypatch, after=11)  # step 2 (keep 0.2), epoch 2
    with pytest.raises(_Stop):
        prune(model, data, p, resume_dir=tmp_path)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["0-prune-to-keep-0.5", "1-prune-to-keep-0.2"]
    monkeypatch.undo()
    model, _ = _tiny()
    prune(model, data, p, resume_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


def test_a_state_of_other_params_or_other_starting_weights_is_ignored(tmp_path):
    p = TrainParams(objective="benign", epochs=2, batch_size=32)
    model, data = _tiny()
    train(model, data, p, resume_dir=tmp_path)
    done = read_state(tmp_path / STATE_FILE)[1]
    assert done["epoch"] == 2
    # other lr: the finished state is not this run's, so it trains (and overwrites the state)
    other, _ = _tiny()
    train(other, data, p.model_copy(update={"lr": 0.01}), resume_dir=tmp_path)
    assert read_state(tmp_path / STATE_FILE)[1]["fingerprint"] != done["fingerprint"]
    # other starting weights, same params: not this run's either
    shifted, _ = _tiny()
    with torch.no_grad():
        next(shifted.parameters()).add_(1e-3)
    train(shifted, data, p, resume_dir=tmp_path)
    assert read_state(tmp_path / STATE_FILE)[1]["fingerprint"] != done["fingerprint"]


def test_a_nan_loss_stops_with_one_line_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    p = TrainParams(objective="benign", epochs=4, batch_size=32)
    model, data = _tiny()
    _objective_failing(monkeypatch, after=8, how="nan")  # epoch 3, step 2
    with pytest.raises(HydraPipeError) as e:
        train(model, data, p, label="finetune", resume_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("finetune: training diverged at epoch 3, step 2 of 3: the loss is nan")
    assert f"the state after epoch 2 is kept in {tmp_path / STATE_FILE}" in msg
    tensors, meta = read_state(tmp_path / STATE_FILE)
    assert meta["epoch"] == 2 and all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model/"))


def test_a_failed_write_is_one_line_naming_the_file_and_the_reason_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "model.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the disk fills up while the file is written
    with pytest.raises(HydraPipeError) as e:
        atomic_write_bytes(target, b"x" * 1000)
    assert str(e.value) == f"{target}: cannot write (No space left on device)"
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == [target.name]
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(HydraPipeError, match=r"model.safetensors: cannot write \(Read-only file system\)$"):
        atomic_write_bytes(target, b"x")
    monkeypatch.undo()
    # a real one: the folder is a file
    (tmp_path / "blocked").write_text("")
    with pytest.raises(HydraPipeError, match=r"blocked/m.json: cannot write \("):
        atomic_write_bytes(tmp_path / "blocked" / "m.json", b"{}")


def test_a_killed_dvc_repro_leaves_the_stage_s_previous_outputs_in_place(tmp_path):
    """DVC deletes a stage's outputs before it runs the command unless they are ``persist``: the git-tracked
    metrics, plots and reports of a killed ``dvc repro`` were gone. Every output in dvc.yaml persists, and the
    stages replace each file whole (write then rename), so what a kill leaves is the previous run's files."""
    import shutil

    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # DVC wants every section a stage reads
    for section, values in TINY.items():
        params[section] = {**params.get(section, {}), **values}
    work = scratch(tmp_path, "run", params)
    for folder in ("pipeline", "stages", "bin"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    bindir = str(Path(sys.executable).parent)
    dvc = shutil.which("dvc", path=bindir) or "dvc"
    env = {**_env(), "VIRTUAL_ENV": sys.prefix, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "DVC_NO_ANALYTICS": "1"}
    init = subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert init.returncode == 0, init.stderr
    previous = {work / "models/pretrained.safetensors": b"previous weights",
                work / "models/pretrained.json": b'{"previous": true}',
                work / "metrics/pretrain.json": b'{"accuracy": 0.5}',
                work / "plots/pretrain.csv": b"epoch,loss,lr\n1,2.0,0.05\n",
                work / "reports/pretrain.json": b'{"previous": true}'}
    for path, content in previous.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    child = subprocess.Popen([dvc, "repro", "pretrain"], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    state = work / ".resume/pretrain" / STATE_FILE
    deadline = time.monotonic() + 240
    while not state.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if not state.exists():
        child.kill()
        pytest.fail(f"the stage never reached its first epoch under dvc repro: {child.communicate()[0]}")
    os.killpg(child.pid, signal.SIGTERM)  # dvc and the stage it runs, as a terminal's kill does
    out, _ = child.communicate(timeout=120)
    assert child.returncode != 0, out
    assert {p: p.read_bytes() for p in previous} == previous, out
    assert not _temp_files(work)
