"""Posterior analysis: Predictive draws, ArviZ InferenceData, IWAE log-likelihood, calibration.

Everything here works on any model/guide pair of the zoo, and on AutoGuides, through Pyro's
effect handlers alone: the guide is traced for latent draws, the model is replayed on them
under an extra plate of draws, and the observation site's distribution gives both new data
(posterior predictive) and the pointwise log-likelihood. Regularizers never appear: they live
only inside :class:`~pyro_physvae.regularizers.PhysVAELoss`, not in models or guides.

Shapes: ``x`` is ``(N, *event)`` (pendulum: ``(N, T)``); draws have leading dims ``(S, N)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
import xarray as xr  # noqa: E402
from pyro.poutine.trace_struct import Trace  # noqa: E402
from pyro.poutine.util import site_is_subsample  # noqa: E402
from torch import Tensor  # noqa: E402

from pyro_physvae.autoguides import supports_subsampling  # noqa: E402
from pyro_physvae.validation import check_positive_int  # noqa: E402

#: Levels of the central intervals checked by :func:`calibration`.
CALIBRATION_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_DRAWS_PLATE = "_physvae_draws"
#: Deterministic curves kept by default: the full reconstruction and the physics-only part.
CURVES = ("x_mean", "x_P")


def _sample_sites(trace: Trace) -> dict[str, dict]:
    """The trace's sample sites, without the plates' subsample sites."""
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def _latent_names(trace: Trace) -> list[str]:
    return [name for name, site in _sample_sites(trace).items() if not site["is_observed"]]


def _row_chunks(guide: Callable, n: int, batch_size: int | None) -> list[Tensor | None]:
    """Row indices of each chunk, passed to model and guide as ``subsample``; ``[None]``
    (all rows at once) for guides that cannot subsample."""
    if batch_size is None or batch_size >= n or not supports_subsampling(guide):
        return [None]
    check_positive_int(batch_size, "batch_size")
    return list(torch.arange(n).split(batch_size))


def _chunk_args(x: Tensor, idx: Tensor | None, kwargs: dict) -> tuple[Tensor, dict]:
    """The rows of a chunk and the keyword arguments that select them."""
    if idx is None:
        return x, kwargs
    idx = idx.to(x.device)
    return x[idx], {**kwargs, "subsample": idx}


def _plate_nesting(model: Callable, guide: Callable, x: Tensor, **kwargs) -> int:
    """How many plates (batch dims) the model uses, from one trace of model and guide."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
    dims = [f.dim for tr in (guide_trace, model_trace) for site in _sample_sites(tr).values()
            for f in site["cond_indep_stack"] if f.vectorized]
    return -min(dims, default=0)


def _traces_over_draws(model: Callable, guide: Callable, x: Tensor, num_draws: int,
                       nesting: int, **kwargs) -> tuple[Trace, Trace]:
    """Guide and model traces with ``num_draws`` draws in a plate left of the model's."""
    with pyro.plate(_DRAWS_PLATE, num_draws, dim=-(nesting + 1), device=x.device):
        guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
    return guide_trace, model_trace


@torch.no_grad()
def sample_posterior(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_samples: int = 100,
    *,
    obs_site: str = "x",
    batch_size: int | None = 250,
    seed: int = 0,
    keep: Iterable[str] = CURVES,
    **kwargs,
) -> dict[str, Tensor]:
    """Posterior draws of the latents, the model's recorded curves and replicated data.

    The model is run on ``x`` itself (so that it reads its initial state from the data) with
    the latents replayed from the guide; ``obs_site``'s distribution then gives a replicate of
    the data and the log-likelihood of the observed rows.

    Args:
        x: observations ``(N, *event)``.
        num_samples: draws S per row.
        batch_size: rows per chunk (bounds memory), selected by passing ``subsample=`` row
            indices to model and guide, as the models of the zoo and ``AutoNormal`` accept;
            ``None`` (or a guide that cannot subsample) runs all rows at once.
        keep: deterministic sites (curves) to return, where the model has them.
        kwargs: further keyword arguments of model and guide.

    Returns:
        Tensors with leading dims ``(S, N)``: every latent site, the kept deterministic sites,
        ``obs_site`` (posterior-predictive replicates, shape of ``x``) and
        ``"log_likelihood"`` (``(S, N)``, summed over the event dims).
    """
    check_positive_int(num_samples, "num_samples")
    keep = tuple(keep)
    pyro.set_rng_seed(seed)
    row_chunks = _row_chunks(guide, x.shape[0], batch_size)
    nesting = _plate_nesting(model, guide, x, **_chunk_args(x, row_chunks[0], kwargs)[1])
    chunks: list[dict[str, Tensor]] = []
    for idx in row_chunks:
        xb, kw = _chunk_args(x, idx, kwargs)
        _, model_trace = _traces_over_draws(model, guide, x, num_samples, nesting, **kw)
        if obs_site not in model_trace.nodes:
            raise ValueError(f"the model has no observation site {obs_site!r}")
        out = {name: model_trace.nodes[name]["value"] for name in _latent_names(model_trace)}
        for name, site in _sample_sites(model_trace).items():
            if site["infer"].get("_deterministic") and name in keep:
                out[name] = _with_draws(site)
        fn = model_trace.nodes[obs_site]["fn"]
        out[obs_site] = fn.sample()
        out["log_likelihood"] = fn.log_prob(xb)
        chunks.append(out)
    return {k: torch.cat([c[k] for c in chunks], dim=1) for k in chunks[0]}


