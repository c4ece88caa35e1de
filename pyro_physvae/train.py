"""SVI training: minibatches, validation every epoch, verified checkpoints, honest resume.

A step is Pyro's stochastic variational inference step: the loss object (any Pyro ELBO,
optionally a :class:`~pyro_physvae.regularizers.PhysVAELoss`) computes the loss and its
gradients with ``loss_and_grads``; the parameters it touched are then updated with the
reference optimiser, Adam (lr 1e-3, weight decay 1e-6, eps 1e-3) with gradient values
clipped at 5. Unlike ``pyro.optim.Adam``, which builds one torch optimiser per parameter,
one fused torch optimiser updates all parameters at once (several ms a step faster here).

A run directory is written by one trainer at a time (:class:`~pyro_physvae.files.DirectoryLock`)
and survives a kill at any moment: checkpoints are atomic and carry a digest, ``last.pt``
is written after every ``checkpoint_every`` epochs (default: every epoch) with the one
before kept as ``last.prev.pt``, and ``history.jsonl`` gains one line per epoch.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor
from tqdm.auto import tqdm

from pyro_physvae.autoguides import check_guide_kind, make_autoguide, supports_subsampling
from pyro_physvae.checkpoint import (
    RUN_KEYS,
    CheckpointError,
    encode_checkpoint,
    load_checkpoint,
    load_module_state,
    write_checkpoint_bytes,
)
from pyro_physvae.data.lazy import SCAN_ROWS, LazyRows, in_memory, row_chunks
from pyro_physvae.devices import resolve_device
from pyro_physvae.files import DirectoryLock, atomic_write, remove_temporaries
from pyro_physvae.ode import IntegrationError
from pyro_physvae.regularizers import NonFiniteStep, PhysVAELoss, _SiteRecorder, refuse_non_finite_step
from pyro_physvae.settings import Setting
from pyro_physvae.systems import System, get_system
from pyro_physvae.validation import check_positive_int

ELBOS: dict[str, Callable[..., ELBO]] = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "renyi": RenyiELBO,
}


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or gradient, or an ODE blow-up."""


#: Options that may change when a run is resumed; all others are fixed for a run.
RESUMABLE = ("epochs", "lr", "lr_schedule", "lr_final_ratio", "threads", "device",
             "checkpoint_every", "stream")
