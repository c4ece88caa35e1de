"""The generative programs of the zoo, one module per physical system."""

from pyro_physvae.models.pendulum import PendulumModel

__all__ = ["PendulumModel"]
