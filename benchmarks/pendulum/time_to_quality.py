"""Time to quality: test omega MAE against seconds of training, ours against the authors' code.

    python benchmarks/pendulum/time_to_quality.py --authors PATH [--epochs 1500] [--every 50]

``PATH`` is a checkout of the authors' code (https://github.com/n-takeishi/phys-vae, not part
of this project) whose pendulum data were made by its ``data/pendulum/makedata.sh``. Both
programs train phys+nn+reg on those data (1000 training sequences, batch 200, Euler), one
torch thread each, one after the other:

* ours: ``physvae import-reference`` turns the authors' text files into our splits under
  ``WORK/data``; our trainer runs with the system's defaults (those of ``physvae train``: the
  reference optimiser, alpha and gamma; our beta, ``PendulumModel.reg_weights``) and seed 0, in
  chunks of ``--every`` epochs resumed in the same process; after each chunk the model of the
  last epoch is evaluated;
* theirs: their ``train.py`` with the flags of their ``pendulum_train.sh`` (as in
  ``vs_authors.py``) and ``--save-interval EVERY``; each saved ``model_e<k>.pt`` is evaluated.

The quality is the mean absolute error of omega [rad/s] on the test split against the true
values (``true_params_test.txt``), with omega read the way the authors' code infers it: the
encoder's mean (clipped to the feasible range, as their ``draw`` and our decoder do). The time
is the cumulative wall time of the training loops [s], without validation (the authors'
``log.txt`` records that duration; ours is the sum of ``time_train`` over the epochs); the
cumulative time including each program's validation pass is recorded too.

Budget: at about 0.25 s (ours) and 0.35 s (theirs) per epoch with validation on one thread of
the 2-core VM, the default 1500 epochs each take about 15 minutes of CPU time in all, plus
start-up and evaluations; keep ``--epochs`` at or below 1500 to stay under 25 minutes.

Writes ``WORK/time_to_quality.json`` and ``WORK/time_to_quality.png`` (default ``WORK``:
``benchmarks/pendulum/out/time_to_quality``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from vs_authors import AUTHORS_FLAGS, ONE_THREAD, log_rows  # noqa: E402

from pyro_physvae.data.io import load_split  # noqa: E402
from pyro_physvae.evaluate import load_run  # noqa: E402
from pyro_physvae.train import TrainConfig, read_history, train  # noqa: E402

HERE = Path(__file__).parent


def import_authors_data(authors: Path, data: Path) -> None:
    """Our splits of the authors' pendulum files, through ``physvae import-reference``."""
    if all((data / f"{s}.nc").is_file() for s in ("train", "valid", "test")):
        return
    source = authors / "data" / "pendulum"
    if not (source / "data_train.txt").is_file():
        raise FileNotFoundError(f"{source}/data_train.txt is missing: run makedata.sh there first")
    subprocess.run(["physvae", "import-reference", "--system", "pendulum", "--out", str(data),
                    str(source)], check=True)


def our_omega(run: Path, x: torch.Tensor) -> np.ndarray:
    """The encoder's mean of omega [rad/s] of ``run``'s last checkpoint for ``x (N, T)``,
    clamped to the feasible range as the decoder does; shape ``(N,)``."""
    loaded = load_run(run, "last.pt")
    model, guide = loaded.model, loaded.guide
    with torch.no_grad():
        h = guide.features(x)
        locs = {site: getattr(guide, attr)(h)[0] for site, attr in guide.aux_encoders.items()}
        omega = guide.omega_posterior(guide.unmix(x, locs))[0]
        return model.omega.clamp(omega).numpy()


def train_ours(data: Path, run: Path, epochs: int, every: int, x: torch.Tensor, truth: np.ndarray
               ) -> list[dict[str, float]]:
    """Our phys+nn+reg in chunks of ``every`` epochs; one point per chunk."""
    points = []
    for done in range(every, epochs + every, every):
        config = TrainConfig(epochs=min(done, epochs), threads=1, seed=0, checkpoint_every=every)
        train("pendulum", "phys+nn+reg", data, run, config, resume=done > every, progress=False)
        history = read_history(run)
        omega = our_omega(run, x)
        points.append({"epoch": len(history),
                       "train_seconds": float(sum(r["time_train"] for r in history)),
                       "seconds_with_validation": float(sum(r["time_epoch"] for r in history)),
                       "omega_mae": float(np.abs(omega - truth).mean())})
        print(f"ours   epoch {points[-1]['epoch']:5d}  {points[-1]['train_seconds']:7.1f} s  "
              f"omega MAE {points[-1]['omega_mae']:.4f}", flush=True)
    return points


