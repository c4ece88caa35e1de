"""Restarts chosen on validation only: what keeping the best of K training seeds would give.

    python benchmarks/restarts.py --system galaxy [--summary benchmarks/galaxy/results/seeds.json]
        [--runs benchmarks/galaxy/out_seeds] [--name restarts]

For the seeds that ``benchmarks/seeds.py`` trained and evaluated, it reads each run's best
validation loss (the minimum of its ``history.jsonl``, the loss that picks ``best.pt``) and its
test figures (``--summary``). A procedure "train K seeds, keep the run with the lowest
validation loss" needs no test data and no true parameters and costs K trainings. Started at
seed s it trains seeds s, ..., s + K - 1, so its outcome on these runs is exact: the chosen
seed's test figures. For K = 1 .. number of seeds it prints, over the start seeds whose window
fits, the mean and the worst of the reconstruction MSE and of each physics parameter's MAE (raw
and, where the summary has it, debiased), and which seed each start chose. Writes
``benchmarks/<system>/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pyro_physvae.train import read_history

HERE = Path(__file__).parent
SETTING = "phys+nn+reg"


def best_validation_loss(run: Path) -> float:
    """The lowest validation loss in a run's history."""
    return min(r["val_loss"] for r in read_history(run))


def figures(row: dict) -> dict[str, float]:
    """A seed's test figures: reconstruction MSE and each physics parameter's MAE, and its
    debiased MAE where the summary has one."""
    maes = {}
    for name, p in row["parameters"].items():
        maes[f"{name} MAE"] = p["mae"]
        if p.get("mae_debiased") is not None:
            maes[f"{name} MAE debiased"] = p["mae_debiased"]
    return {"recon_mse": row["recon_mse"], **maes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", required=True)
    p.add_argument("--summary", type=Path, default=None,
                   help="default: benchmarks/<system>/results/seeds.json")
    p.add_argument("--runs", type=Path, default=None, help="default: benchmarks/<system>/out_seeds")
    p.add_argument("--name", default="restarts", help="output file name, without suffix")
    args = p.parse_args()
    summary = args.summary or HERE / args.system / "results" / "seeds.json"
    runs = args.runs or HERE / args.system / "out_seeds"
    rows = sorted(json.loads(summary.read_text())["rows"], key=lambda r: r["seed"])
    seeds = [r["seed"] for r in rows]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise SystemExit(f"need consecutive seeds in {summary}, got {seeds}")
    val = {r["seed"]: best_validation_loss(runs / f"seed{r['seed']}" / SETTING) for r in rows}
    fig = {r["seed"]: figures(r) for r in rows}
    names = list(fig[seeds[0]])
    lines = [f"{args.system} {SETTING}: keep the lowest validation loss of K seeds "
             f"({summary}, runs in {runs})", "",
             "best validation loss per seed: " + ", ".join(f"{s}: {v:.4g}" for s, v in val.items()), "",
             "| K (trainings) | start seeds | chosen seeds | "
             + " | ".join(f"{n} mean | {n} worst" for n in names) + " |",
             "| --- " * (3 + 2 * len(names)) + "|"]
    report: dict = {"system": args.system, "summary": str(summary), "best_val_loss": val, "by_k": {}}
    for k in range(1, len(seeds) + 1):
        starts = seeds[: len(seeds) - k + 1]
        chosen = [min(range(s, s + k), key=val.__getitem__) for s in starts]
        stats = {n: {"mean": float(np.mean([fig[c][n] for c in chosen])),
                     "worst": float(np.max([fig[c][n] for c in chosen]))} for n in names}
        report["by_k"][k] = {"starts": starts, "chosen": chosen, "figures": stats}
        lines.append(f"| {k} | {starts} | {chosen} | "
                     + " | ".join(f"{stats[n]['mean']:.4g} | {stats[n]['worst']:.4g}" for n in names) + " |")
    out = HERE / args.system / "results"
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
