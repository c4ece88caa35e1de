"""NUTS over a few sequences' latents with the trained networks held fixed, and the
amortization gap of the encoder.

A trained Phys-VAE gives an amortized posterior ``q(z | x)`` from one encoder pass. With the
decoder's networks held at their trained values, the per-sequence posterior
``p(z_P, z_A, ... | x_k)`` of the *same* generative model can also be sampled exactly, with
NUTS; the difference between the two is the amortization gap (plus the family gap of the
Gaussian guide). This module runs that comparison for any
:class:`~pyro_physvae.base.PhysVAEModel`, whatever its system: it reads only the model's
public description (``check_observations``, ``observation_dims``, ``observation_coords``,
``latent_sites``, ``latent_event_shapes``, ``physics_parameters``), never a system name or a
tensor rank.

* :func:`run_nuts` samples the latents of ``x (K, *event)`` with ``pyro.infer.NUTS``; the
  network weights are ordinary ``PyroModule`` parameters (``param`` sites, never latents) and
  are frozen (``requires_grad=False``) while it runs, so the gradient of the potential energy
  reaches only the latents.
* :func:`nuts_to_inference_data` converts the run with ``arviz.from_pyro`` with named dims:
  ``{site}_dim`` for a vector latent, ``("sequence", *model.observation_dims)`` for ``x``.
* :func:`amortization_gap` and :func:`plot_amortization_gap` compare the two posteriors of
  the physics parameters per sequence; :func:`nuts_report` does everything for a run
  directory and writes the files.

Why starting values and a preconditioner matter here: the likelihood is very sharp (for the
pendulum the noise std is about 0.008 rad, so the posterior std of omega is a few 1e-3 rad/s)
while an auxiliary latent that the decoder barely uses keeps its N(0, 1) prior, and in a
trained model the physics and auxiliary latents are often correlated above 0.9. NUTS from a
random start with a unit mass matrix either sticks or needs maximal trees for every draw (and
the warm-up adaptation shrinks its variance estimates towards 1e-3, far above 1e-5).
:func:`starting_values` therefore scores candidate points (draws of the amortized guide, its
mean, sweeps and a space-filling design over the physics ranges), refines the best ones with
damped Newton steps on the log joint density and returns the Laplace approximation there; NUTS
then moves in the standardized coordinates ``(value - center) / scale`` (Pyro's
``transforms``) with the Laplace correlation as a dense inverse mass matrix (see
``mass_matrix`` of :func:`run_nuts`).

Caveats:

* A model may clamp a physics parameter to its feasible range before the physics, so outside
  the range the likelihood is flat in it and the posterior there is the prior times a
  constant. NUTS samples the unclamped site, as the guide does; for data whose parameter lies
  inside the range this tail carries no mass.
* An angle with a ``period`` (the galaxy's ``theta``) is sampled unwrapped: the physics sees
  it modulo the period, so its posterior on the real line repeats once per period, weighted
  by the prior. All chains start in the branch of the best point found (see
  :func:`starting_values`) and a sharp likelihood keeps them there; the summaries, the gap
  table and its figure compare such an angle modulo its period (in the window of one period
  centred on the circular mean of the NUTS draws).

Shapes: ``x`` is ``(K, *event)`` (``event`` named by ``model.observation_dims``, e.g.
``(T,)`` angles [rad] at the model's ``T`` times, ``(X, T)`` fields, ``(C, H, W)`` images);
latent samples are ``(chain, draw, K, *event)`` with the event shapes of
``model.latent_event_shapes()``; physics parameters are in their own units, auxiliary and
state latents are dimensionless.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyro  # noqa: E402
import pyro.poutine as poutine  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC, NUTS, Predictive  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_value  # noqa: E402
from pyro.infer.mcmc.api import _MultiSampler, _UnarySampler  # noqa: E402
from pyro.nn import PyroModule  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.distributions.transforms import AffineTransform  # noqa: E402

from pyro_physvae.diagnostics import markdown_table  # noqa: E402
from pyro_physvae.figures import save_figure  # noqa: E402
from pyro_physvae.files import atomic_write  # noqa: E402
from pyro_physvae.nets import frozen_parameters  # noqa: E402
from pyro_physvae.ode import IntegrationError  # noqa: E402
from pyro_physvae.physics import PhysicalParameter  # noqa: E402
from pyro_physvae.regularizers import wrapped_error  # noqa: E402
from pyro_physvae.validation import check_positive_int  # noqa: E402

#: How chains are run: one after the other in this process, or in worker processes.
CHAIN_METHODS = ("sequential", "parallel")
#: Inverse mass matrices of :func:`run_nuts`.
MASS_MATRICES = ("laplace", "laplace+adapt", "diagonal")
#: Columns of the table returned by :func:`amortization_gap`, in order.
GAP_COLUMNS = (
    "sequence", "parameter", "truth",
    "amortized_mean", "amortized_sd", "amortized_lo", "amortized_hi",
    "nuts_mean", "nuts_sd", "nuts_lo", "nuts_hi", "r_hat", "ess_bulk", "ess_tail",
    "mean_gap_sd", "sd_ratio",
)
_MAX_SEED = 2**32 - 1
#: Observation elements decoded per model call when scoring candidates or draws (bounds memory).
_CHUNK_ELEMENTS = 2**22


# -- latents as one flat vector per sequence ------------------------------------------------
@dataclass(frozen=True)
class LatentLayout:
    """The model's latent sites in sorted name order (Pyro's order for the mass matrix),
    with their per-sequence event shapes; ``D`` scalars per sequence in all."""

    names: tuple[str, ...]
    event_shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: PyroModule) -> LatentLayout:
        """The layout of ``model.latent_sites`` with the event shapes of
        ``model.latent_event_shapes()`` (``()`` for a physics parameter, ``(dim,)`` for a
        state or auxiliary latent)."""
        shapes = {k: tuple(int(n) for n in v) for k, v in model.latent_event_shapes().items()}
        names = tuple(sorted(model.latent_sites))
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ValueError(f"unknown event shape of latent sites {unknown}")
        return cls(names, tuple(shapes[n] for n in names))

    def positions(self, name: str) -> slice:
        """Where the scalars of site ``name`` sit in the flat vector of ``D`` scalars."""
        start = sum(self.sizes[:self.names.index(name)])
        return slice(start, start + self.sizes[self.names.index(name)])

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.event_shapes)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flatten(self, values: Mapping[str, Tensor]) -> Tensor:
        """``{site: (..., K, *event)}`` -> ``(..., K, D)``."""
        parts = []
        for name, shape in zip(self.names, self.event_shapes, strict=True):
            v = values[name]
            parts.append(v.reshape(*v.shape[: v.dim() - len(shape)], -1))
        return torch.cat(parts, -1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``(..., K, D)`` -> ``{site: (..., K, *event)}``."""
        out, pos = {}, 0
        for name, shape, size in zip(self.names, self.event_shapes, self.sizes, strict=True):
            out[name] = flat[..., pos:pos + size].reshape(*flat.shape[:-1], *shape)
            pos += size
        return out


def log_joint(model: PyroModule, x: Tensor, latents: Mapping[str, Tensor], *,
              sites: Collection[str] | None = None) -> Tensor:
    """Log joint density ``log p(x_k, z_k)`` of each sequence, shape ``(..., K)``.

    Args:
        x: observed sequences ``(K, *event)``.
        latents: a value for every latent site, ``(..., K, *event)``; the leading dims
            (candidates, chains, draws) broadcast through the model.
        sites: sum only these sample sites (e.g. ``{"x"}``: the log-likelihood); default all.

    Raises:
        IntegrationError: the ODE solution of some entry is not finite.
    """
    conditioned = poutine.condition(model, data=dict(latents))
    trace = poutine.trace(conditioned).get_trace(x)
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and (sites is None or name in sites):
            total = total + site["fn"].log_prob(site["value"])
    return total


