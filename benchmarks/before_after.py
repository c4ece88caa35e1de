"""Time per epoch before and after a code change, alternated on one machine.

    python benchmarks/before_after.py --system locomotion --before PATH [--rounds 3] [--epochs 6]
        [--data DIR] [--name NAME]

``PATH`` is a checkout of the code before the change (e.g. ``git worktree add /tmp/before
SHA``). Each round trains phys+nn+reg once with that code (``PYTHONPATH=PATH``) and once with
this tree, each in its own process, on the same data, at the system's reference batch size,
seed 0, one torch thread. Alternating the two versions gives both the same machine load, which
on a shared VM moves single figures by more than most changes.

Reports the training-only time per epoch of every run (median over the epochs after the first
two), the median over rounds, and the largest relative difference between the two versions'
validation losses epoch by epoch: the same seeded run, so it shows whether both compute the
same function (float rounding that Adam amplifies gives small differences).

Data: ``--data`` or the system's default: galaxy, 400 training and 100 validation synthetic
35 x 35 images generated once into ``benchmarks/galaxy/out/speed_data``; locomotion, the real
recordings in ``../shared/data/locomotion``, read in place; pendulum and advdif, the data of
``benchmarks/<system>/run.py`` (``benchmarks/<system>/out/data``, made by that script).
Output: ``benchmarks/<system>/results/<NAME>.{log,json}`` (``NAME`` default ``before_after``).
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
ROOT = HERE.parent
BATCH = {"galaxy": 200, "locomotion": 100, "pendulum": 200, "advdif": 200}
WARMUP = 2
WORKER = """
import json, sys, tempfile
from pyro_physvae.train import TrainConfig, train
import pyro_physvae
system, data, epochs, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with tempfile.TemporaryDirectory() as tmp:
    h = train(system, "phys+nn+reg", data, tmp,
              TrainConfig(epochs=epochs, batch_size=batch, threads=1, seed=0, checkpoint_every=epochs),
              progress=False)
print(json.dumps({"code": pyro_physvae.__file__, "time_train": [r["time_train"] for r in h],
                  "val_loss": [r["val_loss"] for r in h]}))
"""


def galaxy_speed_data(n_train: int = 400, n_valid: int = 100) -> Path:
    """The synthetic 35 x 35 images of the galaxy timings, generated once (data seed 0)."""
    data = HERE / "galaxy" / "out" / "speed_data"
    if not all((data / f"{s}.nc").is_file() for s in ("train", "valid", "test")):
        from pyro_physvae.data.galaxy import GalaxyDataConfig, generate
        from pyro_physvae.data.io import save_dataset

        config = GalaxyDataConfig(n_train=n_train, n_valid=n_valid, n_test=10, image_size=35)
        for split, ds in generate(config, seed=0).items():
            save_dataset(ds, data / f"{split}.nc")
    return data


def default_data(system: str) -> Path:
    if system == "galaxy":
        return galaxy_speed_data()
    if system == "locomotion":
        return ROOT.parent / "shared" / "data" / "locomotion"
    return HERE / system / "out" / "data"


def run(code: Path, system: str, data: Path, epochs: int) -> dict:
    """One training run with the code at ``code``, in its own process."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER, system, str(data), str(epochs), str(BATCH[system])],
                         env=env, cwd=code, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["s_per_epoch_train"] = float(np.median(res["time_train"][WARMUP:]))
    return res


def compare(system: str, before: Path, data: Path, rounds: int, epochs: int, name: str) -> dict:
    """Alternate the two versions for ``rounds`` rounds; write and return the summary."""
    if epochs <= WARMUP:
        raise SystemExit(f"--epochs must exceed the {WARMUP} warm-up epochs, got {epochs}")
    if not (before / "pyro_physvae").is_dir():
        raise SystemExit(f"--before {before} is not a checkout of this project (no pyro_physvae/ in it)")
    if not data.is_dir():
        raise SystemExit(f"data directory {data} not found")
    results = HERE / system / "results"
    results.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with open(results / f"{name}.log", "w") as log:
        def say(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")

        say(f"# python benchmarks/before_after.py --system {system} --before {before} --rounds {rounds} "
            f"--epochs {epochs} --data {data}; {date.today().isoformat()}, {platform.platform()}, "
            f"load average at start {os.getloadavg()[0]:.2f}")
        for r in range(rounds):
            for label, code in (("before", before), ("after", ROOT)):
                res = run(code.resolve(), system, data.resolve(), epochs)
                runs[label].append(res)
                say(f"round {r + 1} {label:6s} {res['s_per_epoch_train']:.3f} s/epoch (training only; epochs "
                    f"{[round(t, 3) for t in res['time_train']]}) code {res['code']}")
        med = {k: float(np.median([x["s_per_epoch_train"] for x in v])) for k, v in runs.items()}
        vb, va = np.array(runs["before"][0]["val_loss"]), np.array(runs["after"][0]["val_loss"])
        rel = float((np.abs(va - vb) / np.abs(vb)).max())
        say(f"median over rounds: before {med['before']:.3f}, after {med['after']:.3f} s/epoch, "
            f"speed-up {med['before'] / med['after']:.2f}x")
        say(f"validation loss per epoch, before: {vb.tolist()}")
        say(f"validation loss per epoch, after:  {va.tolist()}")
        say(f"largest relative difference: {rel:.2e}; load average at end {os.getloadavg()[0]:.2f}")
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "system": system,
            "before": str(before), "data": str(data), "rounds": rounds, "epochs": epochs,
            "batch_size": BATCH[system], "median_s_per_epoch_train": med, "val_loss_max_rel_diff": rel}
    (results / f"{name}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", required=True, choices=sorted(BATCH))
    p.add_argument("--before", required=True, type=Path, help="checkout of the code before the change")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--data", type=Path, default=None, help="default: the system's (see above)")
    p.add_argument("--name", default="before_after", help="output file name, without suffix")
    args = p.parse_args()
    data = args.data if args.data is not None else default_data(args.system)
    compare(args.system, args.before, data, args.rounds, args.epochs, args.name)


if __name__ == "__main__":
    main()
