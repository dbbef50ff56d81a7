"""The README's figures are the committed metrics: a figure typed by hand, or a metric committed without
regenerating the README, fails here. And its commands do what they say: every command it prints is run here as
printed (in a scratch folder where it writes) or names why it is not (it trains for minutes, or needs a cluster)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.figures import BLOCKS, readme_block

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_blocks_equal_what_they_are_generated_from(name):
    assert readme_block((ROOT / "README.md").read_text(), name) == BLOCKS[name](ROOT)


# A command the README shows: a fenced bash or yaml block's first line, or an inline code span that starts with one
# of these words. Each is run by a test below ("run") or says why the suite cannot run it.
COMMAND_WORDS = ("hydra-pipe", "bin/hydra-pipe", ".venv/bin/", "dvc ", "make ", "python ", "python3 ", "torchrun ",
                 "apt-get ", "pip ", "source ", "sbatch ", "srun ")
LONG = "trains the pipeline (minutes to hours); `make repro` / `make repro-fashion` are the runs that check it"
README_COMMANDS = {
    # the two commands of a fresh machine, and the real-data run
    "make repro": LONG,
    "make repro-fashion": LONG,
    "apt-get install dataset-fashion-mnist": "installs a Debian package (root, network)",
    # names, not commands: the stage table, placeholders
    "bin/hydra-pipe": "a name (the stages' launcher); tests/test_cli.py runs it",
    "bin/hydra-pipe ...": "a placeholder in the stage table",
    "bin/hydra-pipe <stage>": "a placeholder; tests/test_cli.py runs the launcher without the venv on PATH",
    "hydra-pipe": "a name",
    "python -m stages": "a name (the app as a module); tests/test_interruption.py runs stages through it",
    "hydra-pipe audit MODEL": "a placeholder (MODEL); the audit commands below run",
    "hydra-pipe audit MODEL ... --journal DIR": "a placeholder; tests/test_audit_resume.py resumes through the CLI",
    "hydra-pipe audit --fail-under": "an option's name; the release-gate example below runs",
    "hydra-pipe info": "a name; `hydra-pipe info model.onnx` runs",
    **{f"hydra-pipe {stage}": "run (the stage commands, on tiny params)"
       for stage in ("pretrain", "prune", "finetune", "quantize", "audit", "export", "report")},
    "dvc repro": "the stages it runs are run here; a whole `dvc repro` " + LONG,
    "dvc plots show": "named as what not to use offline (its HTML loads vega from a CDN)",
    "dvc queue start": "a name; the sweep block " + LONG,
    "source .venv/bin/activate": "the sweep block: 18 experiments, " + LONG,
    "make install && .venv/bin/dvc repro prune": "pretrains then prunes the default run: " + LONG,
    "dvc exp run -S prune.keep_ratio=0.01 -S prune.method=lwm": LONG,
    ".venv/bin/dvc exp run -S prune.keep_ratio=0.01 -S prune.method=lwm": LONG,
    "dvc exp run -S audit.budget=quick": "reruns the audit, export and report stages of the default run: " + LONG,
    "dvc exp run -S audit.n_examples=null": "audits all 450 test images at the card's budget: " + LONG,
    "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:PORT -m stages pretrain":
        "two nodes of 8 GPUs; tests/test_distributed.py runs torchrun on the CPU",
    "hydra-pipe audit merge PARTS... --out report.json":
        "a placeholder (PARTS); tests/test_audit_shards.py shards and merges through the CLI",
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500":
        "two nodes; tests/test_audit_shards.py runs the same audit under torchrun with 2 processes on the CPU",
    "jid=$(sbatch --parsable --array=0-15 --wrap 'hydra-pipe audit model.onnx --data x.npz --eps 0.03":
        "a Slurm cluster; tests/test_audit_shards.py runs --shard K/N and the merge as each array task would",
    ".venv/bin/pip install -e '.[bench]'": "installs the benchmarks' peers from the registry (network)",
    "python -m stages.figures": "rewrites README.md; test_readme_blocks_equal_what_they_are_generated_from checks "
                                "that it would change nothing",
    "python -m stages.runs": "run",
    # run as printed
    ".venv/bin/dvc metrics show": "run",
    "dvc metrics show": "run",
    ".venv/bin/dvc exp show --only-changed --drop '.*\\.(py|json|onnx|safetensors)$'": "run",
    ".venv/bin/dvc plots show --json": "run",
    "hydra-pipe prune --params params.yaml": "run",
    "hydra-pipe info model.onnx": "run",
    "hydra-pipe audit model.onnx --data x.npz --eps 0.03 --out report.json": "run",
    "- name: robustness gate": "run",
}


def readme_commands(text: str) -> dict[str, str]:
    """Every command README.md shows (first line of a fenced block, whitespace-normalised inline spans) -> its
    full text (the whole block for a fenced one)."""
    found: dict[str, str] = {}
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang in ("bash", "yaml"):  # keyed by its first line without comments, [optional] parts and the "\\"
            first = re.sub(r"\s*\[[^]]*\]|\s*#.*|\s*\\$", "", body.splitlines()[0]).strip()
            found[first] = body
    rest = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", rest):
        span = " ".join(span.split())
        if span.startswith(COMMAND_WORDS):
            found.setdefault(span, span)
    return found


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def test_every_readme_command_is_run_here_or_says_why_not():
    unknown = sorted(set(COMMANDS) - set(README_COMMANDS))
    assert not unknown, f"README commands with no test: {unknown} (run them below or say why in README_COMMANDS)"
    stale = sorted(set(README_COMMANDS) - set(COMMANDS))
    assert not stale, f"README_COMMANDS names commands the README no longer shows: {stale}"


def _env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "HYDRA_PIPE_QUIET": "1",
            "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}


def _as_printed(command: str, cwd: Path, timeout: int = 600, printed: bool = True) -> subprocess.CompletedProcess:
    """``command`` through bash, as a user types it (``printed``: it is in the README as it is); ``.venv/bin/`` is
    this interpreter's environment when the suite runs outside the project's .venv."""
    assert not printed or command in COMMANDS or any(command in body for body in COMMANDS.values()), command
    if not (ROOT / ".venv/bin").is_dir() or Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        command = command.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_the_readme_s_dvc_commands_read_the_committed_figures():
    """One test, one after the other: DVC takes the repository's lock."""
    for command in (".venv/bin/dvc metrics show", "dvc metrics show"):
        res = _as_printed(command, ROOT)
        assert res.returncode == 0 and "metrics/audit.json" in res.stdout, res.stderr
    res = _as_printed(".venv/bin/dvc plots show --json", ROOT)
    assert res.returncode == 0, res.stderr
    assert "plots/prune_layers.csv" in res.stdout
    # DVC matches `--drop` from the start of a column's name: '\.(py|...)$' dropped nothing
    table = next(c for c in README_COMMANDS if c.startswith(".venv/bin/dvc exp show"))
    res = _as_printed(table, ROOT)
    assert res.returncode == 0, res.stderr
    res_csv = _as_printed(table.replace("exp show", "exp show --csv"), ROOT, printed=False)
    header = res_csv.stdout.splitlines()[0].split(",")
    assert not [c for c in header if re.search(r"\.(py|json|onnx|safetensors)$", c)], header
    everything = _as_printed(".venv/bin/dvc exp show --csv", ROOT, printed=False).stdout.splitlines()[0].split(",")
    assert any(c.endswith(".py") for c in everything)  # there was something to drop
    sweep = COMMANDS["source .venv/bin/activate"]  # the sweep block's comparison table: the same command
    assert table.replace(".venv/bin/", "") in " ".join(sweep.split())


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    """``model.onnx``, ``deploy/model.onnx``, ``x.npz`` and ``test.npz`` as the README's examples name them: a small
    classifier of 8 x 8 digits."""
    import torch

    from pipeline.onnx_io import export_onnx

    d = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(256, 10))
    export_onnx(model, d / "model.onnx", (1, 8, 8))
    (d / "deploy").mkdir()
    shutil.copy(d / "model.onnx", d / "deploy/model.onnx")
    rng = np.random.default_rng(0)
    for name in ("x.npz", "test.npz"):
        np.savez(d / name, x=rng.random((8, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 8))
    return d


def test_the_readme_s_audit_synopsis_runs_as_printed(onnx_folder):
    command = "hydra-pipe audit model.onnx --data x.npz --eps 0.03 --out report.json"  # without its [options]
    assert command in COMMANDS
    res = _as_printed(command, onnx_folder)
    assert res.returncode == 0, res.stderr
    report = yaml.safe_load((onnx_folder / "report.json").read_text())
    assert report["n"] == 8 and report["eps"] == 0.03


def test_the_readme_s_release_gate_runs_as_printed(onnx_folder):
    step = yaml.safe_load(COMMANDS["- name: robustness gate"])[0]
    res = _as_printed(step["run"], onnx_folder)
    assert res.returncode in (0, 3), res.stderr  # 3: a figure below its floor, the gate's own exit code
    assert (onnx_folder / "audit.json").exists()
    if res.returncode == 3:
        assert "robust" in res.stderr or "verified" in res.stderr


def test_hydra_pipe_info_runs_as_printed(onnx_folder):
    res = _as_printed("hydra-pipe info model.onnx", onnx_folder)
    assert res.returncode == 0, res.stderr
    assert "input" in res.stdout


def test_the_stage_commands_run_outside_dvc_as_printed(tmp_path):
    """`hydra-pipe prune --params params.yaml` after `hydra-pipe pretrain`, on tiny params."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["compute"] = {**params.get("compute", {}), "threads": 1}
    for stage in ("pretrain", "prune", "finetune"):
        params[stage] = {**params.get(stage, {}), "epochs": 1, "objective": "benign"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = _as_printed("hydra-pipe pretrain", tmp_path)
    assert res.returncode == 0, res.stderr
    res = _as_printed("hydra-pipe prune --params params.yaml", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "models/pruned.safetensors").exists()


def test_python_m_stages_runs_writes_what_is_committed(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for params in (ROOT / "runs").glob("*/params.yaml"):
        (tmp_path / params.parent.relative_to(ROOT)).mkdir(parents=True)
        shutil.copy(params, tmp_path / params.relative_to(ROOT))
    res = _as_printed("python -m stages.runs", tmp_path)
    assert res.returncode == 0, res.stderr
    for made in (tmp_path / "runs").glob("*/dvc.yaml"):
        assert made.read_text() == (ROOT / made.relative_to(tmp_path)).read_text()
