"""Physical parameters (priors, clamping, uniform draws) and the four model settings."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_physvae.physics import PRIOR_STD_FACTOR, PhysicalParameter
from pyro_physvae.settings import SETTINGS, Setting


def test_prior_loc_and_scale():
    p = PhysicalParameter("omega", 1.0, 3.0)
    assert p.prior_loc == pytest.approx(2.0)
    assert p.prior_scale == pytest.approx(0.8660254 * 2.0, rel=1e-6)
    assert PRIOR_STD_FACTOR == pytest.approx(math.sqrt(3) / 2)
    prior = p.prior()
    assert float(prior.loc) == pytest.approx(2.0)
    assert float(prior.scale) == pytest.approx(math.sqrt(3.0))
    # The scalar prior broadcasts to any shape.
    assert prior.log_prob(torch.zeros(4, 3)).shape == (4, 3)
    expected = -0.5 * math.log(2 * math.pi * 3.0) - 4.0 / (2 * 3.0)
    assert float(prior.log_prob(torch.tensor(0.0))) == pytest.approx(expected, rel=1e-5)


def test_clamp_keeps_values_in_range_and_passes_gradients_inside():
    p = PhysicalParameter("k", -1.0, 2.0)
    v = torch.tensor([-5.0, -1.0, 0.5, 2.0, 7.0], requires_grad=True)
    c = p.clamp(v)
    torch.testing.assert_close(c.detach(), torch.tensor([-1.0, -1.0, 0.5, 2.0, 2.0]))
    c.sum().backward()
    assert v.grad[2] == 1.0
    assert v.grad[0] == 0.0 and v.grad[4] == 0.0


def test_sample_uniform_within_range():
    p = PhysicalParameter("omega", 0.392, 3.53)
    draws = p.sample_uniform((20000,), dtype=torch.float64)
    assert draws.shape == (20000,) and draws.dtype == torch.float64
    assert draws.min() >= 0.392 and draws.max() <= 3.53
    # Uniform: mean at the middle, variance width^2 / 12.
    assert float(draws.mean()) == pytest.approx(p.prior_loc, abs=0.03)
    assert float(draws.var()) == pytest.approx((3.53 - 0.392) ** 2 / 12, rel=0.05)
    assert p.sample_uniform((2, 3)).shape == (2, 3)


@pytest.mark.parametrize(
    ("low", "high"), [(1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0), (0.0, float("inf")), (-math.inf, 0.0)]
)
def test_invalid_range(low, high):
    with pytest.raises(ValueError, match="'bad'.*low < high"):
        PhysicalParameter("bad", low, high)


def test_setting_parse_all_names():
    assert SETTINGS == ("nn-only", "phys-only", "phys+nn", "phys+nn+reg")
    for name in SETTINGS:
        s = Setting.parse(name)
        assert s.value == name and str(s) == name
        assert Setting.parse(s) is s
    assert Setting.parse("  PHYS+NN+Reg ") is Setting.PHYS_NN_REG


def test_setting_flags():
    flags = {s.value: (s.has_physics, s.has_nn, s.regularized) for s in Setting}
    assert flags == {
        "nn-only": (False, True, False),
        "phys-only": (True, False, False),
        "phys+nn": (True, True, False),
        "phys+nn+reg": (True, True, True),
    }


def test_setting_parse_unknown_lists_choices():
    with pytest.raises(ValueError, match="unknown setting 'physics'") as info:
        Setting.parse("physics")
    for name in SETTINGS:
        assert name in str(info.value)
