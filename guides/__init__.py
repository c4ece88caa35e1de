"""Amortized encoder guides, one module per physical system."""

from pyro_physvae.guides.pendulum import PendulumGuide

__all__ = ["PendulumGuide"]
