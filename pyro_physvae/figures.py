"""Figures of the evaluation that work for any system's observations.

Observations are ``(N, *channels, T)``: a sequence dimension, any number of channel
dimensions (none for a single series ``(N, T)``, joints, grid points, ...) and the time axis
last. The figures flatten the channel dimensions into one (:func:`as_channels`, ``C = 1`` for a
single series) and read names, coordinates and units from the data set's ``x`` variable, so
that they need to know nothing about the system. A system with observations that are better
shown otherwise (fields as images, images as images) sets its own
:attr:`~pyro_physvae.systems.System.plot_reconstructions`; :func:`plot_field_reconstructions`
is one such figure, for fields ``(N, X, T)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from torch import Tensor  # noqa: E402

from pyro_physvae.diagnostics import IntervalCalibration, central_interval, posterior_offsets  # noqa: E402
from pyro_physvae.report import INTERVAL  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, 110 dpi; the parent directory is created)
    and close it. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- reading the data set's labels --------------------------------------------------------------
def as_channels(value: Tensor, lead: int = 1) -> Tensor:
    """``(*lead, *channels, T) -> (*lead, C, T)`` with ``C`` the product of the channel
    dimensions (1 for none); ``lead`` is the number of leading dimensions kept (1: sequences;
    2: draws and sequences)."""
    return value.reshape(*value.shape[:lead], -1, value.shape[-1])


def _numpy(value: Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def _format(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float | np.floating) else str(value)


def axis_label(ds: xr.Dataset, name: str) -> str:
    """``"<long_name or name> [<units>]"`` of a variable or coordinate of ``ds``."""
    attrs = ds[name].attrs if name in ds.variables else {}
    text = attrs.get("long_name", name)
    units = attrs.get("units")
    return f"{text} [{units}]" if units else text


def time_axis(ds: xr.Dataset, n_steps: int, coord: str | None = None) -> tuple[np.ndarray, str]:
    """Values ``(n_steps,)`` and label of the time axis: the coordinate ``coord`` (default:
    the last dimension of ``ds["x"]``) where ``ds`` has one of that length, else the step
    index."""
    name = coord or (ds["x"].dims[-1] if "x" in ds else "time")
    if name in ds.variables and ds[name].shape == (n_steps,):
        return np.asarray(ds[name].values, dtype=float), axis_label(ds, name)
    return np.arange(n_steps, dtype=float), f"{name} step"


def value_label(ds: xr.Dataset) -> str:
    """Label of the observed values, from ``ds["x"]``'s ``long_name`` and ``units``."""
    return axis_label(ds, "x") if "x" in ds else "x"


def channel_labels(ds: xr.Dataset, n_channels: int) -> list[str]:
    """A label per flattened channel (see :func:`as_channels`): the channel dimensions of
    ``ds["x"]`` with their coordinate values (``"joint 2"``, ``"space 0.3"``); ``[""]`` for a
    single series, ``"channel c"`` where the data set does not describe ``n_channels``."""
    dims = ds["x"].dims[1:-1] if "x" in ds else ()
    sizes = [int(ds.sizes[d]) for d in dims]
    if math.prod(sizes) != n_channels:
        return [f"channel {c}" for c in range(n_channels)]
    if not dims:
        return [""]
    return [", ".join(f"{d} {_format(ds[d].values[i] if d in ds.coords else i)}"
                      for d, i in zip(dims, index, strict=True))
            for index in np.ndindex(*sizes)]


def sequence_labels(ds: xr.Dataset, n: int) -> list[str]:
    """``"sequence <id>"`` for the first ``n`` rows of ``ds`` (ids from its row coordinate)."""
    row = ds["x"].dims[0] if "x" in ds else "sequence"
    ids = ds[row].values[:n] if row in ds.coords else np.arange(n)
    return [f"{row} {_format(i)}" for i in ids]


# -- reconstructions ----------------------------------------------------------------------------
def _panel_grid(n_panels: int, cols: int, width: float = 3.6, height: float = 2.5):
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.axis("off")
    return fig, axes


def _label_edges(axes: np.ndarray, n_panels: int, xlabel: str, ylabel: str) -> None:
    """x labels under the lowest panel of each column, y labels on the first column."""
    cols = axes.shape[1]
    for k, ax in enumerate(axes.flat[:n_panels]):
        if k + cols >= n_panels:
            ax.set_xlabel(xlabel, fontsize=8)
        if k % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)


