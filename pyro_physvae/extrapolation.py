"""Long-horizon extrapolation: roll a trained model out far past its training window.

The latents of each sequence are inferred from the observed window (posterior means), then
the decoder is integrated for many more steps and compared with the system's noise-free truth
(:attr:`~pyro_physvae.systems.System.true_observations`). Reported per horizon: the MSE at that
step, the RMSE relative to the truth's RMS there, and the growth of the field's Euclidean norm
(for advection-diffusion with a zero boundary the true semi-discrete dynamics never increase it:
the Laplacian is negative definite and the central-difference advection skew-symmetric, so a
norm that grows is unphysical).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import Predictive  # noqa: E402
from torch import Tensor  # noqa: E402

from pyro_physvae.evaluate import load_run  # noqa: E402
from pyro_physvae.figures import as_channels, plot_field_grid, save_figure  # noqa: E402
from pyro_physvae.report import write_json  # noqa: E402
from pyro_physvae.validation import check_positive_int  # noqa: E402

#: Horizons (in time steps from the initial state) reported by default.
HORIZONS = (50, 200, 500, 1000)
#: A norm growth above this factor counts as a blow-up.
BLOWUP_FACTOR = 1.01


@torch.no_grad()
def rollout(model, guide: Callable, x: Tensor, n_steps: int, *, num_samples: int = 50,
            seed: int = 0) -> dict[str, Tensor]:
    """Decode each sequence's posterior-mean latents over ``n_steps`` time steps.

    Args:
        model: a model with ``supports_rollout`` (its ``decode_sites`` takes ``n_steps``).
        guide: a guide for ``x`` (amortized, or fitted to ``x``).
        x: observed windows ``(N, *event)``; the initial state is read off them.
        n_steps: length of the roll-out, counting the initial state.
        num_samples: posterior draws averaged for the latent means.

    Returns:
        The decoded curves (``x_mean`` and, with physics, ``x_P``), ``(N, ..., n_steps)``.
    """
    if not getattr(model, "supports_rollout", False):
        raise ValueError(f"{type(model).__name__} cannot be rolled out past its training window "
                         "(its decoder has a fixed output length)")
    check_positive_int(n_steps, "n_steps")
    # Only the latents are needed: draw them from the guide alone, without decoding each draw.
    pyro.set_rng_seed(seed)
    draws = Predictive(guide, num_samples=check_positive_int(num_samples, "num_samples"),
                       parallel=True)(x)
    latents = {name: draws[name].mean(0) for name in model.latent_sites}
    curves = model.decode_sites(model.initial_condition(x), latents, n_steps=n_steps)
    return {k: v for k, v in curves.items() if k in ("x_mean", "x_P")}


def errors_by_step(pred: Tensor, truth: Tensor) -> dict[str, np.ndarray]:
    """Per time step (last axis) of ``pred`` and ``truth (N, *channels, T)``: ``mse`` over
    sequences and channels, ``relative_rmse`` (RMSE over the truth's RMS at that step) and
    ``norm_ratio``, the largest ratio over sequences of the prediction's Euclidean norm over
    its channels (a field's norm; a single series' absolute value) to its initial norm."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ")
    pred, truth = as_channels(pred), as_channels(truth)
    mse = (pred - truth).pow(2).mean((0, 1))
    rms = truth.pow(2).mean((0, 1)).sqrt().clamp_min(1e-12)
    norm = pred.norm(dim=1)  # (N, T)
    ratio = (norm / norm[:, :1].clamp_min(1e-12)).max(0).values
    return {"mse": mse.cpu().numpy(), "relative_rmse": (mse.sqrt() / rms).cpu().numpy(),
            "norm_ratio": ratio.cpu().numpy()}


def horizon_table(errors: Mapping[str, np.ndarray], horizons: Sequence[int]) -> dict[str, Any]:
    """The errors at each horizon (step ``h`` is time index ``h - 1``), plus the mean MSE
    over steps 1..h and the largest norm ratio up to h."""
    table = {}
    for h in horizons:
        k = h - 1
        table[str(h)] = {"mse": float(errors["mse"][k]), "relative_rmse": float(errors["relative_rmse"][k]),
                         "mean_mse_to_here": float(errors["mse"][:h].mean()),
                         "max_norm_ratio": float(errors["norm_ratio"][:h].max())}
    return table


