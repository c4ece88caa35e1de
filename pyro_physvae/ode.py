"""Batched, plate-friendly ODE integration on top of torchdiffeq.

torchdiffeq returns the time axis first. Pyro plates live on the left of a tensor, so
:func:`integrate` moves time next to the state dimension: an initial state of shape
``(..., D)`` gives a trajectory of shape ``(..., T, D)``, whatever the leading (plate,
particle or Predictive sample) dimensions are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

#: Solvers on a fixed grid: the step is ``dt / substeps``.
FIXED_STEP_METHODS = ("euler", "midpoint", "heun3", "rk4", "explicit_adams", "implicit_adams")
#: Adaptive solvers: the step is chosen to meet ``rtol``/``atol``.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
METHODS = FIXED_STEP_METHODS + ADAPTIVE_METHODS

RightHandSide = Callable[[Tensor, Tensor], Tensor]


class IntegrationError(FloatingPointError):
    """The solution of an ODE became NaN or infinite."""


def check_method(method: str) -> str:
    """Return ``method`` if torchdiffeq offers it here, else raise a ``ValueError``."""
    if method not in METHODS:
        raise ValueError(f"unknown ODE solver method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def time_grid(n_steps: int, dt: float, device: torch.device | str | None = None) -> Tensor:
    """Observation times ``0, dt, ..., (n_steps - 1) dt`` of shape ``(n_steps,)``."""
    if n_steps < 1:
        raise ValueError(f"the number of time steps must be positive, got {n_steps}")
    if not dt > 0:
        raise ValueError(f"the time step dt must be positive, got {dt}")
    return torch.arange(n_steps, device=device, dtype=torch.get_default_dtype()) * dt


def integrate(
    rhs: RightHandSide,
    y0: Tensor,
    t: Tensor,
    *,
    method: str = "euler",
    substeps: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    check_finite: bool = True,
    uniform: bool | None = None,
) -> Tensor:
    """Solve ``dy/dt = rhs(t, y)`` from ``y(t[0]) = y0`` and return ``y`` at the times ``t``.

    Args:
        rhs: right-hand side, called with a scalar time tensor and a state of the same shape
            as ``y0``; it must broadcast over all leading dimensions.
        y0: initial state, shape ``(..., D)``.
        t: strictly increasing times, shape ``(T,)``; on a uniform grid for fixed-step solvers.
        method: a torchdiffeq solver name (:data:`METHODS`).
        substeps: fixed-step solvers take this many steps per interval of ``t``.
        rtol, atol: tolerances of adaptive solvers.
        check_finite: raise :class:`IntegrationError` if the solution is not finite.
        uniform: whether ``t`` is evenly spaced, if the caller knows (``None``: check it).

    Returns:
        The trajectory, shape ``(..., T, D)``.
    """
    check_method(method)
    if substeps < 1:
        raise ValueError(f"substeps must be a positive integer, got {substeps}")
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"t must be a non-empty 1-d tensor of times, got shape {tuple(t.shape)}")
    # On the native fixed grid every output is a solver state, and a non-finite state stays
    # non-finite at every later step (y_next = y + h * sum_j b_j k_j), so the last one tells.
    own_states = t.numel() == 1
    if t.numel() == 1:
        ys = y0.unsqueeze(-2)
    else:
        try:
            if method in TABLEAUS and (is_uniform(t) if uniform is None else uniform):
                ys = _fixed_grid(rhs, y0, t, substeps, method)
                own_states = True
            elif method in FIXED_STEP_METHODS:
                step = float(t[1] - t[0]) / substeps
                ys = odeint(rhs, y0, t, method=method, options={"step_size": step}).movedim(0, -2)
            else:
                ys = odeint(rhs, y0, t, method=method, rtol=rtol, atol=atol).movedim(0, -2)
        except AssertionError as e:  # torchdiffeq's adaptive step control gave up
            raise IntegrationError(
                f"the adaptive solver {method!r} failed ({e}); the dynamics are likely blowing up"
            ) from e
    if check_finite and not torch.isfinite(ys[..., -1, :] if own_states else ys).all():
        raise IntegrationError(
            f"the ODE solution became non-finite (solver {method!r}, {substeps} substep(s)); "
            "the dynamics blew up: lower the learning rate, add substeps or use an adaptive solver"
        )
    return ys


def is_uniform(t: Tensor) -> bool:
    """Whether the times ``t (T,)`` are evenly spaced (to 1e-5 relative)."""
    steps = t.diff()
    return bool(torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-5, atol=0.0))


#: Stages of the fixed-grid methods run natively (here and in
#: :mod:`pyro_physvae.hamiltonian`), as torchdiffeq defines them: ``(c_i, a_ij)`` for each
#: stage and the weights ``b``.
TABLEAUS: dict[str, tuple[tuple[tuple[float, tuple[float, ...]], ...], tuple[float, ...]]] = {
    "euler": (((0.0, ()),), (1.0,)),
    "midpoint": (((0.0, ()), (0.5, (0.5,))), (0.0, 1.0)),
    # Heun's third-order method: three evaluations per step against rk4's four.
    "heun3": (((0.0, ()), (1 / 3, (1 / 3,)), (2 / 3, (0.0, 2 / 3))), (0.25, 0.0, 0.75)),
    # torchdiffeq's "rk4" is the 3/8 rule.
    "rk4": (((0.0, ()), (1 / 3, (1 / 3,)), (2 / 3, (-1 / 3, 1.0)), (1.0, (1.0, -1.0, 1.0))),
            (0.125, 0.375, 0.375, 0.125)),
}


def _fixed_grid(rhs: RightHandSide, y0: Tensor, t: Tensor, substeps: int, method: str) -> Tensor:
    """Explicit Runge-Kutta (a method of :data:`TABLEAUS`) on the uniform grid ``t`` with
    ``substeps`` steps per interval, as torchdiffeq computes it, without its per-step
    interpolation bookkeeping, which is a large share of the cost for the small right-hand
    sides of the zoo. Returns ``(..., T, D)``."""
    stages, weights = TABLEAUS[method]
    # Each interval's own step, so that the solution lands on the given times exactly.
    step = t.diff() / substeps
    starts = t[:-1, None] + step[:, None] * torch.arange(substeps, device=t.device, dtype=t.dtype)
    stage_times = [(starts + c * step[:, None]).flatten().unbind() for c, _ in stages]
    y, ys, i = y0, [y0], 0
    for h in step.tolist():
        for _ in range(substeps):
            ks: list[Tensor] = []
            for (_, a), times in zip(stages, stage_times, strict=True):
                y_stage = y
                for a_j, k_j in zip(a, ks, strict=False):
                    if a_j:
                        y_stage = y_stage.add(k_j, alpha=a_j * h)
                ks.append(rhs(times[i], y_stage))
            for b_j, k_j in zip(weights, ks, strict=True):
                if b_j:
                    y = y.add(k_j, alpha=b_j * h)
            i += 1
        ys.append(y)
    return torch.stack(ys, -2)
