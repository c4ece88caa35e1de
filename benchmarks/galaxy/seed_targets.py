"""The galaxy benchmark's targets, seed by seed, for the runs of ``benchmarks/seeds.py``.

    python benchmarks/galaxy/seed_targets.py [--runs benchmarks/galaxy/out_seeds] [--name seed_targets]

Reads each seed's default evaluation (``seedS/phys+nn+reg/eval-test/metrics.json``, written by
``seeds.py``) and the nn-only reconstruction error of the benchmark's table
(``galaxy/results/results.json``, same data), and prints one row per seed: the reconstruction MSE
over nn-only's (target <= 1.2), theta's median error in degrees (<= 10), e's correlation
(>= 0.9) and the four figures of the theta traversal (non-rotation share <= 0.05, orientation
error <= 2 degrees, flux and axis-ratio variation <= 0.02 each). Writes
``galaxy/results/<name>.{json,md}`` (default ``seed_targets``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).parent
SETTING = "phys+nn+reg"
#: (column, target as text, test) in the order of the table.
TARGETS = (
    ("MSE / nn-only", "<= 1.2", lambda v: v <= 1.2),
    ("theta median err [deg]", "<= 10", lambda v: v <= 10),
    ("e corr", ">= 0.9", lambda v: v >= 0.9),
    ("non-rotation share", "<= 0.05", lambda v: v <= 0.05),
    ("orientation err [deg]", "<= 2", lambda v: v <= 2),
    ("flux var.", "<= 0.02", lambda v: v <= 0.02),
    ("axis-ratio var.", "<= 0.02", lambda v: v <= 0.02),
)


def seed_row(metrics: dict, nn_only_mse: float) -> list[float]:
    """The target figures of one evaluation, in the order of :data:`TARGETS`."""
    t = metrics["theta_traversal"]
    return [metrics["recon_mse"] / nn_only_mse, metrics["theta"]["median_abs_error_deg"],
            metrics["e"]["corr"], t["rotation_residual_fraction"], t["orientation_error_deg"],
            t["flux_rel_std"], t["axis_ratio_rel_std"]]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=HERE / "out_seeds")
    p.add_argument("--name", default="seed_targets", help="output file name, without suffix")
    args = p.parse_args(argv)
    table_rows = json.loads((HERE / "results" / "results.json").read_text())["rows"]
    nn_only = table_rows["nn-only"]["best"]["recon_mse"]
    rows = {}
    for seed_dir in sorted(args.runs.glob("seed*"), key=lambda d: int(d.name[4:])):
        path = seed_dir / SETTING / "eval-test" / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            rows[seed_dir.name] = {"best_epoch": m["checkpoint_epoch"], "figures": seed_row(m, nn_only)}
    head = ["seed", "best epoch", *(f"{name} ({target})" for name, target, _ in TARGETS), "all met"]
    lines = [f"nn-only test MSE {nn_only:.4g} (galaxy/results/results.json)", "",
             "| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for name, row in rows.items():
        met = all(test(v) for (_, _, test), v in zip(TARGETS, row["figures"], strict=True))
        row["all_met"] = met
        cells = [f"{v:.4g}" if math.isfinite(v) else "nan" for v in row["figures"]]
        lines.append(f"| {name[4:]} | {row['best_epoch']} | " + " | ".join(cells)
                     + f" | {'yes' if met else 'no'} |")
    table = "\n".join(lines) + "\n"
    results = HERE / "results"
    (results / f"{args.name}.md").write_text(table)
    report = {"nn_only_mse": nn_only, "targets": [[n, t] for n, t, _ in TARGETS], "seeds": rows}
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    print(table)
    return report


if __name__ == "__main__":
    main()