def _chunk_size(x: Tensor, budget: int = _CHUNK_ELEMENTS) -> int:
    """Leading entries (candidates, draws) per model call, so that one call decodes at most
    about ``budget`` observation elements (``x (K, *event)`` has ``x.numel()`` per entry)."""
    return max(1, budget // max(1, x.numel()))


def _safe_log_joint(model: PyroModule, x: Tensor, layout: LatentLayout, flat: Tensor) -> Tensor:
    """:func:`log_joint` of ``flat (B, K, D)`` with ``-inf`` where the ODE blows up (each
    entry is then evaluated on its own, so one bad candidate spoils nothing else)."""
    try:
        return log_joint(model, x, layout.unflatten(flat))
    except IntegrationError:
        out = torch.full(flat.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)
        for b in range(flat.shape[0]):
            for k in range(flat.shape[1]):
                try:
                    out[b, k] = log_joint(model, x[k:k + 1], layout.unflatten(flat[b, k:k + 1]))[0]
                except IntegrationError:
                    pass
        return out


def _grad_hessian(model: PyroModule, x: Tensor, layout: LatentLayout,
                  flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log joint ``(B, K)``, its gradient ``(B, K, D)`` and per-sequence Hessian blocks
    ``(B, K, D, D)`` at ``flat (B, K, D)``. Entries are independent given the fixed nets,
    so ``D`` double-backward passes give every block at once."""
    with torch.enable_grad():
        z = flat.detach().requires_grad_(True)
        value = log_joint(model, x, layout.unflatten(z))
        (grad,) = torch.autograd.grad(value.sum(), z, create_graph=True)
        rows = [torch.autograd.grad(grad[..., j].sum(), z, retain_graph=j < layout.dim - 1)[0]
                for j in range(layout.dim)]
    return value.detach(), grad.detach(), torch.stack(rows, -2).detach()


def _newton_refine(model: PyroModule, x: Tensor, layout: LatentLayout, flat: Tensor,
                   steps: int) -> tuple[Tensor, Tensor]:
    """Damped Newton ascent of the log joint from ``flat (B, K, D)``, each ``(b, k)`` block
    on its own (Levenberg-Marquardt damping scaled by the Hessian diagonal, a step is kept
    only if it raises the density). Returns the points and the Hessian blocks there."""
    lam = torch.full(flat.shape[:-1], 1e-3, dtype=flat.dtype, device=flat.device)
    eye = torch.eye(layout.dim, dtype=flat.dtype, device=flat.device)
    try:
        value, grad, hess = _grad_hessian(model, x, layout, flat)
    except IntegrationError:
        return flat, torch.zeros(*flat.shape, layout.dim, dtype=flat.dtype, device=flat.device)
    for _ in range(steps):
        neg = -hess
        scale = torch.diagonal(neg, dim1=-2, dim2=-1).abs().clamp_min(1e-6)
        chol, info = torch.linalg.cholesky_ex(neg + lam[..., None, None] * torch.diag_embed(scale)
                                              + 1e-9 * eye)
        ok = info == 0
        step = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        trial = torch.where(ok.unsqueeze(-1), flat + step, flat)
        new_value = _safe_log_joint(model, x, layout, trial)
        better = ok & (new_value > value)
        lam = torch.where(better, (lam / 10).clamp_min(1e-9), lam * 10)
        if not bool(better.any()):
            if bool((lam > 1e8).all()):
                break
            continue
        flat = torch.where(better.unsqueeze(-1), trial, flat)
        try:
            value, grad, hess = _grad_hessian(model, x, layout, flat)
        except IntegrationError:  # a point that was finite cannot blow up; be safe anyway
            break
    return flat, hess


@dataclass
class StartingValues:
    """Per-chain starting points and a Gaussian (Laplace) sketch of the posterior.

    Attributes:
        values: ``{site: (C, K, *event)}``, one start per chain and sequence.
        center: ``{site: (K, *event)}``, the best refined point of each sequence.
        scale: ``{site: (K, *event)}``, approximate posterior standard deviations, in the
            site's units.
        correlation: ``(K, D, D)`` approximate posterior correlation of each sequence's
            ``D`` latent scalars, in :class:`LatentLayout` order.
        log_joint: ``(C, K)`` log joint density at the starts.

    :func:`run_nuts` lets NUTS move in the standardized coordinates
    ``(value - center) / scale`` (where the warm-up adaptation, whose variance estimates
    are shrunk towards 1e-3, works on a well-scaled problem) with the correlation as the
    initial dense inverse mass matrix.
    """

    values: dict[str, Tensor]
    center: dict[str, Tensor]
    scale: dict[str, Tensor]
    correlation: Tensor
    log_joint: Tensor


def _candidates(model: PyroModule, x: Tensor, layout: LatentLayout, guide: PyroModule | None,
                num_candidates: int) -> Tensor:
    """Candidate points ``(M, K, D)`` with ``M <= 1 + 3 * num_candidates + P``:

    * the guide's mean and ``num_candidates`` draws (the prior's without a guide);
    * per physics parameter (P of them), a sweep of ``ceil(num_candidates / P)`` points over
      its range, the other latents at the guide's (or prior) mean;
    * with two or more physics parameters, a Latin hypercube of ``num_candidates`` points over
      all their ranges jointly (each parameter's grid of ``num_candidates`` values used once,
      in a random order), the other latents at the mean; so the count does not grow with P
      as a full grid (``num_candidates ** P``) would.
    """
    K = x.shape[0]
    physics = _physics_positions(model, layout)
    if guide is not None:
        trace = poutine.trace(guide).get_trace(x)
        center = {n: _site_mean(trace.nodes[n]) for n in layout.names}
        source = guide
    else:
        center = {n: m.expand(K, *s) for (n, m), s in zip(_prior_moments(model, x, layout)[0].items(),
                                                          layout.event_shapes, strict=True)}
        source = model
    draws = Predictive(source, num_samples=num_candidates, return_sites=list(layout.names),
                       parallel=True)(x)
    center_flat = layout.flatten(center).reshape(1, K, layout.dim)
    parts = [center_flat, layout.flatten({n: draws[n] for n in layout.names})]
    per_sweep = math.ceil(num_candidates / len(physics)) if physics else 0
    for param, pos in physics:
        block = center_flat.expand(per_sweep, K, layout.dim).clone()
        block[..., pos] = _grid(param, per_sweep, x)[:, None]
        parts.append(block)
    if len(physics) > 1:
        block = center_flat.expand(num_candidates, K, layout.dim).clone()
        for param, pos in physics:
            order = torch.randperm(num_candidates, device=x.device)
            block[..., pos] = _grid(param, num_candidates, x)[order][:, None]
        parts.append(block)
    return torch.cat(parts, 0)


def _grid(param: PhysicalParameter, n: int, like: Tensor) -> Tensor:
    """``n`` evenly spaced values over the range ``[low, high]`` of ``param``."""
    return torch.linspace(param.low, param.high, n, dtype=like.dtype, device=like.device)


def _physics_positions(model: PyroModule, layout: LatentLayout) -> list[tuple[PhysicalParameter, int]]:
    """Each physics parameter with the position of its (scalar) value in the flat vector."""
    out = []
    for param in model.physics_parameters:
        where = layout.positions(param.name)
        if where.stop - where.start != 1:
            raise ValueError(f"physics parameter {param.name!r} is not a scalar site")
        out.append((param, where.start))
    return out


def _periodic_positions(model: PyroModule, layout: LatentLayout) -> list[tuple[int, float]]:
    """``(position, period)`` of each physics parameter that is an angle with a ``period``."""
    return [(pos, float(p.period)) for p, pos in _physics_positions(model, layout)
            if getattr(p, "period", None) is not None]


def _periods(model: PyroModule) -> dict[str, float]:
    """``{name: period}`` of the physics parameters that are angles."""
    return {p.name: float(p.period) for p in model.physics_parameters
            if getattr(p, "period", None) is not None}


def _prior_moments(model: PyroModule, x: Tensor, layout: LatentLayout
                   ) -> tuple[dict[str, Tensor], Tensor]:
    """The prior mean of each latent site ``{site: (*event)}`` and the prior variances of
    the ``D`` latent scalars ``(D,)`` (those of the first sequence), read off one trace of
    the model (so that a model whose priors differ from the defaults is served as it is)."""
    prior = poutine.trace(poutine.block(model, hide=["x"])).get_trace(x)
    means, variances = {}, []
    for name, shape in zip(layout.names, layout.event_shapes, strict=True):
        fn = prior.nodes[name]["fn"]
        means[name] = fn.mean.expand(x.shape[0], *shape)[0]
        variances.append(fn.variance.expand(x.shape[0], *shape)[0].reshape(-1))
    return means, torch.cat(variances)


def _site_mean(site: dict) -> Tensor:
    """The mean of a traced site's distribution, or its value where that has none."""
    try:
        return site["fn"].mean.expand_as(site["value"])
    except (NotImplementedError, AttributeError, RuntimeError):
        return site["value"]


@torch.no_grad()
def starting_values(model: PyroModule, x: Tensor, *, guide: PyroModule | None = None,
                    num_chains: int = 4, num_candidates: int = 64, refine_steps: int = 30,
                    seed: int = 0) -> StartingValues:
    """Good, distinct per-chain starting points for NUTS and the scale of each latent.

    Candidates (see the module docstring) are scored by the log joint density of each
    sequence (sequences are independent given the fixed nets); every sequence's
    ``num_chains`` best candidates are refined by ``refine_steps`` damped Newton steps, and
    chain ``c`` starts at the ``c``-th refined point plus one draw from its Laplace
    approximation, so that chains do not start at the same point. An angle with a
    ``period`` is moved by whole periods into the branch of the sequence's best point before
    the jitter (see :func:`_same_branch`). The Laplace covariance (averaged over the chains
    whose Hessian is negative definite; the prior's where none is) gives the scales and
    correlations.

    Args:
        x: observations ``(K, *event)``.
        guide: the amortized guide, or ``None`` (prior draws instead of guide draws).
        num_candidates: guide (or prior) draws, points of the design over the physics
            ranges (see :func:`_candidates`: at most ``1 + 3 num_candidates + P`` in all).
        refine_steps: Newton steps (0: the best candidates as they are).

    Returns:
        :class:`StartingValues` with values ``(C, K, *event)`` per site.
    """
    check_positive_int(num_chains, "num_chains")
    check_positive_int(num_candidates, "num_candidates")
    if isinstance(refine_steps, bool) or int(refine_steps) != refine_steps or refine_steps < 0:
        raise ValueError(f"refine_steps must be a non-negative integer, got {refine_steps!r}")
    layout = LatentLayout.of(model)
    pyro.set_rng_seed(seed)
    with frozen_parameters(model, guide):
        return _starting_values(model, x, layout, guide, num_chains, num_candidates, refine_steps)


def _best_candidates(model: PyroModule, x: Tensor, layout: LatentLayout, cand: Tensor,
                     num_chains: int) -> Tensor:
    """The ``num_chains`` candidates ``(C, K, D)`` of highest log joint density per sequence."""
    step = _chunk_size(x)
    score = torch.cat([_safe_log_joint(model, x, layout, cand[i:i + step])
                       for i in range(0, cand.shape[0], step)])
    score = torch.nan_to_num(score, nan=-math.inf)
    top = score.topk(num_chains, dim=0)  # (C, K)
    if not bool(torch.isfinite(top.values).all()):
        bad = (~torch.isfinite(top.values)).any(0).nonzero().flatten().tolist()
        raise ValueError(f"fewer than {num_chains} candidate starting points of finite density "
                         f"for sequences {bad}: the ODE blows up almost everywhere")
    return torch.gather(cand, 0, top.indices.unsqueeze(-1).expand(num_chains, *cand.shape[1:]))


def _starting_values(model: PyroModule, x: Tensor, layout: LatentLayout, guide: PyroModule | None,
                     num_chains: int, num_candidates: int, refine_steps: int) -> StartingValues:
    cand = _candidates(model, x, layout, guide, max(num_candidates, num_chains))
    starts = _best_candidates(model, x, layout, cand, num_chains)
    starts, hess = _newton_refine(model, x, layout, starts, refine_steps)
    rows = torch.arange(x.shape[0], device=x.device)
    center = starts[_safe_log_joint(model, x, layout, starts).argmax(0), rows]
    starts = _same_branch(starts, center, _periodic_positions(model, layout))
    cov, good = _laplace_covariance(hess)  # (C, K, D, D), (C, K)
    weight = good.to(cov.dtype)[..., None, None]
    mean_cov = (cov * weight).sum(0) / weight.sum(0).clamp_min(1)
    prior_cov = torch.diag(_prior_moments(model, x, layout)[1]).to(cov)
    mean_cov = torch.where(good.any(0)[..., None, None], mean_cov, prior_cov)
    scale = torch.diagonal(mean_cov, dim1=-2, dim2=-1).sqrt()
    correlation = mean_cov / (scale.unsqueeze(-1) * scale.unsqueeze(-2))
    # Jitter by a Laplace draw where the Laplace approximation exists, keeping the density finite.
    chol = torch.linalg.cholesky_ex(cov)[0] * weight
    noise = torch.randn(*starts.shape, 1, dtype=x.dtype, device=x.device)
    jittered = starts + (chol @ noise).squeeze(-1)
    ok = torch.isfinite(_safe_log_joint(model, x, layout, jittered)) & good
    starts = torch.where(ok.unsqueeze(-1), jittered, starts)
    return StartingValues(layout.unflatten(starts), layout.unflatten(center),
                          layout.unflatten(scale), correlation,
                          _safe_log_joint(model, x, layout, starts))


def _same_branch(starts: Tensor, center: Tensor, periodic: Sequence[tuple[int, float]]) -> Tensor:
    """``starts (C, K, D)`` with each angle moved by whole periods into the window of one
    period around its value in ``center (K, D)``: the physics sees an angle modulo its
    period, so the shifted start describes the same image, and all chains then explore the
    same branch of the (periodically repeated) posterior."""
    if not periodic:
        return starts
    out = starts.clone()
    for pos, period in periodic:
        out[..., pos] = center[:, pos] + wrapped_error(starts[..., pos] - center[:, pos], period)
    return out


def _laplace_covariance(hess: Tensor) -> tuple[Tensor, Tensor]:
    """Covariance blocks ``(C, K, D, D)`` from log-density Hessians: the inverse negative
    Hessian, and ``good (C, K)`` where that is positive definite and finite (elsewhere the
    blocks are zero)."""
    chol, info = torch.linalg.cholesky_ex(-hess)
    cov = torch.cholesky_inverse(chol)
    good = (info == 0) & torch.isfinite(cov).all(-1).all(-1)
    return torch.where(good[..., None, None], cov, torch.zeros_like(cov)), good


# -- the NUTS kernel -----------------------------------------------------------------------
def _is_deterministic(msg: dict) -> bool:
    return bool(msg.get("infer", {}).get("_deterministic", False))


class ObservedSitesOnly:
    """``model`` with its ``pyro.deterministic`` sites (``init``, ``x_P``, ``x_mean``, ...)
    hidden. Pyro records them as observed sample sites, so ``arviz.from_pyro`` would
    otherwise list them as observed data with a log-likelihood of zero; the density is
    unchanged. Picklable (for worker processes) if ``model`` is."""

    def __init__(self, model: PyroModule) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        return poutine.block(self.model, hide_fn=_is_deterministic)(*args, **kwargs)


class _GuardedPotential:
    """A potential energy function that reports an ODE blow-up as infinite energy (with a
    zero gradient), which NUTS treats as a divergent transition instead of crashing."""

    def __init__(self, potential_fn) -> None:
        self.potential_fn = potential_fn

    def __call__(self, z: dict[str, Tensor]) -> Tensor:
        try:
            return self.potential_fn(z)
        except IntegrationError:
            zero = sum(v.sum() for v in z.values()) * 0.0
            return zero + math.inf


class _FixedNetNUTS(NUTS):
    """NUTS for a model whose networks are frozen, with three additions:

    * the potential is guarded (:class:`_GuardedPotential`);
    * ``inverse_mass``, if given, replaces the unit matrix as the initial inverse mass
      matrix (dense ``(KD, KD)`` with ``full_mass=True``, else diagonal ``(KD,)``, in
      Pyro's order of the latent scalars);
    * every chain (also in a worker process) runs with ``num_threads`` torch threads, and a
      worker picks its own start from ``chain_starts`` by its seed (Pyro's parallel sampler
      gives all workers the same kernel object, hence the last chain's ``initial_params``).
    """

    def __init__(self, model, *, num_threads: int, inverse_mass: Tensor | None = None,
                 chain_starts: dict[str, Tensor] | None = None, base_seed: int = 0,
                 **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._num_threads = num_threads
        self._inverse_mass = inverse_mass
        self._chain_starts = chain_starts
        self._base_seed = base_seed

    def setup(self, warmup_steps, *args, **kwargs):
        torch.set_num_threads(self._num_threads)
        if self._chain_starts is not None and not self.initial_params:
            chain = (torch.initial_seed() - self._base_seed) % _MAX_SEED
            num_chains = next(iter(self._chain_starts.values())).shape[0]
            self.initial_params = {k: v[chain % num_chains] for k, v in self._chain_starts.items()}
        return super().setup(warmup_steps, *args, **kwargs)

    def _initialize_model_properties(self, model_args, model_kwargs):
        super()._initialize_model_properties(model_args, model_kwargs)
        self.potential_fn = _GuardedPotential(self.potential_fn)

    def _initialize_adapter(self):
        super()._initialize_adapter()
        if self._inverse_mass is None:
            return
        adapter = self._adapter.mass_matrix_adapter
        (sites,) = adapter.inverse_mass_matrix  # one block: all sites, dense or diagonal
        current = adapter.inverse_mass_matrix[sites]
        if current.shape != self._inverse_mass.shape:
            raise ValueError(f"inverse mass matrix of shape {tuple(self._inverse_mass.shape)} "
                             f"for a block of shape {tuple(current.shape)}")
        adapter.inverse_mass_matrix = {sites: self._inverse_mass.to(current)}
        if self._adapter.adapt_step_size:
            self._adapter.reset_step_size_adaptation(self._initial_params)


def _pyro_order(layout: LatentLayout, K: int) -> Tensor:
    """``(K, D)`` positions of each sequence's latent scalars in Pyro's flat vector, which
    concatenates the sites in sorted order, each flattened as ``(K, *event)``."""
    index = torch.empty(K, layout.dim, dtype=torch.long)
    offset = 0
    for size in layout.sizes:
        for k in range(K):
            index[k, offset:offset + size] = K * offset + k * size + torch.arange(size)
        offset += size
    return index


def dense_inverse_mass(layout: LatentLayout, correlation: Tensor) -> Tensor:
    """The ``(K D, K D)`` block-diagonal inverse mass matrix of the standardized latents:
    each sequence's ``(D, D)`` correlation block placed at its scalars' positions."""
    K, D = correlation.shape[0], layout.dim
    index = _pyro_order(layout, K).to(correlation.device)
    out = torch.zeros(K * D, K * D, dtype=correlation.dtype, device=correlation.device)
    for k in range(K):
        out[index[k][:, None], index[k][None, :]] = correlation[k]
    return out


def _standardizing_transforms(init: StartingValues) -> dict[str, AffineTransform]:
    """``{site: value -> (value - center) / scale}``: the coordinates NUTS moves in."""
    out = {}
    for name, center in init.center.items():
        scale = init.scale[name].clamp_min(1e-12)
        out[name] = AffineTransform(-center / scale, 1.0 / scale)
    return out


def _sequential_mcmc(kernel: NUTS, num_samples: int, warmup_steps: int,
                     initial_params: dict[str, Tensor], progress: bool) -> MCMC:
    """An :class:`~pyro.infer.MCMC` whose chains run one after the other in this process.

    This is Pyro's own sequential runner (``_UnarySampler``, which ``MCMC`` uses when there
    are fewer free CPUs than chains), given per-chain ``initial_params (C, ...)``; the
    result is an ordinary ``MCMC`` with ``num_chains = C``.
    """
    num_chains = next(iter(initial_params.values())).shape[0]
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=1,
                disable_progbar=not progress)
    mcmc.num_chains = num_chains
    mcmc._diagnostics = [None] * num_chains
    mcmc.sampler = _UnarySampler(kernel, num_samples, warmup_steps, num_chains,
                                 not progress, initial_params=initial_params)
    return mcmc


def _parallel_mcmc(kernel: NUTS, num_samples: int, warmup_steps: int,
                   initial_params: dict[str, Tensor], progress: bool, mp_context: str) -> MCMC:
    """Pyro's multiprocessing runner, one worker process per chain; falls back to the
    sequential runner where Pyro would (fewer free CPUs than chains)."""
    num_chains = next(iter(initial_params.values())).shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains=.*available_cpu")
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                    num_chains=num_chains, mp_context=mp_context, disable_progbar=not progress)
    if not isinstance(mcmc.sampler, _MultiSampler):
        kernel._chain_starts = None
        return _sequential_mcmc(kernel, num_samples, warmup_steps, initial_params, progress)
    return mcmc


