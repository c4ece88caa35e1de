"""What checkpointing after every epoch costs: pendulum phys+nn+reg (1000 training sequences,
batch 200, one thread), alternated rounds of a run that checkpoints every epoch and one that
checkpoints once at the end, plus the time to encode and write one checkpoint whose history
holds 5000 epochs (the reference budget).

    python benchmarks/reliability/checkpoint_cost.py --data DIR --rounds 3 --epochs 30

``DIR`` holds pendulum train/valid splits (``physvae generate --out DIR``). Writes
``checkpoint_cost.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyro_physvae.checkpoint import encode_checkpoint, load_checkpoint, write_checkpoint_bytes
from pyro_physvae.train import TrainConfig, train


def seconds_per_epoch(data: str, every: int, epochs: int) -> float:
    """Wall-clock seconds per epoch of one run (its setup, checkpoints and validation
    included) that checkpoints every ``every`` epochs."""
    out = Path(tempfile.mkdtemp(prefix="ckcost-"))
    try:
        t0 = time.perf_counter()
        train("pendulum", "phys+nn+reg", data, out / "run",
              TrainConfig(epochs=epochs, batch_size=200, threads=1, checkpoint_every=every),
              progress=False)
        return (time.perf_counter() - t0) / epochs
    finally:
        shutil.rmtree(out, ignore_errors=True)


def encode_cost(data: str, epochs: int = 5000) -> dict[str, float]:
    """Encode and write a checkpoint of a trained state whose history has ``epochs`` records."""
    out = Path(tempfile.mkdtemp(prefix="ckcost-"))
    try:
        train("pendulum", "phys+nn+reg", data, out / "run", TrainConfig(epochs=1, batch_size=200, threads=1),
              progress=False)
        state = load_checkpoint(out / "run" / "last.pt")
        state["history"] = [dict(state["history"][0], epoch=i + 1) for i in range(epochs)]
        state.pop("format_version")
        encode, write = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            data_bytes = encode_checkpoint(state)
            t1 = time.perf_counter()
            write_checkpoint_bytes(data_bytes, out / "c.pt")
            write.append(time.perf_counter() - t1)
            encode.append(t1 - t0)
        return {"bytes": len(data_bytes), "encode_ms_median": 1e3 * statistics.median(encode),
                "write_and_sync_ms_median": 1e3 * statistics.median(write)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rounds = []
    for r in range(args.rounds):
        every_epoch = seconds_per_epoch(args.data, 1, args.epochs)
        at_end = seconds_per_epoch(args.data, args.epochs, args.epochs)
        rounds.append({"round": r + 1, "every_epoch_s": every_epoch, "at_end_s": at_end,
                       "overhead_ms": 1e3 * (every_epoch - at_end)})
        print(rounds[-1], flush=True)
    result = {"command": "python benchmarks/reliability/checkpoint_cost.py "
                         f"--data {args.data} --rounds {args.rounds} --epochs {args.epochs}",
              "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "rounds": rounds,
              "overhead_ms_median": statistics.median(r["overhead_ms"] for r in rounds),
              "one_checkpoint_5000_epochs": encode_cost(args.data)}
    print(json.dumps(result, indent=2))
    (Path(__file__).parent / "checkpoint_cost.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
