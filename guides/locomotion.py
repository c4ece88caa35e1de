"""Amortized guide for :class:`~pyro_physvae.models.locomotion.LocomotionModel`.

As in the reference: one feature extractor (an MLP of the flattened ``(joint, time)``
angles) shared by all encoders; Gaussian heads give ``q(y0 | x)`` (the initial coordinates
and momenta), ``q(z_P | x)`` (the energy's code) and ``q(z_A2 | x)``. The physics latents
are read from the data directly (the reference locomotion model has no unmixer: its only
regularizer is R_ppc), so the guide sets ``unmixes = False``.
"""

from __future__ import annotations

from torch import Tensor

from pyro_physvae.arguments import Size, Widths
from pyro_physvae.base import PhysVAEGuide
from pyro_physvae.models.locomotion import LocomotionModel
from pyro_physvae.nets import MLP, GaussianHead


class LocomotionGuide(PhysVAEGuide):
    """Amortized encoder guide for a given :class:`LocomotionModel`.

    Args:
        model: the model whose latents this guide covers.
        hidden_feat, feat_dim: hidden widths and output size of the feature extractor
            (reference: 512, 512 and 512).
        hidden_heads: hidden widths of every Gaussian head (reference: 64, 32).
        activation: of all networks.
    """

    x_event_dim = 2
    unmixes = False

    def __init__(
        self,
        model: LocomotionModel,
        *,
        hidden_feat: Widths = (512, 512),
        feat_dim: Size = 512,
        hidden_heads: Widths = (64, 32),
        activation: str = "elu",
    ) -> None:
        super().__init__(name="locomotion_guide")
        self.event_shape = model.observation_shape()
        self.setting = model.setting
        self.feature_net = MLP(model.n_joints * model.n_steps, hidden_feat, feat_dim, activation,
                               final_activation=True)
        self.state_encoders = {}
        for site, dim in model.state_dims.items():
            setattr(self, f"{site}_head", GaussianHead(feat_dim, hidden_heads, dim, activation))
            self.state_encoders[site] = f"{site}_head"
        self.aux_encoders = {}
        for site, dim in model.aux_dims.items():
            setattr(self, f"{site}_head", GaussianHead(feat_dim, hidden_heads, dim, activation))
            self.aux_encoders[site] = f"{site}_head"

    def features(self, x: Tensor) -> Tensor:
        """Features ``(B, feat_dim)`` of angles ``x (B, n_joints, T)``."""
        return self.feature_net(x.flatten(-2))

    def physics_posterior(self, signal: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        return {}  # y0 and z_P are state latents, encoded from the features
