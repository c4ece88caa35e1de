"""Posterior quality of the trained pendulum phys+nn+reg model: calibration and NUTS.

    python benchmarks/pendulum/posterior.py [--setting phys+nn+reg] [--sequences 0,1,2]

Needs the trained run of ``train_all.py`` / ``run.py`` in ``--out``. Runs ``physvae diagnose``
on the test split (200 posterior draws per sequence, interval widening fitted on the validation
split, IWAE with 100 particles) and ``physvae nuts`` on a few test sequences (4 chains of 1000
draws after 1000 warm-up steps), then writes ``posterior.json`` and ``posterior.md`` with the
coverage of omega's central intervals (raw and widened), the IWAE test log-likelihood, R-hat,
ESS and the amortization-gap table.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from pyro_physvae.diagnostics import markdown_table
from pyro_physvae.evaluate import diagnose
from pyro_physvae.mcmc import nuts_report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(Path(__file__).parent / "out"))
    p.add_argument("--setting", default="phys+nn+reg")
    p.add_argument("--sequences", default="0,1,2")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    run = out / args.setting
    if not (run / "best.pt").is_file():
        raise SystemExit(f"no trained run in {run}; run benchmarks/pendulum/run.py first")

    diag = diagnose(run, out / "data", split="test", num_samples=200, iwae_particles=100,
                    calibrate_on="valid", out_dir=out / f"{args.setting}-diagnose")
    sequences = tuple(int(s) for s in args.sequences.split(","))
    nuts = nuts_report(run, out / "data", split="test", sequences=sequences, num_samples=args.samples,
                       warmup_steps=args.warmup, num_chains=args.chains,
                       out_dir=out / f"{args.setting}-nuts")
    cal = diag["calibration"]["omega"]
    result = {
        "date": date.today().isoformat(), "machine": platform.platform(), "torch": torch.__version__,
        "setting": args.setting, "checkpoint_epoch": diag["checkpoint_epoch"],
        "omega": diag["omega"], "recon_mse": diag["recon_mse"],
        "iwae_log_likelihood": diag["iwae_log_likelihood"],
        "coverage": cal["coverage"], "widening_factor": cal["widening_factor"],
        "widened_coverage": cal["widened_coverage"],
        "nuts": {"sequences": list(sequences), "chains": args.chains, "samples": args.samples,
                 "warmup": args.warmup, "max_r_hat": nuts["max_r_hat"],
                 "min_ess_bulk": nuts["min_ess_bulk"], "min_ess_tail": nuts["min_ess_tail"],
                 "divergences": nuts["divergences"]},
        "amortization_gap": json.loads(nuts["gap"].to_json(orient="records")),
    }
    (out / "posterior.json").write_text(json.dumps(result, indent=2))
    levels = list(cal["coverage"])
    lines = [
        f"Checkpoint epoch {diag['checkpoint_epoch']}; test omega MAE {diag['omega']['mae']:.3f}; "
        f"IWAE log-likelihood {diag['iwae_log_likelihood']['mean']:.1f} "
        f"(median {diag['iwae_log_likelihood']['median']:.1f}) nats per sequence.",
        "",
        "| central interval | " + " | ".join(levels) + " |",
        "| --- |" + " --- |" * len(levels),
        "| posterior | " + " | ".join(f"{cal['coverage'][k]:.3f}" for k in levels) + " |",
        f"| widened x{cal['widening_factor']:.3g} (fitted on valid) | "
        + " | ".join(f"{cal['widened_coverage'][k]:.3f}" for k in levels) + " |",
        "",
        f"NUTS on test sequences {list(sequences)}, {args.chains} chains x {args.samples} draws "
        f"({args.warmup} warm-up): max R-hat {nuts['max_r_hat']:.4f}, min bulk ESS "
        f"{nuts['min_ess_bulk']:.0f}, min tail ESS {nuts['min_ess_tail']:.0f}, "
        f"divergences {nuts['divergences']}.",
        "",
        markdown_table(nuts["gap"]),
    ]
    (out / "posterior.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
