"""Advection-diffusion: the Phys-VAE generative model of 1-d space-time fields.

Physics (the incomplete model that scientists know): diffusion ``u_t = D u_xx`` on the grid
``x_i = i dx`` with the field zero just outside it, by the method of lines (second-difference
Laplacian, :mod:`pyro_physvae.pde`). Data come from ``u_t = D u_xx - c u_x``: the advection is
left to a neural term *inside* the ODE, an MLP of the field ``u (X,)`` and ``z_A1``. There is
no out-of-ODE network (as in the reference), so ``x_PB = x_P`` and R_ppc reduces to
``0.5 |x_PA - x_P|^2``.

The initial field is the data's first time step. Observations ``x (X, T)`` (space, time)
``~ Normal(u, sigma)`` with ``log sigma^2 = -13.8 - log 2`` by default, which makes the ELBO
the reference objective (squared error plus ``exp(-13.8)`` times the KL divergence).

``nn-only`` replaces the physics by the network alone: a neural ODE ``u_t = f(u, z_A1)`` with
one more latent dimension (the reference's NN-only model with a PDE-like decoder), which can
be rolled out beyond the training window like the others.

Sample sites (inside the ``data`` plate, dim -1): ``diffusion`` (scalar, length^2/s),
``z_A1`` (event 1), ``x`` (event 2). Deterministic: ``init`` (event 1), ``x_P``, ``x_PA``,
``x_PB``, ``x_mean`` (event 2, ``(X, T)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_physvae.arguments import Count, Size, Widths
from pyro_physvae.base import PhysVAEModel
from pyro_physvae.nets import MLP
from pyro_physvae.ode import time_grid
from pyro_physvae.pde import second_difference_matrix
from pyro_physvae.physics import PhysicalParameter
from pyro_physvae.settings import Setting

X_LNVAR = -13.8 - math.log(2.0)
DIFFUSION = PhysicalParameter("diffusion", 5e-3, 0.2, unit="length^2/s",
                              description="diffusion coefficient D of u_t = D u_xx")


class AdvDifModel(PhysVAEModel):
    """The Phys-VAE generative model of advection-diffusion fields.

    Args:
        setting: ``"nn-only"``, ``"phys-only"``, ``"phys+nn"`` or ``"phys+nn+reg"``.
        n_grid, dx: grid points X and their spacing.
        n_steps, dt: observed time steps T and their interval [s].
        dim_z_aux1: size of ``z_A1`` (``nn-only`` gets one more dimension).
        hidden_aux1: hidden widths of the in-ODE network.
        time_input: the in-ODE network also reads ``sin t`` and ``cos t`` (as in the
            reference); off by default because the advection is autonomous and a roll-out
            far past the training window would feed it times it never saw.
        x_lnvar, learn_noise: log variance of the observation noise; learn it instead.
        method, substeps, rtol, atol: ODE solver (:mod:`pyro_physvae.ode`); the reference
            takes 2 Euler sub-steps per observation step. Explicit Euler is stable for
            ``D dt / (substeps dx^2) <= 1/2``, which holds for the whole feasible range of
            ``D`` with the defaults; for finer grids use more sub-steps or ``dopri5``.
        diffusion: range (and hence prior) of the physics parameter.
    """

    x_event_dim = 2
    observation_dims = ("space", "time")
    init_event_dim = 1
    reg_weights = (1e-1, 1e6, 1e-2)  # the reference's alpha, beta, gamma
    supports_rollout = True

    def __init__(
        self,
        setting: str | Setting = Setting.PHYS_NN_REG,
        *,
        n_grid: Size = 20,
        dx: float = 0.1,
        n_steps: Size = 50,
        dt: float = 0.02,
        dim_z_aux1: Count = 4,
        hidden_aux1: Widths = (64, 64),
        time_input: bool = False,
        activation: str = "elu",
        x_lnvar: float = X_LNVAR,
        learn_noise: bool = False,
        method: str = "euler",
        substeps: Size = 2,
        rtol: float = 1e-5,
        atol: float = 1e-6,
        diffusion: PhysicalParameter = DIFFUSION,
    ) -> None:
        super().__init__(name="advdif_model")
        self.setting = Setting.parse(setting)
        if n_grid < 3:
            raise ValueError(f"n_grid must be at least 3, got {n_grid}")
        if not dx > 0:
            raise ValueError(f"dx must be positive, got {dx}")
        if dim_z_aux1 < 0:
            raise ValueError(f"dim_z_aux1 must be non-negative, got {dim_z_aux1}")
        self.setup_time_grid(n_steps, dt, method, substeps, rtol, atol)
        self.setup_noise(x_lnvar, learn_noise)
        self.n_grid, self.dx = int(n_grid), float(dx)
        self.diffusion = diffusion
        self.dim_z_aux1 = dim_z_aux1 + (0 if self.setting.has_physics else 1)
        self.time_input = bool(time_input)
        self.aux_dims = {"z_A1": self.dim_z_aux1} if self.setting.has_nn else {}
        X = self.n_grid
        if self.setting.has_nn:
            dim_in = X + 2 * int(self.time_input) + self.dim_z_aux1
            self.aux1 = MLP(dim_in, hidden_aux1, X, activation, zero_last=True)
        lap = second_difference_matrix(X, self.dx)
        self.register_buffer("laplacian", lap, persistent=False)
        # phys+nn solves physics-only and physics+net fields together: state (P, PA), (2X,).
        zeros = torch.zeros(X, X)
        self.register_buffer("laplacian2", torch.cat((torch.cat((lap, zeros), 1),
                                                      torch.cat((zeros, lap), 1))), persistent=False)
        self.register_buffer("select_pa", torch.cat((zeros, torch.eye(X)), 1), persistent=False)
        self.register_buffer("into_pa", torch.cat((zeros, torch.eye(X))), persistent=False)

    # -- configuration -------------------------------------------------------------------
    @property
    def physics_parameters(self) -> tuple[PhysicalParameter, ...]:
        return (self.diffusion,) if self.setting.has_physics else ()

    def observation_shape(self) -> tuple[int, int]:
        return (self.n_grid, self.n_steps)

    # -- the decoder ---------------------------------------------------------------------
    def decode(
        self,
        init: Tensor,
        diffusion: Tensor | None,
        z_aux1: Tensor | None,
        *,
        n_steps: int | None = None,
        clamp: bool = True,
    ) -> dict[str, Tensor]:
        """Decode latents into fields.

        Args:
            init: initial fields ``(..., B, X)``.
            diffusion: ``(..., B)`` or ``None`` (nn-only).
            z_aux1: ``(..., B, dim)`` or ``None`` (phys-only).
            n_steps: length of the decoded time axis (default: the training length); a longer
                one rolls the model out past the training window.
            clamp: clamp the diffusion coefficient to its feasible range.

        Returns:
            Fields ``(..., B, X, n_steps)``: ``x_mean`` always; with physics also ``x_P``;
            with physics and the network also ``x_PA`` and ``x_PB`` (equal to ``x_P``).
        """
        s = self.setting
        t = self.t if n_steps is None else time_grid(n_steps, self.dt, device=self.t.device)
        if s.has_physics:
            d = (self.diffusion.clamp(diffusion) if clamp else diffusion).unsqueeze(-1)
            batch = d.shape[:-1]
        else:
            batch = z_aux1.shape[:-1]
        y0 = init.expand(*batch, self.n_grid)
        if not s.has_nn:
            x_p = self.physics_only(y0, diffusion, t=t, clamp=clamp)
            return {"x_P": x_p, "x_mean": x_p}
        if not s.has_physics:
            net = self._in_ode_net(z_aux1, None, None)
            return {"x_mean": self._solve(net, y0, t)}
        net = self._in_ode_net(z_aux1, self.select_pa, self.into_pa)
        lap2 = self.laplacian2

        def rhs(tt: Tensor, y: Tensor) -> Tensor:
            return d * F.linear(y, lap2) + net(tt, y)

        fields = self._solve(rhs, torch.cat((y0, y0), -1), t)
        x_p, x_pa = fields[..., :self.n_grid, :], fields[..., self.n_grid:, :]
        return {"x_P": x_p, "x_PA": x_pa, "x_PB": x_p, "x_mean": x_pa}

    def physics_only(self, init: Tensor, diffusion: Tensor, *, t: Tensor | None = None,
                     clamp: bool = True) -> Tensor:
        """Diffusion-only fields ``(..., B, X, T)`` from ``init (..., B, X)``, ``D (..., B)``."""
        d = (self.diffusion.clamp(diffusion) if clamp else diffusion).unsqueeze(-1)
        lap = self.laplacian
        return self._solve(lambda tt, y: d * F.linear(y, lap), init, self.t if t is None else t)

    def simulate_augmentation(self, init: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Physics-only data for R_DA,2: ``D`` uniform over its range, from ``init (..., B, X)``."""
        d = self.diffusion.sample_uniform(init.shape[:-1], dtype=init.dtype, device=init.device)
        return {"diffusion": d}, self.physics_only(init, d)

    def _in_ode_net(self, z_aux1: Tensor, input_map: Tensor | None, output_map: Tensor | None):
        """The in-ODE network as ``f(t, y)`` for fixed ``z_aux1``, placed by the state maps."""
        if not self.time_input:
            net = self.aux1.bind_conditioned(z_aux1, input_map, output_map)
            return lambda t, y: net(y)
        # Time features (sin t, cos t): appended to the state and read through the input map.
        X = self.n_grid
        dim_state = X if input_map is None else input_map.shape[1]
        select = torch.eye(X, device=z_aux1.device) if input_map is None else input_map
        widen = F.pad(select, (0, 2, 0, 2))
        widen[X, dim_state] = widen[X + 1, dim_state + 1] = 1.0
        net = self.aux1.bind_conditioned(z_aux1, widen, output_map)
        return lambda t, y: net(torch.cat((y, torch.sin(t).expand(*y.shape[:-1], 1),
                                           torch.cos(t).expand(*y.shape[:-1], 1)), -1))

    def _solve(self, rhs, y0: Tensor, t: Tensor) -> Tensor:
        """Integrate and return fields ``(..., B, D, T)`` (space before time, as in ``x``)."""
        return self.solve(rhs, y0, t).transpose(-1, -2)

    # -- the Pyro model ------------------------------------------------------------------
    def decode_sites(self, init: Tensor, latents: Mapping[str, Tensor], *,
                     n_steps: int | None = None, clamp: bool = True) -> dict[str, Tensor]:
        return self.decode(init, latents.get("diffusion"), latents.get("z_A1"), n_steps=n_steps,
                           clamp=clamp)
