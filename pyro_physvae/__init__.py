"""pyro-physvae: Physics-Integrated VAEs as Pyro model/guide pairs."""

from pyro_physvae.arguments import Count, Size, Widths
from pyro_physvae.ode import IntegrationError, integrate
from pyro_physvae.physics import PhysicalParameter
from pyro_physvae.regularizers import (
    PhysicsAugmentation,
    PhysVAELoss,
    PosteriorPredictiveCheck,
    Unmixing,
    phys_vae_regularizers,
)
from pyro_physvae.settings import SETTINGS, Setting

__version__ = "0.1.0"

__all__ = [
    "SETTINGS",
    "Count",
    "IntegrationError",
    "PhysVAELoss",
    "PhysicalParameter",
    "PhysicsAugmentation",
    "PosteriorPredictiveCheck",
    "Setting",
    "Size",
    "Unmixing",
    "Widths",
    "integrate",
    "phys_vae_regularizers",
]
