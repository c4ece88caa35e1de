"""Restarts chosen on validation only: train several seeds, keep the one with the best
validation loss.

Some training seeds settle in a poor solution that the validation loss shows (on the galaxy
benchmark, two seeds of six end with two to three times the others' best validation loss, two to
four times nn-only's test reconstruction error and, for one of them, theta lost;
``benchmarks/RESULTS.md``, "Restarts"). :func:`train_restarts`
trains ``restarts`` seeds, each in its own directory ``RUN/restarts/seed<S>``, and copies the
run with the lowest validation loss into ``RUN``, so that ``RUN`` is an ordinary run for
``evaluate``, ``diagnose`` and ``--resume``. ``RUN/restarts.json`` records every seed's best
validation loss and which one was kept. The choice uses no test data and no true parameters; it
costs one training per seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyro_physvae.files import DirectoryLock, atomic_write, atomic_write_bytes
from pyro_physvae.settings import Setting
from pyro_physvae.systems import System, get_system
from pyro_physvae.train import RUN_FILES, TrainConfig, read_history, train

#: The record of a restarted run, in its directory.
RESTARTS_FILE = "restarts.json"
#: The folder of the restarts' own runs, in the run directory.
RESTARTS_DIR = "restarts"


def restart_dir(run_dir: str | Path, seed: int) -> Path:
    """The directory of the restart with training seed ``seed``."""
    return Path(run_dir) / RESTARTS_DIR / f"seed{seed}"


def read_restarts(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``restarts.json`` record of a run directory, or ``None`` where it has none."""
    path = Path(run_dir) / RESTARTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_run_dir(run_dir: str | Path) -> Path:
    """Where a restarted run's options are recorded for ``--resume``: ``run_dir`` once a
    restart has been kept there, else (the restarts were interrupted before the choice) the
    lowest-seed restart that has written its ``config.json``; ``run_dir`` if there is none."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file():
        return run_dir
    started = [d for d in (run_dir / RESTARTS_DIR).glob("seed*") if (d / "config.json").is_file()]
    return min(started, key=lambda d: int(d.name[4:])) if started else run_dir


def train_restarts(system: str | System, setting: str | Setting, data_dir: str | Path, run_dir: str | Path,
                   config: TrainConfig | None = None, *, restarts: int, resume: bool = False,
                   overwrite: bool = False, **train_kwargs: Any) -> list[dict[str, float]]:
    """Train seeds ``config.seed, ..., config.seed + restarts - 1`` with :func:`~pyro_physvae.train.train`
    and keep the one with the lowest validation loss in ``run_dir``.

    Args:
        config: as for :func:`~pyro_physvae.train.train`; its ``seed`` is the first restart's
            (default: the system's reference configuration, seed 0).
        restarts: number of seeds (at least 1).
        resume: continue every restart that has a run (the others start), e.g. with more
            epochs, then choose again. Without it, ``run_dir`` must not hold a run.
        overwrite: replace a run already in ``run_dir`` and its restarts.
        train_kwargs: ``model_kwargs``, ``guide_kwargs``, ``progress``, passed on.

    Returns:
        The kept run's history. ``run_dir`` receives its files (``config.json``,
        ``history.jsonl``, ``best.pt``, ``last.pt``, ``last.prev.pt`` where written) and
        ``restarts.json``: ``seeds``, their ``best_val_loss`` and ``best_epoch``, the ``chosen``
        seed and the ``trainings`` paid for it.
    """
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    run_dir = Path(run_dir)
    recorded = read_restarts(run_dir)
    if resume and recorded is not None:
        first = recorded["seeds"][0]
    else:
        first = config.seed if config is not None else 0
        held = [name for name in (*RUN_FILES, RESTARTS_FILE) if (run_dir / name).exists()]
        if held and not resume and not overwrite:
            raise ValueError(f"{run_dir} already holds a run ({', '.join(held)}); resume it (--resume), "
                             "replace it (--overwrite) or choose another directory")
        if held and resume and not (run_dir / RESTARTS_DIR).is_dir():
            raise ValueError(f"{run_dir} holds a run trained without restarts: resume it without "
                             "--restarts, or train the restarts in another directory")
    if overwrite and (run_dir / RESTARTS_DIR).is_dir():
        shutil.rmtree(run_dir / RESTARTS_DIR)
    seeds = list(range(first, first + restarts))
    rows, histories = [], {}
    for seed in seeds:
        sub = restart_dir(run_dir, seed)
        again = resume and (sub / "config.json").is_file()
        train(system, setting, data_dir, sub, _seeded(system, config, seed, again), resume=again,
              **train_kwargs)
        history = histories[seed] = read_history(sub)
        best = min(history, key=lambda r: r["val_loss"])
        rows.append({"seed": seed, "best_val_loss": best["val_loss"], "best_epoch": best["epoch"],
                     "epochs": len(history)})
    chosen = min(rows, key=lambda r: r["best_val_loss"])
    with DirectoryLock(run_dir):
        _copy_run(restart_dir(run_dir, chosen["seed"]), run_dir)
        record = {"seeds": seeds, "restarts": rows, "chosen": chosen["seed"], "trainings": len(seeds),
                  "criterion": "the lowest validation loss of each restart (its best.pt)"}
        atomic_write(run_dir / RESTARTS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    return histories[chosen["seed"]]


def _seeded(system: str | System, config: TrainConfig | None, seed: int, resume: bool) -> TrainConfig | None:
    """The configuration of one restart: ``config`` with ``seed`` (on resume ``None`` keeps the
    restart's recorded options); without a ``config``, the system's reference one."""
    if config is not None:
        return replace(config, seed=seed)
    if resume:
        return None
    system = get_system(system) if isinstance(system, str) else system
    return TrainConfig(**{**system.train_defaults, "seed": seed})


def _copy_run(source: Path, target: Path) -> None:
    """Copy a run's files into ``target``, each atomically; a file the source lacks is removed
    there (a ``last.prev.pt`` of an earlier choice must not outlive it)."""
    for name in RUN_FILES:
        if (source / name).is_file():
            atomic_write_bytes(target / name, (source / name).read_bytes())
        elif (target / name).exists():
            (target / name).unlink()
