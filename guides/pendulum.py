"""Amortized guide for :class:`~pyro_physvae.models.pendulum.PendulumModel`.

As in the paper: a feature extractor gives ``q(z_A1, z_A2 | x)``; an unmixer maps
``(x, z_A1, z_A2)`` to a signal that should look like physics-only output (``x`` minus a
learnt residual); a physics encoder on the unmixed signal gives ``q(omega | x)``, whose mean
passes through a Softplus so that it is positive. In ``phys-only`` the physics encoder reads
``x`` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from pyro_physvae.models.pendulum import PendulumModel
from pyro_physvae.nets import MLP
from pyro_physvae.regularizers import guide_deterministic

LNVAR_MIN, LNVAR_MAX = -16.0, 6.0


class GaussianHead(PyroModule):
    """Features ``(..., F)`` -> ``(loc, scale)`` of a diagonal Normal ``(..., dim)``."""

    def __init__(self, in_features: int, hidden: Sequence[int], dim: int, activation: str,
                 positive: bool = False) -> None:
        super().__init__()
        self.loc = MLP(in_features, hidden, dim, activation)
        self.lnvar = MLP(in_features, hidden, dim, activation)
        self.positive = positive

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        loc = self.loc(h)
        if self.positive:
            loc = nn.functional.softplus(loc)
        scale = torch.exp(0.5 * self.lnvar(h).clamp(LNVAR_MIN, LNVAR_MAX))
        return loc, scale


class PendulumGuide(PyroModule):
    """Amortized encoder guide for a given :class:`PendulumModel`.

    The default sizes are the reference ones: one feature extractor per latent group
    (``z_A1``, ``z_A2``, and omega after unmixing), each ``T -> hidden_feat -> feat_dim``.

    Args:
        model: the model whose latents this guide covers (its setting and sizes are used).
        hidden_feat: hidden widths of the feature extractor MLPs; ``feat_dim`` their output size.
        hidden_aux: hidden widths of the z_A heads.
        hidden_unmixer: hidden widths of the unmixer.
        hidden_phys: hidden widths of the physics encoder (on ``feat_dim`` physics features).
    """

    def __init__(
        self,
        model: PendulumModel,
        *,
        hidden_feat: Sequence[int] = (128, 128),
        feat_dim: int = 256,
        hidden_aux: Sequence[int] = (64, 32),
        hidden_unmixer: Sequence[int] = (128, 128),
        hidden_phys: Sequence[int] = (64, 32),
        activation: str = "elu",
    ) -> None:
        super().__init__(name="pendulum_guide")
        self.setting = model.setting
        self.n_steps = model.n_steps
        self.dim_z_aux1, self.dim_z_aux2 = model.dim_z_aux1, model.dim_z_aux2
        T = model.n_steps

        def features() -> MLP:
            return MLP(T, hidden_feat, feat_dim, activation, final_activation=True)

        if self.setting.has_nn:
            self.aux1 = PyroModule[nn.Sequential](
                features(), GaussianHead(feat_dim, hidden_aux, self.dim_z_aux1, activation))
            self.aux2 = PyroModule[nn.Sequential](
                features(), GaussianHead(feat_dim, hidden_aux, self.dim_z_aux2, activation))
        if self.setting.has_physics:
            if self.setting.has_nn:
                dim_in = T + self.dim_z_aux1 + self.dim_z_aux2
                self.unmixer = MLP(dim_in, hidden_unmixer, T, activation, zero_last=True)
            self.phys_features = features()
            self.omega_head = GaussianHead(feat_dim, hidden_phys, 1, activation, positive=True)

    def omega_posterior(self, signal: Tensor) -> tuple[Tensor, Tensor]:
        """``q(omega | signal)``: loc and scale, shape ``(...)`` for a signal ``(..., T)``."""
        loc, scale = self.omega_head(self.phys_features(signal))
        return loc.squeeze(-1), scale.squeeze(-1)

    def physics_mean(self, x: Tensor) -> dict[str, Tensor]:
        """Posterior mean of the physics parameters from a physics-only signal ``(..., T)``."""
        return {"omega": self.omega_posterior(x)[0]}

    def unmix(self, x: Tensor, z_aux1: Tensor, z_aux2: Tensor) -> Tensor:
        """Remove the learnt non-physics part: ``(..., B, T)`` from ``x (B, T)`` and the
        latents (the guide passes their posterior means, as the reference does, so that the
        omega encoder does not see their sampling noise)."""
        x = x.expand(z_aux1.shape[:-1] + x.shape[-1:])
        return x - self.unmixer(torch.cat((x, z_aux1, z_aux2), -1))

    def forward(
        self,
        x: Tensor | None = None,
        *,
        init: Tensor | None = None,
        subsample: Tensor | None = None,
        omega_prior: dist.Distribution | None = None,
    ) -> dict[str, Tensor]:
        """Sample the latents of the sequences ``x (N, T)`` (rows ``subsample``).

        Takes the model's arguments (``init`` and ``omega_prior`` are not used). Returns the
        sampled latents by site name.
        """
        if x is None:
            raise ValueError("the amortized guide needs the observations x")
        s = self.setting
        out: dict[str, Tensor] = {}
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            x_b = x[idx]
            signal = x_b
            if s.has_nn:
                q1, q2 = self.aux1(x_b), self.aux2(x_b)
                out["z_A1"] = pyro.sample("z_A1", dist.Normal(*q1).to_event(1))
                out["z_A2"] = pyro.sample("z_A2", dist.Normal(*q2).to_event(1))
            if s.has_physics:
                if s.has_nn:
                    signal = guide_deterministic("unmixed", self.unmix(x_b, q1[0], q2[0]), event_dim=1)
                out["omega"] = pyro.sample("omega", dist.Normal(*self.omega_posterior(signal)))
        return out
