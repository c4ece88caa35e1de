"""Peak memory of the series evaluation and diagnosis against the number of sequences.

    python benchmarks/scale/series_stream.py --run RUN [--sizes 1000 8000] [--samples 20]
        [--iwae-particles 5]

``RUN`` is a trained run of a series system (for instance an advection-diffusion run of
``benchmarks/seeds.py``, ``benchmarks/advdif/out_seeds/seed0/phys+nn+reg``). For each size N,
a test split of N sequences and a validation split of 500 (for the calibration) are generated
with the run's system (data seed 1, the benchmark's sizes) into
``benchmarks/scale/out/<system>_<N>``, then, each under ``/usr/bin/time -v`` (peak resident set
size), one torch thread:

* ``evaluate --stream`` (the split read from its file a chunk at a time);
* ``evaluate`` (the split read into memory; the posterior is still summarised in chunks);
* ``diagnose --stream`` (every draw of the latents and log-likelihoods kept, the replicates
  of the first 1000 sequences written).

Before the chunked summaries, an evaluation held every draw of the curves ``x``, ``x_mean``,
``x_P`` and the raw replicates: ``4 S N`` observations of ``4 x event`` bytes; the script
prints that figure beside the measured peaks. Writes
``benchmarks/scale/results/series_stream.{json,log}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from galaxy_stream import timed  # noqa: E402

from pyro_physvae.checkpoint import load_checkpoint  # noqa: E402
from pyro_physvae.data.io import save_dataset  # noqa: E402
from pyro_physvae.systems import get_system  # noqa: E402

RESULTS = HERE / "results"


def make_data(system: str, n: int, out: Path) -> tuple[Path, tuple[int, ...]]:
    """Validation (500) and test (``n``) splits of ``system`` in ``out`` (kept if there);
    the data directory and the event shape."""
    data = out / f"{system}_{n}"
    if not (data / "test.nc").exists():
        splits = get_system(system).generate(seed=1, n_train=8, n_valid=500, n_test=n)
        for split, ds in splits.items():
            save_dataset(ds, data / f"{split}.nc")
    shape = get_system(system).observations(get_system(system).load_split(data, "valid")).shape[1:]
    return data, tuple(shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--iwae-particles", type=int, default=5)
    args = p.parse_args()
    system = load_checkpoint(args.run / "last.pt")["system"]
    physvae = [sys.executable, "-m", "pyro_physvae.cli"]
    common = ["--samples", str(args.samples), "--iwae-particles", str(args.iwae_particles)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(sys.argv), "date": str(date.today()), "machine": platform.platform(),
              "torch_threads": 1, "run": str(args.run), "system": system, "samples": args.samples,
              "rows": []}
    with open(RESULTS / "series_stream.log", "a") as log:
        log.write(f"# {report['command']}  ({report['date']}, {report['machine']})\n")
        for n in args.sizes:
            data, event = make_data(system, n, HERE / "out")
            numel = int(np.prod(event))
            row = {"n_sequences": n, "event_shape": list(event),
                   "test_float32_mib": n * numel * 4 / 2**20,
                   "all_curve_draws_mib": 4 * args.samples * n * numel * 4 / 2**20}
            for name, cmd in (
                    ("evaluate_stream", ["evaluate", str(args.run), "--data", str(data), "--stream",
                                         "--out", str(data / "eval-stream")]),
                    ("evaluate_in_memory", ["evaluate", str(args.run), "--data", str(data),
                                            "--out", str(data / "eval-memory")]),
                    ("diagnose_stream", ["diagnose", str(args.run), "--data", str(data), "--stream",
                                         "--out", str(data / "diagnose-stream")])):
                row[name] = timed([*physvae, *cmd, *common], log)
                print(f"N {n:6d} {name:>19}: peak RSS {row[name]['peak_rss_mib']:7.0f} MiB, "
                      f"{row[name]['wall_s']:.0f} s", flush=True)
            metrics = json.loads((data / "eval-stream" / "metrics.json").read_text())
            row["recon_mse"] = metrics["recon_mse"]
            print(f"N {n:6d}: test split {row['test_float32_mib']:.0f} MiB as float32; every draw of the "
                  f"curves would be {row['all_curve_draws_mib']:.0f} MiB", flush=True)
            report["rows"].append(row)
    (RESULTS / "series_stream.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
