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
    ("audit:\n  attacks: [pgd, pgd]\n", "audit.attacks: an attack is listed twice"),
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


@pytest.mark.parametrize("text, needle", [
    ("audit:\n  eps: 8\n", "audit.eps"),
    ("audit:\n  eps: 1\n", "audit.eps"),
    ("audit:\n  eps: 0.1\n  sweep_eps: [0.05, 16]\n", "audit.sweep_eps"),
    ("pretrain:\n  eps: 8\n", "pretrain.eps"),
    ("prune:\n  eps: 2\n", "prune.eps"),
    ("finetune:\n  eps: 255\n", "finetune.eps"),
])
def test_an_linf_eps_on_the_pixel_scale_is_refused_naming_the_255_form(tmp_path, text, needle):
    """eps >= 1 on inputs in [0, 1] lets every image become every other: the slip is 8 for 8/255."""
    p = write(tmp_path, text)
    with pytest.raises(HydraPipeError) as e:
        load_params(p)
    msg = str(e.value)
    assert needle in msg and "/255" in msg and "\n" not in msg


def test_radii_below_the_whole_range_and_l2_radii_stay_accepted(tmp_path):
    params = load_params(write(tmp_path, "audit:\n  eps: 0.999\n  sweep_eps: [0.5]\npretrain:\n  eps: 0.0314\n"))
    assert params.audit.eps == 0.999 and params.pretrain.eps == 0.0314
    # an L2 ball of radius 2 on 64 pixels is far from the whole box (its diameter is 8)
    assert load_params(write(tmp_path, "audit:\n  norm: l2\n  eps: 2.0\n")).audit.eps == 2.0


def test_the_dynamo_exporter_is_the_default_and_refuses_an_opset_it_would_not_write(tmp_path):
    params = load_params(write(tmp_path, ""))
    assert params.export.exporter == "dynamo" and params.export.opset >= 18
    with pytest.raises(HydraPipeError, match="export.opset: the dynamo exporter writes opset 18"):
        load_params(write(tmp_path, "export:\n  opset: 17\n"))
    assert load_params(write(tmp_path, "export:\n  exporter: legacy\n  opset: 17\n")).export.opset == 17


def test_the_audit_stage_takes_the_quick_budget(tmp_path):
    from pipeline.config import QUICK_ATTACKS

    audit = load_params(write(tmp_path, "audit:\n  budget: quick\n")).audit
    runs = audit.what_runs()
    assert runs.attacks == list(QUICK_ATTACKS) and not runs.alpha_crown and not runs.bab and runs.crown
    assert load_params(write(tmp_path, "")).audit.what_runs() == load_params(write(tmp_path, "")).audit
    with pytest.raises(HydraPipeError, match="audit.budget"):
        load_params(write(tmp_path, "audit:\n  budget: fast\n"))


def test_the_prune_stage_optimiser_is_the_method_s_own_unless_given():
    """HYDRA's scores train with the authors' SGD (lr 0.1, weight decay 1e-4), ADMM's weights with Adam (lr 1e-3);
    values a params file gives apply to whichever method runs; the optimiser built is the one resolved."""
    import torch

    from pipeline.config import PruneParams
    from pipeline.training import _optimizer

    assert PruneParams(method="hydra").optimiser() == ("sgd", 0.1, 0.9, 1e-4)
    assert PruneParams(method="admm").optimiser() == ("adam", 1e-3, 0.9, 0.0)
    assert PruneParams(method="admm", optimizer="sgd", lr=0.02).optimiser() == ("sgd", 0.02, 0.9, 0.0)
    assert PruneParams(method="hydra", lr=None, weight_decay=0.0).optimiser() == ("sgd", 0.1, 0.9, 0.0)
    w = torch.nn.Parameter(torch.zeros(3))
    sgd = _optimizer([w], PruneParams(method="hydra"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == 0.1
    assert sgd.param_groups[0]["weight_decay"] == 1e-4
    adam = _optimizer([w], PruneParams(method="admm"))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3
    # the repository's runs leave it to the method
    for path in ("params.yaml", "runs/fashion/params.yaml"):
        p = load_params(path).prune
        assert (p.optimizer, p.lr, p.weight_decay) == (None, None, None), path
