"""Locomotion: a Hamiltonian Phys-VAE on real gait recordings, and what its latents mean.

    python examples/locomotion_energy.py [--data ../shared/data/locomotion] [--epochs 300]

Trains ``phys+nn+reg`` (Hamiltonian dynamics with a learnt energy inside the model, a neural
residual outside it) on the recordings in ``--data`` (read in place; a synthetic stand-in of
the same shape is generated when the directory holds none), then on the validation split:

* the reconstruction error and the share of the angles' variance that the physics-only part
  explains;
* how well the learnt energy is conserved along the physics-only trajectories;
* which latent follows walking speed and cadence most closely.

Figures go to ``--out``/eval-valid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyro_physvae.data.io import save_dataset
from pyro_physvae.evaluate import evaluate
from pyro_physvae.systems import get_system
from pyro_physvae.train import TrainConfig, train

DEFAULT_DATA = Path(__file__).parents[1].parent / "shared" / "data" / "locomotion"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--out", default="locomotion-example")
    p.add_argument("--synthetic-size", type=int, default=400,
                   help="training sequences of the synthetic stand-in, when --data has none")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out, data = Path(args.out), Path(args.data)
    system = get_system("locomotion")
    if not (data / "train.npy").is_file() and not (data / "data_train.mat").is_file():
        data = out / "data"
        n = args.synthetic_size
        for split, ds in system.generate(seed=args.seed, n_train=n, n_valid=max(n // 4, 8),
                                         n_test=max(n // 4, 8)).items():
            save_dataset(ds, data / f"{split}.nc")
        print(f"no recordings found: trained on a synthetic stand-in in {data}")
    run = out / "phys+nn+reg"
    config = TrainConfig(epochs=args.epochs, batch_size=100, seed=args.seed, threads=1,
                         checkpoint_every=max(1, args.epochs))
    train(system, "phys+nn+reg", data, run, config, overwrite=True, progress=False)
    m = evaluate(run, data, split="valid", num_samples=50, out_dir=out / "eval-valid")
    energy, corr = m["energy"], m["latent_correlations"]
    print(f"reconstruction MSE {m['recon_mse']:.3g}; the physics-only part explains "
          f"{100 * m['physics_only_variance_explained']:.1f}% of the angles' variance")
    print(f"energy drift over a cycle ({energy['solver']}, step {energy['step']}): median "
          f"{100 * energy['relative_drift_median']:.3g}%, max {100 * energy['relative_drift_max']:.3g}%")
    for cov in ("speed", "cadence"):
        print(f"{cov}: most correlated latent {corr[cov]['strongest']} (r = {corr[cov]['strongest_r']:.2f})")
    return m


if __name__ == "__main__":
    main()
