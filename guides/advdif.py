"""Amortized guide for :class:`~pyro_physvae.models.advdif.AdvDifModel`.

As in the paper: a feature extractor on the flattened field gives ``q(z_A1 | x)``; an unmixer
removes a learnt non-physics part, ``unmixed = x - g(E[z_A1])``, which R_DA,1 pulls towards
the physics-only field; a second feature extractor on the unmixed field gives
``q(diffusion | x)``, whose mean passes through a Softplus (positive). In ``phys-only`` the
physics encoder reads ``x`` directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from pyro_physvae.arguments import Size, Widths
from pyro_physvae.base import PhysVAEGuide
from pyro_physvae.models.advdif import AdvDifModel
from pyro_physvae.nets import MLP, GaussianHead


class AdvDifGuide(PhysVAEGuide):
    """Amortized encoder guide for a given :class:`AdvDifModel`.

    The default sizes are the reference ones: feature extractors ``X*T -> (256, 256) -> 256``,
    heads ``(64, 32)``, unmixer ``(256, 256)``.

    Args:
        model: the model whose latents this guide covers (its setting and sizes are used).
        hidden_feat, feat_dim: hidden widths and output size of each feature extractor.
        hidden_aux: hidden widths of the ``z_A1`` head.
        hidden_unmixer: hidden widths of the unmixer.
        hidden_phys: hidden widths of the diffusion-coefficient head.
        unmixer_reads_data: the unmixer's residual ``g`` reads the field as well as the
            latent means. By default it reads the latents only, as in the reference: with the
            1000-value field as input it has the capacity to produce anything, and the physics
            encoder downstream then sees signals unlike the physics-only fields it learns on.
    """

    x_event_dim = 2

    def __init__(
        self,
        model: AdvDifModel,
        *,
        hidden_feat: Widths = (256, 256),
        feat_dim: Size = 256,
        hidden_aux: Widths = (64, 32),
        hidden_unmixer: Widths = (256, 256),
        hidden_phys: Widths = (64, 32),
        unmixer_reads_data: bool = False,
        activation: str = "elu",
    ) -> None:
        super().__init__(name="advdif_guide")
        self.event_shape = model.observation_shape()
        self.setting = model.setting
        self.field_shape = (model.n_grid, model.n_steps)
        size = model.n_grid * model.n_steps

        def features() -> nn.Module:
            return PyroModule[nn.Sequential](
                PyroModule[nn.Flatten](-2), MLP(size, hidden_feat, feat_dim, activation,
                                                final_activation=True))

        self.aux_encoders = {"z_A1": "aux1"} if self.setting.has_nn else {}
        if self.setting.has_nn:
            self.aux1 = PyroModule[nn.Sequential](
                features(), GaussianHead(feat_dim, hidden_aux, model.dim_z_aux1, activation))
        if self.setting.has_physics:
            if self.setting.has_nn:
                self.unmixer_reads_data = bool(unmixer_reads_data)
                dim_in = model.dim_z_aux1 + (size if self.unmixer_reads_data else 0)
                self.unmixer = MLP(dim_in, hidden_unmixer, size, activation, zero_last=True)
            self.phys_features = features()
            self.diffusion_head = GaussianHead(feat_dim, hidden_phys, 1, activation, positive=True)

    def physics_posterior(self, signal: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """``q(diffusion | signal)`` for fields ``(..., X, T)``: loc and scale ``(...)``."""
        loc, scale = self.diffusion_head(self.phys_features(signal))
        return {"diffusion": (loc.squeeze(-1), scale.squeeze(-1))}

    def unmix(self, x: Tensor, aux_locs: Mapping[str, Tensor]) -> Tensor:
        """``x - g(E[z_A1])`` (or ``x - g(x, E[z_A1])``): fields ``(B, X, T)``."""
        z = aux_locs["z_A1"]
        residual = self.unmixer(torch.cat((x.flatten(-2), z), -1) if self.unmixer_reads_data else z)
        return x - residual.unflatten(-1, self.field_shape)
