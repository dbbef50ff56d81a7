"""The ready Fashion-MNIST run (runs/fashion/): its dvc.yaml is the root one, regenerated; its params are the issue's
setup and fit the time budget; missing data is one line and exit code 2; the launcher works from the run's folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from stages.runs import main, render, run_stages, runs

ROOT = Path(__file__).resolve().parent.parent
RUN = Path("runs") / "fashion"

# measured on the 2-core CI machine, one thread: a PGD-10 epoch of CNN-small over 55,000 images (weights) and a
# HYDRA score epoch; the audit and the stages' own measurements get the rest of the hour
PGD_EPOCH_S, SCORE_EPOCH_S, AUDIT_BUDGET_S = 46.0, 58.0, 25 * 60


def test_committed_dvc_yaml_is_the_generated_one():
    assert (ROOT / RUN / "dvc.yaml").read_text() == render(ROOT, RUN), "run `python -m stages.runs`"
    assert RUN in runs(ROOT)


def test_run_stages_are_the_root_stages_pointing_back_up():
    root = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    run = yaml.safe_load((ROOT / RUN / "dvc.yaml").read_text())
    assert list(run["stages"]) == list(root["stages"])
    for name, stage in run["stages"].items():
        assert stage["cmd"] == "../../" + root["stages"][name]["cmd"]
        assert (ROOT / RUN / stage["cmd"].split()[0]).resolve() == ROOT / "bin" / "hydra-pipe"
        for d in stage["deps"]:
            path = d if isinstance(d, str) else next(iter(d))
            if path.startswith("../"):  # project code: must exist from the run's folder
                assert (ROOT / RUN / path).exists(), (name, path)
            else:  # an output of an earlier stage of the same run
                outs = {o if isinstance(o, str) else next(iter(o)) for s in run["stages"].values()
                        for o in [*s.get("outs", []), *s.get("metrics", []), *s.get("plots", [])]}
                assert path in outs, (name, path)
        assert stage["params"] == root["stages"][name]["params"]
        assert stage.get("outs") == root["stages"][name].get("outs")  # outputs relative to the run's folder


def test_run_stages_refuse_a_command_that_is_not_the_launcher():
    with pytest.raises(ValueError, match="does not start with"):
        run_stages({"stages": {"x": {"cmd": "python train.py", "deps": []}}})


def test_every_param_the_run_dvc_yaml_lists_is_in_its_params_file():
    raw = yaml.safe_load((ROOT / RUN / "params.yaml").read_text())
    for stage in yaml.safe_load((ROOT / RUN / "dvc.yaml").read_text())["stages"].values():
        for key in stage.get("params", []):
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, key
                node = node[part]


def test_params_are_the_issues_setup_within_the_hour():
    p = load_params(ROOT / RUN / "params.yaml")
    assert p.data.name == "fashion_mnist" and p.data.validation == 5000 and p.model.arch == "cnn_small"
    for stage in (p.pretrain, p.prune, p.finetune):
        assert stage.objective == "pgd" and stage.eps == 0.1 and stage.attack_steps == 10
    assert p.prune.method == "hydra" and p.prune.keep_ratio == 0.1 and p.finetune.epochs > 0
    assert p.audit.eps == 0.1 and p.audit.n_examples == 1000
    training = (p.pretrain.epochs + p.finetune.epochs) * PGD_EPOCH_S + p.prune.epochs * SCORE_EPOCH_S
    assert training + AUDIT_BUDGET_S <= 60 * 60, training


def test_missing_data_is_one_line_and_exit_code_2(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    raw = yaml.safe_load((ROOT / RUN / "params.yaml").read_text())
    raw["data"]["root"] = str(tmp_path / "nowhere")
    (run / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as e:
        main(["--check-data", str(run)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "apt-get install dataset-fashion-mnist" in err and "nowhere" in err
    from tests.test_data import write_idx_set

    write_idx_set(tmp_path / "nowhere")
    main(["--check-data", str(run)])  # there now: no exit


def test_the_launcher_runs_from_the_run_folder():
    """DVC runs each stage in runs/fashion/: ../../bin/hydra-pipe must find the project's environment from there."""
    out = subprocess.run(["../../bin/hydra-pipe", "--help"], cwd=ROOT / RUN, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pretrain" in out.stdout and "audit" in out.stdout


def test_stage_outputs_are_relative_to_the_working_directory():
    from stages import common

    for path in (common.MODELS, common.METRICS, common.PLOTS, common.REPORTS, common.DEPLOY, common.RESUME):
        assert not path.is_absolute()


def test_readme_block_says_not_run_until_the_outputs_are_there(tmp_path):
    from stages.figures import fashion_run

    assert fashion_run(tmp_path).startswith("Not run yet")
