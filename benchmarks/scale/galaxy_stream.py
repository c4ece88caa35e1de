"""A galaxy data set larger than a third of memory's worth: peak resident memory of streamed
training and evaluation, against the data's size.

    python benchmarks/scale/galaxy_stream.py [--data DIR] [--n-train 50000] [--n-test 2000]
        [--epochs 2] [--batch-size 50] [--eval-samples 10] [--iwae-particles 5] [--reference-nets]

1. ``make``: a synthetic galaxy set at 69 x 69 (``--n-train`` training images, 1000
   validation, ``--n-test`` test), generated 1000 images at a time and written part by part
   (:func:`~pyro_physvae.data.lazy.write_rows_in_parts`), so that making it never holds it
   all either. The images are rendered without super-sampling (``supersample=1``; the
   benchmark data sets use 3, nine times the rendering cost), which changes their fine
   detail, not their size.
2. ``train --stream`` for ``--epochs`` epochs (``--batch-size``, one torch thread), then
   ``evaluate --stream`` on ``--eval-split`` (``--eval-samples`` draws per image,
   ``--iwae-particles``), each under ``/usr/bin/time -v``, which reports the peak resident
   set size (RSS). A training step's working set grows with the batch (about 1 GB at batch
   200 at 69 x 69 with the small networks); the data add a minibatch.
3. For contrast, the same process reading the training split into memory as a tensor (what
   training without ``--stream`` does first), also under ``/usr/bin/time -v``.

The networks are the test sizes of the galaxy system (``--small-nets``, default), so that an
epoch over 50,000 images takes minutes on a 2-core machine; ``--reference-nets`` uses the
reference architecture (an epoch of 50,000 images at 69 x 69 then takes about half an hour
per thread here). Writes ``benchmarks/scale/results/galaxy_stream.{json,log}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results"
#: Images generated and written at a time.
PART = 1000


def make_data(data: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, int]:
    """The three splits in ``data`` (kept if already there); their sizes in bytes."""
    from pyro_physvae.data.galaxy import GalaxyDataConfig, generate_split
    from pyro_physvae.data.lazy import write_rows_in_parts

    config = GalaxyDataConfig(image_size=69, supersample=1)
    generator = torch.Generator().manual_seed(seed)
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 1000), ("test", n_test)):
        path = data / f"{split}.nc"
        if not path.exists():
            started = time.perf_counter()
            parts = (generate_split(min(PART, n - i), config, generator, split) for i in range(0, n, PART))
            write_rows_in_parts(path, parts, n)
            print(f"wrote {path}: {n} images in {time.perf_counter() - started:.0f} s", flush=True)
    return {split: (data / f"{split}.nc").stat().st_size for split in ("train", "valid", "test")}


def timed(cmd: list[str], log) -> dict[str, float]:
    """Run ``cmd`` under ``/usr/bin/time -v``; its peak RSS [MiB] and wall time [s]."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    log.write(proc.stdout[-3000:] + proc.stderr[-4000:] + "\n")
    log.flush()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"peak_rss_mib": rss_kib / 1024, "wall_s": seconds}


def net_options(reference: bool) -> list[str]:
    """``--model-option``/``--guide-option`` arguments of the galaxy system's test sizes."""
    if reference:
        return []
    from pyro_physvae.systems import get_system

    sizes = get_system("galaxy").test_sizes
    return ([f"--model-option={k}={json.dumps(v)}" for k, v in sizes["model"].items()]
            + [f"--guide-option={k}={json.dumps(v)}" for k, v in sizes["guide"].items()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE / "out" / "galaxy50k")
    p.add_argument("--run", type=Path, default=None, help="default: DATA/../run")
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--eval-split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--eval-samples", type=int, default=10)
    p.add_argument("--iwae-particles", type=int, default=5)
    p.add_argument("--reference-nets", action="store_true")
    args = p.parse_args()
    run = args.run or args.data.parent / ("run-reference" if args.reference_nets else "run")
    RESULTS.mkdir(parents=True, exist_ok=True)
    sizes = make_data(args.data, args.n_train, args.n_test)
    n_values = args.n_train * 3 * 69 * 69
    physvae = [sys.executable, "-m", "pyro_physvae.cli"]
    out: dict = {"command": " ".join(sys.argv), "date": str(date.today()), "machine": platform.platform(),
                 "cpus": torch.get_num_threads(), "n_train": args.n_train,
                 "train_float32_gib": n_values * 4 / 2**30, "file_bytes": sizes,
                 "nets": "reference" if args.reference_nets else "test sizes", "batch_size": args.batch_size}
    with open(RESULTS / "galaxy_stream.log", "a") as log:
        log.write(f"# {out['command']}  ({out['date']}, {out['machine']})\n")
        out["train"] = timed([*physvae, "train", "--system", "galaxy", "--setting", "phys+nn+reg",
                              "--data", str(args.data), "--out", str(run), "--overwrite",
                              "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                              "--threads", "1", "--stream", "--quiet",
                              *net_options(args.reference_nets)], log)
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        out["history"] = [{k: r[k] for k in ("epoch", "loss", "val_loss", "time_train", "time_epoch")}
                          for r in history]
        out["evaluate"] = timed([*physvae, "evaluate", str(run), "--split", args.eval_split, "--stream",
                                 "--samples", str(args.eval_samples), "--iwae-particles",
                                 str(args.iwae_particles)], log)
        metrics = json.loads((run / f"eval-{args.eval_split}" / "metrics.json").read_text())
        out["metrics"] = {k: metrics[k] for k in ("n_sequences", "recon_mse", "physics_only_mse",
                                                  "predictive_coverage90")}
        out["metrics"]["theta_circular_correlation"] = metrics.get("theta", {}).get("circular_correlation")
        out["in_memory_load"] = timed([sys.executable, "-c", (
            "import sys; from pyro_physvae.systems import get_system; s = get_system('galaxy'); "
            f"x = s.observations(s.load_split({str(args.data)!r}, 'train')); print(x.shape, x.dtype)")], log)
    limit = out["train_float32_gib"] * 1024 / 3
    for step in ("train", "evaluate", "in_memory_load"):
        rss = out[step]["peak_rss_mib"]
        print(f"{step:>15}: peak RSS {rss:7.0f} MiB ({rss / (out['train_float32_gib'] * 1024):.1%} of the "
              f"training split as float32), {out[step]['wall_s']:.0f} s")
    print(f"bound asked for: under a third of the data, {limit:.0f} MiB")
    (RESULTS / "galaxy_stream.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
