"""NUTS convergence on every system at tiny size, the Lotka-Volterra plugin included.

    python benchmarks/nuts_systems.py [--systems pendulum advdif ...] [--chains 4]
        [--samples 500] [--warmup 300] [--epochs 20] [--out benchmarks/nuts_systems_results]

For each system: its tiny data and networks (``System.test_sizes``), phys+nn+reg trained for
``--epochs`` epochs (so that the networks are not at their zero start), then
:func:`pyro_physvae.mcmc.run_nuts` on one test sequence with the networks fixed. Reports the
largest R-hat and the smallest bulk and tail ESS over all latent scalars (``az.summary`` of
the angles in their window, see :func:`pyro_physvae.mcmc.posterior_summary`), the number of
divergences and the wall time, as JSON lines in ``OUT/nuts_systems.jsonl`` and a table on
standard output.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pyro_physvae.data.io import save_dataset
from pyro_physvae.evaluate import load_run
from pyro_physvae.mcmc import nuts_to_inference_data, posterior_summary, run_nuts
from pyro_physvae.systems import SYSTEMS, get_system, load_plugin
from pyro_physvae.train import TrainConfig, train

PLUGIN = Path(__file__).parents[1] / "examples" / "lotka_volterra" / "lotka_volterra_guide.py"


def measure(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Train the tiny phys+nn+reg model of system ``name`` briefly and run NUTS on it."""
    system = get_system(name)
    data = workdir / name / "data"
    for split, ds in system.generate(seed=0, **system.test_sizes["data"]).items():
        save_dataset(ds, data / f"{split}.nc")
    run_dir = workdir / name / "run"
    train(system, "phys+nn+reg", data, run_dir, TrainConfig(epochs=args.epochs, batch_size=16),
          model_kwargs=system.test_sizes.get("model", {}), guide_kwargs=system.test_sizes.get("guide", {}),
          overwrite=True, progress=False)
    run = load_run(run_dir, "last.pt")
    x = system.observations(run.load("test"))[:1]
    t0 = time.perf_counter()
    mcmc = run_nuts(run.model, x, guide=run.guide, num_samples=args.samples, warmup_steps=args.warmup,
                    num_chains=args.chains, seed=args.seed, max_tree_depth=args.max_tree_depth)
    seconds = time.perf_counter() - t0
    idata = nuts_to_inference_data(mcmc, run.model, x)
    summary = posterior_summary(idata, run.model)
    return {"system": name, "latents": list(run.model.latent_sites), "scalars": int(len(summary)),
            "chains": args.chains, "samples": args.samples, "warmup": args.warmup,
            "max_r_hat": float(summary["r_hat"].max()), "min_ess_bulk": float(summary["ess_bulk"].min()),
            "min_ess_tail": float(summary["ess_tail"].min()),
            "divergences": int(idata.sample_stats["diverging"].values.sum()), "seconds": seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", default=[*SYSTEMS, "lotka-volterra"])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--max-tree-depth", type=int, default=6)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/nuts_systems_results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_plugin(PLUGIN)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.systems:
            row = measure(name, args, Path(tmp))
            rows.append(row)
            with (out / "nuts_systems.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name:<15} max R-hat {row['max_r_hat']:.4f}  min ESS bulk {row['min_ess_bulk']:.0f} "
                  f"tail {row['min_ess_tail']:.0f}  divergences {row['divergences']}  "
                  f"{row['scalars']} scalars  {row['seconds']:.0f} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
