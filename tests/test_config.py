import pytest

from pipeline.config import load_params, params_hash
from pipeline.errors import HydraPipeError


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repository_params_are_valid():
    params = load_params("params.yaml")
    assert params.prune.method == "hydra"
    assert params.audit.steps == 1000 and params.audit.restarts == 100


@pytest.mark.parametrize("text, needle", [
    ("prune:\n  keep_ratio: 1.5\n", "prune.keep_ratio"),
    ("prune:\n  keep_ratio: 0\n", "prune.keep_ratio"),
    ("audit:\n  eps: -0.1\n", "audit.eps"),
    ("audit:\n  steps: -1\n", "audit.steps"),
    ("pretrain:\n  epochs: many\n", "pretrain.epochs"),
    ("pretrain:\n  objective: magic\n", "pretrain.objective"),
    ("prune:\n  kep_ratio: 0.1\n", "prune.kep_ratio: unknown key"),
    ("colour: blue\n", "colour: unknown key"),
    ("prune:\n  schedule_keep: [0.5, 2.0]\n", "prune"),
])
def test_bad_values_name_file_section_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(HydraPipeError) as e:
        load_params(p)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg


def test_unreadable_files(tmp_path):
    with pytest.raises(HydraPipeError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(HydraPipeError, match="not valid YAML"):
        load_params(write(tmp_path, "prune: [unclosed\n"))
    with pytest.raises(HydraPipeError, match="mapping"):
        load_params(write(tmp_path, "- a\n- b\n"))


def test_params_hash_tracks_sections(tmp_path):
    a = load_params(write(tmp_path, "prune:\n  keep_ratio: 0.1\n"))
    b = load_params(write(tmp_path, "prune:\n  keep_ratio: 0.2\n"))
    assert params_hash(a, "pretrain") == params_hash(b, "pretrain")
    assert params_hash(a, "prune") != params_hash(b, "prune")