#: The files of a run that :func:`train` writes (``overwrite=True`` replaces them).
RUN_FILES = ("config.json", "history.jsonl", "last.pt", "last.prev.pt", "best.pt")


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults are the reference ones.

    ``grad_scale`` multiplies the gradients before clipping and Adam; ``None`` takes
    :func:`reference_grad_scale`, which puts them on the reference implementation's scale so
    that ``clip_value`` and ``adam_eps`` mean what they mean there.

    ``lr_schedule`` (a name in :data:`LR_SCHEDULES`) changes the learning rate from epoch to
    epoch, down to ``lr * lr_final_ratio`` in the last epoch (see :func:`scheduled_lr`); the
    default, ``"constant"``, is the reference's.

    ``alpha``, ``beta``, ``gamma`` (R_ppc, R_DA,2, R_DA,1 weights) default to the system's
    reference values and apply to ``phys+nn+reg`` only. ``guide`` is ``"amortized"`` (the
    system's encoder) or an AutoGuide with per-sequence latents (see
    :mod:`pyro_physvae.autoguides`); ``renyi_alpha`` is the order of ``elbo="renyi"`` (0 gives
    the importance-weighted bound, IWAE).
    """

    epochs: int = 5000
    batch_size: int = 200
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.01
    weight_decay: float = 1e-6
    adam_eps: float = 1e-3
    clip_value: float = 5.0
    seed: int = 0
    elbo: str = "meanfield"
    num_particles: int = 1
    renyi_alpha: float = 0.0
    guide: str = "amortized"
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    grad_scale: float | None = None
    device: str = "cpu"
    threads: int | None = None
    checkpoint_every: int = 1
    stream: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_particles", "checkpoint_every"):
            check_positive_int(getattr(self, name), name)
        if self.elbo not in ELBOS:
            raise ValueError(f"unknown ELBO {self.elbo!r}; choose one of: {', '.join(ELBOS)}")
        check_guide_kind(self.guide)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of: "
                             f"{', '.join(LR_SCHEDULES)}")
        if not (_is_number(self.lr_final_ratio) and 0 < self.lr_final_ratio <= 1):
            raise ValueError(f"lr_final_ratio must be a number in (0, 1], got {self.lr_final_ratio!r}")
        if not (self.renyi_alpha >= 0 and self.renyi_alpha != 1):
            raise ValueError(f"renyi_alpha must be >= 0 and not 1, got {self.renyi_alpha}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("lr", "adam_eps", "clip_value", "grad_scale"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        for name in ("alpha", "beta", "gamma", "weight_decay", "renyi_alpha"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.threads is not None:
            check_positive_int(self.threads, "threads")
        if not isinstance(self.stream, bool):
            raise ValueError(f"stream must be True or False, got {self.stream!r}")
        if self.stream and self.guide != "amortized":
            raise ValueError(f"stream=True reads minibatches from the files, which needs the "
                             f"amortized guide; the {self.guide!r} guide holds every sequence's "
                             "latents: load the data into memory (stream=False)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


#: Learning-rate schedules: the share of the way from ``lr`` (1) to ``lr * lr_final_ratio``
#: (0) still to go, as a function of the training progress in ``[0, 1]``.
LR_SCHEDULES: dict[str, Callable[[float], float]] = {"constant": _constant, "cosine": _cosine}


def scheduled_lr(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) of a run of ``config.epochs`` epochs.

    ``"constant"`` keeps ``config.lr``. ``"cosine"`` falls from ``config.lr`` in the first
    epoch to ``config.lr * config.lr_final_ratio`` in the last, along half a cosine, so that
    the last epochs take small steps and the best-validation checkpoint stops depending on
    where the last large step happened to land. The schedule is a function of the epoch and
    of ``config.epochs`` only: a resumed run continues it exactly, and a run resumed with more
    epochs follows the longer schedule from where it stands.
    """
    progress = epoch / max(config.epochs - 1, 1)
    ratio = config.lr_final_ratio
    return config.lr * (ratio + (1.0 - ratio) * LR_SCHEDULES[config.lr_schedule](min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_loss(setting: Setting, system: System, config: TrainConfig,
              model: torch.nn.Module | None = None) -> ELBO:
    """The ELBO of ``config`` plus, for ``phys+nn+reg``, the weighted regularizers.

    ``alpha``, ``beta``, ``gamma`` are in the reference's units (relative to the *sum of
    squared errors*); :class:`~pyro_physvae.regularizers.PhysVAELoss` converts them to ELBO
    units with the model's likelihood precision and, as in the reference, weights the KL part
    by ``1 + alpha``. With an AutoGuide the terms that act through the encoder are left out
    (with a warning). ``model`` is not needed (kept for callers that pass it).
    """
    extra = {"alpha": config.renyi_alpha} if config.elbo == "renyi" else {}
    elbo = ELBOS[config.elbo](num_particles=config.num_particles,
                              vectorize_particles=config.num_particles > 1, **extra)
    if not setting.regularized:
        return elbo
    weights = with_reg_weights(config, system)
    beta, gamma = weights.beta, weights.gamma
    if config.guide != "amortized":  # R_DA,1 and R_DA,2 act through the encoder
        beta = gamma = 0.0
    return PhysVAELoss(elbo, alpha=weights.alpha, beta=beta, gamma=gamma)


def with_reg_weights(config: TrainConfig, system: System) -> TrainConfig:
    """``config`` with the regularizer weights it leaves ``None`` set to the system's."""
    names = ("alpha", "beta", "gamma")
    return replace(config, **{k: d if getattr(config, k) is None else getattr(config, k)
                              for k, d in zip(names, system.reg_weights, strict=True)})


def reference_grad_scale(model: torch.nn.Module, n: int) -> float:
    """``2 sigma^2 / N``: the factor from our loss, the negative ELBO summed over the ``N``
    training sequences, to the reference's, the squared error averaged over a batch.

    Adam is invariant to the scale of the gradients except through ``eps`` and gradient
    clipping; the reference's ``eps = 1e-3`` and clipping at 5 were tuned on its scale, where
    ``eps`` damps the steps of parameters with small gradients. Unscaled, our gradients are
    ``N / (2 sigma^2)`` (about 1e9 for advection-diffusion) times larger, so every gradient
    would be clipped and ``eps`` would do nothing.
    """
    if hasattr(model, "noise_scale"):
        return float(2.0 * model.noise_scale().detach().pow(2)) / n
    return 1.0 / n


def build_pair(system: System, setting: str | Setting, guide: str = "amortized",
               model_kwargs: dict | None = None, guide_kwargs: dict | None = None):
    """The system's model and a guide: its amortized encoder or an AutoGuide."""
    if check_guide_kind(guide) == "amortized":
        return system.build(setting, model_kwargs, guide_kwargs)
    model = system.model_cls(Setting.parse(setting), **(model_kwargs or {}))
    return model, make_autoguide(guide, model, **(guide_kwargs or {}))


def device_rng_state(device: torch.device) -> dict[str, Tensor]:
    """What a checkpoint keeps of ``device``'s random state besides the CPU's ``rng_state``:
    on CUDA the guide's draws and the minibatch permutations come from the GPU's own
    generator, so a resumed run needs it to continue as if it had never stopped
    (``{"cuda_rng_state": ...}``; nothing on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"cuda_rng_state": torch.cuda.get_rng_state(device)}


@contextmanager
def _divergence_as_error():
    """Turn Pyro's rejection of NaN distribution parameters ("found invalid values"), which
    is how overflowing networks show up, and a refused non-finite step into
    :class:`TrainingDiverged`."""
    try:
        yield
    except NonFiniteStep as e:
        raise TrainingDiverged(str(e)) from e
    except ValueError as e:
        if "found invalid values" in str(e):
            raise TrainingDiverged(f"a distribution parameter became NaN ({str(e).splitlines()[0]})") from e
        raise


class SVITrainer:
    """Stochastic variational inference with one fused Adam over all parameters.

    ``step(*args, **kwargs)`` behaves like ``pyro.infer.SVI.step``: it returns the loss
    estimate and updates every parameter that the model and guide touched (parameters
    created lazily, as by AutoGuides, join the optimiser when first seen).
    """

    def __init__(self, model: Callable, guide: Callable, loss: ELBO, config: TrainConfig,
                 grad_scale: float = 1.0) -> None:
        self.model, self.guide, self.loss, self.config = model, guide, loss, config
        self.grad_scale = float(grad_scale)
        self.optimizer: torch.optim.Adam | None = None
        self._known: set[int] = set()

    def _params(self, *args, **kwargs) -> tuple[float, list[Tensor]]:
        with poutine.trace(param_only=True) as tr:
            value = self.loss.loss_and_grads(self.model, self.guide, *args, **kwargs)
        params = [site["value"].unconstrained() for site in tr.trace.nodes.values()]
        return value, params

    def _ensure_optimizer(self, params: list[Tensor]) -> None:
        new = [p for p in params if id(p) not in self._known]
        if not new:
            return
        self._known.update(id(p) for p in new)
        c = self.config
        if self.optimizer is None:
            # The fused kernel does the same update as the multi-tensor one in one pass over
            # the parameters (about 1 ms less per pendulum step on one CPU thread).
            fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in new)
            self.optimizer = torch.optim.Adam(new, lr=c.lr, betas=(0.9, 0.999), eps=c.adam_eps,
                                              weight_decay=c.weight_decay, fused=fused,
                                              foreach=None if fused else True)
        else:
            self.optimizer.add_param_group({"params": new})

    def init_optimizer(self, params: list[Tensor]) -> None:
        """Create the optimiser over ``params`` in a fixed order (needed to resume)."""
        self._ensure_optimizer(params)

    def step(self, *args, **kwargs) -> float:
        """One SVI step. A step whose loss or gradient is not finite is not applied: the
        parameters keep their values and :class:`TrainingDiverged` is raised."""
        with _divergence_as_error():
            value, params = self._params(*args, **kwargs)
            if not isinstance(self.loss, PhysVAELoss):  # which has refused such a step already
                refuse_non_finite_step(value, params)
        self._ensure_optimizer(params)
        grads = [p.grad for p in params if p.grad is not None]
        if self.grad_scale != 1.0 and grads:
            torch._foreach_mul_(grads, self.grad_scale)
        torch.nn.utils.clip_grad_value_(params, self.config.clip_value)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    @torch.no_grad()
    def evaluate(self, *args, **kwargs) -> tuple[float, Tensor | None]:
        """Loss estimate (no gradients) and the model's recorded ``x_mean`` of that draw."""
        with _divergence_as_error(), _SiteRecorder() as rec:
            value = self.loss.loss(self.model, self.guide, *args, **kwargs)
        return value, rec.values.get("x_mean")


def validation_loss(trainer: SVITrainer, x: Tensor | LazyRows, chunk: int | None = None
                    ) -> tuple[float, float]:
    """The loss of the rows ``x`` (summed over them, no gradients) and the mean squared error
    of the model's ``x_mean`` (``nan`` for a model without one), all rows at once or
    ``chunk`` rows at a time (bounded memory; the loss is a sum over rows, so the chunks'
    losses add up to an estimate of the same loss)."""
    total, squared, elements = 0.0, 0.0, 0
    for xb in row_chunks(x, chunk or x.shape[0]):
        value, x_mean = trainer.evaluate(xb)
        total += value
        if x_mean is None:
            squared, elements = math.nan, 1
            continue
        error = (x_mean - xb).pow(2)
        squared += float(error.sum())
        elements += error.numel()
    return total, squared / elements


def make_trainer(system: System, setting: Setting, model: torch.nn.Module, guide: Callable,
                 config: TrainConfig, n_train: int) -> SVITrainer:
    """The trainer :func:`train` uses: the loss of ``config`` (:func:`make_loss`) and its
    gradient scale (``config.grad_scale``, or the reference loss scale for ``n_train``
    training sequences). Its optimiser is created by ``init_optimizer`` or the first step."""
    loss = make_loss(setting, system, config, model)
    grad_scale = (config.grad_scale if config.grad_scale is not None
                  else reference_grad_scale(model, n_train))
    return SVITrainer(model, guide, loss, config, grad_scale)


def module_parameters(*modules: torch.nn.Module) -> list[Tensor]:
    """Parameters of the modules in a fixed order, each once."""
    seen: dict[int, Tensor] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def train(
    system: str | System,
    setting: str | Setting,
    data_dir: str | Path,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    model_kwargs: dict | None = None,
    guide_kwargs: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train a model/guide pair on ``data_dir/{train,valid}.nc`` and write ``run_dir``.

    ``run_dir`` receives ``config.json``, ``history.jsonl`` (one JSON record per epoch,
    appended as training goes), ``last.pt`` (after the first epoch, every
    ``checkpoint_every`` epochs and at the end; the one before is kept as ``last.prev.pt``)
    and ``best.pt`` (best validation loss so far). Data, options and the model's view of the
    data are checked before anything is written; only one trainer at a time may use
    ``run_dir``.

    Args:
        config: optimisation settings; default: the system's reference ones (or, with
            ``resume``, the run's own).
        model_kwargs, guide_kwargs: constructor arguments beyond those read off the data.
        resume: continue the run in ``run_dir`` from its newest intact checkpoint
            (``last.pt``, else ``last.prev.pt``, else ``best.pt``). Of the options, only
            those in :data:`RESUMABLE` (epochs, lr, threads, device, checkpoint_every) may
            differ from the run's; the changes are applied and recorded in ``config.json``.
        overwrite: start afresh in a ``run_dir`` that already holds a run, replacing its
            files; without it such a directory is refused.

    Returns:
        One record per epoch: ``epoch``, ``loss`` (mean training loss per sequence), the
        regularizer terms, ``val_loss``, ``val_mse``, ``lr`` and wall times ``time_train``
        and ``time_epoch`` (seconds).

    Raises:
        ValueError: bad data or options, a resume that would change a fixed option, or a
            ``run_dir`` that is a file or already holds a run.
        DirectoryInUse: another trainer is using ``run_dir``.
        TrainingDiverged: the loss, a gradient or the ODE solution became non-finite; the
            checkpoints already written are left as they were.
    """
    return _run_training(system, setting, data_dir, run_dir, config, model_kwargs, guide_kwargs,
                         resume=resume, overwrite=overwrite, progress=progress, engine=_train)


def _run_training(system: str | System, setting: str | Setting, data_dir: str | Path,
                  run_dir: str | Path, config: TrainConfig | None, model_kwargs: dict | None,
                  guide_kwargs: dict | None, *, resume: bool, overwrite: bool, progress: bool,
                  engine: Callable[..., list[dict[str, float]]], writer: bool = True,
                  ) -> list[dict[str, float]]:
    """:func:`train`'s checks, data, resume options and lock, then ``engine`` (``_train``'s
    signature) does the training. ``writer=False``: a process of a multi-process run that
    only reads (it neither takes the lock nor writes; the writing process does both)."""
    system = get_system(system) if isinstance(system, str) else system
    setting = Setting.parse(setting)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file, expected a directory")
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist")
    if not resume and not overwrite and _holds_run(run_dir):
        raise ValueError(f"{run_dir} already holds a run ({', '.join(_held_files(run_dir))}); "
                         "resume it (--resume), replace it (--overwrite) or choose another directory")

    lazy = config.stream if config is not None else _recorded_stream(run_dir) if resume else False
    train_ds = system.load_split(data_dir, "train", lazy=lazy)
    valid_ds = system.load_split(data_dir, "valid", lazy=lazy)
    data_kwargs = system.model_kwargs_from_data(train_ds)
    system.check_data_fits(valid_ds, data_kwargs)  # same length, time step, ... as the training split
    lock = DirectoryLock(run_dir)
    if writer and run_dir.is_dir():  # from now on the only writer of an existing run directory
        lock.acquire()
    try:
        state, resumed_from = None, None
        if resume:
            state, resumed_from = latest_checkpoint(run_dir)
            config, model_kwargs, guide_kwargs = _resumed_options(
                state, system, setting, config, data_kwargs, model_kwargs, guide_kwargs)
        else:
            config = config or TrainConfig(**system.train_defaults)
            if setting.regularized:
                # Record the weights themselves, not "the system's default", which may change.
                config = with_reg_weights(config, system)
            model_kwargs = {**data_kwargs, **(model_kwargs or {})}
            guide_kwargs = dict(guide_kwargs or {})
        return engine(system, setting, train_ds, valid_ds, data_dir, run_dir, config,
                      model_kwargs, guide_kwargs, state, resumed_from, lock, progress)
    finally:
        lock.release()


def _recorded_stream(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` streams its data (its ``config.json``), so that a
    resume without options opens the data as the run did."""
    try:
        return bool(json.loads((run_dir / "config.json").read_text())["train_config"].get("stream"))
    except (OSError, ValueError, KeyError, TypeError):
        return False  # the resume itself reports a missing or damaged run


def _holds_run(run_dir: Path) -> bool:
    return bool(_held_files(run_dir))


def _held_files(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def latest_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu"
                      ) -> tuple[dict[str, Any], Path]:
    """The newest intact checkpoint of ``run_dir`` to resume from, and its path.

    Reads ``last.pt``, ``last.prev.pt`` and ``best.pt`` and keeps the one with the most
    epochs among those that pass :func:`~pyro_physvae.checkpoint.load_checkpoint`'s
    checks; a damaged one is reported in a warning and skipped.

    Raises:
        FileNotFoundError: the run has no checkpoint yet.
        CheckpointError: every checkpoint of the run is damaged.
    """
    run_dir = Path(run_dir)
    required = (*RUN_KEYS, "optimizer_state", "history", "best_val", "rng_state")
    good: list[tuple[dict[str, Any], Path]] = []
    damaged: list[str] = []
    for name in ("last.pt", "last.prev.pt", "best.pt"):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            good.append((load_checkpoint(path, map_location=device, required=required), path))
        except (CheckpointError, OSError) as e:
            damaged.append(str(e))
    if not good:
        if damaged:
            raise CheckpointError(f"cannot resume {run_dir}: no intact checkpoint ({'; '.join(damaged)})")
        raise FileNotFoundError(f"cannot resume: {run_dir} has no checkpoint (last.pt, "
                                "last.prev.pt or best.pt); the run stopped before its first epoch ended")
    state, path = max(good, key=lambda item: item[0]["epoch"])
    if damaged:
        warnings.warn(f"{'; '.join(damaged)}. Resuming from {path.name} (epoch {state['epoch']}).",
                      UserWarning, stacklevel=2)
    return state, path


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, as JSON would give it back (to compare options)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _resumed_options(state: dict[str, Any], system: System, setting: Setting,
                     config: TrainConfig | None, data_kwargs: dict, model_kwargs: dict | None,
                     guide_kwargs: dict | None) -> tuple[TrainConfig, dict, dict]:
    """The options of a resumed run: the run's own, with the :data:`RESUMABLE` ones of
    ``config`` applied. Any other difference, in ``config``, in the constructor arguments
    given or in what the data say (``n_steps``, ``dt``, ...), is refused by name."""
    if state["system"] != system.name or state["setting"] != setting.value:
        raise ValueError(f"the run is {state['system']} {state['setting']}, not "
                         f"{system.name} {setting.value}; resume it with its own system and setting")
    stored = TrainConfig.from_dict(state["train_config"])
    if config is None:
        config = stored
    elif setting.regularized:
        config = with_reg_weights(config, system)
    differ = [f.name for f in fields(TrainConfig)
              if f.name not in RESUMABLE and getattr(config, f.name) != getattr(stored, f.name)]
    differ = [f"{name} (run: {getattr(stored, name)!r}, asked: {getattr(config, name)!r})" for name in differ]
    guide_cls = system.guide_cls if stored.guide == "amortized" else None
    for what, given, kept, cls in (
            ("model option", {**data_kwargs, **(model_kwargs or {})}, state["model_kwargs"],
             system.model_cls),
            ("guide option", guide_kwargs or {}, state["guide_kwargs"], guide_cls)):
        for key, value in given.items():
            used = kept[key] if key in kept else _default_argument(cls, key)
            if _plain(used) != _plain(value):
                differ.append(f"{what} {key} (run: {used!r}, asked: {value!r})")
    if differ:
        raise ValueError(f"cannot resume with a different {'; '.join(differ)}. Only "
                         f"{', '.join(RESUMABLE)} may change on resume; start a new run "
                         "directory to change the others")
    return config, dict(state["model_kwargs"]), dict(state["guide_kwargs"])


def _default_argument(cls: type | None, name: str) -> Any:
    """The default of constructor argument ``name`` of ``cls`` (``None`` if it has none)."""
    if cls is None:
        return None
    parameter = inspect.signature(cls.__init__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """The per-epoch records of a run, read from its ``history.jsonl`` (a line cut short by
    a kill while it was being written is left out)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training history in {run_dir} (history.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class _RunWriter:
    """Writes a run directory's files: ``config.json``, the history and the checkpoints."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._history = None

    def start(self, meta: dict[str, Any], history: list[dict[str, float]], fresh: bool) -> None:
        """Clean up, record the options and begin the history with the ``history`` so far."""
        remove_temporaries(self.run_dir)
        if fresh:  # overwrite: the old run's files go
            for name in RUN_FILES:
                (self.run_dir / name).unlink(missing_ok=True)
        self.write_json("config.json", meta)
        lines = "".join(json.dumps(r) + "\n" for r in history)
        atomic_write(self.run_dir / "history.jsonl", lambda tmp: Path(tmp).write_text(lines))
        self._history = open(self.run_dir / "history.jsonl", "a")

    def write_json(self, name: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2)
        atomic_write(self.run_dir / name, lambda tmp: Path(tmp).write_text(text))

    def append(self, record: dict[str, float]) -> None:
        self._history.write(json.dumps(record) + "\n")
        self._history.flush()
        os.fsync(self._history.fileno())

    def checkpoint(self, state: dict[str, Any], last: bool, best: bool) -> None:
        """Write ``state`` as ``best.pt`` and/or ``last.pt`` (keeping the previous
        ``last.pt`` as ``last.prev.pt``); serialised once."""
        if not (last or best):
            return
        data = encode_checkpoint(state)
        if best:
            write_checkpoint_bytes(data, self.run_dir / "best.pt")
        if last:
            self._keep_previous()
            write_checkpoint_bytes(data, self.run_dir / "last.pt")

    def _keep_previous(self) -> None:
        last, prev = self.run_dir / "last.pt", self.run_dir / "last.prev.pt"
        if not last.exists():
            return
        tmp = self.run_dir / ".last.prev.pt.link.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(last, tmp)
        except OSError:  # a file system without hard links
            shutil.copy2(last, tmp)
        os.replace(tmp, prev)

    def close(self) -> None:
        if self._history is not None:
            self._history.close()
            self._history = None


@dataclass
class _RunSetup:
    """What :func:`_setup_run` prepares for an engine: data on ``device``, the model/guide
    pair, its :class:`SVITrainer` (optimiser created, resumed state loaded), the batch size
    and the history so far."""

    system: System
    setting: Setting
    data_dir: str | Path
    config: TrainConfig
    model_kwargs: dict
    guide_kwargs: dict
    device: torch.device
    x_train: Tensor | LazyRows
    x_check: Tensor | LazyRows
    n: int
    model: torch.nn.Module
    guide: Callable
    trainer: SVITrainer
    batch_size: int
    history: list[dict[str, float]]
    best_val: float
    start: int
    resumes: list[dict[str, Any]]

    def meta(self, **extra: Any) -> dict[str, Any]:
        """The run's ``config.json`` (and the options part of every checkpoint)."""
        return {"system": self.system.name, "system_source": dict(self.system.source),
                "setting": self.setting.value, "model_kwargs": self.model_kwargs,
                "guide_kwargs": self.guide_kwargs, "train_config": asdict(self.config),
                "data_dir": str(Path(self.data_dir).resolve()), "n_train": self.n,
                "torch_threads": torch.get_num_threads(), "resumes": self.resumes, **extra}


def _setup_run(system: System, setting: Setting, train_ds, valid_ds, data_dir: str | Path,
               config: TrainConfig, model_kwargs: dict, guide_kwargs: dict,
               state: dict[str, Any] | None, resumed_from: Path | None,
               device: torch.device | None = None) -> _RunSetup:
    """Data, seeded model/guide pair, trainer and resumed state of :func:`_train` (shared with
    other engines); ``device`` default: ``config.device``. Writes nothing."""
    device = resolve_device(config.device) if device is None else device
    if config.threads:
        torch.set_num_threads(config.threads)
    x_train = system.observations(train_ds, device)
    x_valid = system.observations(valid_ds, device)
    if not config.stream:
        x_train, x_valid = in_memory(x_train), in_memory(x_valid)
    n = x_train.shape[0]
    if state is not None and state.get("n_train", n) != n:
        raise ValueError(f"the training split in {data_dir} has {n} sequences; the run was "
                         f"trained on {state['n_train']}: resume it on its own data")

    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    model, guide = build_pair(system, setting, config.guide, model_kwargs, guide_kwargs)
    model.to(device)
    guide.to(device)
    # Data that do not fit the model fail here, not after an epoch.
    for split, x in (("train", x_train), ("valid", x_valid)):
        try:
            for xb in row_chunks(x, max(config.batch_size, SCAN_ROWS)):
                model.check_observations(xb)
        except ValueError as e:
            raise ValueError(f"the {split} split of {data_dir} does not fit the model: {e}") from None
    batch_size = config.batch_size if supports_subsampling(guide) else n
    # An AutoGuide has latents for the training sequences only: it is validated on them.
    x_check = x_valid if config.guide == "amortized" else x_train
    trainer = make_trainer(system, setting, model, guide, config, n)
    if config.guide != "amortized":
        with torch.no_grad():
            guide(x_train, subsample=torch.arange(min(batch_size, n), device=device))  # create its parameters
    trainer.init_optimizer(module_parameters(model, guide))

    history: list[dict[str, float]] = []
    best_val, start = math.inf, 0
    resumes: list[dict[str, Any]] = []
    if state is not None:
        load_module_state(model, state["model_state"], f"{resumed_from} model_state")
        load_module_state(guide, state["guide_state"], f"{resumed_from} guide_state")
        trainer.optimizer.load_state_dict(state["optimizer_state"])
        history, best_val, start = list(state["history"]), state["best_val"], state["epoch"]
        torch.set_rng_state(state["rng_state"])
        if "cuda_rng_state" in state and device.type == "cuda":  # the draws made on the GPU
            torch.cuda.set_rng_state(state["cuda_rng_state"].cpu(), device)
        before = TrainConfig.from_dict(state["train_config"])
        changed = {k: [getattr(before, k), getattr(config, k)] for k in RESUMABLE
                   if getattr(before, k) != getattr(config, k)}
        resumes = [*state.get("resumes", []),
                   {"epoch": start, "from": resumed_from.name, "changed": changed}]
        if config.epochs < start:
            raise ValueError(f"the run has already trained {start} epochs, more than the "
                             f"{config.epochs} asked for; ask for more epochs to continue it")

    return _RunSetup(system, setting, data_dir, config, model_kwargs, guide_kwargs, device,
                     x_train, x_check, n, model, guide, trainer, batch_size, history, best_val,
                     start, resumes)


def _train(system: System, setting: Setting, train_ds, valid_ds, data_dir: str | Path,
           run_dir: Path, config: TrainConfig, model_kwargs: dict, guide_kwargs: dict,
           state: dict[str, Any] | None, resumed_from: Path | None, lock: DirectoryLock,
           progress: bool) -> list[dict[str, float]]:
    run = _setup_run(system, setting, train_ds, valid_ds, data_dir, config, model_kwargs,
                     guide_kwargs, state, resumed_from)
    model, guide, trainer, loss, device = run.model, run.guide, run.trainer, run.trainer.loss, run.device
    x_train, x_check, n, batch_size = run.x_train, run.x_check, run.n, run.batch_size
    history, best_val, start = run.history, run.best_val, run.start
    if not lock.held:
        lock.acquire()
    meta = run.meta()
    writer = _RunWriter(run_dir)
    writer.start(meta, history, fresh=state is None)

    def snapshot(epoch: int) -> dict[str, Any]:
        return {**meta, "epoch": epoch, "best_val": best_val, "history": history,
                "model_state": model.state_dict(), "guide_state": guide.state_dict(),
                "optimizer_state": trainer.optimizer.state_dict(),
                "rng_state": torch.get_rng_state(), **device_rng_state(device)}

    bar = tqdm(range(start, config.epochs), desc=f"{system.name} {setting.value}",
               disable=not progress, initial=start, total=config.epochs, dynamic_ncols=True)
    try:
        for epoch in bar:
            record = _epoch(system, config, trainer, loss, model, guide, x_train, x_check,
                            n, batch_size, epoch, run_dir, device)
            history.append(record)
            writer.append(record)
            best = record["val_loss"] < best_val
            if best:
                best_val = record["val_loss"]
            done = epoch + 1
            last = done == 1 or done % config.checkpoint_every == 0 or done == config.epochs
            writer.checkpoint(snapshot(done), last=last, best=best)
            bar.set_postfix({"loss": f"{record['loss']:.4g}",
                             **{k: f"{v:.3g}" for k, v in record.items() if k not in _RECORD_KEYS},
                             "val_loss": f"{record['val_loss']:.4g}",
                             "val_mse": f"{record['val_mse']:.2e}"}, refresh=False)
    finally:
        writer.close()
        bar.close()
    return history


#: The entries of every epoch record; the others are regularizer terms.
_RECORD_KEYS = ("epoch", "loss", "val_loss", "val_mse", "lr", "time_train", "time_epoch")


def _epoch(system: System, config: TrainConfig, trainer: SVITrainer, loss: ELBO,
           model: torch.nn.Module, guide: Callable, x_train: Tensor, x_check: Tensor, n: int,
           batch_size: int, epoch: int, run_dir: Path, device: torch.device) -> dict[str, float]:
    """One pass over the training data in minibatches, then the validation loss."""
    t0 = time.perf_counter()
    lr = scheduled_lr(config, epoch)
    set_lr(trainer.optimizer, lr)
    model.train()
    guide.train()
    # Guides that pack all sequences' latents into one vector need them in a fixed order.
    perm = torch.randperm(n, device=device) if batch_size < n else torch.arange(n, device=device)
    # A system's augmentation (e.g. flipped and rotated images) gives each epoch a fresh,
    # seeded copy of the training data; AutoGuides' per-sequence latents need the originals.
    augment = system.augment if config.guide == "amortized" else None
    epoch_seed = config.seed * 1_000_003 + epoch
    x_epoch = x_train
    if augment is not None and not config.stream:
        x_epoch = augment(x_train, torch.Generator().manual_seed(epoch_seed))
    total, terms = 0.0, {}
    try:
        for i in range(0, n, batch_size):
            batch = perm[i:i + batch_size]
            # Each step's loss estimates the full-data loss; weight it by batch share.
            share = batch.shape[0] / n
            if config.stream:  # just the rows of the minibatch, read from the file
                xb = x_train[batch]
                if augment is not None:
                    xb = augment(xb, torch.Generator().manual_seed(epoch_seed * 1_000_003 + i))
                total += share * trainer.step(xb, size=n, subsample=batch)
            else:
                total += share * trainer.step(x_epoch, subsample=batch)
            for k, v in getattr(loss, "last_terms", {}).items():
                terms[k] = terms.get(k, 0.0) + share * v
        t_train = time.perf_counter() - t0
        model.eval()
        guide.eval()
        val_loss, val_mse = validation_loss(trainer, x_check, batch_size if config.stream else None)
    except (IntegrationError, TrainingDiverged) as e:
        kept = run_dir / "best.pt"
        raise TrainingDiverged(
            f"training stopped at epoch {epoch + 1}: {e}. Checkpoints already written "
            f"are kept unchanged ({kept if kept.exists() else 'none yet'})."
        ) from e
    if not math.isfinite(val_loss):
        raise TrainingDiverged(f"validation loss became {val_loss} at epoch {epoch + 1}; "
                               "checkpoints already written are kept unchanged")
    return {"epoch": epoch + 1, "loss": total / n, **terms,
            "val_loss": val_loss / x_check.shape[0], "val_mse": val_mse,
            "lr": lr, "time_train": t_train, "time_epoch": time.perf_counter() - t0}
