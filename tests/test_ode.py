"""The ODE integrator against closed-form solutions, and its argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_physvae.ode import (
    ADAPTIVE_METHODS,
    FIXED_STEP_METHODS,
    METHODS,
    IntegrationError,
    check_method,
    integrate,
    time_grid,
)

K = 0.7
T_DECAY = torch.linspace(0.0, 2.0, 11)


def decay(t, y):
    return -K * y


def decay_error(method: str, substeps: int = 1, dtype=torch.float64) -> float:
    y0 = torch.tensor([1.0], dtype=dtype)
    t = T_DECAY.to(dtype)
    y = integrate(decay, y0, t, method=method, substeps=substeps)
    return float((y[:, 0] - torch.exp(-K * t)).abs().max())


def test_method_lists_are_consistent():
    assert set(FIXED_STEP_METHODS).isdisjoint(ADAPTIVE_METHODS)
    assert set(METHODS) == set(FIXED_STEP_METHODS) | set(ADAPTIVE_METHODS)
    for m in METHODS:
        assert check_method(m) == m


@pytest.mark.parametrize(
    ("method", "substeps", "tol"),
    [("euler", 1000, 1e-3), ("midpoint", 20, 1e-4), ("heun3", 10, 1e-6), ("rk4", 1, 1e-5), ("rk4", 10, 1e-9),
     ("dopri5", 1, 1e-5), ("bosh3", 1, 2e-3)],
)
def test_exponential_decay_matches_closed_form(method, substeps, tol):
    assert decay_error(method, substeps) < tol


def test_euler_error_is_first_order_in_the_step():
    errors = [decay_error("euler", s) for s in (1, 10, 100)]
    # Not exact yet: plain Euler with one step per interval is visibly off.
    assert errors[0] > 1e-2
    for coarse, fine in zip(errors[:-1], errors[1:], strict=True):
        ratio = coarse / fine
        assert 7.0 < ratio < 13.0, errors  # ~10x smaller error for a 10x smaller step


@pytest.mark.parametrize("substeps", [1, 4])
def test_euler_takes_exactly_substeps_steps_per_interval(substeps):
    # Hand-rolled Euler on the same grid: y_n = (1 - k h)^n with h = dt / substeps.
    dt, n = 0.05, 20
    t = torch.arange(n, dtype=torch.float64) * dt
    y = integrate(decay, torch.ones(1, dtype=torch.float64), t, method="euler", substeps=substeps)
    h = dt / substeps
    expected = (1 - K * h) ** (substeps * torch.arange(n, dtype=torch.float64))
    torch.testing.assert_close(y[:, 0], expected, atol=1e-12, rtol=0)


def test_rk4_is_much_more_accurate_than_euler_at_the_same_step():
    assert decay_error("rk4", 1) < 1e-3 * decay_error("euler", 1)


def test_adaptive_tolerance_controls_the_error():
    loose = integrate(decay, torch.ones(1, dtype=torch.float64), T_DECAY.double(), method="dopri5",
                      rtol=1e-3, atol=1e-3)
    tight = integrate(decay, torch.ones(1, dtype=torch.float64), T_DECAY.double(), method="dopri5",
                      rtol=1e-10, atol=1e-12)
    exact = torch.exp(-K * T_DECAY.double())
    err_tight = (tight[:, 0] - exact).abs().max()
    assert err_tight < 1e-9
    assert err_tight < (loose[:, 0] - exact).abs().max()


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_harmonic_oscillator(method):
    w = 2.0

    def rhs(t, y):
        return torch.stack((y[..., 1], -(w**2) * y[..., 0]), -1)

    t = torch.linspace(0.0, 3.0, 31, dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.0], [0.0, w]], dtype=torch.float64)  # cos(wt) and sin(wt)
    y = integrate(rhs, y0, t, method=method, substeps=4, rtol=1e-8, atol=1e-10)
    assert y.shape == (2, 31, 2)
    torch.testing.assert_close(y[0, :, 0], torch.cos(w * t), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, :, 1], -w * torch.sin(w * t), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1, :, 0], torch.sin(w * t), atol=1e-5, rtol=0)
    # The energy is conserved to solver accuracy.
    energy = y[..., 1] ** 2 + w**2 * y[..., 0] ** 2
    torch.testing.assert_close(energy, energy[:, :1].expand_as(energy), atol=1e-5, rtol=0)


def test_output_shape_with_leading_dimensions_and_per_element_rates():
    rates = torch.linspace(0.1, 1.0, 3 * 5 * 2, dtype=torch.float64).reshape(3, 5, 2)
    y0 = torch.rand(3, 5, 2, dtype=torch.float64) + 0.5
    t = torch.linspace(0.0, 1.0, 7, dtype=torch.float64)
    y = integrate(lambda t, y: -rates * y, y0, t, method="rk4", substeps=5)
    assert y.shape == (3, 5, 7, 2)
    # Time sits next to the state dimension; each element decays at its own rate.
    expected = y0.unsqueeze(-2) * torch.exp(-rates.unsqueeze(-2) * t[:, None])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(y[..., 0, :], y0)


def test_time_dependent_right_hand_side():
    # dy/dt = cos(t), y(0) = 0  ->  y = sin(t)
    t = torch.linspace(0.0, 2.0, 9, dtype=torch.float64)
    y = integrate(lambda tt, y: torch.cos(tt).expand_as(y), torch.zeros(1, dtype=torch.float64), t,
                  method="rk4", substeps=4)
    torch.testing.assert_close(y[:, 0], torch.sin(t), atol=1e-6, rtol=0)


def test_single_time_returns_initial_state():
    y0 = torch.randn(4, 3)
    y = integrate(decay, y0, torch.zeros(1))
    assert y.shape == (4, 1, 3)
    torch.testing.assert_close(y[:, 0], y0)


def test_gradients_flow_through_the_solver():
    k = torch.tensor(0.5, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5)
    y = integrate(lambda t, y: -k * y, torch.ones(1), t, method="rk4", substeps=4)
    y[-1, 0].backward()
    # d/dk exp(-k) = -exp(-k)
    assert k.grad is not None
    assert abs(float(k.grad) + math.exp(-0.5)) < 1e-4


def test_blow_up_raises_integration_error():
    with pytest.raises(IntegrationError, match="non-finite"):
        integrate(lambda t, y: y**2, torch.tensor([10.0]), torch.linspace(0.0, 10.0, 11), method="euler")
    assert issubclass(IntegrationError, FloatingPointError)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4"])
def test_a_non_finite_value_midway_in_one_row_is_caught(method):
    """The fixed-grid check looks at the last state only: a NaN from the right-hand side
    half-way, in one row of the batch, must still stop the solve."""
    def rhs(t, y):
        bad = (t > 0.4) & (t < 0.6)
        return torch.where(bad & (torch.arange(3) == 1)[:, None], float("nan"), -y)

    t = torch.linspace(0.0, 1.0, 11)
    with pytest.raises(IntegrationError, match="non-finite"):
        integrate(rhs, torch.ones(3, 2), t, method=method, substeps=2)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_known_uniform_grid_gives_the_checked_result(method):
    t = torch.linspace(0.0, 2.0, 9)
    checked = integrate(decay, torch.ones(2), t, method=method, substeps=3)
    torch.testing.assert_close(integrate(decay, torch.ones(2), t, method=method, substeps=3,
                                         uniform=True), checked)
    # uniform=False takes torchdiffeq's general path: the same steps, the same values.
    torch.testing.assert_close(integrate(decay, torch.ones(2), t, method=method, substeps=3,
                                         uniform=False), checked)


def test_blow_up_check_can_be_switched_off():
    y = integrate(lambda t, y: y**2, torch.tensor([10.0]), torch.linspace(0.0, 10.0, 11),
                  method="euler", check_finite=False)
    assert not torch.isfinite(y).all()


def test_blow_up_with_adaptive_solver_raises_integration_error():
    with pytest.raises(IntegrationError):
        integrate(lambda t, y: y**2, torch.tensor([10.0]), torch.linspace(0.0, 10.0, 11), method="dopri5")


def test_unknown_method_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="unknown ODE solver method 'leapfrog'.*rk4"):
        integrate(decay, torch.ones(1), T_DECAY, method="leapfrog")
    with pytest.raises(ValueError, match="dopri5"):
        check_method("RK4")


@pytest.mark.parametrize("substeps", [0, -1])
def test_bad_substeps(substeps):
    with pytest.raises(ValueError, match="substeps"):
        integrate(decay, torch.ones(1), T_DECAY, substeps=substeps)


@pytest.mark.parametrize("t", [torch.zeros(0), torch.zeros(2, 3), torch.tensor(1.0)])
def test_bad_time_grid(t):
    with pytest.raises(ValueError, match="t must be a non-empty 1-d tensor"):
        integrate(decay, torch.ones(1), t)


def test_time_grid():
    t = time_grid(5, 0.25)
    torch.testing.assert_close(t, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert t.dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="positive"):
        time_grid(0, 0.1)
    with pytest.raises(ValueError, match="dt must be positive"):
        time_grid(3, 0.0)
    with pytest.raises(ValueError, match="dt must be positive"):
        time_grid(3, float("nan"))


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4"])
@pytest.mark.parametrize("substeps", [1, 3])
def test_native_fixed_grid_loop_equals_torchdiffeq(method, substeps):
    """The native loops compute what torchdiffeq's solvers of the same name compute, values
    and gradients."""
    from torchdiffeq import odeint

    w = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], requires_grad=True)

    def rhs(t, y):
        return y @ w.T + torch.sin(3 * t)

    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.5]])
    t = torch.arange(8) * 0.1
    ours = integrate(rhs, y0, t, method=method, substeps=substeps)
    (g_ours,) = torch.autograd.grad(ours.sum(), w)
    ref = odeint(rhs, y0, t, method=method, options={"step_size": 0.1 / substeps}).movedim(0, -2)
    (g_ref,) = torch.autograd.grad(ref.sum(), w)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_euler_on_a_non_uniform_grid_falls_back_to_torchdiffeq():
    t = torch.tensor([0.0, 0.1, 0.3, 0.35])
    ys = integrate(lambda t, y: -y, torch.ones(1), t, method="euler", substeps=50)
    assert torch.allclose(ys[..., 0], torch.exp(-t), atol=5e-3)


def test_heun3_error_is_third_order_in_the_step():
    errors = [decay_error("heun3", s) for s in (1, 10)]
    assert 500.0 < errors[0] / errors[1] < 2000.0, errors  # ~1000x smaller for a 10x smaller step
