"""Training speed of a system's settings, one at a time, at the reference batch size.

    python benchmarks/speed.py --system pendulum [--epochs 40] [--threads 1] [--settings ...]
        [--model-option KEY=VALUE ...] [--json speed.json]

Trains each setting for a few epochs on the benchmark data (generated, or ``--data``) at the
system's reference batch size with the model's default solver (or the model arguments
given), with a fixed thread count, and reports the median wall time per epoch, with and
without validation, in ``benchmarks/<system>/out/speed.json`` (or ``--json``). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_all import ensure_data  # noqa: E402

from pyro_physvae.cli import model_option_arg  # noqa: E402
from pyro_physvae.settings import SETTINGS  # noqa: E402
from pyro_physvae.systems import get_system  # noqa: E402
from pyro_physvae.train import TrainConfig, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--system", default="pendulum")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default: benchmarks/<system>/out")
    p.add_argument("--data", default=None, help="data directory (default: generated into OUT/data)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--model-option", type=model_option_arg, action="append", default=[],
                   metavar="KEY=VALUE", help="a model constructor argument (as physvae train)")
    p.add_argument("--json", default="speed.json", help="result file name, in OUT")
    args = p.parse_args()
    model_kwargs = dict(args.model_option)
    out = Path(args.out or Path(__file__).parent / args.system / "out")
    data = Path(args.data) if args.data else out / "data"
    if args.data is None:
        ensure_data(data, seed=0, system=args.system)
    batch_size = get_system(args.system).train_defaults["batch_size"]
    rows = {}
    for setting in args.settings:
        with tempfile.TemporaryDirectory() as tmp:
            h = train(args.system, setting, data, tmp,
                      TrainConfig(epochs=args.epochs, batch_size=batch_size, threads=args.threads,
                                  checkpoint_every=args.epochs),
                      model_kwargs=model_kwargs, progress=False)
        skip = min(5, args.epochs - 1)  # warm-up epochs
        rows[setting] = {"s_per_epoch": float(np.median([r["time_epoch"] for r in h[skip:]])),
                         "s_per_epoch_train_only": float(np.median([r["time_train"] for r in h[skip:]]))}
        print(setting, rows[setting], flush=True)
    result = {"system": args.system, "date": date.today().isoformat(), "machine": platform.platform(),
              "torch": torch.__version__, "threads": args.threads, "epochs": args.epochs,
              "model_kwargs": model_kwargs, "rows": rows}
    (out / args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
