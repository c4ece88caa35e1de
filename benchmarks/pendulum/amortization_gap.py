"""Where a trained pendulum run loses reconstruction accuracy on new sequences: the encoder or
the decoder.

    python benchmarks/pendulum/amortization_gap.py RUN [RUN ...] [--steps 500] [--n 500]
        [--splits train,valid,test]

For each run (best-validation checkpoint) and each split (the first ``--n`` sequences of
each), prints the training objective per sequence (ELBO plus regularizers, as in the
trainer's ``val_loss``) and the reconstruction MSE of the posterior-mean latents, once with the
encoder's posterior and once with that posterior refined per sequence for ``--steps`` steps
with the trained model fixed (:func:`pyro_physvae.autoguides.refine_amortized_guide`), and the
time the refinement took (one torch thread).

If the decoder generalised poorly, refinement could not bring held-out sequences near the
training ones; if the encoder does, it can.
"""

from __future__ import annotations

import argparse
import time

import torch

from pyro_physvae.autoguides import amortized_posterior, refine_amortized_guide
from pyro_physvae.evaluate import load_run
from pyro_physvae.train import TrainConfig, make_loss

SPLITS = ("train", "valid", "test")


def posterior_mean_mse(run, latents: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """MSE of the decoder mean at the given latent values, over all sequences and steps."""
    with torch.no_grad():
        curve = run.model.decode_sites(x[:, 0], latents)["x_mean"]
    return float((curve - x).pow(2).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--steps", type=int, default=500, help="refinement steps")
    p.add_argument("--n", type=int, default=500, help="sequences per split")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated")
    args = p.parse_args()
    torch.set_num_threads(1)
    for path in args.runs:
        run = load_run(path)
        loss = make_loss(run.setting, run.system, TrainConfig.from_dict(run.checkpoint["train_config"]),
                         run.model)
        print(f"run {path} (epoch {run.checkpoint['epoch']}), first {args.n} sequences per split, "
              f"{args.steps} refinement steps")
        for split in args.splits.split(","):
            x = run.system.observations(run.load(split))[: args.n]
            torch.manual_seed(0)
            with torch.no_grad():
                objective = sum(loss.loss(run.model, run.guide, x) for _ in range(5)) / (5 * x.shape[0])
            encoder = {k: mean for k, (mean, _) in amortized_posterior(run.guide, x).items()}
            t0 = time.perf_counter()
            refined_guide = refine_amortized_guide(run.model, run.guide, x, steps=args.steps)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                refined = refined_guide.median(x)
            print(f"  {split:5s}: training objective / seq {objective:8.1f}   recon MSE: encoder "
                  f"{posterior_mean_mse(run, encoder, x):.5f}, refined "
                  f"{posterior_mean_mse(run, refined, x):.5f} ({seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