def _with_draws(site: dict) -> Tensor:
    """A recorded value broadcast to its site's full shape, so that a value that does not
    depend on the latents (e.g. the initial state) also gets the leading draw dim."""
    fn = site["fn"]
    return site["value"].expand(fn.batch_shape + fn.event_shape)


@torch.no_grad()
def iwae_log_likelihood(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_particles: int = 100,
    *,
    batch_size: int | None = 250,
    seed: int = 0,
    **kwargs,
) -> Tensor:
    """Importance-weighted estimate of ``log p(x_i)`` per row, with the guide as proposal.

    ``log (1/K) sum_k p(x_i, z_k) / q(z_k | x_i)`` with ``z_k ~ q(. | x_i)``: a lower bound
    of ``log p(x_i)`` in expectation that tightens as ``K`` grows (Burda et al., 2016).
    Every site's log-density enters unscaled, so minibatch scales do not matter.

    Returns:
        ``(N,)`` log-likelihood estimates [nats per sequence].
    """
    check_positive_int(num_particles, "num_particles")
    pyro.set_rng_seed(seed)
    row_chunks = _row_chunks(guide, x.shape[0], batch_size)
    nesting = _plate_nesting(model, guide, x, **_chunk_args(x, row_chunks[0], kwargs)[1])
    out = []
    for idx in row_chunks:
        xb, kw = _chunk_args(x, idx, kwargs)
        guide_trace, model_trace = _traces_over_draws(model, guide, x, num_particles, nesting, **kw)
        log_w = _summed_log_prob(model_trace, xb.shape[0]) - _summed_log_prob(guide_trace, xb.shape[0])
        out.append(torch.logsumexp(log_w, 0) - math.log(num_particles))
    return torch.cat(out)


def _summed_log_prob(trace: Trace, n: int) -> Tensor:
    """Sum of every sample site's log-density as ``(K, n)``; sites outside the data plate
    (``(K, 1)``) broadcast, deterministic and auxiliary sites are masked to zero."""
    total = None  # on the sites' device (a CPU zero would stay on the CPU for no site)
    for site in _sample_sites(trace).values():
        lp = site["fn"].log_prob(site["value"])
        if site["mask"] is not None and site["mask"] is not True:
            lp = lp * site["mask"]
        total = lp if total is None else total + lp
    if total is None:
        return torch.zeros(())
    return total.reshape(total.shape[0], -1).expand(-1, n) if total.dim() else total


# -- InferenceData ---------------------------------------------------------------------------
def _event_dims(name: str, shape: Sequence[int]) -> list[str]:
    return [f"{name}_dim" if len(shape) == 1 else f"{name}_dim_{i}" for i in range(len(shape))]


def to_inference_data(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    dataset: xr.Dataset | None = None,
    num_samples: int = 100,
    obs_site: str = "x",
    curves: Iterable[str] = CURVES,
    seed: int = 0,
    batch_size: int | None = 250,
    **kwargs,
) -> az.InferenceData:
    """ArviZ InferenceData of a trained model/guide pair on observations ``x``.

    Groups:
        ``posterior``: every latent site (physics parameters and auxiliary latents) and the
            requested deterministic ``curves``; dims ``(chain=1, draw, sequence, ...)``.
        ``posterior_predictive``: replicated ``obs_site``.
        ``log_likelihood``: ``obs_site``'s log-density per sequence (summed over time).
        ``observed_data``: ``x``.
        ``constant_data``: the data set's other variables (initial state, true parameters)
            and its coordinates (the time axis), when ``dataset`` is given.

    Args:
        dataset: the xarray data set ``x`` came from; its dims and coordinates name the
            InferenceData's (otherwise ``sequence`` and ``{obs_site}_dim_i``).
        curves: deterministic sites to keep in the posterior group (``(S, N, T)`` each).
    """
    curves = tuple(curves)
    draws = sample_posterior(model, guide, x, num_samples, obs_site=obs_site, seed=seed,
                             batch_size=batch_size, keep=curves, **kwargs)
    return draws_to_inference_data(draws, x, dataset=dataset, obs_site=obs_site, curves=curves)


