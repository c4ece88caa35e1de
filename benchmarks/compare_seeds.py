"""Two sets of training seeds side by side: the spread summaries of ``benchmarks/seeds.py``.

    python benchmarks/compare_seeds.py benchmarks/advdif/results/seeds.json \\
        benchmarks/advdif/results/seeds_cosine.json [--out FILE.md]

For each figure that both summaries hold (test reconstruction MSE, each physics parameter's
MAE, correlation and calibrated 90% coverage), prints the mean, median and worst over the seeds
of each set, and the seeds where both sets hold that seed, seed by seed. The sets are named by
their learning-rate schedule (summaries written before the option existed: constant).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: The physics parameters' figures compared (besides ``recon_mse``), by suffix.
PARAMETER_FIGURES = ("_mae", "_corr", "_coverage90")


def label(report: dict) -> str:
    """The set's learning-rate schedule."""
    return report["meta"].get("lr_schedule", "constant")


def kept(summary: dict) -> list[str]:
    return [k for k in summary if k == "recon_mse" or k.endswith(PARAMETER_FIGURES)]


def per_seed(report: dict, key: str) -> dict[int, float]:
    """Seed -> value of ``key`` (``recon_mse`` or ``<parameter>_<figure>``)."""
    out = {}
    for row in report["rows"]:
        if key == "recon_mse":
            out[row["seed"]] = row["recon_mse"]
        else:  # "<parameter>_<figure>"; a parameter's name may hold "_" itself
            for name, figures in row["parameters"].items():
                figure = key.removeprefix(f"{name}_")
                if figure != key and figure in figures:
                    out[row["seed"]] = figures[figure]
    return out


def table(a: dict, b: dict, name_a: str, name_b: str) -> str:
    keys = [k for k in kept(a["summary"]) if k in b["summary"]]
    seeds = sorted(set(r["seed"] for r in a["rows"]) & set(r["seed"] for r in b["rows"]))
    head = ["figure", "set", "mean", "median", "worst", *(f"seed {s}" for s in seeds)]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for key in keys:
        for name, report in ((name_a, a), (name_b, b)):
            stats = report["summary"][key]
            values = per_seed(report, key)
            cells = [f"{stats[s]:.4g}" for s in ("mean", "median", "worst")]
            cells += [f"{values[s]:.4g}" for s in seeds]
            lines.append(f"| {key} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    a, b = (json.loads(path.read_text()) for path in (args.first, args.second))
    text = (f"{a['meta']['system']} {a['meta']['setting']}, {a['meta']['epochs']} epochs: "
            f"{label(a)} ({args.first}) against {label(b)} ({args.second})\n\n"
            + table(a, b, label(a), label(b)))
    if args.out:
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
