"""Time per epoch of pendulum phys+nn+reg: ours against the authors' PyTorch code, alternated.

    python benchmarks/pendulum/vs_authors.py --authors PATH [--rounds 3] [--epochs 30]

``PATH`` is a checkout of the authors' code (https://github.com/n-takeishi/phys-vae, not part
of this project) whose pendulum data were made by its ``data/pendulum/makedata.sh``. Each round
trains the authors' phys+nn+reg (the flags of their ``pendulum_train.sh``, 1000 sequences, batch
200, Euler) and then ours (``benchmarks/speed.py``, same sizes, our defaults) for ``--epochs``
epochs, each in its own process with one torch thread, so that both see the same machine state.
Times are medians over the epochs after the first five. The authors' ``train.py`` times only its
training loop (its logged duration leaves out validation), so the comparison is with our
training-only time; ours with validation is reported too. Writes
``benchmarks/pendulum/out/vs_authors.json``. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
WARMUP = 5
#: The authors' pendulum_train.sh, its phys+nn+reg branch ("physnn"): architecture, optimiser
#: and regularizer weights.
AUTHORS_FLAGS = (
    "--range-omega 0.392 3.53 --hidlayers-aux1-dec 64 64 --hidlayers-aux2-dec 128 128 "
    "--x-lnvar -9.0 --arch-feat mlp --hidlayers-feat 128 128 --num-units-feat 256 "
    "--hidlayers-unmixer 128 128 --hidlayers-aux1-enc 64 32 --hidlayers-aux2-enc 64 32 "
    "--hidlayers-omega 64 32 --learning-rate 1e-3 --train-size 1000 --batch-size 200 "
    "--grad-clip 5.0 --intg-lev 1 --weight-decay 1e-6 --adam-eps 1e-3 --balance-kld 1.0 "
    "--save-interval 999999 --num-workers 0 --activation elu --dim-z-aux1 1 --dim-z-aux2 2 "
    "--balance-unmix 1e-3 --balance-dataug 1e-1 --balance-lact-dec 1e-2 --balance-lact-enc 1e-2"
).split()
#: Runs a module with one intra-op and one inter-op torch thread.
ONE_THREAD = ("import runpy, sys, torch; torch.set_num_threads(1); torch.set_num_interop_threads(1); "
              "sys.argv[0] = {script!r}; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


def log_rows(run: Path) -> list[list[str]]:
    """The epoch rows of the authors' ``log.txt`` in ``run``, split into columns (epoch, six
    losses, cumulative training time [s]); none when there is no log."""
    log = run / "log.txt"
    if not log.is_file():
        return []
    lines = log.read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


def run_one_thread(cmd: list[str], cwd: Path | None = None) -> None:
    """Run ``cmd`` with one OpenMP/MKL thread; on failure, raise with the end of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def authors_epoch_time(authors: Path, epochs: int) -> float:
    """Median training time per epoch [s] of the authors' phys+nn+reg, from its log's
    cumulative training duration (last column)."""
    data = authors / "data" / "pendulum" / "data_train.txt"
    if not data.is_file():
        raise FileNotFoundError(f"{data} is missing: run data/pendulum/makedata.sh in {authors} first")
    with tempfile.TemporaryDirectory() as out:
        code = ONE_THREAD.format(script="physvae/pendulum/train.py", module="physvae.pendulum.train")
        cmd = [sys.executable, "-c", code, "--datadir", "./data/pendulum/", "--outdir", out,
               "--epochs", str(epochs), *AUTHORS_FLAGS]
        run_one_thread(cmd, cwd=authors)
        rows = log_rows(Path(out))
    total = np.array([float(r[-1]) for r in rows])
    return float(np.median(np.diff(total, prepend=0.0)[WARMUP:]))


def our_epoch_times(data: Path, epochs: int) -> dict[str, float]:
    """Our phys+nn+reg, through ``speed.py``: median s/epoch with and without validation."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(HERE.parent / "speed.py"), "--system", "pendulum", "--epochs",
               str(epochs), "--threads", "1", "--settings", "phys+nn+reg", "--out", out]
        if data.is_dir():
            cmd += ["--data", str(data)]
        run_one_thread(cmd)
        return json.loads((Path(out) / "speed.json").read_text())["rows"]["phys+nn+reg"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", required=True, help="checkout of github.com/n-takeishi/phys-vae")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--data", default=str(HERE / "out" / "data"),
                   help="our benchmark data (generated by speed.py when missing)")
    p.add_argument("--json", default=str(HERE / "out" / "vs_authors.json"))
    args = p.parse_args()
    if args.epochs <= WARMUP:
        p.error(f"--epochs must exceed the {WARMUP} warm-up epochs")
    authors = Path(args.authors)
    if not (authors / "physvae" / "pendulum" / "train.py").is_file():
        p.error(f"{authors} is not a checkout of the authors' code (no physvae/pendulum/train.py)")
    rounds = []
    for i in range(args.rounds):
        theirs = authors_epoch_time(authors, args.epochs)
        ours = our_epoch_times(Path(args.data), args.epochs)
        rounds.append({"authors_train_only": theirs, "ours_train_only": ours["s_per_epoch_train_only"],
                       "ours_with_validation": ours["s_per_epoch"]})
        print(f"round {i + 1}: authors {theirs:.3f} s/epoch (training only); ours "
              f"{ours['s_per_epoch_train_only']:.3f} (training only), {ours['s_per_epoch']:.3f} "
              f"(with validation)", flush=True)
    ratio = [r["authors_train_only"] / r["ours_train_only"] for r in rounds]
    print(f"authors / ours, training only: {', '.join(f'{r:.2f}' for r in ratio)}")
    result = {"date": date.today().isoformat(), "machine": platform.platform(), "threads": 1,
              "epochs": args.epochs, "warmup_epochs": WARMUP, "rounds": rounds,
              "speedup_train_only": ratio}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
