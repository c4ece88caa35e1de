"""NUTS with the trained networks held fixed, against the amortized posterior.

    python examples/pendulum_nuts.py [--epochs 200] [--sequences 0,1,2] [--samples 500]
                                     [--warmup 500] [--chains 4] [--out physvae-nuts]

Generates pendulum data, trains an amortized ``phys+nn+reg`` model briefly with
``pyro_physvae.train.train``, then samples the latents (omega, z_A1, z_A2) of a few test
sequences with NUTS while the decoder's networks stay at their trained values, and compares
the encoder's posterior of omega with NUTS's (the amortization gap). Prints R-hat and ESS
and the gap table; ``<out>/run/nuts-test`` receives ``nuts.nc``, ``summary.csv``,
``amortization_gap.csv``/``.md`` and ``amortization_gap.png``.

Tiny settings for a smoke test (a few seconds)::

    python examples/pendulum_nuts.py --n-train 32 --n-steps 20 --epochs 2 --hidden 16 \\
        --sequences 0,1 --samples 20 --warmup 20 --chains 2
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from pyro_physvae.data.io import save_dataset
from pyro_physvae.diagnostics import markdown_table
from pyro_physvae.mcmc import nuts_report
from pyro_physvae.systems import get_system
from pyro_physvae.train import TrainConfig, train


def _sequences(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("physvae-nuts"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=500, help="training sequences")
    p.add_argument("--n-steps", type=int, default=50, help="time steps per sequence")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--hidden", type=int, default=None,
                   help="width of every hidden layer (default: the reference architecture)")
    p.add_argument("--sequences", type=_sequences, default=(0, 1, 2),
                   help="test sequences for NUTS, e.g. 0,1,2")
    p.add_argument("--samples", type=int, default=500, help="NUTS draws kept per chain")
    p.add_argument("--warmup", type=int, default=500, help="NUTS warm-up iterations per chain")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--chain-method", choices=("sequential", "parallel"), default="sequential")
    p.add_argument("--mass-matrix", choices=("laplace", "laplace+adapt", "diagonal"), default="laplace")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p.parse_args(argv)


def _network_kwargs(hidden: int | None) -> tuple[dict, dict]:
    if hidden is None:
        return {}, {}
    h = (hidden,)
    return ({"hidden_aux1": h, "hidden_aux2": h},
            {"hidden_feat": h, "feat_dim": hidden, "hidden_aux": h, "hidden_unmixer": h,
             "hidden_phys": h})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir, run_dir = args.out / "data", args.out / "run"

    print(f"[1/3] generating pendulum data in {data_dir}")
    n_test = max(10, max(args.sequences) + 1)
    splits = get_system("pendulum").generate(
        seed=args.seed, n_train=args.n_train, n_valid=max(10, args.n_train // 5), n_test=n_test,
        n_steps=args.n_steps)
    for split, ds in splits.items():
        save_dataset(ds, data_dir / f"{split}.nc")

    print(f"[2/3] training phys+nn+reg for {args.epochs} epochs in {run_dir}")
    model_kwargs, guide_kwargs = _network_kwargs(args.hidden)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, seed=args.seed,
                         threads=args.threads)
    train("pendulum", "phys+nn+reg", data_dir, run_dir, config, model_kwargs=model_kwargs,
          guide_kwargs=guide_kwargs, overwrite=True, progress=True)

    print(f"[3/3] NUTS on test sequences {list(args.sequences)}: {args.chains} chains x "
          f"({args.warmup} warm-up + {args.samples}) draws, networks fixed")
    report = nuts_report(run_dir, data_dir, split="test", sequences=args.sequences,
                         num_samples=args.samples, warmup_steps=args.warmup,
                         num_chains=args.chains, seed=args.seed, chain_method=args.chain_method,
                         mass_matrix=args.mass_matrix, progress=True)
    print(f"max R-hat {report['max_r_hat']:.3f}, min bulk ESS {report['min_ess_bulk']:.0f}, "
          f"min tail ESS {report['min_ess_tail']:.0f}, divergences {report['divergences']}, "
          f"{report['time_s']:.0f} s")
    print("amortization gap (mean_gap_sd: guide mean minus NUTS mean in NUTS sds; "
          "sd_ratio: guide sd / NUTS sd)")
    print(markdown_table(report["gap"]))
    print(f"figure: {report['files'].get('amortization_gap.png')}")
    return report


if __name__ == "__main__":
    main()
