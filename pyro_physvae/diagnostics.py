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
    with pyro.plate(_DRAWS_PLATE, num_draws, dim=-(nesting + 1)):
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
    total = torch.zeros(())
    for site in _sample_sites(trace).values():
        lp = site["fn"].log_prob(site["value"])
        if site["mask"] is not None and site["mask"] is not True:
            lp = lp * site["mask"]
        total = total + lp
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
) -> az.InferenceData:
    """The InferenceData of :func:`to_inference_data` from draws of :func:`sample_posterior`."""
    curves = tuple(c for c in curves if c in draws)
    if dataset is not None and obs_site in dataset:
        data_dims = list(dataset[obs_site].dims)
        coords = {d: dataset[d].values for d in data_dims if d in dataset.coords}
    else:
        data_dims = ["sequence", *_event_dims(obs_site, x.shape[1:])]
        coords = {}
    row_dim = data_dims[0]
    coords.setdefault(row_dim, np.arange(x.shape[0]))

    def as_array(name: str, value: Tensor) -> xr.DataArray:
        value = value.detach().cpu().numpy()[None]  # chain dim
        extra = value.shape[3:]
        if name in (obs_site, *curves) and extra == tuple(x.shape[1:]):
            dims = ["chain", "draw", *data_dims]
        else:
            dims = ["chain", "draw", row_dim, *_event_dims(name, extra)]
        return xr.DataArray(value, dims=dims)

    posterior = {k: as_array(k, v) for k, v in draws.items() if k not in (obs_site, "log_likelihood")}
    idata = az.InferenceData(
        posterior=_dataset(posterior, coords),
        posterior_predictive=_dataset({obs_site: as_array(obs_site, draws[obs_site])}, coords),
        log_likelihood=_dataset({obs_site: xr.DataArray(
            draws["log_likelihood"].cpu().numpy()[None], dims=["chain", "draw", row_dim])}, coords),
        observed_data=xr.Dataset({obs_site: xr.DataArray(x.detach().cpu().numpy(), dims=data_dims)},
                                 coords=coords),
    )
    if dataset is not None:
        const = dataset.drop_vars([obs_site], errors="ignore").reset_coords(drop=False)
        const = const.assign_coords({d: dataset[d].values for d in const.dims if d in dataset.coords})
        idata.add_groups(constant_data=const)
    return idata


def _dataset(arrays: dict[str, xr.DataArray], coords: dict[str, np.ndarray]) -> xr.Dataset:
    ds = xr.Dataset(arrays)
    ds = ds.assign_coords({"chain": [0], "draw": np.arange(ds.sizes["draw"]),
                           **{d: c for d, c in coords.items() if d in ds.dims}})
    return ds


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
