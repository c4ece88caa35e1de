"""The generative programs of the zoo, one module per physical system."""

from pyro_physvae.models.advdif import AdvDifModel
from pyro_physvae.models.pendulum import PendulumModel

__all__ = ["AdvDifModel", "PendulumModel"]
