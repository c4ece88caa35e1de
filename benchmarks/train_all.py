"""Train the settings of one system at a fixed budget (used by each system's run.py).

    python benchmarks/train_all.py --system advdif --epochs 2000 --jobs 2 --out DIR

Data are generated (seeded) into ``OUT/data`` when missing, unless ``--data`` names a
directory to train on (e.g. the real gait recordings, read in place). Finished runs (``last.pt`` at the
final epoch) are kept; partial ones resume. The learning-rate schedule is the system's default
(advection-diffusion: cosine since 2026-12-03; its earlier tables were trained at a constant rate).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pyro_physvae.data.io import save_dataset
from pyro_physvae.settings import SETTINGS
from pyro_physvae.systems import get_system
from pyro_physvae.train import TrainConfig, latest_checkpoint, train


def ensure_data(data_dir: Path, seed: int, system: str = "pendulum") -> None:
    if all((data_dir / f"{s}.nc").is_file() for s in ("train", "valid", "test")):
        return
    for split, ds in get_system(system).generate(seed=seed).items():
        save_dataset(ds, data_dir / f"{split}.nc")


def finished(run_dir: Path, epochs: int) -> bool:
    try:
        return latest_checkpoint(run_dir)[0]["epoch"] >= epochs
    except (FileNotFoundError, ValueError):
        return False


def started(run_dir: Path) -> bool:
    """Whether the run has a checkpoint to resume from (intact or not: train() decides)."""
    return any((run_dir / name).is_file() for name in ("last.pt", "last.prev.pt", "best.pt"))


def train_one(system: str, setting: str, data_dir: str, out: str, config: dict,
              model_kwargs: dict | None = None) -> str:
    run_dir = Path(out) / setting
    cfg = TrainConfig(**config)
    if not finished(run_dir, cfg.epochs):
        train(system, setting, data_dir, run_dir, cfg, model_kwargs=model_kwargs,
              resume=started(run_dir), overwrite=True, progress=False)
    return setting


def main(argv: list[str] | None = None) -> argparse.Namespace:
    """Train what is missing; return the parsed arguments."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--system", default="pendulum")
    p.add_argument("--out", default=None, help="default: benchmarks/<system>/out")
    p.add_argument("--epochs", type=int, default=None, help="default: the system's reference")
    p.add_argument("--data", default=None, help="data directory (default: generated into OUT/data)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the system's reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="settings trained side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training job")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--solver", default=None, help="ODE solver (default: the model's)")
    p.add_argument("--substeps", type=int, default=None,
                   help="solver steps per interval (default: the model's)")
    p.add_argument("--grad-scale", type=float, default=None,
                   help="gradient factor (default: the reference loss scale; 1 reproduces the "
                   "pendulum results recorded before that default)")
    args = p.parse_args(argv)
    args.out = args.out or str(Path(__file__).parent / args.system / "out")
    defaults = get_system(args.system).train_defaults
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if args.data is None:
        ensure_data(data, args.seed, args.system)
    config = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
              "threads": args.threads, "checkpoint_every": 100, "grad_scale": args.grad_scale,
              "lr_schedule": defaults.get("lr_schedule", "constant")}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        model_kwargs = {k: v for k, v in (("method", args.solver), ("substeps", args.substeps))
                        if v is not None}
        futures = [pool.submit(train_one, args.system, s, str(data), str(out), config, model_kwargs)
                   for s in args.settings]
        for f in futures:
            print("trained", f.result(), flush=True)
    (out / "train_args.json").write_text(json.dumps(vars(args), indent=2))
    return args


if __name__ == "__main__":
    main()
