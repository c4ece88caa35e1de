"""Where the error of the prey growth rate a comes from: the self-limitation at equilibrium.

    python benchmarks/lotka_volterra/a_bias.py [--out benchmarks/lotka_volterra/out] [--seed 0]

For the benchmark's phys+nn+reg and phys-only runs of one seed, on the test split: the mean
error of the encoder's posterior means of a and c, and how the error of a compares with
``-a c / K``, the missing per-capita term ``-a x / K`` at the prey equilibrium ``x* = c / d``
(``d = 1``). Writes nothing; the benchmark keeps its output in ``results/a_bias.log``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from pyro.infer import Predictive

from pyro_physvae.evaluate import load_run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for setting in ("phys+nn+reg", "phys-only"):
        run = load_run(args.out / f"seed{args.seed}" / setting)
        ds = run.load("test")
        draws = Predictive(run.guide, num_samples=50, return_sites=["a", "c"])(run.system.observations(ds))
        a_hat, c_hat = draws["a"].mean(0).numpy(), draws["c"].mean(0).numpy()
        a, c, k = ds["a"].values, ds["c"].values, ds["K"].values
        err, shift = a_hat - a, a * c / k
        r = np.corrcoef(err, -shift)[0, 1]
        print(f"{setting}: mean error of a {err.mean():+.3f}, of c {(c_hat - c).mean():+.3f}; "
              f"a c / K mean {shift.mean():.3f}; corr(error of a, -a c / K) {r:.3f}; "
              f"MAE of a against a - a c / K {np.abs(a_hat - (a - shift)).mean():.3f}")


if __name__ == "__main__":
    main()