def extrapolate(run_dir: str | Path, data_dir: str | Path | None = None, *, split: str = "test",
                n_steps: int = 1000, n_sequences: int = 200, num_samples: int = 50,
                horizons: Sequence[int] = HORIZONS, out_dir: str | Path | None = None,
                checkpoint: str = "best.pt", seed: int = 0, guide_steps: int = 1000,
                device: str = "cpu") -> dict[str, Any]:
    """Roll a run out to ``n_steps`` on the first ``n_sequences`` of a split and compare with
    the truth. Writes ``extrapolation.json`` (per-horizon table and per-step error curves),
    ``extrapolation_error.png`` and ``space_time.png`` (truth, model, error for three
    sequences) to ``out_dir`` (default ``run_dir/extrapolate-<split>``). ``device``: where the
    model and the data live (the truth is moved there)."""
    horizons = tuple(h for h in horizons if h <= n_steps)
    run = load_run(run_dir, checkpoint, device)
    if run.system.true_observations is None:
        raise ValueError(f"the {run.system.name} system has no known truth to extrapolate against")
    ds = run.load(split, data_dir)
    ds = ds.isel(sequence=slice(0, check_positive_int(n_sequences, "n_sequences")))
    x = run.system.observations(ds, device)
    guide = run.guide_for(x, steps=guide_steps, seed=seed)
    curves = rollout(run.model, guide, x, n_steps, num_samples=num_samples, seed=seed)
    truth = run.system.true_observations(ds, n_steps).to(x)  # x's dtype and device
    errors = {name: errors_by_step(value, truth) for name, value in curves.items()}
    finite = bool(all(torch.isfinite(v).all() for v in curves.values()))
    dt = float(run.model.dt)  # the roll-out's time step: the model's grid, as the data's
    report = {"system": run.system.name, "setting": run.setting.value, "split": split,
              "checkpoint_epoch": run.checkpoint["epoch"], "n_sequences": int(x.shape[0]),
              "n_steps": n_steps, "train_steps": int(x.shape[-1]), "dt": dt,
              "finite": finite,
              "blowup": bool(not finite or errors["x_mean"]["norm_ratio"].max() > BLOWUP_FACTOR),
              "horizons": {name: horizon_table(e, horizons) for name, e in errors.items()},
              "by_step": {name: {k: v.tolist() for k, v in e.items()} for name, e in errors.items()}}
    out = Path(out_dir) if out_dir else Path(run_dir) / f"extrapolate-{split}"
    plot_error_by_step({run.setting.value: errors["x_mean"]["mse"]}, out / "extrapolation_error.png",
                       train_steps=int(x.shape[-1]))
    plot_space_time(truth[:3], curves["x_mean"][:3], out / "space_time.png", dt=dt,
                    title=run.setting.value, ylabel=_channel_axis(ds))
    write_json(report, out / "extrapolation.json")
    return report


def plot_error_by_step(curves: Mapping[str, Sequence[float] | np.ndarray], path: Path, *,
                       train_steps: int) -> Path:
    """MSE against the number of steps rolled out, one line per label, log scale; the
    training window is shaded."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, mse in curves.items():
        mse = np.asarray(mse)
        ax.semilogy(np.arange(1, len(mse) + 1), np.maximum(mse, 1e-16), label=label)
    ax.axvspan(1, train_steps, color="0.85", label="training window")
    ax.set_xlabel("time step")
    ax.set_ylabel("MSE against the truth")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_space_time(truth: Tensor, pred: Tensor, path: Path, *, dt: float, title: str = "",
                    ylabel: str = "grid point") -> Path:
    """Images of truth, model and their difference, channels (e.g. grid points) vertical and
    time horizontal, for each of the given sequences ``(n, *channels, T)`` (time step ``dt``
    [s]; a single series ``(n, T)`` is a one-row image)."""
    truth, pred = as_channels(truth), as_channels(pred)
    rows = [{"truth": truth[i].cpu().numpy(), "model": pred[i].cpu().numpy(),
             "model - truth": (pred[i] - truth[i]).cpu().numpy()} for i in range(truth.shape[0])]
    return plot_field_grid(rows, path, t_max=dt * (truth.shape[-1] - 1), signed=("model - truth",),
                           labels=[f"sequence {i}" for i in range(len(rows))], title=title,
                           ylabel=ylabel)


def _channel_axis(ds) -> str:
    """The vertical axis of :func:`plot_space_time`: the channel dimensions of ``ds["x"]``."""
    dims = ds["x"].dims[1:-1]
    return f"{' x '.join(dims)} grid point" if dims else "series"
