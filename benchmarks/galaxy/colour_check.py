"""How much of each setting's reconstruction error is a wrong colour?

    python benchmarks/galaxy/colour_check.py [--out benchmarks/galaxy/out] [--n 200]

For the first ``--n`` test images of each trained setting in ``--out``: the test MSE of the
posterior-mean reconstruction, and the MSE left after multiplying each band of each
reconstruction by its least-squares gain against the data (a per-image colour correction),
next to the mean sky-noise variance of the images (the floor of any reconstruction).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pyro_physvae.data.io import load_split
from pyro_physvae.evaluate import load_run
from pyro_physvae.settings import SETTINGS
from pyro_physvae.summaries import posterior_summaries

HERE = Path(__file__).parent


def colour_corrected_mse(recon: torch.Tensor, x: torch.Tensor) -> float:
    """MSE after the least-squares gain per image and band: ``recon, x (N, 3, S, S)``."""
    gain = (recon * x).sum((-2, -1), keepdim=True) / recon.pow(2).sum((-2, -1), keepdim=True).clamp_min(1e-12)
    return float((gain * recon - x).pow(2).mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--samples", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    ds = load_split(out / "data", "test").isel(sequence=slice(0, args.n))
    x = torch.as_tensor(ds["x"].values)
    print(f"{x.shape[0]} test images; mean sky-noise variance {float((ds['noise_std'] ** 2).mean()):.3e}")
    print("| setting | test recon MSE | MSE after per-band gains |\n| --- | --- | --- |")
    for setting in SETTINGS:
        if not (out / setting / "best.pt").is_file():
            continue
        run = load_run(out / setting)
        recon = posterior_summaries(run.model, run.guide, x, args.samples)["x_mean"]
        mse = float((recon - x).pow(2).mean())
        print(f"| {setting} | {mse:.3e} | {colour_corrected_mse(recon, x):.3e} |")


if __name__ == "__main__":
    main()
