"""Pyro AutoGuides with per-sequence latents, as drop-in replacements of the amortized encoder.

An AutoGuide has free variational parameters for every latent of every sequence instead of an
encoder network, so it fits a posterior for the sequences it was trained on only; for other
sequences (a test split) :func:`fit_local_guide` fits a fresh one with the trained model held
fixed. The regularizers that act through the encoder (R_DA,1 and R_DA,2) do not apply to an
AutoGuide; R_ppc, which acts on the decoder, does.

``auto-normal`` (:class:`~pyro.infer.autoguide.AutoNormal`) keeps one Normal per latent
element and supports minibatches: its plate is the model's ``data`` plate with the same
``subsample`` indices. ``auto-diagonal`` and ``auto-lowrank`` pack all latents of all sequences
into one vector, so they are trained on the full data set at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor

from pyro_physvae.nets import frozen_parameters
from pyro_physvae.validation import check_positive_int

AUTOGUIDES: dict[str, type[AutoGuide]] = {
    "auto-normal": AutoNormal,
    "auto-diagonal": AutoDiagonalNormal,
    "auto-lowrank": AutoLowRankMultivariateNormal,
}
#: Guide choices of the trainer and the CLI.
GUIDES: tuple[str, ...] = ("amortized", *AUTOGUIDES)


def check_guide_kind(kind: str) -> str:
    if kind not in GUIDES:
        raise ValueError(f"unknown guide {kind!r}; choose one of: {', '.join(GUIDES)}")
    return kind


def _data_plate(x: Tensor | None = None, *args, subsample: Tensor | None = None, init=None,
                **kwargs) -> pyro.plate:
    """The model's ``data`` plate over the rows of ``x`` (or of ``init``)."""
    size = (x if x is not None else init).shape[0]
    return pyro.plate("data", size, subsample=subsample)


def make_autoguide(kind: str, model: Callable, *, init_scale: float = 0.01,
                   rank: int | None = None) -> AutoGuide:
    """An AutoGuide of ``kind`` over the model's latents, started at prior medians.

    Args:
        kind: ``"auto-normal"``, ``"auto-diagonal"`` or ``"auto-lowrank"``.
        init_scale: initial posterior standard deviation in unconstrained space.
        rank: rank of the low-rank covariance (default: Pyro's, about sqrt of the size).
    """
    if check_guide_kind(kind) == "amortized":
        raise ValueError("the amortized guide is built by the system, not here")
    kwargs: dict = {"init_loc_fn": init_to_median, "init_scale": init_scale}
    if kind == "auto-normal":
        kwargs["create_plates"] = _data_plate
    if kind == "auto-lowrank" and rank is not None:
        kwargs["rank"] = rank
    return AUTOGUIDES[kind](model, **kwargs)


def supports_subsampling(guide: Callable) -> bool:
    """Whether the guide can be trained on minibatches of sequences."""
    return not isinstance(guide, AutoGuide) or isinstance(guide, AutoNormal)


def fit_local_guide(
    model: torch.nn.Module,
    kind: str,
    x: Tensor,
    *,
    steps: int = 1000,
    lr: float = 1e-2,
    num_particles: int = 1,
    seed: int = 0,
) -> AutoGuide:
    """Fit an AutoGuide over the latents of the sequences ``x`` with the model held fixed.

    The model's weights are neither updated nor traced as parameters; all sequences enter
    every step.

    Returns:
        The fitted guide; call it (or ``Predictive``) with the same ``x``.
    """
    check_positive_int(steps, "steps")
    pyro.set_rng_seed(seed)
    guide = make_autoguide(kind, model)
    fixed_model = poutine.block(model, hide_types=["param"])
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    with frozen_parameters(model):
        guide(x)  # creates the guide's parameters
        optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
        for _ in range(steps):
            loss = elbo.differentiable_loss(fixed_model, guide, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return guide
