"""Amortized encoder guides, one module per physical system."""

from pyro_physvae.guides.advdif import AdvDifGuide
from pyro_physvae.guides.pendulum import PendulumGuide

__all__ = ["AdvDifGuide", "PendulumGuide"]