def plot_channel_reconstructions(ds: xr.Dataset, x: Tensor, draws: Mapping[str, Tensor], path: Path, *,
                                 n: int | None = None, channel_names: Sequence[str] | None = None,
                                 max_channels: int = 6, time_coord: str | None = None,
                                 time_label: str | None = None, ylabel: str | None = None) -> Path:
    """Data, posterior-mean reconstruction, 90% posterior-predictive band and, where the
    model records it, the physics-only part ``x_P``, over the time axis: one panel per
    sequence and channel.

    Args:
        ds: the data set of ``x`` (labels, coordinates and units are read off ``ds["x"]``).
        x: observations ``(N, *channels, T)``.
        draws: ``x`` (replicates), ``x_mean`` and optionally ``x_P``, each ``(S, N, *channels, T)``;
            where they also hold the raw replicates ``x_raw`` (see
            :func:`~pyro_physvae.diagnostics.with_noise`), ``x`` carries the noise fitted after
            training and the band is labelled so.
        path: the PNG file to write.
        n: sequences drawn (default: 9 for a single series, fewer with more channels).
        channel_names: a name per flattened channel (default: from ``ds``'s coordinates).
        max_channels: channels drawn at most (the first ones).
        time_coord, time_label: the coordinate of the time axis and its label (default: the
            last dimension of ``ds["x"]``, labelled with its units).
        ylabel: label of the values (default: ``ds["x"]``'s long name and units).
    """
    xs = as_channels(x)
    shown = min(xs.shape[1], max_channels)
    n = min(n or max(3, 9 // shown), xs.shape[0])
    names = list(channel_names) if channel_names is not None else channel_labels(ds, xs.shape[1])
    t, xlabel = time_axis(ds, xs.shape[-1], time_coord)
    lo, hi = (as_channels(v) for v in central_interval(draws["x"], INTERVAL))
    recon = as_channels(draws["x_mean"].mean(0))
    phys = as_channels(draws["x_P"].mean(0)) if "x_P" in draws else None
    rows = sequence_labels(ds, n)
    panels = [(i, c) for i in range(n) for c in range(shown)]
    fig, axes = _panel_grid(len(panels), shown if shown > 1 else min(3, n))
    for ax, (i, c) in zip(axes.flat, panels, strict=False):
        ax.fill_between(t, _numpy(lo[i, c]), _numpy(hi[i, c]), color="C0", alpha=0.25,
                        label=f"{INTERVAL:.0%} predictive" + (" (fitted noise)" if "x_raw" in draws else ""))
        ax.plot(t, _numpy(recon[i, c]), color="C0", label="reconstruction")
        if phys is not None:
            ax.plot(t, _numpy(phys[i, c]), "--", color="C2", label="physics only")
        ax.plot(t, _numpy(xs[i, c]), ".", color="k", ms=2.5, label="data")
        ax.set_title(f"{rows[i]}, {names[c]}" if names[c] else rows[i], fontsize=8)
    _label_edges(axes, len(panels), time_label or xlabel, ylabel or value_label(ds))
    axes.flat[0].legend(fontsize=6)
    return save_figure(fig, path)


def plot_field_grid(rows: list[dict[str, np.ndarray]], path: Path, *, t_max: float,
                    signed: tuple[str, ...] = (), labels: list[str] | None = None, title: str = "",
                    ylabel: str = "grid point", xlabel: str = "time [s]") -> Path:
    """Images of fields ``(X, T)``, space vertical and time horizontal (from 0 to ``t_max``):
    one row per entry of ``rows``, one panel per key. Panels named in ``signed``
    (differences) get a diverging colour map symmetric about zero; the others share their
    row's colour range."""
    cols = len(rows[0])
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.6 * cols, 2.2 * len(rows) + 0.4),
                             squeeze=False)
    for r, row in enumerate(rows):
        vmax = max(float(np.abs(v).max()) for k, v in row.items() if k not in signed) or 1.0
        for ax, (key, img) in zip(axes[r], row.items(), strict=True):
            lim = max(float(np.abs(img).max()), 1e-12) if key in signed else vmax
            im = ax.imshow(img, aspect="auto", cmap="RdBu_r" if key in signed else "viridis",
                           vmin=-lim, vmax=lim, interpolation="nearest",
                           extent=(0.0, t_max, img.shape[0] - 0.5, -0.5))
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(key if labels is None else f"{key}, {labels[r]}", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_field_reconstructions(ds: xr.Dataset, x: Tensor, draws: Mapping[str, Tensor], path: Path,
                               n: int = 3) -> Path:
    """For the first ``n`` fields ``(X, T)`` of ``x (N, X, T)``: images of the data, the
    posterior-mean reconstruction, the physics-only part (where the model records ``x_P``)
    and reconstruction minus data; ``draws`` as for :func:`plot_channel_reconstructions`."""
    xs = as_channels(x)
    recon = as_channels(draws["x_mean"].mean(0))
    phys = as_channels(draws["x_P"].mean(0)) if "x_P" in draws else None
    rows = []
    for i in range(min(n, xs.shape[0])):
        row = {"data": xs[i], "reconstruction": recon[i]}
        if phys is not None:
            row["physics only"] = phys[i]
        row["reconstruction - data"] = recon[i] - xs[i]
        rows.append({k: _numpy(v) for k, v in row.items()})
    t, xlabel = time_axis(ds, xs.shape[-1])
    space = ds["x"].dims[1] if "x" in ds and len(ds["x"].dims) == 3 else "channel"
    return plot_field_grid(rows, path, t_max=float(t[-1]), signed=("reconstruction - data",),
                           labels=sequence_labels(ds, len(rows)), ylabel=f"{space} grid point",
                           xlabel=xlabel)


# -- parameters and counterfactuals -------------------------------------------------------------
def plot_parameter(truth: np.ndarray, samples: Tensor, name: str, path: Path, units: str = "",
                   calibration: IntervalCalibration | None = None) -> Path:
    """Posterior mean with central 90% intervals of a physics parameter (``samples (S, N)``)
    against its true value ``(N,)``; the diagonal is perfect recovery. With
    ``calibration`` (fitted on another split), the recalibrated intervals are drawn too,
    broad and light, behind the raw ones."""
    mean = _numpy(samples.mean(0))
    lo, hi = (_numpy(v) for v in central_interval(samples, INTERVAL))
    fig, ax = plt.subplots(figsize=(4.2, 4))
    lows, highs = [lo], [hi]
    if calibration is not None:
        centre, rel, _ = posterior_offsets(samples)
        c_lo, c_hi = (_numpy(centre + v) for v in calibration.offsets(rel))
        ax.vlines(truth, c_lo, c_hi, alpha=0.35, lw=2.0, color="C1",
                  label=f"calibrated 90% interval ({calibration.method})")
        lows.append(c_lo)
        highs.append(c_hi)
    ax.errorbar(truth, mean, yerr=[mean - lo, hi - mean], fmt=".", ms=3, alpha=0.5, elinewidth=0.5,
                color="C0", label="raw posterior mean and 90% interval")
    edge = [min(truth.min(), *(v.min() for v in lows)), max(truth.max(), *(v.max() for v in highs))]
    ax.plot(edge, edge, "k--", lw=1)
    unit = f" [{units}]" if units else ""
    ax.set_xlabel(f"true {name}{unit}")
    ax.set_ylabel(f"inferred {name}{unit} (mean, 90% interval)")
    if calibration is not None:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_counterfactual(ds: xr.Dataset, curves: Mapping[float, tuple[Tensor, Tensor, Tensor | None]],
                        name: str, path: Path, n: int = 3, max_channels: int = 3) -> Path:
    """Counterfactual curves: one column per factor by which the physics parameter ``name``
    was multiplied, one row per sequence (the first ``n``); in each panel the true system,
    the model's decoding and its physics-only part (``None``: not drawn), each
    ``(N, *channels, T)``, for the first ``max_channels`` channels."""
    factors = list(curves)
    true0 = as_channels(curves[factors[0]][0])
    n, shown = min(n, true0.shape[0]), min(true0.shape[1], max_channels)
    t, xlabel = time_axis(ds, true0.shape[-1])
    rows = sequence_labels(ds, n)
    fig, axes = plt.subplots(n, len(factors), figsize=(2.9 * len(factors), 2.3 * n), squeeze=False)
    for j, f in enumerate(factors):
        true, full, phys = (None if v is None else as_channels(v) for v in curves[f])
        for i in range(n):
            ax = axes[i, j]
            for c in range(shown):
                first = c == 0
                ax.plot(t, _numpy(true[i, c]), "k", lw=1.2, label="truth" if first else None)
                ax.plot(t, _numpy(full[i, c]), "C0", label="Phys-VAE" if first else None)
                if phys is not None:
                    ax.plot(t, _numpy(phys[i, c]), "C2--", label="physics part" if first else None)
            ax.set_title(f"{name} x {f:g}, {rows[i]}", fontsize=8)
    _label_edges(axes, axes.size, xlabel, value_label(ds))
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)
