"""Locomotion phys+nn+reg time per epoch: autograd's double backward against the written gradient.

    python benchmarks/locomotion/speed_check.py [--data ../shared/data/locomotion] [--rounds 3]
        [--epochs 8] [--run RUN ...] [--out benchmarks/locomotion/results/speed_check.json]

Trains phys+nn+reg on the real recordings (read in place) at the reference batch size on one
torch thread, alternating ``energy_gradient="autograd"`` and ``"explicit"`` in the same process
for ``--rounds`` rounds, so that both see the same load on a shared machine; each run's time
per epoch (training only, and with validation) is the median over the epochs after two of
warm-up. For each trained run given with ``--run`` it then reports the learnt energy's relative
drift over a cycle (median and maximum over the validation recordings' posterior-mean latents,
the model's solver), with the written gradient and with autograd's, on the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pyro_physvae.evaluate import load_run
from pyro_physvae.train import TrainConfig, train

HERE = Path(__file__).parent
DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data" / "locomotion"
PATHS = ("autograd", "explicit")
WARMUP = 2


def time_epochs(data: Path, gradient: str, epochs: int) -> dict[str, float]:
    """Median and worst seconds per epoch after the warm-up, training only and with validation."""
    with tempfile.TemporaryDirectory() as tmp:
        history = train("locomotion", "phys+nn+reg", data, tmp,
                        TrainConfig(epochs=epochs, batch_size=100, threads=1, checkpoint_every=epochs),
                        model_kwargs={"energy_gradient": gradient}, progress=False)
    train_s = [r["time_train"] for r in history[WARMUP:]]
    epoch_s = [r["time_epoch"] for r in history[WARMUP:]]
    return {"train_median": float(np.median(train_s)), "train_max": float(max(train_s)),
            "epoch_median": float(np.median(epoch_s)), "epoch_max": float(max(epoch_s)),
            "final_loss": history[-1]["loss"]}


def energy_drift(run: str, data: Path, split: str = "valid", checkpoint: str = "best.pt") -> dict:
    """Relative drift of the run's learnt energy with both gradient paths on the same weights."""
    loaded = load_run(run, checkpoint)
    x = loaded.system.observations(loaded.load(split, data))
    with torch.no_grad():
        h = loaded.guide.features(x)
        y0 = loaded.guide.y0_head(h)[0]
        z = loaded.guide.z_P_head(h)[0] if loaded.model.dim_z_phys else None
        row = {"run": run, "checkpoint": checkpoint, "split": split}
        for gradient in PATHS:
            loaded.model.energy_gradient = gradient
            rel = loaded.model.energy_drift(y0, z)["relative"]
            row[gradient] = {"drift_median": float(rel.median()), "drift_max": float(rel.max())}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--run", nargs="*", default=[], help="trained run directories to check the drift of")
    p.add_argument("--out", default=str(HERE / "results" / "speed_check.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data)
    rounds = []
    for i in range(args.rounds):
        row = {"round": i + 1, "load_before": os.getloadavg()}
        for gradient in PATHS:
            row[gradient] = time_epochs(data, gradient, args.epochs)
            print(json.dumps({"round": i + 1, "path": gradient, **row[gradient]}), flush=True)
        row["ratio_train"] = row["explicit"]["train_median"] / row["autograd"]["train_median"]
        rounds.append(row)
    summary = {}
    if rounds:
        summary = {g: {k: float(np.median([r[g][k] for r in rounds]))
                       for k in ("train_median", "epoch_median")} for g in PATHS}
        for g in PATHS:
            summary[g]["train_worst_round"] = max(r[g]["train_median"] for r in rounds)
            summary[g]["epoch_worst_round"] = max(r[g]["epoch_median"] for r in rounds)
        print(json.dumps({"summary": summary}), flush=True)
    drifts = [energy_drift(run, data) for run in args.run]
    for d in drifts:
        print(json.dumps(d), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "threads": 1, "epochs": args.epochs,
              "warmup_epochs": WARMUP, "rounds": rounds, "summary": summary, "drift": drifts,
              "load_after": os.getloadavg()}
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
