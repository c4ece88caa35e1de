"""Galaxy images: the Phys-VAE generative model with a closed-form light profile inside it.

Physics (static, no ODE): an elliptical exponential disk ``I0 exp(-r)`` on a square pixel
grid over ``[-1, 1]^2`` (69 x 69 by default, as Galaxy10), with
``r = sqrt((u / A)^2 + (v / B)^2)``, ``B = A (1 - e)``, and ``u, v`` the coordinates along and
across the major axis at angle ``theta`` (:mod:`pyro_physvae.data.galaxy` fixes the geometry).
The physics image is one band; ``x_P`` repeats it in the three bands.

Around it (settings with networks), as in the paper: a neural image decoded from
``(I0, A, e, z_A2)`` and a U-Net that refines the physics image given the neural image into the
three-band mean ``x_mean = x_PB`` in ``[0, 1]``. Three choices of this implementation, the
first two so that ``theta`` keeps its meaning of a rotation:

* the neural image is decoded in the galaxy's own frame (major axis along ``+x``) and rotated
  by ``theta``, so the neural structure (dust lane, bulge, colour gradients) turns with the
  disk instead of reading the angle as one more input number;
* the U-Net refines additively, ``x_PB = clip(x_P + U(x_P, neural))`` with a smooth clip into
  ``(0, 1)`` (:func:`soft_unit_clip`) and the U-Net's last layer starting at zero, so an
  untrained refiner returns the physics image and R_ppc measures a departure from it. (A
  refinement in logit space, ``sigmoid(logit(x_P) + U)``, learnt next to nothing where the
  physics image is dark: the sigmoid's slope there is ~1e-3.)
* the neural image has three bands (the reference's has one), so that a galaxy's colour, which
  the one-band physics cannot carry, reaches the refiner (benchmark, test MSE against
  nn-only's: 1.36x with one band, whose reconstructions all came out in one average colour;
  1.145x with three, ``benchmarks/RESULTS.md``).

``nn-only``: a convolutional decoder of ``z_A2`` (4 more dimensions, as in the reference) with a
sigmoid. ``phys-only``: ``x_mean = x_P``.

Priors: the reference ranges I0 in [0.5, 1], A in [0.1, 1], e in [0.2, 0.8], theta in [0, pi]
(Normal with std 0.866 x range, :class:`~pyro_physvae.physics.PhysicalParameter`), draws
clamped to the reference's feasible ranges I0 in [0.1, 1], A in [0.001, 10], e in [0, 0.999]
before they enter the decoder, with gradients passed straight through the clamp (see
:class:`ImageParameter`). ``theta`` is not clamped: every angle is feasible, the physics
image is periodic in it with period pi and the decoder is continuous in it, whereas a clamp or a
wrap would tear the rotated neural image at the range's ends. Errors of ``theta`` are measured
modulo pi (its ``period``), in R_DA,2 as in the metrics.

Observation noise: ``log sigma^2 = -11 - log 2``, which makes the ELBO the reference objective
(squared error plus ``exp(-11)`` times the KL divergence).

Sample sites (inside the ``data`` plate, dim -1): ``I0``, ``A``, ``e``, ``theta`` (scalars),
``z_A2`` (event 1), ``x`` (event 3, ``(3, S, S)``). Deterministic: ``x_P``, ``x_PB``,
``x_mean`` (event 3). No ``init`` site: the model reads no initial state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_physvae.arguments import Count, Size, Widths
from pyro_physvae.base import PhysVAEModel
from pyro_physvae.data.galaxy import check_images, exponential_disk, pixel_grid, rotate_images
from pyro_physvae.nets import ConvDecoder, UNet
from pyro_physvae.physics import PhysicalParameter
from pyro_physvae.settings import Setting

X_LNVAR = -11.0 - math.log(2.0)
#: Sharpness of :func:`soft_unit_clip`: the identity within about 1 / 200 of 0 and 1.
CLIP_SHARPNESS = 200.0


def soft_unit_clip(y: Tensor, sharpness: float = CLIP_SHARPNESS) -> Tensor:
    """A smooth clip into ``(0, 1)`` (``[0, 1]`` once rounded to floats far outside):
    ``(softplus(k y) - softplus(k (y - 1))) / k``, which is ``y`` with slope ~1 for ``y`` in
    ``[1/k, 1 - 1/k]`` and flattens outside."""
    return (F.softplus(sharpness * y) - F.softplus(sharpness * (y - 1.0))) / sharpness


@dataclass(frozen=True)
class ImageParameter(PhysicalParameter):
    """A physics parameter whose feasible range differs from its prior range, or an angle.

    ``feasible``: draws are clamped to it (default: the prior range ``[low, high]``). The
    gradient passes straight through the clamp (as if unclamped): with a hard clamp, a draw
    outside the range has zero gradient, and an encoder whose draws all fall outside (as
    happened to e and A in phys-only and phys+nn runs, which have no R_DA,2 to guide the
    encoder) never comes back.
    ``period``: the parameter is an angle that the physics sees modulo ``period``; it is not
    clamped, and its errors are measured modulo ``period``.
    """

    feasible: tuple[float, float] | None = None
    period: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feasible is not None:
            lo, hi = self.feasible
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"parameter {self.name!r}: feasible range must be finite with "
                                 f"low < high, got {self.feasible}")
        if self.period is not None and not (math.isfinite(self.period) and self.period > 0):
            raise ValueError(f"parameter {self.name!r}: period must be positive, got {self.period}")

    def clamp(self, value: Tensor) -> Tensor:
        """Clamp to the feasible range (straight-through gradient); an angle passes unchanged."""
        if self.period is not None:
            return value
        lo, hi = self.feasible if self.feasible is not None else (self.low, self.high)
        return value + (value.clamp(lo, hi) - value).detach()


I0 = ImageParameter("I0", 0.5, 1.0, unit="1", feasible=(0.1, 1.0),
                    description="central intensity of the disk (full scale 1)")
SCALE = ImageParameter("A", 0.1, 1.0, unit="half image widths", feasible=(0.001, 10.0),
                       description="e-folding scale along the major axis")
ELLIPTICITY = ImageParameter("e", 0.2, 0.8, unit="1", feasible=(0.0, 0.999),
                             description="ellipticity: the minor scale is A (1 - e)")
ANGLE = ImageParameter("theta", 0.0, math.pi, unit="rad", period=math.pi,
                       description="angle of the major axis, counter-clockwise from +x")
PHYSICS = (I0, SCALE, ELLIPTICITY, ANGLE)


class GalaxyModel(PhysVAEModel):
    """The Phys-VAE generative model of three-band galaxy images.

    Args:
        setting: ``"nn-only"``, ``"phys-only"``, ``"phys+nn"`` or ``"phys+nn+reg"``.
        image_size: height and width S of the images in pixels (69 for Galaxy10).
        dim_z_aux2: size of ``z_A2`` (``nn-only`` gets 4 more: the physics parameters' share).
        unet_width, unet_depth: the refiner's first width and pooling levels (the reference:
            8 and 3).
        neural_channels, neural_hidden: stages of the neural-image decoder and its MLP.
        neural_bands: bands of the neural image (the reference: 1).
        nn_channels, nn_hidden: the same for the ``nn-only`` decoder.
        x_lnvar, learn_noise: log variance of the observation noise; learn it instead.
        ranges: other prior ranges by name, e.g. ``{"A": (0.1, 1.5)}``.
    """

    x_event_dim = 3
    observation_dims = ("band", "row", "col")
    init_event_dim = None
    # The reference's (1e-1, 1e3, 1) in this library's units: R_DA,2 sums the squared errors
    # of the 4 parameters where the reference averages them (1e3 / 4), and R_DA,1 compares the
    # one unmixed band with the 3 bands of x_P where the reference compares it with one (1 / 3).
    reg_weights = (1e-1, 250.0, 1.0 / 3.0)

    def __init__(
        self,
        setting: str | Setting = Setting.PHYS_NN_REG,
        *,
        image_size: Size = 69,
        dim_z_aux2: Count = 2,
        unet_width: Size = 8,
        unet_depth: Size = 3,
        neural_channels: Widths = (32, 16, 8, 4),
        neural_hidden: Widths = (32, 64),
        neural_bands: Size = 3,
        nn_channels: Widths = (128, 64, 32, 16),
        nn_hidden: Widths = (64, 128),
        x_lnvar: float = X_LNVAR,
        learn_noise: bool = False,
        ranges: Mapping[str, Sequence[float]] | None = None,
        activation: str = "elu",
    ) -> None:
        super().__init__(name="galaxy_model")
        self.setting = s = Setting.parse(setting)
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        if dim_z_aux2 < 0:
            raise ValueError(f"dim_z_aux2 must be non-negative, got {dim_z_aux2}")
        self.image_size = int(image_size)
        self.setup_noise(x_lnvar, learn_noise)
        self._physics = _with_ranges(PHYSICS, ranges)
        self.dim_z_aux2 = int(dim_z_aux2) + (0 if s.has_physics else len(PHYSICS))
        self.aux_dims = {"z_A2": self.dim_z_aux2} if s.has_nn and self.dim_z_aux2 > 0 else {}
        x, y = pixel_grid(self.image_size)
        self.register_buffer("grid_x", x.clone(), persistent=False)
        self.register_buffer("grid_y", y.clone(), persistent=False)
        if not s.has_physics:
            self.decoder = ConvDecoder(self.dim_z_aux2, self.image_size, 3, nn_channels, nn_hidden,
                                       activation)
        elif s.has_nn:
            self.neural = ConvDecoder(3 + self.dim_z_aux2, self.image_size, neural_bands, neural_channels,
                                      neural_hidden, activation)
            self.refiner = UNet(1 + neural_bands, 3, unet_width, unet_depth, zero_last=True)

    # -- configuration -------------------------------------------------------------------
    @property
    def physics_parameters(self) -> tuple[ImageParameter, ...]:
        return self._physics if self.setting.has_physics else ()

    def observation_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def check_observations(self, x: Tensor) -> None:
        check_images(x, "x", size=self.image_size)

    # -- the decoder ---------------------------------------------------------------------
    def physics_image(self, params: Mapping[str, Tensor], clamp: bool = True) -> Tensor:
        """The physics-only band ``(..., 1, S, S)`` from parameters ``(...)`` by name."""
        p = {q.name: q.clamp(params[q.name]) if clamp else params[q.name] for q in self._physics}
        img = exponential_disk(p["I0"], p["A"], p["e"], p["theta"], self.grid_x, self.grid_y)
        return img.unsqueeze(-3)

    def neural_image(self, params: Mapping[str, Tensor], z_aux2: Tensor | None, clamp: bool = True) -> Tensor:
        """The neural image ``(..., neural_bands, S, S)``: decoded from ``(I0, A, e)`` (scaled to their
        prior ranges) and ``z_A2 (..., dim)`` in the galaxy frame, rotated by ``theta``."""
        p = {q.name: q.clamp(params[q.name]) if clamp else params[q.name] for q in self._physics}
        feats = [(p[q.name] - q.prior_loc) / (q.high - q.low) for q in self._physics if q.period is None]
        batch = torch.broadcast_shapes(*(f.shape for f in feats),
                                       *(() if z_aux2 is None else (z_aux2.shape[:-1],)))
        inputs = torch.stack([f.expand(batch) for f in feats], -1)
        if z_aux2 is not None:
            inputs = torch.cat((inputs, z_aux2.expand(*batch, z_aux2.shape[-1])), -1)
        frame = self.neural(inputs)
        return rotate_images(frame, p["theta"].expand(batch))

    def decode(self, params: Mapping[str, Tensor] | None, z_aux2: Tensor | None, *,
               clamp: bool = True) -> dict[str, Tensor]:
        """Decode latents into images.

        Args:
            params: physics parameters by name, each ``(..., B)`` (``None`` for nn-only).
            z_aux2: ``(..., B, dim)`` or ``None`` (phys-only).
            clamp: clamp the parameters to their feasible ranges.

        Returns:
            Images ``(..., B, 3, S, S)``: ``x_mean`` always; with physics also ``x_P``; with
            physics and networks also ``x_PB`` (equal to ``x_mean``).
        """
        s = self.setting
        if not s.has_physics:
            return {"x_mean": torch.sigmoid(self.decoder(z_aux2))}
        phys = self.physics_image(params, clamp)
        x_p = phys.expand(*phys.shape[:-3], 3, *phys.shape[-2:])
        if not s.has_nn:
            return {"x_P": x_p, "x_mean": x_p}
        neural = self.neural_image(params, z_aux2, clamp)
        phys = phys.expand(*neural.shape[:-3], *phys.shape[-3:])
        refine = self.refiner(torch.cat((phys, neural), -3))
        x_pb = soft_unit_clip(phys + refine)
        return {"x_P": x_p, "x_PB": x_pb, "x_mean": x_pb}

    def simulate_augmentation(self, init: None = None, size: int = 1) -> tuple[dict[str, Tensor], Tensor]:
        """Physics-only images for R_DA,2: ``size`` parameter sets drawn uniformly over the
        prior ranges, and their physics bands ``(size, 1, S, S)``. (``init`` must be ``None``:
        this model reads no initial state.)"""
        if init is not None:
            raise ValueError("GalaxyModel reads no initial state; simulate_augmentation takes init=None")
        ref = self.grid_x
        truth = {p.name: p.sample_uniform((size,), dtype=ref.dtype, device=ref.device) for p in self._physics}
        return truth, self.physics_image(truth)

    # -- the Pyro model ------------------------------------------------------------------
    def decode_sites(self, init: None, latents: Mapping[str, Tensor], *,
                     clamp: bool = True) -> dict[str, Tensor]:
        params = {p.name: latents[p.name] for p in self.physics_parameters} or None
        return self.decode(params, latents.get("z_A2"), clamp=clamp)


def _with_ranges(params: Sequence[ImageParameter], ranges: Mapping[str, Sequence[float]] | None
                 ) -> tuple[ImageParameter, ...]:
    """``params`` with the prior ranges named in ``ranges`` replaced."""
    ranges = dict(ranges or {})
    unknown = set(ranges) - {p.name for p in params}
    if unknown:
        raise ValueError(f"ranges given for {sorted(unknown)}, which are not physics parameters "
                         f"({[p.name for p in params]})")
    out = []
    for p in params:
        if p.name in ranges:
            lo, hi = (float(v) for v in ranges[p.name])
            p = dataclasses.replace(p, low=lo, high=hi)
        out.append(p)
    return tuple(out)
