"""Lotka-Volterra predator-prey as a Phys-VAE, with pyro_physvae's public API only. Truth: prey x,
predator y, dx/dt = a x (1 - x/K) - b x y, dy/dt = d x y - c y; x (N, 2, T). The physics omits the
prey's self-limitation; z_P: prey growth rate a, predator death rate c (b, d known). phys+nn adds a
net f_A1(log x, log y, z_A1) to the per-capita rates, f_A2(a, c, z_A1, z_A2) to the curves. Solving
for log-populations keeps them positive whatever the net does (on populations, x y blew up)."""

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from pyro_physvae import Count, PhysicalParameter, Setting, Size, Widths
from pyro_physvae.base import PhysVAEModel
from pyro_physvae.nets import MLP

A = PhysicalParameter("a", 0.25, 2.0, "1/s", "prey growth rate")
C = PhysicalParameter("c", 0.25, 2.0, "1/s", "predator death rate")
B = D = 1.0  # predation and conversion rates, known [1/s per unit population]
TRUTH = {"a": (0.5, 1.5), "c": (0.5, 1.5), "K": (3.0, 8.0), "b": (B, B), "d": (D, D)}  # K: capacity
INITIAL, NOISE_STD, DT = {"prey": (0.5, 1.5), "predator": (0.5, 1.5)}, 0.02, 0.25


def lotka_volterra(t: Tensor, y: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    """The true rates ``(..., 2)`` at populations ``y (..., 2)``; ``p``: a, b, c, d, K ``(...)``."""
    prey, pred = y[..., 0], y[..., 1]
    return torch.stack((p["a"] * prey * (1 - prey / p["K"]) - p["b"] * prey * pred,
                        p["d"] * prey * pred - p["c"] * pred), -1)


def known_physics(u: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """``d log y / dt (..., 2)`` of the model's physics at log-populations ``u (..., 2)``."""
    return torch.stack((a - B * u[..., 1].exp(), D * u[..., 0].exp() - c), -1)


class LotkaVolterraModel(PhysVAEModel):
    """Populations ``x (N, 2, T)`` from their first step. Args: setting, n_steps, dt [s]; sizes of
    z_A1, z_A2, the nets' hidden layers; x_lnvar (default: the data's noise); the ODE solver."""

    x_event_dim, observation_dims, init_event_dim = 2, ("species", "time"), 1
    reg_weights = (1e-2, 10.0, 1e-3)  # the pendulum's: z_P of order one here as there

    def __init__(self, setting: str | Setting = "phys+nn+reg", *, n_steps: Size = 50, dt: float = DT,
                 dim_z_aux1: Count = 2, dim_z_aux2: Count = 2, hidden_aux1: Widths = (32, 32),
                 hidden_aux2: Widths = (64, 64), x_lnvar: float = 2 * math.log(NOISE_STD),
                 learn_noise: bool = False, method: str = "rk4", substeps: Size = 1) -> None:
        super().__init__(name="lotka_volterra_model")
        self.setting = s = Setting.parse(setting)
        self.setup_time_grid(n_steps, dt, method, substeps)
        self.setup_noise(x_lnvar, learn_noise)
        dim_z_aux1 += 0 if s.has_physics else 2  # nn-only: as many latents as the others
        self.aux_dims = {"z_A1": dim_z_aux1, "z_A2": dim_z_aux2} if s.has_nn else {}
        if s.has_nn:
            self.aux1 = MLP(2 + dim_z_aux1, hidden_aux1, 2, zero_last=True)
            self.aux2 = MLP(2 * s.has_physics + dim_z_aux1 + dim_z_aux2, hidden_aux2, 2 * n_steps,
                            zero_last=True)

    @property
    def physics_parameters(self) -> tuple[PhysicalParameter, ...]:
        return (A, C) if self.setting.has_physics else ()

    def observation_shape(self) -> tuple[int, int]:
        return (2, self.n_steps)  # prey and predator over the time grid

    def decode_sites(self, init: Tensor, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Curves ``(..., B, 2, T)`` from ``init (..., B, 2)``, ``a, c (..., B)``, ``z_A (..., B, dim)``."""
        phys = [p.clamp(latents[p.name]).unsqueeze(-1) for p in self.physics_parameters]  # a, c
        zs = [latents[k] for k in self.aux_dims]
        batch = torch.broadcast_shapes(*(v.shape[:-1] for v in (init, *phys, *zs)))
        n = math.prod(batch)  # the solve runs on a flat batch

        def flat(v: Tensor) -> Tensor:
            return v.expand(*batch, v.shape[-1]).reshape(n, -1)

        a, c = (flat(p)[:, 0] for p in phys) if phys else (None, None)
        net = self.aux1.bind_conditioned(flat(zs[0])) if zs else None

        def rhs(t: Tensor, u: Tensor) -> Tensor:  # log-populations (n, 2), or P and PA (n, 4)
            parts = [known_physics(u[:, :2], a, c)] if phys else []
            if net is not None:
                parts.append(net(u[:, -2:]) + (known_physics(u[:, -2:], a, c) if phys else 0))
            return torch.cat(parts, -1)

        u0 = flat(init).clamp_min(1e-3).log().repeat(1, 2 if phys and zs else 1)
        ys = self.solve(rhs, u0).exp().reshape(*batch, self.n_steps, -1).transpose(-1, -2)
        if not zs:  # phys-only
            return {"x_P": ys, "x_mean": ys}
        residual = self.aux2(torch.cat([flat(v) for v in (*phys, *zs)], -1)).reshape(*batch, 2, -1)
        if not phys:  # nn-only
            return {"x_mean": ys + residual}
        x_p, x_pa = ys[..., :2, :], ys[..., 2:, :]  # physics alone, with the in-ODE net
        return {"x_P": x_p, "x_PA": x_pa, "x_PB": x_p + residual, "x_mean": x_pa + residual}
