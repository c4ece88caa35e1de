"""How much of a run's validation loss is the noise of its random draws.

    python benchmarks/validation_noise.py RUN [RUN ...] [--checkpoints [best.pt last.pt]] [--draws 8]

The trainer picks ``best.pt`` by the validation loss of each epoch: the loss (negative ELBO plus
regularizers) of one random draw of the guide's latents (and of R_DA,2's simulated data) for
every validation sequence. This script evaluates that same loss ``--draws`` times at fixed
weights, each with another random seed, and prints its spread, with the mean squared error of
the draw's reconstruction, next to the run's history: the range of the validation loss over the
last 200 epochs and its ratio to the best. Where the draws alone move the loss by as much as it
moves between epochs, the best-validation checkpoint is chosen largely by the draws.

Output: one line per run and checkpoint, and ``--out`` (JSON) if given.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pyro
import torch

from pyro_physvae.evaluate import load_run
from pyro_physvae.train import TrainConfig, make_trainer, read_history, validation_loss


def spread_at(run_dir: Path, checkpoint: str, draws: int) -> dict:
    """The validation loss and draw MSE per sequence over ``draws`` seeds at ``checkpoint``."""
    run = load_run(run_dir, checkpoint)
    ds = run.load("valid")
    x = run.system.observations(ds)
    config = TrainConfig.from_dict(run.checkpoint["train_config"])
    n_train = int(run.checkpoint.get("n_train", x.shape[0]))
    trainer = make_trainer(run.system, run.setting, run.model, run.guide, config, n_train)
    losses, mses = [], []
    with torch.no_grad():
        for seed in range(draws):
            pyro.set_rng_seed(seed)
            loss, mse = validation_loss(trainer, x)
            losses.append(loss / x.shape[0])
            mses.append(mse)
    losses, mses = np.asarray(losses), np.asarray(mses)
    return {"run": str(run_dir), "checkpoint": checkpoint, "epoch": run.checkpoint["epoch"],
            "val_loss_draws": losses.tolist(), "val_mse_draws": mses.tolist(),
            "val_loss_max_over_min": float(losses.max() / losses.min()),
            "val_loss_cv": float(losses.std() / losses.mean())}


def history_spread(run_dir: Path, window: tuple[int, int] | None = None) -> dict:
    """The validation loss over the epochs ``window`` (first and last, 1-based; default: the
    run's last 200), against its best."""
    val = np.asarray([r["val_loss"] for r in read_history(run_dir)])
    tail = val[window[0] - 1:window[1]] if window else val[-200:]
    return {"epochs": int(val.size), "best": float(val.min()), "best_epoch": int(val.argmin()) + 1,
            "tail_min": float(tail.min()), "tail_median": float(np.median(tail)),
            "tail_max": float(tail.max()),
            "tail_median_over_best": float(np.median(tail) / val.min())}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--checkpoints", nargs="*", default=["best.pt", "last.pt"],
                   help="checkpoints to evaluate (none: the histories only)")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--window", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                   help="epochs whose validation loss is summarised (default: the last 200)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run in map(Path, args.runs):
        hist = history_spread(run, args.window)
        span = f"epochs {args.window[0]}-{args.window[1]}" if args.window else "last 200 epochs"
        print(f"{run}: {hist['epochs']} epochs, best val loss {hist['best']:.4g} at epoch "
              f"{hist['best_epoch']}; "
              f"{span} "
              f"min {hist['tail_min']:.4g}, median {hist['tail_median']:.4g}, "
              f"max {hist['tail_max']:.4g}", flush=True)
        for ckpt in args.checkpoints:
            row = {**spread_at(run, ckpt, args.draws), "history": hist}
            loss, mse = np.asarray(row["val_loss_draws"]), np.asarray(row["val_mse_draws"])
            print(f"  {ckpt} (epoch {row['epoch']}): val loss over {args.draws} draws min {loss.min():.4g} "
                  f"median {np.median(loss):.4g} max {loss.max():.4g} "
                  f"(max/min {row['val_loss_max_over_min']:.3g}); "
                  f"draw MSE min {mse.min():.3g} max {mse.max():.3g}", flush=True)
            rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=lambda v: None if math.isnan(v) else v))
    return rows


if __name__ == "__main__":
    main()
