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

:func:`refine_amortized_guide` is semi-amortized inference for a trained amortized encoder: an
``auto-normal`` guide started from the encoder's posterior for new sequences and refined by
SVI per sequence, with model and encoder held fixed. It closes the encoder's amortization gap
on data it was not trained on.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_physvae.base import data_plate_size
from pyro_physvae.data.lazy import LazyRows, row_chunks
from pyro_physvae.nets import frozen_parameters
from pyro_physvae.validation import check_positive_int

AUTOGUIDES: dict[str, type[AutoGuide]] = {
    "auto-normal": AutoNormal,
    "auto-diagonal": AutoDiagonalNormal,
    "auto-lowrank": AutoLowRankMultivariateNormal,
}
#: Guide choices of the trainer and the CLI.
GUIDES: tuple[str, ...] = ("amortized", *AUTOGUIDES)

_guide_numbers = itertools.count()


def check_guide_kind(kind: str) -> str:
    if kind not in GUIDES:
        raise ValueError(f"unknown guide {kind!r}; choose one of: {', '.join(GUIDES)}")
    return kind


def _data_plate(x: Tensor | None = None, *args, subsample: Tensor | None = None, init=None,
                size: int | None = None, **kwargs) -> pyro.plate:
    """The model's ``data`` plate over the rows of ``x`` (or of ``init``; see
    :func:`~pyro_physvae.base.data_plate_size` for ``size``)."""
    rows = x if x is not None else init
    return pyro.plate("data", data_plate_size(rows, size, subsample), subsample=subsample,
                      device=rows.device)


def make_autoguide(kind: str, model: Callable, *, init_scale: float = 0.01,
                   rank: int | None = None, init_loc_fn: Callable = init_to_median) -> AutoGuide:
    """An AutoGuide of ``kind`` over the model's latents, started at ``init_loc_fn`` (by
    default the prior medians).

    Args:
        kind: ``"auto-normal"``, ``"auto-diagonal"`` or ``"auto-lowrank"``.
        init_scale: initial posterior standard deviation in unconstrained space.
        rank: rank of the low-rank covariance (default: Pyro's, about sqrt of the size).
        init_loc_fn: Pyro's initialisation strategy, a function of the model's site.
    """
    if check_guide_kind(kind) == "amortized":
        raise ValueError("the amortized guide is built by the system, not here")
    kwargs: dict = {"init_loc_fn": init_loc_fn, "init_scale": init_scale}
    if kind == "auto-normal":
        kwargs["create_plates"] = _data_plate
    if kind == "auto-lowrank" and rank is not None:
        kwargs["rank"] = rank
    guide = AUTOGUIDES[kind](model, **kwargs)
    # Pyro keeps a PyroModule's parameters in its global store under the module's name. A name
    # of its own keeps guides fitted to different sequences (say a test and a validation split
    # in `physvae diagnose`) from sharing, or clashing over, the same parameters.
    guide._pyro_name = f"{type(guide).__name__}_{next(_guide_numbers)}"
    return guide


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
    return _fit_latents(model, guide, x, steps=steps, lr=lr, num_particles=num_particles)


def refine_amortized_guide(
    model: torch.nn.Module,
    guide: Callable,
    x: Tensor | LazyRows,
    *,
    steps: int = 500,
    lr: float = 1e-2,
    num_particles: int = 1,
    seed: int = 0,
    chunk: int | None = None,
) -> AutoNormal:
    """Semi-amortized inference: refine the amortized posterior of each of the sequences ``x``.

    An ``auto-normal`` guide (one Normal per latent element of every sequence) is started at
    the means and standard deviations that the amortized ``guide`` gives for ``x``, then
    fitted for ``steps`` Adam steps of the model's ELBO (``Trace_ELBO``) with the model and the
    encoder held fixed. The regularizers are not part of this objective: they shape the
    networks in training, the posterior of a trained model is the model's. Every latent of
    the model must have real support (true of the zoo's models, whose physics parameters
    have Normal priors and are clamped in the decoder).

    Each sequence's latents enter only its own term of the ELBO and Adam updates every
    element on its own, so the sequences can be refined ``chunk`` at a time, each chunk for
    ``steps`` steps, with the same result in distribution: memory is then that of a chunk.

    Args:
        model: the trained model.
        guide: its amortized guide, called as ``guide(x)``.
        x: observations ``(N, *event)``: a tensor, or
            :class:`~pyro_physvae.data.lazy.LazyRows` read ``chunk`` rows at a time.
        chunk: sequences refined together (default: all of a tensor, 250 of ``LazyRows``).

    Returns:
        The refined guide over the N sequences; call it (or ``Predictive``) with the same
        ``x``, or with rows of it as ``(x[idx], size=N, subsample=idx)``.
    """
    check_positive_int(steps, "steps")
    n = x.shape[0]
    chunk = check_positive_int(chunk, "chunk") if chunk is not None else (
        REFINE_CHUNK if isinstance(x, LazyRows) else n)
    pyro.set_rng_seed(seed)
    parts = [_refine_rows(model, guide, xb, steps=steps, lr=lr, num_particles=num_particles)
             for xb in row_chunks(x, chunk)]
    if len(parts) == 1 and not isinstance(x, LazyRows):
        return parts[0]
    first = x[:min(chunk, n)]
    rows = {"size": n, "subsample": torch.arange(first.shape[0], device=first.device)}
    locs = {name: torch.cat([_site_param(p.locs, name) for p in parts]) for name in _site_names(parts[0])}
    scales = {name: torch.cat([_site_param(p.scales, name) for p in parts]) for name in locs}
    return _auto_normal_at(model, first, locs, scales, **rows)


