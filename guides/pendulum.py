"""Amortized guide for :class:`~pyro_physvae.models.pendulum.PendulumModel`.

As in the paper: a feature extractor gives ``q(z_A1, z_A2 | x)``; an unmixer maps
``(x, z_A1, z_A2)`` to a signal that should look like physics-only output (``x`` minus a
learnt residual); a physics encoder on the unmixed signal gives ``q(omega | x)``, whose mean
passes through a Softplus so that it is positive. In ``phys-only`` the physics encoder reads
``x`` directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from pyro_physvae.arguments import Size, Widths
from pyro_physvae.base import PhysVAEGuide
from pyro_physvae.models.pendulum import PendulumModel
from pyro_physvae.nets import MLP, GaussianHead


class PendulumGuide(PhysVAEGuide):
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
        hidden_feat: Widths = (128, 128),
        feat_dim: Size = 256,
        hidden_aux: Widths = (64, 32),
        hidden_unmixer: Widths = (128, 128),
        hidden_phys: Widths = (64, 32),
        activation: str = "elu",
    ) -> None:
        super().__init__(name="pendulum_guide")
        self.event_shape = model.observation_shape()
        self.setting = model.setting
        self.n_steps = model.n_steps
        self.dim_z_aux1, self.dim_z_aux2 = model.dim_z_aux1, model.dim_z_aux2
        T = model.n_steps

        def features() -> MLP:
            return MLP(T, hidden_feat, feat_dim, activation, final_activation=True)

        self.aux_encoders = {"z_A1": "aux1", "z_A2": "aux2"} if self.setting.has_nn else {}
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

    def physics_posterior(self, signal: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        return {"omega": self.omega_posterior(signal)}

    def unmix(self, x: Tensor, aux_locs: Mapping[str, Tensor]) -> Tensor:
        """Remove the learnt non-physics part: ``x - unmixer(x, z_A1, z_A2)``, ``(B, T)``."""
        z_aux1, z_aux2 = aux_locs["z_A1"], aux_locs["z_A2"]
        x = x.expand(z_aux1.shape[:-1] + x.shape[-1:])
        return x - self.unmixer(torch.cat((x, z_aux1, z_aux2), -1))
