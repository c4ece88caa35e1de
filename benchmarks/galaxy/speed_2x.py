"""Galaxy phys+nn+reg time per epoch, before and after a change, alternated on one machine.

    python benchmarks/galaxy/speed_2x.py --before PATH [--rounds 3] [--epochs 6]

The galaxy case of ``benchmarks/before_after.py`` (see there): 400 training and 100 validation
synthetic 35 x 35 images, batch 200, seed 0, one torch thread, each run in its own process.
Output: ``benchmarks/galaxy/results/speed_2x.{log,json}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from before_after import compare, galaxy_speed_data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path, help="checkout of the code before the change")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    compare("galaxy", args.before, galaxy_speed_data(), args.rounds, args.epochs, "speed_2x")


if __name__ == "__main__":
    main()
