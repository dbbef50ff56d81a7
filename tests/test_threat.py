"""The threat model: validated once, and the one place an eps becomes an input box or a PGD step."""

import pytest
import torch

from pipeline.errors import HydraPipeError
from pipeline.threat import ThreatModel


def test_box_is_the_ball_intersected_with_the_input_range():
    x = torch.tensor([[0.0, 0.05, 0.5, 0.97, 1.0]])
    lo, hi = ThreatModel(0.1).box(x)
    assert torch.allclose(lo, torch.tensor([[0.0, 0.0, 0.4, 0.87, 0.9]]))
    assert torch.allclose(hi, torch.tensor([[0.1, 0.15, 0.6, 1.0, 1.0]]))
    lo2, hi2 = ThreatModel(0.1).box(x, eps=0.0)
    assert torch.equal(lo2, x) and torch.equal(hi2, x)


def test_the_box_contains_the_l2_ball():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 10, generator=g)
    threat = ThreatModel(0.3, "l2")
    lo, hi = threat.box(x)
    d = torch.randn(64, 10, generator=g)
    x_adv = (x + 0.3 * d / d.norm(dim=1, keepdim=True)).clamp(0, 1)  # on the sphere, then in range
    assert ((lo <= x_adv) & (x_adv <= hi)).all()


@pytest.mark.parametrize("eps, norm", [(-0.1, "linf"), (float("nan"), "linf"), (float("inf"), "l2"), (0.1, "l1")])
def test_bad_threat_models_are_one_line(eps, norm):
    with pytest.raises(HydraPipeError) as err:
        ThreatModel(eps, norm)
    assert "\n" not in str(err.value)


def test_pgd_step_is_madrys_capped_at_100_steps():
    t = ThreatModel(0.1)
    assert t.step_size(10) == pytest.approx(0.025)
    assert t.step_size(1000) == t.step_size(100) == pytest.approx(0.0025)
    assert t.step_size(0) == pytest.approx(0.25)


def test_inputs_outside_the_range_are_refused():
    with pytest.raises(HydraPipeError, match=r"\[0, 1\]"):
        ThreatModel(0.1).check_inputs(torch.tensor([[1.5]]))