def draws_to_inference_data(
    draws: dict[str, Tensor],
    x: Tensor,
    *,
    dataset: xr.Dataset | None = None,
    obs_site: str = "x",
    curves: Iterable[str] = CURVES,
    chains: int = 1,
    noise: NoiseEstimate | None = None,
) -> az.InferenceData:
    """The InferenceData of :func:`to_inference_data` from draws of :func:`sample_posterior`
    (or of :func:`with_noise`).

    The latents and ``log_likelihood`` cover the ``N`` rows; the replicates ``obs_site`` and
    the ``curves`` may cover the first ``K <= N`` rows only, with ``x`` those ``K`` rows (a
    streamed diagnosis of data larger than memory keeps every draw of the latents, not of
    the curves). With ``K < N``, the curves go to the ``posterior_predictive`` group beside
    the replicates, ``observed_data`` holds the ``K`` rows, and the groups' attributes say so.

    Args:
        chains: the ``S`` independent draws are split into this many chains of ``S / chains``
            draws (``S`` must be divisible by it), so that ArviZ's chain-based diagnostics
            (``az.summary``'s R-hat and ESS) have the at least two chains of at least four
            draws they validate; for independent draws R-hat is 1 and ESS about ``S`` up to
            noise. 1: one chain (``az.summary(..., kind="stats")`` is then the summary to ask
            for). See :func:`split_chains`.
        noise: the fitted noise that ``draws``' predictive and log-likelihood use (see
            :func:`with_noise`), recorded in the groups' attributes. The model's own
            (raw) log-likelihood, ``draws["log_likelihood_raw"]`` where present, goes to the
            posterior group as ``log_likelihood_raw``, so that the ``log_likelihood`` group
            holds one variable (``az.loo`` and ``az.compare`` need no ``var_name``); the raw
            replicates ``<obs_site>_raw`` are left out.
    """
    check_positive_int(chains, "chains")
    n_draws = next(iter(draws.values())).shape[0]
    if n_draws % chains:
        raise ValueError(f"{n_draws} draws cannot be split into {chains} chains of equal length")
    curves = tuple(c for c in curves if c in draws)
    if dataset is not None and obs_site in dataset:
        data_dims = list(dataset[obs_site].dims)
        coords = {d: dataset[d].values for d in data_dims if d in dataset.coords}
    else:
        data_dims = ["sequence", *_event_dims(obs_site, x.shape[1:])]
        coords = {}
    row_dim = data_dims[0]
    n_rows, n_shown = draws["log_likelihood"].shape[1], x.shape[0]
    if n_shown > n_rows or draws[obs_site].shape[1] != n_shown:
        raise ValueError(f"the replicates cover {draws[obs_site].shape[1]} rows and x {n_shown}: "
                         f"both must be the first K of the {n_rows} rows of the latents")
    partial = n_shown < n_rows
    coords.setdefault(row_dim, np.arange(n_rows))
    shown_coords = {**coords, row_dim: coords[row_dim][:n_shown]}

    def with_chains(value: Tensor) -> np.ndarray:
        value = value.detach().cpu().numpy()
        return value.reshape(chains, n_draws // chains, *value.shape[1:])

    def as_array(name: str, value: Tensor) -> xr.DataArray:
        value = with_chains(value)
        extra = value.shape[3:]
        if name in (obs_site, *curves) and extra == tuple(x.shape[1:]):
            dims = ["chain", "draw", *data_dims]
        else:
            dims = ["chain", "draw", row_dim, *_event_dims(name, extra)]
        return xr.DataArray(value, dims=dims)

    skip = (obs_site, f"{obs_site}_raw", "log_likelihood", "log_likelihood_raw", *(curves if partial else ()))
    posterior = {k: as_array(k, v) for k, v in draws.items() if k not in skip}
    if "log_likelihood_raw" in draws:
        posterior["log_likelihood_raw"] = xr.DataArray(
            with_chains(draws["log_likelihood_raw"]), dims=["chain", "draw", row_dim],
            attrs={"long_name": f"log-likelihood of {obs_site} per sequence with the model's own "
                                "(training) noise scale: raw", "units": "nats"})
    noted = {"observation_noise": "fitted after training" if noise is not None else "the model's own",
             "draws": f"{n_draws} independent posterior draws in {chains} chain(s)"}
    if noise is not None:
        noted["noise_sigma"] = [float(v) for v in noise.sigma]
        noted["noise_channels"] = "; ".join(noise.channel_names)
        noted["noise_method"] = noise.method
    if partial:
        noted["predictive_sequences"] = (f"the replicates, the curves and the observed data cover the "
                                         f"first {n_shown} of the {n_rows} sequences")
    shown = (obs_site, *(curves if partial else ()))
    predictive = _dataset({k: as_array(k, draws[k]) for k in shown}, shown_coords)
    loglik = _dataset({obs_site: xr.DataArray(with_chains(draws["log_likelihood"]),
                                              dims=["chain", "draw", row_dim])}, coords)
    idata = az.InferenceData(
        posterior=_dataset(posterior, coords),
        posterior_predictive=predictive.assign_attrs(noted),
        log_likelihood=loglik.assign_attrs(noted),
        observed_data=xr.Dataset({obs_site: xr.DataArray(x.detach().cpu().numpy(), dims=data_dims)},
                                 coords=shown_coords).assign_attrs(
            {k: v for k, v in noted.items() if k == "predictive_sequences"}),
    )
    if dataset is not None:
        const = dataset.drop_vars([obs_site], errors="ignore").reset_coords(drop=False)
        const = const.assign_coords({d: dataset[d].values for d in const.dims if d in dataset.coords})
        idata.add_groups(constant_data=const)
    return idata


def _dataset(arrays: dict[str, xr.DataArray], coords: dict[str, np.ndarray]) -> xr.Dataset:
    ds = xr.Dataset(arrays)
    ds = ds.assign_coords({"chain": np.arange(ds.sizes["chain"]), "draw": np.arange(ds.sizes["draw"]),
                           **{d: c for d, c in coords.items() if d in ds.dims}})
    return ds


# -- observation noise fitted after training -----------------------------------------------------
#: Observation dimensions over which one noise scale is shared (pooled): the time axis and
#: spatial axes. Every other observation dimension (a gait's ``joint``, an image's ``band``)
#: is a channel with its own noise scale.
POOLED_DIMS = ("time", "space", "row", "col")
#: Estimators of the observation noise: ``"ml"`` (default) and ``"plugin"``; see
#: :func:`estimate_noise`.
NOISE_METHODS = ("ml", "plugin")


def noise_channel_axes(event_shape: Sequence[int], observation_dims: Sequence[str] | None = None
                       ) -> tuple[int, ...]:
    """The axes of one observation ``(*event)`` that are channels, each with its own noise.

    With the model's ``observation_dims`` (e.g. ``("joint", "time")``), the axes whose names
    are not in :data:`POOLED_DIMS` (so: one channel for a series ``("time",)`` or a field
    ``("space", "time")``, one per joint for locomotion, one per band for a galaxy image).
    Without names, the convention of :func:`pyro_physvae.figures.as_channels`: every axis but
    the last (time) one.
    """
    rank = len(event_shape)
    if observation_dims is None:
        return tuple(range(rank - 1))
    if len(observation_dims) != rank:
        raise ValueError(f"observation_dims {tuple(observation_dims)} do not name the {rank} "
                         f"event dimension(s) of shape {tuple(event_shape)}")
    return tuple(i for i, d in enumerate(observation_dims) if d not in POOLED_DIMS)


@dataclass
class NoiseEstimate:
    """The Gaussian observation noise fitted to a trained model's residuals, per channel.

    Attributes:
        sigma_ml: ``(C,)`` maximum-likelihood scale, ``sqrt(E_q[(x - x_mean(z))^2])``, the
            square averaged over posterior draws, sequences and the pooled axes [units of x].
        sigma_plugin: ``(C,)`` root mean squared residual of the posterior-mean
            reconstruction, ``sqrt(mean (x - E_q[x_mean])^2)`` [units of x]. It is smaller:
            ``sigma_ml^2 = sigma_plugin^2 + (posterior variance of x_mean)``.
        method: which of the two :attr:`sigma` is (:data:`NOISE_METHODS`).
        event_shape: shape of one observation.
        channel_axes: the event axes that are channels (:func:`noise_channel_axes`).
        channel_names: a label per channel (``"joint 0"``, ...; ``"all"`` for one channel).
        sigma_model: the model's own (training) noise scale, for reference.
        n_sequences: sequences the estimate comes from; ``split``: their split.
    """

    sigma_ml: Tensor
    sigma_plugin: Tensor
    method: str
    event_shape: tuple[int, ...]
    channel_axes: tuple[int, ...]
    channel_names: tuple[str, ...]
    sigma_model: float
    n_sequences: int
    split: str | None = None

    def __post_init__(self) -> None:
        if self.method not in NOISE_METHODS:
            raise ValueError(f"noise method must be one of {NOISE_METHODS}, got {self.method!r}")

    @property
    def sigma(self) -> Tensor:
        """``(C,)`` the scale of the chosen :attr:`method`."""
        return self.sigma_ml if self.method == "ml" else self.sigma_plugin

    def scale(self) -> Tensor:
        """:attr:`sigma` shaped to broadcast against one observation ``(*event)``: the
        channel axes keep their sizes, the pooled axes are 1."""
        shape = [s if i in self.channel_axes else 1 for i, s in enumerate(self.event_shape)]
        return self.sigma.reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: both estimates per channel, the one used and the model's."""
        def per_channel(v: Tensor) -> dict[str, float]:
            return {c: float(s) for c, s in zip(self.channel_names, v, strict=True)}

        return {"method": self.method, "fitted_on": self.split, "n_sequences": self.n_sequences,
                "sigma": per_channel(self.sigma), "sigma_ml": per_channel(self.sigma_ml),
                "sigma_plugin": per_channel(self.sigma_plugin), "sigma_model_raw": self.sigma_model}


def _channel_names(event_shape: Sequence[int], channel_axes: Sequence[int],
                   observation_dims: Sequence[str] | None) -> tuple[str, ...]:
    if not channel_axes:
        return ("all",)
    names = [observation_dims[a] if observation_dims else f"axis{a}" for a in channel_axes]
    sizes = [int(event_shape[a]) for a in channel_axes]
    return tuple(", ".join(f"{n} {i}" for n, i in zip(names, idx, strict=True))
                 for idx in np.ndindex(*sizes))


def residual_moments(x: Tensor, x_mean: Tensor, channel_axes: Sequence[int]) -> Tensor:
    """Mean squared residual per sequence and channel, ``(N, C)``.

    Args:
        x: observations ``(N, *event)``.
        x_mean: reconstructions ``(N, *event)`` or draws of them ``(S, N, *event)`` (the
            square is then averaged over the draws too).
        channel_axes: event axes kept as channels (:func:`noise_channel_axes`).
    """
    sq = (x - x_mean).pow(2)
    if x_mean.dim() == x.dim() + 1:
        sq = sq.mean(0)
    return pooled_means(sq, channel_axes)


def pooled_means(values: Tensor, channel_axes: Sequence[int]) -> Tensor:
    """Per row and channel ``(N, C)``, the mean of ``values (N, *event)`` over the event axes
    that are not ``channel_axes`` (the channels flattened in order)."""
    keep = [1 + a for a in channel_axes]
    pooled = [1 + a for a in range(values.dim() - 1) if a not in channel_axes]
    v = values.permute(0, *keep, *pooled)
    return v.reshape(v.shape[0], max(1, int(np.prod([values.shape[k] for k in keep]))), -1).mean(-1)


def noise_from_moments(ml: Tensor, plugin: Tensor, *, event_shape: Sequence[int],
                       channel_axes: Sequence[int], observation_dims: Sequence[str] | None = None,
                       method: str = "ml", sigma_model: float = math.nan,
                       split: str | None = None) -> NoiseEstimate:
    """A :class:`NoiseEstimate` from per-sequence moments ``(N, C)`` of
    :func:`residual_moments` (over draws for ``ml``, of the posterior mean for ``plugin``),
    e.g. accumulated chunk by chunk."""
    return NoiseEstimate(
        sigma_ml=ml.mean(0).sqrt(), sigma_plugin=plugin.mean(0).sqrt(), method=method,
        event_shape=tuple(int(s) for s in event_shape), channel_axes=tuple(channel_axes),
        channel_names=_channel_names(event_shape, channel_axes, observation_dims),
        sigma_model=float(sigma_model), n_sequences=int(ml.shape[0]), split=split)


def estimate_noise(x: Tensor, x_mean: Tensor, *, observation_dims: Sequence[str] | None = None,
                   method: str = "ml", sigma_model: float = math.nan,
                   split: str | None = None) -> NoiseEstimate:
    """The observation noise per channel, fitted to the residuals of posterior draws.

    Fit it on a split the model was not trained on (the validation split) and use it for
    the posterior predictive and the log-likelihood of another (:func:`with_noise`). Training
    keeps its fixed reference noise, which helps the physics but is far below a trained
    model's misfit, so that replicates and pointwise log-likelihoods with it are useless.

    Two estimates are computed, per channel (:func:`noise_channel_axes`):

    * ``"ml"`` (the default): ``sigma^2 = E_q[(x - x_mean(z))^2]`` averaged over the draws,
      sequences and pooled axes. It maximises the expected log-likelihood
      ``E_q[log Normal(x | x_mean(z), sigma)]`` over ``sigma``;
    * ``"plugin"``: the RMS residual of the posterior-mean reconstruction ``E_q[x_mean]``.

    The default was chosen by the 90% predictive coverage on the test split of the
    benchmark runs (``benchmarks/calibration.py``, ``benchmarks/RESULTS.md``, "Calibrated
    posteriors"): pendulum 0.915 with either, advection-diffusion 0.888 (ml) against 0.887
    (plugin). The two differ by the posterior variance of ``x_mean``, which is small for
    these amortized posteriors; ``ml`` is the likelihood's own choice.

    Args:
        x: observations ``(N, *event)``.
        x_mean: draws of the reconstruction ``(S, N, *event)``.
        observation_dims: the model's ``observation_dims``, which decide the channels.
        method: the estimate :attr:`NoiseEstimate.sigma` returns.
        sigma_model: the model's training noise scale (recorded for reference).
        split: the split ``x`` comes from (recorded).
    """
    if x_mean.dim() != x.dim() + 1 or x_mean.shape[1:] != x.shape:
        raise ValueError(f"need draws x_mean (S, *x.shape) for x {tuple(x.shape)}, got "
                         f"{tuple(x_mean.shape)}")
    axes = noise_channel_axes(x.shape[1:], observation_dims)
    return noise_from_moments(residual_moments(x, x_mean, axes), residual_moments(x, x_mean.mean(0), axes),
                              event_shape=x.shape[1:], channel_axes=axes, observation_dims=observation_dims,
                              method=method, sigma_model=sigma_model, split=split)


@torch.no_grad()
def with_noise(draws: dict[str, Tensor], x: Tensor, noise: NoiseEstimate | None, *,
               obs_site: str = "x", seed: int = 0) -> dict[str, Tensor]:
    """Draws of :func:`sample_posterior` with the posterior predictive and the pointwise
    log-likelihood recomputed with the fitted noise ``noise`` (the Normal observation model
    around ``x_mean``): ``x_rep ~ Normal(x_mean, sigma)`` replaces ``draws[obs_site]`` and
    ``sum_event log Normal(x | x_mean, sigma)`` ``(S, N)`` replaces ``"log_likelihood"``; the
    model's own are kept as ``"<obs_site>_raw"`` and ``"log_likelihood_raw"``. ``None``: the
    draws as they are (no ``_raw`` entries)."""
    if noise is None:
        return dict(draws)
    if tuple(x.shape[1:]) != noise.event_shape:
        raise ValueError(f"the noise was fitted to observations of shape {noise.event_shape}, "
                         f"not {tuple(x.shape[1:])}")
    mean = draws["x_mean"]
    scale = noise.scale().to(dtype=mean.dtype, device=mean.device)
    gen = torch.Generator(device=mean.device).manual_seed(seed)
    out = dict(draws)
    out[f"{obs_site}_raw"], out["log_likelihood_raw"] = draws[obs_site], draws["log_likelihood"]
    out[obs_site] = mean + scale * torch.randn(mean.shape, generator=gen, dtype=mean.dtype,
                                               device=mean.device)
    event = tuple(range(2, mean.dim()))
    out["log_likelihood"] = torch.distributions.Normal(mean, scale).log_prob(x).sum(event)
    return out


#: Relative efficiency of independent posterior draws (those of a guide, split into chains
#: only for ArviZ's shape checks): their effective sample size is their number.
INDEPENDENT_DRAWS_REFF = 1.0


def split_chains(n_draws: int, chains: int = 4, min_draws: int = 4) -> int:
    """The most chains, up to ``chains``, into which ``n_draws`` independent draws split
    evenly with at least ``min_draws`` draws each (ArviZ's shape validation for R-hat and
    ESS wants two chains of four draws); 1 where none does."""
    for c in range(min(chains, n_draws // min_draws), 1, -1):
        if n_draws % c == 0:
            return c
    return 1


def psis_loo(idata: az.InferenceData, var_name: str | None = None,
             reff: float | None = INDEPENDENT_DRAWS_REFF) -> az.ELPDData:
    """``az.loo`` of an InferenceData's pointwise (per-sequence) log-likelihood, pointwise,
    with ArviZ's warnings about large ``k`` silenced (:func:`loo_report` gives their shares).

    ``reff``: the relative efficiency of the draws, 1 for the independent draws of a guide
    (the default, :data:`INDEPENDENT_DRAWS_REFF`); ``None`` lets ArviZ estimate it from the
    chains, as MCMC draws need (ArviZ then computes an effective sample size for every
    element of the posterior group: minutes for a thousand fields with their curves).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return az.loo(idata, pointwise=True, var_name=var_name, reff=reff)


def loo_report(idata: az.InferenceData, var_name: str | None = None,
               reff: float | None = INDEPENDENT_DRAWS_REFF,
               loo: az.ELPDData | None = None) -> dict[str, float]:
    """PSIS-LOO and WAIC of an InferenceData's pointwise (per-sequence) log-likelihood.

    ``reff`` as in :func:`psis_loo`; ``loo``: that function's result for the same
    ``idata`` and ``var_name``, if already computed.

    Returns ``elpd_loo`` with its standard error ``se_loo`` and ``p_loo``; the shares of
    sequences whose Pareto shape ``k`` exceeds 0.7 (``pareto_k_gt_0.7``: the importance
    weights are unreliable there) and 1 (``pareto_k_gt_1``); ``elpd_waic``, ``se_waic``,
    ``p_waic``; ``n_sequences`` and ``n_draws`` [nats per data set, not per sequence].
    ArviZ's warnings about large ``k`` or WAIC's variance are silenced: the shares say it.
    """
    import warnings

    loo = psis_loo(idata, var_name, reff) if loo is None else loo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        waic = az.waic(idata, var_name=var_name)
    k = np.asarray(loo.pareto_k)
    return {"elpd_loo": float(loo.elpd_loo), "se_loo": float(loo.se), "p_loo": float(loo.p_loo),
            "pareto_k_gt_0.7": float(np.mean(k > 0.7)), "pareto_k_gt_1": float(np.mean(k > 1.0)),
            "pareto_k_max": float(np.nanmax(k)),
            "elpd_waic": float(waic.elpd_waic), "se_waic": float(waic.se), "p_waic": float(waic.p_waic),
            "n_sequences": int(k.size), "n_draws": int(loo.n_samples)}


def raw_loo_report(idata: az.InferenceData) -> dict[str, float] | None:
    """:func:`loo_report` of the raw (model-noise) log-likelihood that
    :func:`draws_to_inference_data` keeps in the posterior group; ``None`` if it has none."""
    if "log_likelihood_raw" not in idata.posterior:
        return None
    raw = az.InferenceData(posterior=idata.posterior[["log_likelihood_raw"]],
                           log_likelihood=idata.posterior[["log_likelihood_raw"]])
    return loo_report(raw)


def plot_pareto_k(data: az.InferenceData | az.ELPDData, path, title: str = "",
                  reff: float | None = INDEPENDENT_DRAWS_REFF) -> None:
    """The Pareto shape ``k`` of each sequence's PSIS-LOO weights (``az.plot_khat``), with
    the 0.7 and 1 thresholds. ``data``: the InferenceData (PSIS-LOO is computed with
    ``reff`` as in :func:`psis_loo`) or :func:`psis_loo`'s result."""
    loo = data if isinstance(data, az.ELPDData) else psis_loo(data, reff=reff)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    az.plot_khat(loo, ax=ax, show_hlines=True, hlines_kwargs={"hlines": [0.7, 1.0], "color": "C3"})
    ax.set_xlabel("sequence (index in the split)")
    ax.set_ylabel("Pareto shape k (dimensionless)")
    ax.set_title(title or f"PSIS-LOO: {np.mean(np.asarray(loo.pareto_k) > 0.7):.1%} of k > 0.7",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- calibration ------------------------------------------------------------------------------
def central_interval(samples: Tensor, level: float) -> tuple[Tensor, Tensor]:
    """Central ``level`` interval over the first (draw) dimension of ``samples``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype, device=samples.device)
    lo, hi = torch.quantile(samples, q, dim=0)
    return lo, hi


def calibration(samples: Tensor, truth: Tensor | np.ndarray,
                levels: Sequence[float] = CALIBRATION_LEVELS,
                widen: float = 1.0) -> xr.Dataset:
    """Coverage of the truth by central posterior intervals at several levels.

    Args:
        samples: posterior draws ``(S, N)`` of one scalar parameter.
        truth: true values ``(N,)``.
        widen: intervals are stretched about the posterior median by this factor (see
            :func:`interval_widening`); 1 reports the posterior as it is.

    Returns:
        Dataset over ``level`` with ``coverage`` (fraction of the N truths inside) and
        ``mean_width`` (in the parameter's units).
    """
    truth = torch.as_tensor(np.asarray(truth), dtype=samples.dtype, device=samples.device)
    if samples.dim() != 2 or truth.shape != samples.shape[1:]:
        raise ValueError(f"need samples (S, N) and truth (N,), got {tuple(samples.shape)} and "
                         f"{tuple(truth.shape)}")
    if not widen > 0:
        raise ValueError(f"widen must be positive, got {widen}")
    median = samples.median(0).values
    coverage, width = [], []
    for level in levels:
        lo, hi = central_interval(samples, level)
        lo, hi = median + widen * (lo - median), median + widen * (hi - median)
        coverage.append(float(((truth >= lo) & (truth <= hi)).float().mean()))
        width.append(float((hi - lo).mean()))
    return xr.Dataset({"coverage": ("level", coverage), "mean_width": ("level", width)},
                      coords={"level": list(levels)}, attrs={"widen": widen, "n": int(truth.numel())})


def interval_widening(samples: Tensor, truth: Tensor | np.ndarray, level: float = 0.9) -> float:
    """The factor by which central ``level`` intervals must be stretched about the median to
    cover ``level`` of the truths (split-conformal recalibration on held-out data).

    With ``n`` rows, the ``ceil((n + 1) level) / n`` quantile of the per-row factors is taken,
    so the stretched intervals cover new exchangeable rows with probability at least
    ``level`` (Vovk et al., 2005). Use a split other than the one you report on.
    """
    truth = torch.as_tensor(np.asarray(truth), dtype=samples.dtype, device=samples.device)
    median = samples.median(0).values
    lo, hi = central_interval(samples, level)
    half = torch.where(truth >= median, hi - median, median - lo).clamp_min(1e-12)
    factors = ((truth - median).abs() / half).sort().values
    n = factors.numel()
    k = min(n, math.ceil((n + 1) * level)) - 1
    return max(float(factors[k]), 1e-6)


#: Split-conformal recalibrations of a scalar parameter's posterior intervals (see
#: :func:`fit_interval_calibration`).
INTERVAL_METHODS = ("residual", "widen", "rescale+widen", "seq-rescale+widen")
#: The default, chosen by interval width at 90% coverage on the benchmark runs' test splits
#: (``benchmarks/calibration.py``; ``benchmarks/RESULTS.md``, "Calibrated posteriors").
DEFAULT_INTERVAL_METHOD = "residual"


def _wrap(value: Tensor, period: float) -> Tensor:
    """Angles (differences) to ``[-period / 2, period / 2)``."""
    return torch.remainder(value + period / 2, period) - period / 2


def _conformal_quantile(scores: Tensor, level: float) -> float:
    """The ``ceil((n + 1) level)``-th smallest of ``n`` scores (the largest if that is past
    ``n``): a new exchangeable score is below it with probability at least ``level``."""
    v = scores.flatten().sort().values
    n = v.numel()
    return float(v[min(n, math.ceil((n + 1) * level)) - 1])


def posterior_offsets(samples: Tensor, truth: Tensor | np.ndarray | None = None,
                      period: float | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Draws ``(S, N)`` and truths ``(N,)`` as offsets from each row's centre.

    Returns ``(centre (N,), draws - centre (S, N), truth - centre (N,) or None)``; the centre
    is the posterior median, or for an angle with ``period`` its circular mean, the offsets
    then wrapped to ``[-period / 2, period / 2)``.
    """
    if samples.dim() != 2:
        raise ValueError(f"need draws (S, N) of one scalar parameter, got {tuple(samples.shape)}")
    if period is None:
        centre = samples.median(0).values
        rel = samples - centre
    else:
        phase = 2 * math.pi * samples / period
        centre = torch.atan2(torch.sin(phase).mean(0), torch.cos(phase).mean(0)) * period / (2 * math.pi)
        rel = _wrap(samples - centre, period)
    if truth is None:
        return centre, rel, None
    truth = torch.as_tensor(np.asarray(truth), dtype=samples.dtype, device=samples.device)
    if truth.shape != samples.shape[1:]:
        raise ValueError(f"need truth (N,) for draws (S, N), got {tuple(truth.shape)} and "
                         f"{tuple(samples.shape)}")
    offset = truth - centre
    return centre, rel, offset if period is None else _wrap(offset, period)


@dataclass
class IntervalCalibration:
    """A split-conformal recalibration of central posterior intervals, fitted on held-out
    truths (:func:`fit_interval_calibration`), for one scalar parameter and one ``level``.

    Methods (:data:`INTERVAL_METHODS`), with ``c`` the row's posterior median (an angle's
    circular mean) and ``[c + l, c + h]`` its central ``level`` interval:

    * ``"residual"``: ``[c + lower, c + upper]``, the lower and upper conformal quantiles of
      the signed errors ``truth - c`` (each tail at most ``(1 - level) / 2``): the same width
      for every row, centred where the errors are (it corrects a shared bias);
    * ``"widen"``: ``[c + factor l, c + factor h]``, the row's interval stretched about ``c``;
    * ``"rescale+widen"``: the spread first multiplied by ``rescale`` (the ratio of the
      fitted to the model's noise scale), then widened. A common rescaling is absorbed by
      the conformal factor: the intervals are those of ``"widen"``, reported to show it;
    * ``"seq-rescale+widen"``: the spread of each row multiplied by its own ratio of RMS
      residual to the model's noise scale (``seq_scale``), then widened.

    Attributes ``factor``, ``rescale``, ``lower``, ``upper`` are in the parameter's units
    (``factor`` and ``rescale`` dimensionless); ``n``: calibration rows; ``split``: theirs.
    """

    method: str
    level: float
    n: int
    factor: float = 1.0
    rescale: float = 1.0
    lower: float = 0.0
    upper: float = 0.0
    split: str | None = None

    def offsets(self, rel: Tensor, seq_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Interval bounds ``(N,)`` as offsets from the centre, from draws' offsets
        ``rel (S, N)`` (:func:`posterior_offsets`)."""
        n = rel.shape[1]
        if self.method == "residual":
            return rel.new_full((n,), self.lower), rel.new_full((n,), self.upper)
        lo, hi = central_interval(rel, self.level)
        scale = self.factor * self.rescale
        if self.method == "seq-rescale+widen":
            if seq_scale is None:
                raise ValueError("seq-rescale+widen needs the rows' seq_scale")
            scale = scale * seq_scale.to(rel)
        return lo * scale, hi * scale

    def to_dict(self) -> dict[str, Any]:
        keys = {"residual": ("lower", "upper"), "widen": ("factor",),
                "rescale+widen": ("rescale", "factor"), "seq-rescale+widen": ("factor",)}[self.method]
        return {"method": self.method, "level": self.level, "fitted_on": self.split, "n": self.n,
                **{k: getattr(self, k) for k in keys}}


def fit_interval_calibration(samples: Tensor, truth: Tensor | np.ndarray, *, level: float = 0.9,
                             method: str = DEFAULT_INTERVAL_METHOD, period: float | None = None,
                             rescale: float = 1.0, seq_scale: Tensor | None = None,
                             split: str | None = None) -> IntervalCalibration:
    """Fit a split-conformal recalibration (:class:`IntervalCalibration`) of the central
    ``level`` posterior intervals on rows with known truths: posterior draws ``(S, N)`` of
    one scalar parameter and its true values ``(N,)``, from a split other than the one the
    intervals are reported on. The recalibrated intervals then cover new exchangeable rows'
    truths with probability at least ``level``.

    Args:
        period: the period of an angle (offsets are wrapped); ``None`` for a plain parameter.
        rescale: ``"rescale+widen"``'s common factor of the spread.
        seq_scale: ``(N,)`` the rows' factors for ``"seq-rescale+widen"``.
    """
    if method not in INTERVAL_METHODS:
        raise ValueError(f"interval method must be one of {INTERVAL_METHODS}, got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    _, rel, offset = posterior_offsets(samples, truth, period)
    n = int(offset.numel())
    if method == "residual":
        tail = (1 + level) / 2
        return IntervalCalibration(method, level, n, lower=-_conformal_quantile(-offset, tail),
                                   upper=_conformal_quantile(offset, tail), split=split)
    cal = IntervalCalibration(method, level, n, rescale=float(rescale) if method == "rescale+widen" else 1.0,
                              split=split)
    lo, hi = cal.offsets(rel, seq_scale)
    half = torch.where(offset >= 0, hi, -lo).clamp_min(1e-12)
    cal.factor = max(_conformal_quantile(offset.abs() / half, level), 1e-6)
    return cal


def interval_coverage(samples: Tensor, truth: Tensor | np.ndarray,
                      calibration: IntervalCalibration | None = None, *, level: float = 0.9,
                      period: float | None = None, seq_scale: Tensor | None = None) -> dict[str, float]:
    """Coverage of the truths ``(N,)`` by the central ``level`` intervals of draws ``(S, N)``,
    raw (``calibration=None``) or recalibrated, and their mean width [parameter units]."""
    _, rel, offset = posterior_offsets(samples, truth, period)
    if calibration is None:
        lo, hi = central_interval(rel, level)
    else:
        lo, hi = calibration.offsets(rel, seq_scale)
    return {"coverage": float(((offset >= lo) & (offset <= hi)).float().mean()),
            "mean_width": float((hi - lo).mean())}


def conformal_calibration(cal_samples: Tensor, cal_truth: Tensor | np.ndarray, samples: Tensor,
                          truth: Tensor | np.ndarray, levels: Sequence[float] = CALIBRATION_LEVELS, *,
                          method: str = DEFAULT_INTERVAL_METHOD, period: float | None = None,
                          **fit_kwargs) -> xr.Dataset:
    """Like :func:`calibration`, with intervals recalibrated by ``method`` fitted afresh at
    each level on ``cal_samples (S, M)`` / ``cal_truth (M,)`` (a held-out split) and applied
    to ``samples (S, N)`` / ``truth (N,)``. (``"seq-rescale+widen"``, which needs the rows'
    scales on both splits, is not offered here.)"""
    if method == "seq-rescale+widen":
        raise ValueError("conformal_calibration does not take seq-rescale+widen")
    coverage, width = [], []
    for level in levels:
        cal = fit_interval_calibration(cal_samples, cal_truth, level=level, method=method,
                                       period=period, **fit_kwargs)
        r = interval_coverage(samples, truth, cal, level=level, period=period)
        coverage.append(r["coverage"])
        width.append(r["mean_width"])
    return xr.Dataset({"coverage": ("level", coverage), "mean_width": ("level", width)},
                      coords={"level": list(levels)}, attrs={"method": method, "n": len(np.asarray(truth))})


def plot_calibration(tables: dict[str, xr.Dataset], path, title: str = "") -> None:
    """Empirical coverage against the nominal level, one line per table (e.g. raw and
    recalibrated posteriors); the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    for label, table in tables.items():
        ax.plot(table["level"], table["coverage"], "o-", ms=4, label=label)
    ax.set_xlabel("nominal level of the central interval")
    ax.set_ylabel("fraction of truths covered")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    """A table as Markdown (numbers with ``digits`` significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return "nan" if not np.isfinite(v) else f"{v:.{digits}g}"
        return str(v)

    head = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"