def train_theirs(authors: Path, out: Path, epochs: int, every: int, x: torch.Tensor,
                 truth: np.ndarray) -> list[dict[str, float]]:
    """The authors' phys+nn+reg with a model saved every ``every`` epochs; one point per save."""
    out.mkdir(parents=True, exist_ok=True)
    code = ONE_THREAD.format(script="physvae/pendulum/train.py", module="physvae.pendulum.train")
    flags = list(AUTHORS_FLAGS)
    flags[flags.index("--save-interval") + 1] = str(every)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", code, "--datadir", "./data/pendulum/", "--outdir", str(out.resolve()),
           "--epochs", str(epochs), *flags]
    with open(out / "stdout.txt", "w") as log:
        subprocess.run(cmd, cwd=authors, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    rows = log_rows(out)
    if str(authors) not in sys.path:
        sys.path.insert(0, str(authors))
    from physvae.pendulum.model import VAE  # the authors' code, from the checkout

    model = VAE(json.loads((out / "args.json").read_text()))
    points = []
    for epoch in range(every, epochs + 1, every):
        model.load_state_dict(torch.load(out / f"model_e{epoch}.pt", map_location="cpu", weights_only=True))
        model.eval()
        with torch.no_grad():
            omega_stat, aux1_stat, aux2_stat, _ = model.encode(x)
            omega = model.draw(omega_stat, aux1_stat, aux2_stat, hard_z=True)[0].squeeze(-1).numpy()
        row = rows[epoch - 1]
        # log.txt keeps the cumulative training duration only; validation time is not logged.
        points.append({"epoch": epoch, "train_seconds": float(row[-1]),
                       "omega_mae": float(np.abs(omega - truth).mean())})
        print(f"theirs epoch {epoch:5d}  {points[-1]['train_seconds']:7.1f} s  "
              f"omega MAE {points[-1]['omega_mae']:.4f}", flush=True)
    return points


def time_to(points: list[dict[str, float]], target: float) -> float | None:
    """Seconds of training until the omega MAE first reaches ``target`` (``None``: never)."""
    return next((p["train_seconds"] for p in points if p["omega_mae"] <= target), None)


def plot(ours: list[dict], theirs: list[dict], path: Path, epochs: int) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for points, label, style in ((ours, "ours (pyro-physvae)", "o-"), (theirs, "authors' code", "s--")):
        ax.plot([p["train_seconds"] for p in points], [p["omega_mae"] for p in points], style,
                ms=3, label=label)
    ax.set_xlabel("wall-clock time of training, one thread [s]")
    ax.set_ylabel("omega MAE on the test split [rad/s]")
    ax.set_yscale("log")
    ax.set_title(f"Pendulum phys+nn+reg, {epochs} epochs each")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", required=True, help="checkout of github.com/n-takeishi/phys-vae")
    p.add_argument("--epochs", type=int, default=1500)
    p.add_argument("--every", type=int, default=50, help="epochs between evaluations")
    p.add_argument("--work", default=str(HERE / "out" / "time_to_quality"))
    args = p.parse_args()
    if args.epochs % args.every:
        p.error("--epochs must be a multiple of --every")
    authors, work = Path(args.authors).resolve(), Path(args.work)
    if not (authors / "physvae" / "pendulum" / "train.py").is_file():
        p.error(f"{authors} is not a checkout of the authors' code (no physvae/pendulum/train.py)")
    torch.set_num_threads(1)
    data = work / "data"
    import_authors_data(authors, data)
    test = load_split(data, "test", system="pendulum")
    x = torch.tensor(test["x"].values, dtype=torch.float32)
    truth = np.asarray(test["omega"].values, dtype=np.float64)
    for old in (work / "ours", work / "theirs"):
        if old.exists():
            p.error(f"{old} exists: remove it or choose another --work")
    ours = train_ours(data, work / "ours", args.epochs, args.every, x, truth)
    theirs = train_theirs(authors, work / "theirs", args.epochs, args.every, x, truth)
    best = max(min(q["omega_mae"] for q in ours), min(q["omega_mae"] for q in theirs))
    targets = sorted({0.3, 0.2, 0.15, round(best * 1.05, 4)}, reverse=True)
    result = {"command": "python " + " ".join(sys.argv), "date": date.today().isoformat(),
              "machine": platform.platform(), "load_average": os.getloadavg(),
              "threads": 1, "epochs": args.epochs, "every": args.every,
              "ours": ours, "theirs": theirs,
              "seconds_to_mae": {str(t): {"ours": time_to(ours, t), "theirs": time_to(theirs, t)}
                                 for t in targets}}
    (work / "time_to_quality.json").write_text(json.dumps(result, indent=2))
    plot(ours, theirs, work / "time_to_quality.png", args.epochs)
    for t, v in result["seconds_to_mae"].items():
        print(f"omega MAE <= {t}: ours {v['ours']} s, theirs {v['theirs']} s")


if __name__ == "__main__":
    main()
