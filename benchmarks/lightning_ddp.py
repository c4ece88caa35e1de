"""Seconds per epoch: the single-process trainer, Lightning on 1 device, Lightning on N CPU processes.

Each engine trains pendulum phys+nn+reg (reference networks, global batch 200, one thread per
process) for ``--epochs`` epochs from scratch through ``physvae train``; the time per epoch is the
median of the ``time_train`` (training steps) and ``time_epoch`` (with validation and the
checkpoint record) fields of ``history.jsonl`` over epochs 2.., so process start-up is left out.

    python benchmarks/lightning_ddp.py --data /work/bench/data/pendulum --epochs 6 --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(data: str, out: Path, epochs: int, extra: list[str]) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pyro_physvae.cli", "train", "--data", data, "--out", str(out),
                    "--epochs", str(epochs), "--threads", "1", "--quiet", *extra], check=True, env=env)
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    later = history[1:] or history
    return {"s_per_epoch_train": statistics.median(r["time_train"] for r in later),
            "s_per_epoch": statistics.median(r["time_epoch"] for r in later), "wall_s": wall,
            "final_loss": history[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    engines = {"single process": [], "lightning, 1 device": ["--devices", "1", "--accelerator", "cpu"],
               f"lightning, {args.devices} processes (ddp, gloo)":
                   ["--devices", str(args.devices), "--accelerator", "cpu", "--strategy", "ddp"]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(engines.items()):
            results[name] = run(args.data, Path(tmp) / f"run{i}", args.epochs, extra)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(json.dumps({"epochs": args.epochs, "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
