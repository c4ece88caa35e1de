"""The four model settings compared in the Phys-VAE paper."""

from __future__ import annotations

from enum import Enum


class Setting(str, Enum):
    """Which parts of a Phys-VAE are switched on.

    ``nn-only``      no physics: the decoder is purely neural.
    ``phys-only``    physics alone, no auxiliary (neural) parts.
    ``phys+nn``      physics plus neural corrections, plain ELBO.
    ``phys+nn+reg``  the proposed model: ``phys+nn`` trained with the regularizers
                     R_ppc, R_DA,1 and R_DA,2 (see :mod:`pyro_physvae.regularizers`).
    """

    NN_ONLY = "nn-only"
    PHYS_ONLY = "phys-only"
    PHYS_NN = "phys+nn"
    PHYS_NN_REG = "phys+nn+reg"

    @property
    def has_physics(self) -> bool:
        return self is not Setting.NN_ONLY

    @property
    def has_nn(self) -> bool:
        return self is not Setting.PHYS_ONLY

    @property
    def regularized(self) -> bool:
        return self is Setting.PHYS_NN_REG

    @classmethod
    def parse(cls, value: str | Setting) -> Setting:
        """Return the setting named ``value``; raise ``ValueError`` naming the valid choices."""
        if isinstance(value, Setting):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown setting {value!r}; choose one of: {choices}") from None

    def __str__(self) -> str:
        return self.value


SETTINGS: tuple[str, ...] = tuple(s.value for s in Setting)