def _check_nuts_args(model: PyroModule, x: Tensor, num_samples: int, warmup_steps: int,
                     num_chains: int, target_accept_prob: float, max_tree_depth: int,
                     chain_method: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (K, *event), got {type(x).__name__}")
    model.check_observations(x)
    check_positive_int(num_samples, "num_samples")
    check_positive_int(num_chains, "num_chains")
    check_positive_int(max_tree_depth, "max_tree_depth")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob must lie in (0, 1), got {target_accept_prob}")
    if chain_method not in CHAIN_METHODS:
        raise ValueError(f"chain_method must be one of {CHAIN_METHODS}, got {chain_method!r}")
    if not model.latent_sites:
        raise ValueError("the model has no latent sites to sample")


def run_nuts(
    model: PyroModule,
    x: Tensor,
    *,
    guide: PyroModule | None = None,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 8,
    init: StartingValues | None = None,
    mass_matrix: str = "laplace",
    chain_method: str = "sequential",
    mp_context: str = "spawn",
    progress: bool = False,
) -> MCMC:
    """Sample the latents of the sequences ``x`` with NUTS, the model's networks fixed.

    The target is ``p(z_k | x_k)`` for each of the K sequences, ``z`` all the sites of
    ``model.latent_sites`` (physics, state and auxiliary latents, e.g. ``omega, z_A1, z_A2``
    of the pendulum), jointly in one NUTS state of ``K * D`` scalars. The
    model's weights are frozen during the run (:func:`frozen_parameters`) and restored
    afterwards; they are ``param`` sites, which NUTS never samples.

    Args:
        model: a trained model, called as ``model(x)``; its sites sit in the ``data`` plate.
        x: observations ``(K, *event)`` (checked by ``model.check_observations``), K small
            (1 to 5).
        guide: the amortized guide, used for starting values (see :func:`starting_values`).
        num_samples, warmup_steps: draws kept and warm-up iterations per chain.
        num_chains: independent chains C (for R-hat, at least 2).
        seed: seeds the starting values and the chains.
        target_accept_prob, max_tree_depth: NUTS settings (a tree holds at most
            ``2**max_tree_depth`` leapfrog steps).
        init: starting values and preconditioner; computed by :func:`starting_values` if
            ``None`` (with ``num_chains`` starts).
        mass_matrix: NUTS moves in the standardized latents ``(value - center) / scale``
            with the inverse mass matrix ``"laplace"`` (default: the dense Laplace
            correlation of each sequence's latents, kept fixed; the physics and auxiliary
            latents of a trained model are often correlated above 0.9, which a diagonal
            matrix cannot undo), ``"laplace+adapt"`` (the same to start with, then Pyro's
            dense warm-up adaptation; for long warm-ups and non-Gaussian posteriors) or
            ``"diagonal"`` (Pyro's diagonal adaptation from the unit matrix).
        chain_method: ``"sequential"`` (default: chains one after the other in this process,
            robust and deterministic) or ``"parallel"`` (one worker process per chain with
            ``mp_context``; falls back to sequential where Pyro has too few CPUs).
        progress: show Pyro's progress bar.

    Returns:
        The finished :class:`pyro.infer.MCMC`; ``get_samples(group_by_chain=True)`` gives
        ``{site: (C, num_samples, K, *event)}``. Convert with :func:`nuts_to_inference_data`.
    """
    _check_nuts_args(model, x, num_samples, warmup_steps, num_chains, target_accept_prob,
                     max_tree_depth, chain_method)
    if mass_matrix not in MASS_MATRICES:
        raise ValueError(f"mass_matrix must be one of {MASS_MATRICES}, got {mass_matrix!r}")
    with frozen_parameters(model, guide):
        if init is None:
            init = starting_values(model, x, guide=guide, num_chains=num_chains, seed=seed)
        transforms = _standardizing_transforms(init)
        starts = {k: transforms[k](v.detach()) for k, v in init.values.items()}
        if next(iter(starts.values())).shape[0] != num_chains:
            raise ValueError(f"init has {next(iter(starts.values())).shape[0]} chains' starts, "
                             f"num_chains is {num_chains}")
        pyro.set_rng_seed(seed)
        dense = mass_matrix != "diagonal"
        kernel = _FixedNetNUTS(
            ObservedSitesOnly(model), num_threads=torch.get_num_threads(), transforms=transforms,
            inverse_mass=dense_inverse_mass(LatentLayout.of(model), init.correlation) if dense else None,
            full_mass=dense, adapt_mass_matrix=mass_matrix != "laplace",
            chain_starts=starts if chain_method == "parallel" else None,
            base_seed=torch.initial_seed(), target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth, max_plate_nesting=1,
            init_strategy=init_to_value(values={k: v[0] for k, v in init.values.items()}))
        if chain_method == "parallel" and num_chains > 1:
            mcmc = _parallel_mcmc(kernel, num_samples, warmup_steps, starts, progress, mp_context)
        else:
            mcmc = _sequential_mcmc(kernel, num_samples, warmup_steps, starts, progress)
        mcmc.run(x)
    return mcmc


# -- ArviZ -------------------------------------------------------------------------------
def _coords_dims(model: PyroModule, sequence_ids: Sequence[int],
                 observation_coords: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """ArviZ ``coords`` and ``dims``: ``sequence`` for every site, ``{site}_dim`` for the
    event dim of a vector latent, ``model.observation_dims`` for ``x``; coordinates of the
    observation dims from ``model.observation_coords()``, updated by ``observation_coords``
    (e.g. a data set's; those of other dims are ignored)."""
    coords: dict[str, Any] = {"sequence": np.asarray(sequence_ids)}
    dims: dict[str, list[str]] = {"x": ["sequence", *model.observation_dims]}
    known = {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
             for k, v in {**model.observation_coords(), **(observation_coords or {})}.items()}
    coords.update({k: v for k, v in known.items() if k in model.observation_dims})
    for name, shape in model.latent_event_shapes().items():
        if name not in model.latent_sites:
            continue
        if len(shape) > 1:
            raise ValueError(f"latent site {name!r} has event shape {shape}; only scalars and "
                             f"vectors get named dims")
        dims[name] = ["sequence", *(f"{name}_dim" for _ in shape)]
        coords.update({f"{name}_dim": np.arange(n) for n in shape})
    return coords, dims


def _sequence_ids(sequence_ids: Sequence[int] | None, K: int) -> list[int]:
    ids = list(range(K)) if sequence_ids is None else [int(i) for i in sequence_ids]
    if len(ids) != K:
        raise ValueError(f"sequence_ids has {len(ids)} entries for {K} sequences")
    return ids


def _likelihoods(model: PyroModule, x: Tensor, samples: Mapping[str, Tensor]):
    """The observation distribution ``p(x | z)`` (batch ``(n, K)``) of chunks of ``n`` draws
    of ``samples {site: (chain, draw, K, *event)}``, in order (chunks bound the memory that
    a model of large observations, such as images, needs)."""
    lead = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in samples.items()}
    step = _chunk_size(x)
    for i in range(0, lead[0] * lead[1], step):
        chunk = {k: v[i:i + step] for k, v in flat.items()}
        trace = poutine.trace(poutine.condition(model, data=chunk)).get_trace(x)
        yield trace.nodes["x"]["fn"]


@torch.no_grad()
def pointwise_log_likelihood(model: PyroModule, x: Tensor, samples: Mapping[str, Tensor]) -> Tensor:
    """``log p(x_k | z)`` of every draw and sequence, ``(chain, draw, K)``, from draws
    ``{site: (chain, draw, K, *event)}`` (summed over the event dims of ``x``)."""
    lead = next(iter(samples.values())).shape[:2]
    parts = [fn.log_prob(x) for fn in _likelihoods(model, x, samples)]
    return torch.cat(parts).reshape(*lead, x.shape[0])


@torch.no_grad()
def posterior_predictive(model: PyroModule, x: Tensor, samples: Mapping[str, Tensor]) -> Tensor:
    """One replicate ``x_rep ~ p(x | z)`` per draw, ``(chain, draw, K, *event)``, from draws
    ``{site: (chain, draw, K, *event)}`` (torch's global random state)."""
    lead = next(iter(samples.values())).shape[:2]
    parts = [fn.sample() for fn in _likelihoods(model, x, samples)]
    return torch.cat(parts).reshape(*lead, *x.shape)


def nuts_to_inference_data(mcmc: MCMC, model: PyroModule, x: Tensor, *,
                           sequence_ids: Sequence[int] | None = None,
                           coords: Mapping[str, Any] | None = None,
                           predictive: bool = False) -> az.InferenceData:
    """Convert a :func:`run_nuts` result with ``arviz.from_pyro``.

    Groups: ``posterior`` (each latent site ``(chain, draw, sequence)`` for a scalar such as
    a physics parameter, in its units, or ``(chain, draw, sequence, {site}_dim)`` for a
    vector latent), ``sample_stats`` (``diverging``, ...), ``log_likelihood`` (``x (chain,
    draw, sequence)``, summed over the event dims) and ``observed_data`` (``x (sequence,
    *model.observation_dims)``, e.g. ``(sequence, time)`` with ``time`` in seconds).
    ``sequence`` holds ``sequence_ids`` (default ``0..K-1``). The posterior variable of an
    angle carries its ``period`` as an attribute. ``arviz.summary(idata)`` gives R-hat and
    ESS (see :func:`posterior_summary` for angles). With ``predictive``, also
    ``posterior_predictive`` (``x (chain, draw, sequence, *model.observation_dims)``, one
    replicate per draw: as many numbers as the draws times ``x.numel()``).

    Args:
        x: the observations the chains were run on ``(K, *event)`` (checked against the run).
        coords: coordinates of observation dims, e.g. a data set's ``{"space": ..., "time":
            ...}``; they replace those of ``model.observation_coords()``.
    """
    if mcmc._args is None or mcmc._samples is None:
        raise ValueError("the MCMC has not been run yet")
    ran_on = mcmc._args[0]
    if tuple(ran_on.shape) != tuple(x.shape) or not torch.equal(ran_on.cpu(), x.detach().cpu()):
        raise ValueError("x is not the data the MCMC was run on")
    coords_all, dims = _coords_dims(model, _sequence_ids(sequence_ids, x.shape[0]), coords)
    with frozen_parameters(model), torch.no_grad():
        idata = az.from_pyro(mcmc, coords=coords_all, dims=dims, log_likelihood=False)
        samples = mcmc.get_samples(group_by_chain=True)
        loglik = pointwise_log_likelihood(model, x, samples)
        replicates = posterior_predictive(model, x, samples) if predictive else None
    idata.add_groups({"log_likelihood": {"x": loglik.cpu().numpy()}},
                     coords={"sequence": coords_all["sequence"]}, dims={"x": ["sequence"]})
    if replicates is not None:
        idata.add_groups({"posterior_predictive": {"x": replicates.cpu().numpy()}},
                         coords=coords_all, dims={"x": dims["x"]})
    for name, period in _periods(model).items():
        if name in idata.posterior:
            idata.posterior[name].attrs["period"] = period
    idata.posterior.attrs["model_setting"] = str(getattr(model.setting, "value", model.setting))
    return idata


def _angle_center(draws: np.ndarray, period: float, axis: tuple[int, ...]) -> np.ndarray:
    """The circular mean of angles ``draws`` over ``axis`` (kept, size 1), as the
    representative nearest their median: for draws within one branch, their own branch."""
    phase = 2 * np.pi * draws / period
    mean = np.arctan2(np.sin(phase).mean(axis, keepdims=True),
                      np.cos(phase).mean(axis, keepdims=True)) * period / (2 * np.pi)
    return mean + period * np.round((np.median(draws, axis, keepdims=True) - mean) / period)


def _around(values: np.ndarray, center: np.ndarray | float, period: float) -> np.ndarray:
    """``values`` moved by whole periods into ``[center - period / 2, center + period / 2)``."""
    return center + np.remainder(np.asarray(values, float) - center + period / 2, period) - period / 2


def _unwrapped(draws: np.ndarray, period: float, axis: tuple[int, ...]) -> np.ndarray:
    """Angles ``draws`` moved by whole periods into the window of one period centred on
    their circular mean over ``axis`` (the other axes, e.g. sequences, each their own)."""
    return _around(draws, _angle_center(draws, period, axis), period)


def posterior_summary(idata: az.InferenceData, model: PyroModule, **kwargs) -> pd.DataFrame:
    """``arviz.summary`` of the model's latent sites (``kwargs`` go to it), an angle with a
    ``period`` taken modulo the period: its draws are first moved by whole periods into the
    window of one period centred on their circular mean (per sequence), so that chains in
    different branches of the same angle count as agreeing."""
    posterior = idata.posterior[list(model.latent_sites)].copy()
    for name, period in _periods(model).items():
        if name in posterior:
            var = posterior[name]
            axis = (var.dims.index("chain"), var.dims.index("draw"))
            posterior[name] = var.copy(data=_unwrapped(var.values, period, axis))
    return az.summary(posterior, **kwargs)


# -- the amortization gap ------------------------------------------------------------------
@torch.no_grad()
def amortized_samples(guide: PyroModule, x: Tensor, sites: Sequence[str], *,
                      num_samples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Draws of the amortized posterior ``q(. | x)``: ``{site: (S, K, *event)}``."""
    check_positive_int(num_samples, "num_samples")
    if not sites:
        return {}
    pyro.set_rng_seed(seed)
    draws = Predictive(guide, num_samples=num_samples, return_sites=list(sites), parallel=True)(x)
    return {k: draws[k].cpu().numpy() for k in sites}


def _nuts_draws(posterior: MCMC | az.InferenceData, site: str) -> np.ndarray:
    """``(chain, draw, K, *event)`` draws of ``site`` from an MCMC or InferenceData."""
    if isinstance(posterior, az.InferenceData):
        return posterior.posterior[site].values
    return posterior.get_samples(group_by_chain=True)[site].detach().cpu().numpy()


def _scalar_parameters(site: str, values: np.ndarray, lead: int) -> list[tuple[str, np.ndarray]]:
    """Split the event dims of ``values (*lead dims, K, *event)`` into named scalars."""
    event = values.shape[lead + 1:]
    if not event:
        return [(site, values)]
    flat = values.reshape(*values.shape[:lead + 1], -1)
    return [(f"{site}[{j}]", flat[..., j]) for j in range(flat.shape[-1])]


def _summaries(draws: np.ndarray, level: float) -> tuple[float, float, float, float]:
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(draws.mean()), float(draws.std(ddof=1)), float(lo), float(hi)


def amortization_gap(
    model: PyroModule,
    guide: PyroModule,
    x: Tensor,
    mcmc: MCMC | az.InferenceData,
    *,
    num_samples: int = 1000,
    level: float = 0.9,
    truth: Mapping[str, Sequence[float]] | None = None,
    sequence_ids: Sequence[int] | None = None,
    parameters: Sequence[str] | None = None,
    amortized: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Amortized posterior against NUTS, per sequence and physics parameter.

    Returns a :class:`pandas.DataFrame` with the columns :data:`GAP_COLUMNS`, one row per
    sequence and scalar parameter (``"omega"``; a vector site ``z`` gives ``"z[0]"``, ...):

    * ``amortized_mean``, ``amortized_sd``, ``amortized_lo``/``_hi`` (central ``level``
      interval) of ``num_samples`` guide draws;
    * ``nuts_mean``, ``nuts_sd``, ``nuts_lo``/``_hi`` of all chains' draws, with ``r_hat``
      (rank-normalized split R-hat), ``ess_bulk`` and ``ess_tail`` (ArviZ);
    * ``mean_gap_sd = (amortized_mean - nuts_mean) / nuts_sd`` (signed; 0 is no gap) and
      ``sd_ratio = amortized_sd / nuts_sd`` (1 is no gap; > 1 the guide is too wide);
    * ``truth``: the true value if given, else NaN. Values are in the parameter's units.

    An angle with a ``period`` (e.g. the galaxy's ``theta``) is compared modulo its period:
    per sequence, the NUTS draws, the amortized draws and the truth are moved by whole
    periods into the window of one period centred on the circular mean of the NUTS draws,
    and every column is computed there (R-hat and ESS too).

    Args:
        model: the model the chains sampled (it names the physics parameters).
        mcmc: a :func:`run_nuts` result or its InferenceData.
        parameters: sites to compare; default the model's physics parameters, so for an
            ``nn-only`` model the table has no rows (but the same columns).
        truth: ``{site: (K,)}`` true values, e.g. from the data set.
        amortized: precomputed :func:`amortized_samples` (then ``num_samples`` is unused).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    names = list(parameters) if parameters is not None else [p.name for p in model.physics_parameters]
    missing = [n for n in names if n not in model.latent_sites]
    if missing:
        raise ValueError(f"{missing} are not latent sites of the model ({model.latent_sites})")
    ids = _sequence_ids(sequence_ids, x.shape[0])
    if amortized is None:
        amortized = amortized_samples(guide, x, names, num_samples=num_samples, seed=seed)
    periods = _periods(model)
    rows = []
    for site in names:
        nuts = _nuts_draws(mcmc, site)
        if nuts.shape[2] != len(ids) or amortized[site].shape[1] != len(ids):
            raise ValueError(f"{site}: NUTS draws {nuts.shape} and amortized draws "
                             f"{amortized[site].shape} must both cover the {len(ids)} sequences")
        true = None if truth is None or site not in truth else np.asarray(truth[site], float)
        period = periods.get(site)
        for (name, q), (_, p) in zip(_scalar_parameters(site, amortized[site], 1),
                                     _scalar_parameters(site, nuts, 2), strict=True):
            for k, seq in enumerate(ids):
                qk, pk = np.asarray(q[:, k], float), np.asarray(p[:, :, k], float)
                tk = math.nan if true is None else float(true[k])
                if period is not None:
                    qk, pk, tk = _modulo_period(qk, pk, tk, period)
                rows.append(_gap_row(seq, name, qk, pk, level, tk))
    table = pd.DataFrame(rows, columns=list(GAP_COLUMNS))
    table.attrs["level"] = level
    return table


def _modulo_period(q: np.ndarray, p: np.ndarray, truth: float, period: float
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Amortized draws ``q (S,)``, NUTS draws ``p (chain, draw)`` and the truth of an angle,
    each moved by whole periods into the window of one period centred on the circular mean
    of ``p``."""
    center = float(_angle_center(p, period, (0, 1)).reshape(()))
    return (_around(q, center, period), _around(p, center, period),
            truth if math.isnan(truth) else float(_around(truth, center, period)))


def _gap_row(seq: int, name: str, q: np.ndarray, p: np.ndarray, level: float,
             truth: float) -> dict[str, Any]:
    """One table row from amortized draws ``q (S,)`` and NUTS draws ``p (chain, draw)``."""
    qm, qs, qlo, qhi = _summaries(q, level)
    pm, ps, plo, phi = _summaries(p.reshape(-1), level)
    return {"sequence": seq, "parameter": name, "truth": truth,
            "amortized_mean": qm, "amortized_sd": qs, "amortized_lo": qlo, "amortized_hi": qhi,
            "nuts_mean": pm, "nuts_sd": ps, "nuts_lo": plo, "nuts_hi": phi,
            **_diagnostics(p),
            "mean_gap_sd": (qm - pm) / ps if ps > 0 else math.nan,
            "sd_ratio": qs / ps if ps > 0 else math.nan}


def _diagnostics(p: np.ndarray) -> dict[str, float]:
    """R-hat, bulk and tail ESS of draws ``p (chain, draw)``, computed as ``arviz.summary``
    computes them (so that they match ``summary.csv``; NaN R-hat for a single chain)."""
    d = az.summary(p.astype(np.float64), kind="diagnostics", round_to="none").iloc[0]
    return {"r_hat": float(d["r_hat"]), "ess_bulk": float(d["ess_bulk"]),
            "ess_tail": float(d["ess_tail"])}


def plot_amortization_gap(
    mcmc: MCMC | az.InferenceData,
    amortized: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    parameter: str = "omega",
    truth: Sequence[float] | None = None,
    sequence_ids: Sequence[int] | None = None,
    level: float = 0.9,
    period: float | None = None,
) -> Path:
    """Two panels per sequence (columns) for a scalar ``parameter``.

    Top: both posteriors as density histograms (log scale) over the range of both, with
    their central ``level`` intervals and the true value if given. Bottom: a zoom on the
    NUTS posterior (the two often differ in width by orders of magnitude), with the
    amortized posterior as the Normal density of its mean and sd.

    Args:
        amortized: ``{site: (S, K)}`` guide draws (:func:`amortized_samples`).
        path: the image file to write (its folder is created).
        period: the period of an angle (e.g. pi for the galaxy's ``theta``): both posteriors
            and the truth are then drawn in the window of one period centred on the
            circular mean of the NUTS draws, as :func:`amortization_gap` compares them.
    """
    nuts = _nuts_draws(mcmc, parameter)
    if nuts.ndim != 3:
        raise ValueError(f"{parameter!r} is not a scalar site (draws of shape {nuts.shape})")
    q = np.asarray(amortized[parameter])
    K = nuts.shape[2]
    ids = _sequence_ids(sequence_ids, K)
    fig, axes = plt.subplots(2, K, figsize=(3.8 * K, 5.4), squeeze=False)
    for k in range(K):
        p, qk = nuts[:, :, k], q[:, k]
        true = math.nan if truth is None else float(truth[k])
        if period is not None:
            qk, p, true = _modulo_period(qk, p, true, period)
        p, true = p.reshape(-1), None if math.isnan(true) else true
        _plot_full(axes[0, k], p, qk, true, level)
        _plot_zoom(axes[1, k], p, qk, true)
        axes[0, k].set_title(f"sequence {ids[k]}", fontsize=9)
        axes[1, k].set_xlabel(parameter)
        axes[0, k].legend(fontsize=6)
    axes[0, 0].set_ylabel("density (log scale)")
    axes[1, 0].set_ylabel("density, NUTS range")
    return save_figure(fig, path)


def _plot_full(ax: plt.Axes, p: np.ndarray, q: np.ndarray, truth: float | None,
               level: float) -> None:
    lo_all = min(p.min(), q.min()) if truth is None else min(p.min(), q.min(), truth)
    hi_all = max(p.max(), q.max()) if truth is None else max(p.max(), q.max(), truth)
    bins = np.linspace(lo_all, hi_all, 80) if hi_all > lo_all else 10
    for draws, label, color in ((q, "amortized", "C1"), (p, "NUTS", "C0")):
        lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
        ax.hist(draws, bins=bins, density=True, histtype="stepfilled", alpha=0.45, color=color,
                label=f"{label} ({level:.0%}: {lo:.3g}..{hi:.3g})")
        ax.axvline(draws.mean(), color=color, lw=0.8, ls="--")
    if truth is not None:
        ax.axvline(truth, color="k", lw=1.2, label=f"truth {truth:.3g}")
    ax.set_yscale("log")


def _plot_zoom(ax: plt.Axes, p: np.ndarray, q: np.ndarray, truth: float | None) -> None:
    sd = p.std() if p.std() > 0 else 1e-6
    lo, hi = p.min() - 2 * sd, p.max() + 2 * sd
    ax.hist(p, bins=40, density=True, color="C0", alpha=0.6)
    grid = np.linspace(lo, hi, 200)
    m, s = q.mean(), max(q.std(), 1e-12)
    ax.plot(grid, np.exp(-0.5 * ((grid - m) / s) ** 2) / (s * math.sqrt(2 * math.pi)), color="C1")
    if truth is not None and lo <= truth <= hi:
        ax.axvline(truth, color="k", lw=1.2)
    ax.set_xlim(lo, hi)


# -- a run directory end to end ------------------------------------------------------------
def check_sequence_indices(sequences: Sequence[int], n: int) -> list[int]:
    """Positional indices into a split of ``n`` sequences: non-empty, integers, in
    ``[0, n)``, no repeats; ``ValueError`` naming the problem otherwise."""
    seqs = list(sequences)
    if not seqs:
        raise ValueError("no sequences chosen: give at least one sequence index")
    bad = [s for s in seqs if isinstance(s, bool) or not float(s).is_integer()]
    if bad:
        raise ValueError(f"sequence indices must be integers, got {bad}")
    out = [int(s) for s in seqs]
    outside = [s for s in out if not 0 <= s < n]
    if outside:
        raise ValueError(f"sequence indices {outside} out of range: the split has {n} "
                         f"sequences (valid indices 0..{n - 1})")
    if len(set(out)) != len(out):
        raise ValueError(f"sequence indices repeat: {out}")
    return out


def _observation_coords(ds: Any, model: PyroModule) -> dict[str, np.ndarray]:
    """The data set's coordinates of the observation dims of ``x`` (``ds["x"].dims`` after
    ``sequence``), where it has them and they are named as the model names them."""
    dims = ds["x"].dims[1:]
    if tuple(dims) != tuple(model.observation_dims):
        return {}
    return {d: ds[d].values for d in dims if d in ds.coords}


def nuts_report(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    *,
    split: str = "test",
    sequences: Sequence[int] = (0, 1, 2),
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    out_dir: str | Path | None = None,
    amortized_draws: int = 1000,
    level: float = 0.9,
    checkpoint: str = "best.pt",
    chain_method: str = "sequential",
    mass_matrix: str = "laplace",
    max_tree_depth: int = 8,
    progress: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """NUTS on a few sequences of a trained run, and the amortization gap of its guide.

    Loads ``run_dir`` (:func:`pyro_physvae.evaluate.load_run`) and ``<data_dir>/<split>.nc``
    (``data_dir`` defaults to the directory the run was trained on), runs :func:`run_nuts` on the
    chosen ``sequences`` (positional indices into the split) and writes to ``out_dir``
    (default ``run_dir/nuts-<split>``). The guide compared with NUTS is the run's amortized
    encoder (for a run trained with an AutoGuide, whose posterior is not amortized, the guide
    that ``Run.guide_for`` fits to these sequences):

    * ``nuts.nc``: the InferenceData (netCDF, :func:`nuts_to_inference_data`);
    * ``summary.csv``: :func:`posterior_summary` of all latents (``arviz.summary``: mean,
      sd, HDI, MCSE, ``ess_bulk``, ``ess_tail``, ``r_hat``; angles modulo their period);
    * ``amortization_gap.csv`` and ``.md``: :func:`amortization_gap` with the true values of
      the data set where it has them;
    * ``amortization_gap.png``: :func:`plot_amortization_gap` of each physics parameter
      (``amortization_gap_<name>.png`` if there are several, e.g. the galaxy's I0, A, e and
      theta). A run without physics parameters (``nn-only``; locomotion, whose physics
      latents ``y0`` and ``z_P`` are state latents) has its latents sampled all the same, a
      gap table without rows and no figure.

    The observations' dims and coordinates in ``nuts.nc`` are the data set's
    (``ds["x"].dims`` and coords) where they match ``model.observation_dims``. ``device``: where
    the model, the guide, the data and the chains live (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Returns:
        ``max_r_hat``, ``min_ess_bulk``, ``min_ess_tail`` (over all latent scalars),
        ``divergences`` (total), ``gap`` (the DataFrame), ``files`` (name -> path), ``guide``
        (``"amortized"`` or the AutoGuide kind) and the run's settings (``setting``,
        ``split``, ``sequences``, ``num_chains``, ..., ``time_s`` in seconds).

    Raises:
        ValueError: bad sequence indices or settings; FileNotFoundError: no run or data.
    """
    from pyro_physvae.evaluate import load_run

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run = load_run(run_dir, checkpoint, device)
    ds = run.load(split, data_dir)
    idx = check_sequence_indices(sequences, int(ds.sizes["sequence"]))
    ds = ds.isel(sequence=idx)
    x = run.system.observations(ds, device)
    ids = [int(v) for v in ds["sequence"].values] if "sequence" in ds.coords else idx
    guide = run.guide_for(x, seed=seed)
    mcmc = run_nuts(run.model, x, guide=guide, num_samples=num_samples,
                    warmup_steps=warmup_steps, num_chains=num_chains, seed=seed,
                    max_tree_depth=max_tree_depth, chain_method=chain_method,
                    mass_matrix=mass_matrix, progress=progress)
    idata = nuts_to_inference_data(mcmc, run.model, x, sequence_ids=ids,
                                   coords=_observation_coords(ds, run.model))
    physics = [p.name for p in run.model.physics_parameters]
    truth = {n: ds[n].values for n in physics if n in ds and ds[n].dims == ("sequence",)}
    amortized = amortized_samples(guide, x, physics, num_samples=amortized_draws, seed=seed)
    gap = amortization_gap(run.model, guide, x, idata, level=level, truth=truth,
                           sequence_ids=ids, amortized=amortized)

    out = Path(out_dir) if out_dir is not None else run_dir / f"nuts-{split}"
    out.mkdir(parents=True, exist_ok=True)
    files = {"nuts.nc": out / "nuts.nc", "summary.csv": out / "summary.csv",
             "amortization_gap.csv": out / "amortization_gap.csv",
             "amortization_gap.md": out / "amortization_gap.md"}
    atomic_write(files["nuts.nc"], idata.to_netcdf)
    summary = posterior_summary(idata, run.model, round_to=4)
    summary.to_csv(files["summary.csv"])
    gap.to_csv(files["amortization_gap.csv"], index=False)
    files["amortization_gap.md"].write_text(markdown_table(gap))
    for name in physics:
        fig = "amortization_gap.png" if len(physics) == 1 else f"amortization_gap_{name}.png"
        files[fig] = plot_amortization_gap(idata, amortized, out / fig, parameter=name,
                                           truth=truth.get(name), sequence_ids=ids, level=level,
                                           period=_periods(run.model).get(name))
    divergences = int(idata.sample_stats["diverging"].values.sum())
    return {"system": run.system.name, "setting": run.setting.value, "split": split,
            "guide": run.guide_kind, "sequences": ids, "num_chains": num_chains, "num_samples": num_samples,
            "warmup_steps": warmup_steps, "max_r_hat": float(summary["r_hat"].max()),
            "min_ess_bulk": float(summary["ess_bulk"].min()),
            "min_ess_tail": float(summary["ess_tail"].min()), "divergences": divergences,
            "gap": gap, "files": {k: str(v) for k, v in files.items()},
            "time_s": time.perf_counter() - t0}