#: Sequences refined together when the observations are read from a file.
REFINE_CHUNK = 250


def _refine_rows(model: torch.nn.Module, guide: Callable, x: Tensor, *, steps: int, lr: float,
                 num_particles: int) -> AutoNormal:
    """:func:`refine_amortized_guide` of the rows ``x`` at once."""
    start = amortized_posterior(guide, x)
    auto = _auto_normal_at(model, x, {k: m for k, (m, _) in start.items()},
                           {k: s for k, (_, s) in start.items()})
    return _fit_latents(model, auto, x, steps=steps, lr=lr, num_particles=num_particles)


def _auto_normal_at(model: torch.nn.Module, x: Tensor, locs: dict[str, Tensor],
                    scales: dict[str, Tensor], **plate_kwargs) -> AutoNormal:
    """An ``auto-normal`` guide with the given locations and scales (by site, leading dim
    the data plate), its plates made by calling it on ``x`` with ``plate_kwargs``."""
    # Started at the rows of ``x``: no prior draws (as an init strategy would make) are spent.
    auto = make_autoguide("auto-normal", model, init_loc_fn=lambda site: locs[site["name"]][:x.shape[0]])
    with torch.no_grad():
        auto(x, **plate_kwargs)  # creates the parameters (of the plate's full size), set below
        for name, loc in locs.items():
            deep_setattr(auto.locs, name, PyroParam(loc.clone(), constraints.real,
                                                    event_dim=loc.dim() - 1))
        for name, scale in scales.items():
            deep_setattr(auto.scales, name, PyroParam(scale.clone(), auto.scale_constraint,
                                                      event_dim=scale.dim() - 1))
    return auto


def _site_names(auto: AutoNormal) -> list[str]:
    return [name for name, _ in auto.prototype_trace.iter_stochastic_nodes()]


def _site_param(params: torch.nn.Module, name: str) -> Tensor:
    """The constrained value of an ``AutoNormal``'s location or scale of site ``name``."""
    return functools.reduce(getattr, name.split("."), params).detach()


def amortized_posterior(guide: Callable, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """The encoder's posterior for ``x`` by latent site: ``(mean, standard deviation)``, each
    of the site's shape (``(N,)`` or ``(N, dim)``)."""
    with torch.no_grad():
        trace = prune_subsample_sites(poutine.trace(guide).get_trace(x))
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, site in trace.iter_stochastic_nodes():  # recorded curves are observed sites
        fn = site["fn"]
        if not _is_real(fn.support):
            raise ValueError(f"cannot refine latent {name!r}: its posterior has support "
                             f"{fn.support}, not the real line")
        out[name] = (fn.mean, fn.stddev)
    return out


def _is_real(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _fit_latents(model: Callable, guide: AutoGuide, x: Tensor, *, steps: int, lr: float,
                 num_particles: int) -> AutoGuide:
    """Adam on ``guide``'s own parameters for the model's ELBO, model weights frozen."""
    fixed_model = poutine.block(model, hide_types=["param"])
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    with frozen_parameters(model):
        guide(x)  # creates the guide's parameters, if not yet there
        optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
        for _ in range(steps):
            loss = elbo.differentiable_loss(fixed_model, guide, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return guide
