"""Amortized guide for :class:`~pyro_physvae.models.galaxy.GalaxyModel`.

As in the paper:

* a CNN feature extractor on the three-band image gives ``q(z_A2 | x)``;
* an unmixer maps the three bands to one physics-like band, ``unmixed = sum_c w_c x_c`` with
  per-image weights ``w = tanh(MLP(.))`` in ``(-1, 1)``; R_DA,1 pulls it towards the physics
  band. (The reference computes the weights from the CNN features; here they come from
  per-band summary statistics, which carry the colour balance the weights must undo, plus
  ``E[z_A2]``: no second pass of the CNN is needed.)
* a physics encoder, a second CNN on the unmixed band, gives ``q(I0, A, e, theta | x)``: the
  means of ``I0``, ``A`` and ``e`` pass through a Softplus (positive); the angle's mean is
  ``atan2`` of a predicted direction, so that it moves continuously round the circle (the
  decoder is periodic in it) instead of jumping at the ends of a range.

In ``phys-only`` the physics encoder reads the band mean of ``x``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from pyro_physvae.arguments import Size, Widths
from pyro_physvae.base import PhysVAEGuide
from pyro_physvae.models.galaxy import GalaxyModel
from pyro_physvae.nets import LNVAR_MAX, LNVAR_MIN, MLP, ConvFeatures, GaussianHead

#: Summary statistics per band fed to the unmixer: mean, std, centre mean, maximum.
N_BAND_STATS = 4


class GalaxyGuide(PhysVAEGuide):
    """Amortized encoder guide for a given :class:`GalaxyModel`.

    The defaults are the reference sizes: CNNs with 16-32-64-128 channels and 5x5 kernels into
    512 features, ``z_A2`` head ``(256, 128)``, physics heads ``(64, 32)``, unmixer ``(16, 16)``.

    Args:
        model: the model whose latents this guide covers (its setting and sizes are used).
        channels, kernel_size, feat_dim: the CNN feature extractors (both the same shape).
        hidden_aux: hidden widths of the ``z_A2`` head.
        hidden_phys: hidden widths of each physics head.
        hidden_unmixer: hidden widths of the unmixing-weight MLP.
    """

    x_event_dim = 3

    def __init__(
        self,
        model: GalaxyModel,
        *,
        channels: Widths = (16, 32, 64, 128),
        kernel_size: Size = 5,
        feat_dim: Size = 512,
        hidden_aux: Widths = (256, 128),
        hidden_phys: Widths = (64, 32),
        hidden_unmixer: Widths = (16, 16),
        activation: str = "elu",
    ) -> None:
        super().__init__(name="galaxy_guide")
        self.event_shape = model.observation_shape()
        self.setting = s = model.setting
        size = model.image_size
        self.image_size = size
        self.aux_encoders = {site: "aux_encoder" for site in model.aux_dims}
        if model.aux_dims:
            self.aux_encoder = PyroModule[nn.Sequential](
                ConvFeatures(3, size, channels, feat_dim, kernel_size),
                GaussianHead(feat_dim, hidden_aux, model.aux_dims["z_A2"], activation))
        if s.has_physics:
            self.physics_names = tuple(p.name for p in model.physics_parameters)
            self.angle_name = next(p.name for p in model.physics_parameters if p.period is not None)
            self.positive_names = tuple(n for n in self.physics_names if n != self.angle_name)
            if s.has_nn:
                dim_in = 3 * N_BAND_STATS + model.dim_z_aux2 * bool(model.aux_dims)
                self.unmixer = MLP(dim_in, hidden_unmixer, 3, activation)
            self.phys_features = ConvFeatures(1, size, channels, feat_dim, kernel_size)
            self.phys_head = GaussianHead(feat_dim, hidden_phys, len(self.positive_names), activation,
                                          positive=True)
            self.angle_direction = MLP(feat_dim, hidden_phys, 2, activation)
            self.angle_lnvar = MLP(feat_dim, hidden_phys, 1, activation)

    def physics_posterior(self, signal: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """``q(z_P | signal)`` for images ``(..., C, S, S)`` (``C = 1``, or 3: band mean):
        ``{name: (loc, scale)}`` with each ``(...)``."""
        if signal.shape[-3] != 1:
            signal = signal.mean(-3, keepdim=True)
        h = self.phys_features(signal)
        loc, scale = self.phys_head(h)
        out = {n: (loc[..., i], scale[..., i]) for i, n in enumerate(self.positive_names)}
        direction = self.angle_direction(h)
        angle = torch.atan2(direction[..., 1], direction[..., 0])
        angle_scale = torch.exp(0.5 * self.angle_lnvar(h)[..., 0].clamp(LNVAR_MIN, LNVAR_MAX))
        out[self.angle_name] = (angle, angle_scale)
        return {n: out[n] for n in self.physics_names}

    def unmix(self, x: Tensor, aux_locs: Mapping[str, Tensor]) -> Tensor:
        """One physics-like band ``(B, 1, S, S)`` from ``x (B, 3, S, S)``: a weighted sum of
        the bands, weights from band statistics and ``E[z_A2]``."""
        inputs = [band_statistics(x)]
        if "z_A2" in aux_locs:
            inputs.append(aux_locs["z_A2"])
        w = torch.tanh(self.unmixer(torch.cat(inputs, -1)))
        return (w[..., :, None, None] * x).sum(-3, keepdim=True)


def band_statistics(x: Tensor) -> Tensor:
    """Per band: mean, standard deviation, mean of the central ninth (a third of the width
    each way) and maximum of images ``(..., 3, S, S)``; returns ``(..., 3 * N_BAND_STATS)``."""
    s = x.shape[-1]
    c = slice(s // 3, s - s // 3)
    flat = x.flatten(-2)
    stats = (flat.mean(-1), flat.std(-1), x[..., c, c].flatten(-2).mean(-1), flat.amax(-1))
    return torch.cat(stats, -1)
