"""Galaxy phys+nn+reg time per epoch, before and after a change, alternated on one machine.

    python benchmarks/galaxy/speed_2x.py --before PATH [--rounds 3] [--epochs 6] [--n-train 400]

``PATH`` is a checkout of the code before the change (e.g. ``git worktree add /tmp/before
SHA``); each round trains phys+nn+reg once with that code (``PYTHONPATH=PATH``) and once with
this tree, each in its own process, on the same synthetic 35 x 35 images (generated once into
``benchmarks/galaxy/out/speed_data``), batch 200 (the reference's), seed 0, one torch thread.
It reports the training-only time per epoch (median over the epochs after the first 2) of
every run, and the largest relative difference between the two versions' validation losses
epoch by epoch (the same seeded run, so it shows whether both compute the same function).
Output: ``benchmarks/galaxy/results/speed_2x.{log,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
WORKER = """
import json, sys, tempfile
from pyro_physvae.train import TrainConfig, train
import pyro_physvae
data, epochs = sys.argv[1], int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    h = train("galaxy", "phys+nn+reg", data, tmp,
              TrainConfig(epochs=epochs, batch_size=200, threads=1, seed=0, checkpoint_every=epochs),
              progress=False)
print(json.dumps({"code": pyro_physvae.__file__, "time_train": [r["time_train"] for r in h],
                  "val_loss": [r["val_loss"] for r in h]}))
"""


def ensure_data(data: Path, n_train: int, n_valid: int) -> None:
    if all((data / f"{s}.nc").is_file() for s in ("train", "valid", "test")):
        return
    from pyro_physvae.data.galaxy import GalaxyDataConfig, generate
    from pyro_physvae.data.io import save_dataset

    config = GalaxyDataConfig(n_train=n_train, n_valid=n_valid, n_test=10, image_size=35)
    for split, ds in generate(config, seed=0).items():
        save_dataset(ds, data / f"{split}.nc")


def run(code: Path, data: Path, epochs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER, str(data), str(epochs)], env=env, cwd=code,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout of the code before the change")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-valid", type=int, default=100)
    args = p.parse_args()
    data = HERE / "out" / "speed_data"
    ensure_data(data, args.n_train, args.n_valid)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    log = open(results / "speed_2x.log", "w")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")

    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name, code in (("before", Path(args.before)), ("after", ROOT)):
            res = run(code.resolve(), data.resolve(), args.epochs)
            res["s_per_epoch_train"] = float(np.median(res["time_train"][2:]))
            runs[name].append(res)
            say(f"round {r + 1} {name:6s} {res['s_per_epoch_train']:.3f} s/epoch (training only; "
                f"epochs {[round(t, 2) for t in res['time_train']]}) code {res['code']}")
    med = {k: float(np.median([x["s_per_epoch_train"] for x in v])) for k, v in runs.items()}
    vb, va = np.array(runs["before"][0]["val_loss"]), np.array(runs["after"][0]["val_loss"])
    rel = np.abs(va - vb) / np.abs(vb)
    say(f"median over rounds: before {med['before']:.3f}, after {med['after']:.3f} s/epoch, "
        f"speed-up {med['before'] / med['after']:.2f}x")
    say(f"validation loss per epoch, before: {vb.tolist()}")
    say(f"validation loss per epoch, after:  {va.tolist()}")
    say(f"largest relative difference: {rel.max():.2e}")
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "args": vars(args),
            "median_s_per_epoch_train": med, "val_loss_max_rel_diff": float(rel.max())}
    (results / "speed_2x.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    log.close()


if __name__ == "__main__":
    main()
