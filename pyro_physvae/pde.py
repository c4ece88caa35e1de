"""Finite differences for PDEs solved by the method of lines.

A field ``u`` sampled on a uniform 1-d grid of ``n`` points with spacing ``dx`` becomes a state
vector ``(..., n)``; a spatial derivative becomes a fixed ``(n, n)`` matrix applied with
``F.linear``, so that the PDE turns into an ODE system that :func:`pyro_physvae.ode.integrate`
solves, broadcasting over any leading (plate, particle, draw) dimensions.

Boundary: the field is zero just outside the grid (ghost points ``u_{-1} = u_n = 0``), as in
the reference data generator. The grid's own end points are free.

For small grids a dense matrix product is faster than a convolution on CPU (one fused
matrix-multiply call instead of reshapes around ``conv1d``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_grid(n: int, dx: float) -> None:
    if n < 2:
        raise ValueError(f"a grid needs at least 2 points, got {n}")
    if not dx > 0:
        raise ValueError(f"the grid spacing dx must be positive, got {dx}")


def second_difference_matrix(n: int, dx: float, **tensor_kwargs) -> Tensor:
    """``(n, n)`` matrix ``L`` with ``(L u)_i = (u_{i-1} - 2 u_i + u_{i+1}) / dx^2``, zero
    outside the grid: the Laplacian ``u_xx`` to second order."""
    _check_grid(n, dx)
    eye = torch.eye(n, dtype=torch.float64)
    lap = -2.0 * eye + torch.diag(torch.ones(n - 1, dtype=torch.float64), 1) \
        + torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
    return (lap / dx**2).to(**{"dtype": torch.get_default_dtype(), **tensor_kwargs})


def central_difference_matrix(n: int, dx: float, **tensor_kwargs) -> Tensor:
    """``(n, n)`` matrix ``G`` with ``(G u)_i = (u_{i+1} - u_{i-1}) / (2 dx)``, zero outside
    the grid: the gradient ``u_x`` to second order."""
    _check_grid(n, dx)
    ones = torch.ones(n - 1, dtype=torch.float64)
    grad = torch.diag(ones, 1) - torch.diag(ones, -1)
    return (grad / (2.0 * dx)).to(**{"dtype": torch.get_default_dtype(), **tensor_kwargs})


def dirichlet_eigenpair(n: int, dx: float, k: int = 1) -> tuple[float, Tensor]:
    """The ``k``-th eigenpair of :func:`second_difference_matrix`: ``L v = -lam v`` with
    ``v_i = sin(k pi (i + 1) / (n + 1))`` and ``lam = (4 / dx^2) sin^2(k pi / (2 (n + 1)))``.

    Then ``u(t) = exp(-D lam t) v`` solves the semi-discrete diffusion ``u' = D L u`` exactly:
    a closed-form solution to test integrators against.
    """
    _check_grid(n, dx)
    if not 1 <= k <= n:
        raise ValueError(f"mode k must be in 1..{n}, got {k}")
    i = torch.arange(1, n + 1, dtype=torch.float64)
    vec = torch.sin(k * torch.pi * i / (n + 1))
    lam = 4.0 / dx**2 * float(torch.sin(torch.tensor(k * torch.pi / (2 * (n + 1))))) ** 2
    return lam, vec.to(torch.get_default_dtype())
