"""SVI training: minibatches, validation every epoch, best-validation checkpoints, resume.

A step is Pyro's stochastic variational inference step: the loss object (any Pyro ELBO,
optionally a :class:`~pyro_physvae.regularizers.PhysVAELoss`) computes the loss and its
gradients with ``loss_and_grads``; the parameters it touched are then updated with the
reference optimiser, Adam (lr 1e-3, weight decay 1e-6, eps 1e-3) with gradient values
clipped at 5. Unlike ``pyro.optim.Adam``, which builds one torch optimiser per parameter,
one fused torch optimiser updates all parameters at once (several ms a step faster here).
"""

from __future__ import annotations

import json
import math
import time
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
from pyro_physvae.checkpoint import load_checkpoint, save_checkpoint
from pyro_physvae.ode import IntegrationError
from pyro_physvae.regularizers import PhysVAELoss, _SiteRecorder
from pyro_physvae.settings import Setting
from pyro_physvae.systems import System, get_system
from pyro_physvae.validation import check_positive_int

ELBOS: dict[str, Callable[..., ELBO]] = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "renyi": RenyiELBO,
}


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or an ODE blow-up."""


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults are the reference ones.

    ``grad_scale`` multiplies the gradients before clipping and Adam; ``None`` takes
    :func:`reference_grad_scale`, which puts them on the reference implementation's scale so
    that ``clip_value`` and ``adam_eps`` mean what they mean there.

    ``alpha``, ``beta``, ``gamma`` (R_ppc, R_DA,2, R_DA,1 weights) default to the system's
    reference values and apply to ``phys+nn+reg`` only. ``guide`` is ``"amortized"`` (the
    system's encoder) or an AutoGuide with per-sequence latents (see
    :mod:`pyro_physvae.autoguides`); ``renyi_alpha`` is the order of ``elbo="renyi"`` (0 gives
    the importance-weighted bound, IWAE).
    """

    epochs: int = 5000
    batch_size: int = 200
    lr: float = 1e-3
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
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_particles", "checkpoint_every"):
            check_positive_int(getattr(self, name), name)
        if self.elbo not in ELBOS:
            raise ValueError(f"unknown ELBO {self.elbo!r}; choose one of: {', '.join(ELBOS)}")
        check_guide_kind(self.guide)
        if not (self.renyi_alpha >= 0 and self.renyi_alpha != 1):
            raise ValueError(f"renyi_alpha must be >= 0 and not 1, got {self.renyi_alpha}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("lr", "adam_eps", "clip_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.grad_scale is not None and not self.grad_scale > 0:
            raise ValueError(f"grad_scale must be positive, got {self.grad_scale}")
        for name in ("alpha", "beta", "gamma", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.threads is not None:
            check_positive_int(self.threads, "threads")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available here")
    return torch.device(name)


@contextmanager
def _divergence_as_error():
    """Turn Pyro's rejection of NaN distribution parameters ("found invalid values"), which
    is how overflowing networks show up, into :class:`TrainingDiverged`."""
    try:
        yield
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
        with _divergence_as_error():
            value, params = self._params(*args, **kwargs)
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value}")
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
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train a model/guide pair on ``data_dir/{train,valid}.nc`` and write ``run_dir``.

    ``run_dir`` receives ``config.json``, ``last.pt`` (every ``checkpoint_every`` epochs and
    at the end), ``best.pt`` (best validation loss so far) and ``history.json``.

    Returns:
        One record per epoch: ``epoch``, ``loss`` (mean training loss per sequence), the
        regularizer terms, ``val_loss``, ``val_mse`` and wall times ``time_train`` and
        ``time_epoch`` (seconds).

    Raises:
        TrainingDiverged: the loss or the ODE solution became non-finite; the checkpoints
            already written are left as they were.
    """
    system = get_system(system) if isinstance(system, str) else system
    setting = Setting.parse(setting)
    config = config or TrainConfig(**system.train_defaults)
    if setting.regularized:
        # Record the weights themselves, not "the system's default", which may change later.
        config = with_reg_weights(config, system)
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)

    train_ds = system.load_split(data_dir, "train")
    valid_ds = system.load_split(data_dir, "valid")
    model_kwargs = {**system.model_kwargs_from_data(train_ds), **(model_kwargs or {})}
    guide_kwargs = dict(guide_kwargs or {})
    x_train = system.observations(train_ds, device)
    x_valid = system.observations(valid_ds, device)
    n = x_train.shape[0]

    state = None
    if resume:
        state = load_checkpoint(run_dir / "last.pt", map_location=device)
        if state["setting"] != setting.value or state["system"] != system.name:
            raise ValueError(f"{run_dir}/last.pt is a {state['system']} {state['setting']} run, "
                             f"not {system.name} {setting.value}")
        model_kwargs, guide_kwargs = state["model_kwargs"], state["guide_kwargs"]

    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    model, guide = build_pair(system, setting, config.guide, model_kwargs, guide_kwargs)
    model.to(device)
    guide.to(device)
    batch_size = config.batch_size if supports_subsampling(guide) else n
    # An AutoGuide has latents for the training sequences only: it is validated on them.
    x_check = x_valid if config.guide == "amortized" else x_train
    trainer = make_trainer(system, setting, model, guide, config, n)
    loss = trainer.loss
    if config.guide != "amortized":
        with torch.no_grad():
            guide(x_train, subsample=torch.arange(min(batch_size, n), device=device))  # create its parameters
    trainer.init_optimizer(module_parameters(model, guide))

    history: list[dict[str, float]] = []
    best_val, start = math.inf, 0
    if state is not None:
        model.load_state_dict(state["model_state"])
        guide.load_state_dict(state["guide_state"])
        trainer.optimizer.load_state_dict(state["optimizer_state"])
        history, best_val, start = state["history"], state["best_val"], state["epoch"]
        torch.set_rng_state(state["rng_state"])

    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"system": system.name, "system_source": dict(system.source), "setting": setting.value,
            "model_kwargs": model_kwargs,
            "guide_kwargs": guide_kwargs, "train_config": asdict(config),
            "data_dir": str(Path(data_dir).resolve()), "n_train": n,
            "torch_threads": torch.get_num_threads()}
    (run_dir / "config.json").write_text(json.dumps(meta, indent=2))

    def snapshot(epoch: int) -> dict[str, Any]:
        return {**meta, "epoch": epoch, "best_val": best_val, "history": history,
                "model_state": model.state_dict(), "guide_state": guide.state_dict(),
                "optimizer_state": trainer.optimizer.state_dict(),
                "rng_state": torch.get_rng_state()}

    bar = tqdm(range(start, config.epochs), desc=f"{system.name} {setting.value}",
               disable=not progress, initial=start, total=config.epochs, dynamic_ncols=True)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        guide.train()
        # Guides that pack all sequences' latents into one vector need them in a fixed order.
        perm = torch.randperm(n, device=device) if batch_size < n else torch.arange(n, device=device)
        # A system's augmentation (e.g. flipped and rotated images) gives each epoch a fresh,
        # seeded copy of the training data; AutoGuides' per-sequence latents need the originals.
        x_epoch = x_train
        if system.augment is not None and config.guide == "amortized":
            x_epoch = system.augment(x_train, torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        total, terms = 0.0, {}
        try:
            for i in range(0, n, batch_size):
                batch = perm[i:i + batch_size]
                # Each step's loss estimates the full-data loss; weight it by batch share.
                share = batch.shape[0] / n
                total += share * trainer.step(x_epoch, subsample=batch)
                for k, v in getattr(loss, "last_terms", {}).items():
                    terms[k] = terms.get(k, 0.0) + share * v
            t_train = time.perf_counter() - t0
            model.eval()
            guide.eval()
            val_loss, x_mean = trainer.evaluate(x_check)
        except (IntegrationError, TrainingDiverged) as e:
            kept = run_dir / "best.pt"
            raise TrainingDiverged(
                f"training stopped at epoch {epoch + 1}: {e}. Checkpoints already written "
                f"are kept unchanged ({kept if kept.exists() else 'none yet'})."
            ) from e
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"validation loss became {val_loss} at epoch {epoch + 1}; "
                                   "checkpoints already written are kept unchanged")
        record = {"epoch": epoch + 1, "loss": total / n, **terms,
                  "val_loss": val_loss / x_check.shape[0],
                  "val_mse": float((x_mean - x_check).pow(2).mean()) if x_mean is not None
                  else math.nan,
                  "time_train": t_train, "time_epoch": time.perf_counter() - t0}
        history.append(record)
        if record["val_loss"] < best_val:
            best_val = record["val_loss"]
            save_checkpoint(snapshot(epoch + 1), run_dir / "best.pt")
        if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
            save_checkpoint(snapshot(epoch + 1), run_dir / "last.pt")
        bar.set_postfix({"loss": f"{record['loss']:.4g}",
                         **{k: f"{v:.3g}" for k, v in terms.items()},
                         "val_loss": f"{record['val_loss']:.4g}",
                         "val_mse": f"{record['val_mse']:.2e}"}, refresh=False)
    (run_dir / "history.json").write_text(json.dumps(history))
    return history
