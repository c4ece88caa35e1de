"""Physics parameters: names, physical ranges, priors and feasibility clamping."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import Tensor

#: Prior std as a multiple of the range width, as in the reference implementation.
PRIOR_STD_FACTOR = math.sqrt(3.0) / 2.0


@dataclass(frozen=True)
class PhysicalParameter:
    """A physics latent z_P with a user-given plausible range ``[low, high]``.

    The prior is ``Normal((low + high) / 2, 0.866 * (high - low))`` as in the reference work
    (wide, so that the range is a soft hint), and draws are clamped to ``[low, high]`` before
    they enter the physics, which keeps the solver in a feasible regime.
    """

    name: str
    low: float
    high: float
    unit: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(
                f"parameter {self.name!r}: range must be finite with low < high, "
                f"got [{self.low}, {self.high}]"
            )

    @property
    def prior_loc(self) -> float:
        return 0.5 * (self.low + self.high)

    @property
    def prior_scale(self) -> float:
        return PRIOR_STD_FACTOR * (self.high - self.low)

    def prior(self, device: torch.device | str | None = None) -> dist.Normal:
        """The scalar prior; inside a plate it broadcasts to the plate's shape."""
        loc = torch.tensor(self.prior_loc, device=device)
        return dist.Normal(loc, torch.tensor(self.prior_scale, device=device))

    def clamp(self, value: Tensor) -> Tensor:
        """Clamp a draw to the feasible range (gradients pass inside the range)."""
        return value.clamp(self.low, self.high)

    def sample_uniform(self, shape: torch.Size | tuple[int, ...], **kwargs) -> Tensor:
        """Uniform draws over the range, e.g. for physics-based data augmentation."""
        u = torch.rand(shape, **kwargs)
        return self.low + (self.high - self.low) * u
