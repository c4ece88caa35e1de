"""Data-parallel training through Lightning: the same loss, steps and run directory on many devices.

:func:`train_lightning` is :func:`~pyro_physvae.train.train` with Lightning's ``Trainer`` as the
engine: its ``"ddp"`` strategy starts one process per device, sets up the process group (gloo on
CPU, NCCL on GPU), broadcasts the initial weights and averages the gradients over the processes
(ranks) in the backward pass. Everything else is this package's own and shared with the
single-process path: the data, the seeded model/guide pair, the loss of ``make_trainer`` (the ELBO
plus, for ``phys+nn+reg``, the regularizers of :class:`~pyro_physvae.regularizers.PhysVAELoss`),
the optimiser, the refusal of non-finite steps, resume, and the run directory, which the rank-0
process writes with the same writer (``config.json``, ``history.jsonl``, ``last.pt``,
``last.prev.pt``, ``best.pt``), so ``physvae evaluate RUN`` and ``physvae train --resume`` work on
the result.

**One step** (manual optimisation, as :meth:`~pyro_physvae.train.SVITrainer.step`): the loss's
``differentiable_loss`` on the rank's shard of the minibatch, ``manual_backward`` (DDP all-reduces
the gradients), the gradients times ``grad_scale`` (``config.grad_scale`` or
:func:`~pyro_physvae.train.reference_grad_scale`), ``clip_grad_value_`` at ``config.clip_value``,
then Adam (lr, betas (0.9, 0.999), eps ``adam_eps``, weight decay). A step whose loss is not
finite on any rank, or whose averaged gradient is not finite, is applied on no rank and stops
training with :class:`~pyro_physvae.train.TrainingDiverged`; the checkpoints already written stay.

**Sharding and scale.** ``batch_size`` is the *global* batch ``B``: every epoch all ranks take the
same permutation of the ``N`` training sequences, cut it into global batches of ``B`` (the last one
may be smaller) and rank ``r`` of ``W`` takes every ``W``-th index of each, ``batch[r::W]``, so the
union of the ranks' minibatches is the global batch and nothing is dropped or repeated; each rank
takes about ``B / W`` sequences. Rank ``r``'s loss with ``subsample=`` its ``B_r`` indices is itself
an estimate of the full-data loss: the ``data`` plate scales its terms by ``N / B_r``. DDP averages
the gradients over ranks; scaling rank ``r``'s loss by ``w_r = W B_r / B`` (1 when the batch
divides evenly) makes that average ``(1/W) sum_r w_r (N / B_r) sum_{i in b_r} grad l_i
= (N / B) sum_{i in b} grad l_i``, exactly the single-process estimate at the global batch ``b``
(terms outside the data plate, weighted ``w_r``, average to themselves). A rank with no sequences in
a last batch smaller than ``W`` contributes zero gradient and weight 0. The training loss recorded
per epoch is averaged over ranks the same way.

**Random numbers.** With one device the permutation is drawn from the global torch generator as in
:func:`~pyro_physvae.train.train`, so ``--devices 1`` repeats the single-process run. With several,
the permutation comes from a generator seeded by (seed, epoch), the same on every rank; rank 0 keeps
the seeded global stream (saved in checkpoints as ``rng_state``) and rank ``r > 0`` reseeds its
stream from (seed, rank, epoch) at every epoch, so the guide's draws differ between ranks and a
resumed run continues as the run never stopped.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyro.poutine as poutine
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from pyro_physvae.autoguides import supports_subsampling
from pyro_physvae.files import DirectoryLock
from pyro_physvae.ode import IntegrationError
from pyro_physvae.regularizers import all_finite
from pyro_physvae.settings import Setting
from pyro_physvae.systems import System
from pyro_physvae.train import (
    _RECORD_KEYS,
    TrainConfig,
    TrainingDiverged,
    _divergence_as_error,
    _run_training,
    _RunSetup,
    _RunWriter,
    _setup_run,
    device_rng_state,
    scheduled_lr,
    set_lr,
    validation_loss,
)

ACCELERATORS = ("cpu", "gpu")
#: ``"auto"``: one device without a process group; ``"ddp"``: one process per device.
STRATEGIES = ("auto", "ddp")


def train_lightning(
    system: str | System,
    setting: str | Setting,
    data_dir: str | Path,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    accelerator: str = "cpu",
    devices: int = 1,
    strategy: str = "auto",
    model_kwargs: dict | None = None,
    guide_kwargs: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, float]]:
    """:func:`~pyro_physvae.train.train` through Lightning, on ``devices`` CPU processes or GPUs.

    Same options, checks, resume rules, run directory and return value as ``train``; see the
    module docstring for the sharding of ``config.batch_size`` (the global batch) over devices.

    Args:
        accelerator: ``"cpu"`` (gloo process group) or ``"gpu"`` (NCCL, one GPU per process).
        devices: number of processes (CPU) or GPUs.
        strategy: ``"ddp"`` (needed for ``devices > 1``): Lightning starts ``devices - 1`` more
            processes by running this program's command line again (``python -m ...`` or the
            script), so call it from a script or ``physvae train``, not from an interactive
            session; ``"auto"``: a single device.

    Returns:
        The per-epoch records (on every rank; rank 0 writes them to ``run_dir``).

    Raises:
        ValueError: bad options, among them ``elbo="renyi"`` (it has no differentiable loss), a
            guide that cannot be trained on minibatches with ``devices > 1``, or a global batch
            smaller than ``devices``; and everything ``train`` raises.
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if devices > 1 and strategy != "ddp":
        raise ValueError(f"{devices} devices need --strategy ddp")
    if config is not None and config.stream:
        raise ValueError("the Lightning engine loads the data into memory: stream=True "
                         "(--stream) trains in one process only")
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("--accelerator gpu was asked for but CUDA is not available here")
    try:
        import lightning  # noqa: F401
    except ImportError:
        raise ImportError("training on several devices needs Lightning: pip install "
                          "'pyro-physvae[lightning]' (lightning>=2.2,<3)") from None
    rank = launched_rank()
    engine = functools.partial(_lightning_engine, accelerator=accelerator, devices=devices,
                               strategy=strategy, rank=rank)
    return _run_training(system, setting, data_dir, run_dir, config, model_kwargs, guide_kwargs,
                         resume=resume, overwrite=overwrite, progress=progress and rank == 0,
                         engine=engine, writer=rank == 0)


def launched_rank() -> int:
    """This process's global rank as the launcher gave it (0 when not launched as a rank):
    ``RANK`` (torchrun, SLURM launchers) or ``LOCAL_RANK`` (Lightning's own launcher, one node)."""
    for name in ("RANK", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, ...), different for different tuples."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B9 + (value << 6) + (value >> 2))) % (1 << 63)
    return value


class ShardedBatches(Sampler[list[int]]):
    """The batch sampler of rank ``rank`` of ``world_size``: the global minibatches of one
    permutation of ``range(n)``, of ``batch_size`` each (the last may be smaller), and of each
    the rank's share ``batch[rank::world_size]`` (possibly empty in a last batch smaller than
    ``world_size``). Every rank yields the same number of batches, ``ceil(n / batch_size)``.

    The permutation: ``arange(n)`` when one batch holds all; with one rank, the global torch
    generator (as the single-process trainer); else a generator seeded by (``seed``, epoch).
    ``set_epoch(e)`` (Lightning calls it with the epochs since ``fit`` began) selects epoch
    ``first_epoch + e``.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 first_epoch: int = 0, device: torch.device | str = "cpu") -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.first_epoch, self.device = seed, first_epoch, torch.device(device)
        self.epoch = first_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.first_epoch + epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def global_size(self, index: int) -> int:
        """The size of global batch ``index`` (all ranks together)."""
        return min(self.batch_size, self.n - index * self.batch_size)

    def permutation(self) -> Tensor:
        if self.batch_size >= self.n:
            return torch.arange(self.n)
        if self.world_size == 1:
            return torch.randperm(self.n, device=self.device).cpu()
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        for start in range(0, self.n, self.batch_size):
            yield perm[start:start + self.batch_size][self.rank::self.world_size].tolist()


def shard_weight(local: int, global_: int, world_size: int) -> float:
    """``w_r = W B_r / B``: the factor of a rank's loss on ``local`` (``B_r``) of the ``global_``
    (``B``) sequences of a minibatch, so that DDP's average over ``world_size`` (``W``) ranks of
    the gradients is the gradient of the single-process estimate at the global batch."""
    return world_size * local / global_


def _indices(batch: list[int]) -> Tensor:
    """DataLoader collate: a rank's sequence indices as a ``(B_r,)`` long tensor (maybe empty)."""
    return torch.tensor(batch, dtype=torch.long)


def _lightning_module_class() -> type:
    """:class:`PhysVAEModule`'s class, defined on first use (Lightning is imported lazily)."""
    import lightning.pytorch as pl

    class PhysVAEModule(pl.LightningModule):
        """The model/guide pair and its loss as a LightningModule (manual optimisation).

        The model and guide are submodules, so DDP sees (broadcasts, all-reduces) their
        parameters; the optimiser is the :class:`~pyro_physvae.train.SVITrainer`'s own (with
        any resumed state). Rank 0 validates after every epoch and writes the run directory.
        """

        def __init__(self, run: _RunSetup, run_dir: Path, sampler: ShardedBatches,
                     meta: dict[str, Any], fresh: bool, progress: bool) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.model, self.guide = run.model, run.guide
            self.run, self.run_dir, self.sampler = run, run_dir, sampler
            self.meta, self.fresh, self.progress = meta, fresh, progress
            self.history = list(run.history)
            self.best_val = run.best_val
            self.writer: _RunWriter | None = None
            self.bar: tqdm | None = None
            self._traced: list[Tensor] | None = None
            self._x_epoch = run.x_train
            self._epoch = run.start
            self._total, self._terms, self._t0 = 0.0, {}, 0.0

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.run.trainer.optimizer

        @property
        def writes(self) -> bool:
            return self.global_rank == 0

        def on_train_start(self) -> None:
            if self.writes:
                self.writer = _RunWriter(self.run_dir)
                self.writer.start(self.meta, self.history, fresh=self.fresh)
                c, name = self.run.config, f"{self.run.system.name} {self.run.setting.value}"
                self.bar = tqdm(total=c.epochs, initial=self.run.start, desc=name,
                                disable=not self.progress, dynamic_ncols=True)

        def on_train_epoch_start(self) -> None:
            run, c = self.run, self.run.config
            self._epoch = run.start + self.current_epoch
            self.sampler.epoch = self._epoch
            if self.global_rank > 0:  # its own draws, the same after a resume
                torch.manual_seed(_stream_seed(c.seed, self.global_rank, self._epoch))
            self._t0 = time.perf_counter()
            self._lr = scheduled_lr(c, self._epoch)
            set_lr(run.trainer.optimizer, self._lr)
            self.model.train()
            self.guide.train()
            self._x_epoch = run.x_train
            if run.system.augment is not None and c.guide == "amortized":
                generator = torch.Generator().manual_seed(c.seed * 1_000_003 + self._epoch)
                self._x_epoch = run.system.augment(run.x_train, generator)
            self._total, self._terms = 0.0, {}

        def _stopped(self, reason: str) -> TrainingDiverged:
            kept = self.run_dir / "best.pt"
            return TrainingDiverged(
                f"training stopped at epoch {self._epoch + 1}: {reason}. Checkpoints already written "
                f"are kept unchanged ({kept if kept.exists() else 'none yet'}).")

        def training_step(self, batch: Tensor, batch_idx: int) -> None:
            run, strategy = self.run, self.trainer.strategy
            b_global = self.sampler.global_size(batch_idx)
            weight = shard_weight(batch.numel(), b_global, self.trainer.world_size)
            failure, loss, value = None, None, 0.0
            if batch.numel():
                try:
                    with _divergence_as_error(), poutine.trace(param_only=True) as tr:
                        loss = run.trainer.loss.differentiable_loss(self.model, self.guide, self._x_epoch,
                                                                   subsample=batch)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        failure = f"the loss became {value}; the step was not applied"
                except (IntegrationError, TrainingDiverged) as e:
                    failure = f"{e}; the step was not applied"
                if failure is None:
                    self._check_traced([site["value"].unconstrained() for site in tr.trace.nodes.values()])
            # Every rank decides together: a failure on one stops all before any gradient exchange.
            if strategy.reduce_boolean_decision(failure is not None, all=False):
                raise self._stopped(failure or "a step failed on another process (see its message)")
            if loss is None:  # no sequences here: zero gradient, still part of the all-reduce
                loss = torch.stack([p.sum() for p in self.parameters()]).sum() * 0.0
            self.manual_backward(weight * loss)
            traced = self._traced
            ids = {id(p) for p in traced}
            for p in self.parameters():  # as SVITrainer: only what the loss touched is updated
                if id(p) not in ids:
                    p.grad = None
            grads = [p.grad for p in traced if p.grad is not None]
            if not all_finite(grads):  # the averaged gradient: the same on every rank
                for p in traced:
                    p.grad = None
                raise self._stopped(f"the gradient became non-finite (loss {value:.6g}); "
                                    "the step was not applied")
            if run.trainer.grad_scale != 1.0 and grads:
                torch._foreach_mul_(grads, run.trainer.grad_scale)
            torch.nn.utils.clip_grad_value_(traced, run.config.clip_value)
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            share = b_global / run.n  # each step estimates the full-data loss; weight by batch share
            self._total += share * weight * value
            for k, v in getattr(run.trainer.loss, "last_terms", {}).items() if batch.numel() else ():
                self._terms[k] = self._terms.get(k, 0.0) + share * weight * v

        def _check_traced(self, params: list[Tensor]) -> None:
            """Keep the parameters the loss touched; refuse ones outside the model and guide,
            which DDP would not keep equal across ranks."""
            if self._traced is None:
                known = {id(p) for p in self.parameters()}
                outside = [p for p in params if id(p) not in known]
                if outside:
                    raise ValueError(f"the loss uses {len(outside)} parameter(s) outside the model and "
                                     "guide modules (pyro.param); the Lightning engine trains module "
                                     "parameters only")
            self._traced = params

        def _check_ranks_agree(self) -> None:
            """The ranks' parameters must be bitwise equal (identical averaged gradients, identical
            updates); one gathered digest per epoch checks it."""
            if self.trainer.world_size == 1:
                return
            digest = torch.stack([p.detach().double().sum() for p in self.parameters()]).sum().reshape(1)
            every = self.all_gather(digest).reshape(-1)
            if not bool((every == every[0]).all()):
                raise RuntimeError(f"the processes' parameters differ after epoch {self._epoch + 1} "
                                   f"(digests {every.tolist()}); the gradient all-reduce did not happen")

        def on_train_epoch_end(self) -> None:
            strategy = self.trainer.strategy
            t_train = time.perf_counter() - self._t0
            names = list(self._terms)
            sums = torch.tensor([self._total, *(self._terms[k] for k in names)], dtype=torch.float64,
                                device=self.run.device)
            sums = strategy.reduce(sums, reduce_op="mean").tolist()
            self._check_ranks_agree()
            outcome: tuple[dict[str, float] | None, str | None] = (None, None)
            if self.writes:
                outcome = self._validate(sums, names, t_train)
            record, failure = strategy.broadcast(outcome, src=0)
            if failure is not None:
                raise self._stopped(failure) if not failure.startswith("validation") else \
                    TrainingDiverged(f"{failure} at epoch {self._epoch + 1}; checkpoints already written "
                                     "are kept unchanged")
            self.history.append(record)
            if self.writes:
                self._write(record)

        def _validate(self, sums: list[float], names: list[str], t_train: float
                      ) -> tuple[dict[str, float] | None, str | None]:
            run = self.run
            self.model.eval()
            self.guide.eval()
            try:
                val_loss, val_mse = validation_loss(run.trainer, run.x_check)
            except (IntegrationError, TrainingDiverged) as e:
                return None, str(e)
            if not math.isfinite(val_loss):
                return None, f"validation loss became {val_loss}"
            record = {"epoch": self._epoch + 1, "loss": sums[0] / run.n,
                      **dict(zip(names, sums[1:], strict=True)),
                      "val_loss": val_loss / run.x_check.shape[0], "val_mse": val_mse,
                      "lr": self._lr, "time_train": t_train,
                      "time_epoch": time.perf_counter() - self._t0}
            return record, None

        def _write(self, record: dict[str, float]) -> None:
            c = self.run.config
            self.writer.append(record)
            best = record["val_loss"] < self.best_val
            if best:
                self.best_val = record["val_loss"]
            done = self._epoch + 1
            last = done == 1 or done % c.checkpoint_every == 0 or done == c.epochs
            self.writer.checkpoint(self._snapshot(done), last=last, best=best)
            self.bar.set_postfix({"loss": f"{record['loss']:.4g}",
                                  **{k: f"{v:.3g}" for k, v in record.items() if k not in _RECORD_KEYS},
                                  "val_loss": f"{record['val_loss']:.4g}",
                                  "val_mse": f"{record['val_mse']:.2e}"}, refresh=False)
            self.bar.update(1)

        def _snapshot(self, epoch: int) -> dict[str, Any]:
            return {**self.meta, "epoch": epoch, "best_val": self.best_val, "history": self.history,
                    "model_state": self.model.state_dict(), "guide_state": self.guide.state_dict(),
                    "optimizer_state": self.run.trainer.optimizer.state_dict(),
                    "rng_state": torch.get_rng_state(), **device_rng_state(self.run.device)}

        def close(self) -> None:
            if self.writer is not None:
                self.writer.close()
            if self.bar is not None:
                self.bar.close()

    return PhysVAEModule


def _has_unused_parameters(run: _RunSetup) -> bool:
    """Whether a step leaves some parameter of the model or guide without a gradient (DDP must
    then look for them every step). One trial loss on a few sequences, random state restored."""
    params = [p for m in (run.model, run.guide) for p in m.parameters() if p.requires_grad]
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loss = run.trainer.loss.differentiable_loss(run.model, run.guide, run.x_train,
                                                    subsample=torch.arange(min(2, run.n), device=run.device))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return any(g is None for g in grads)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's informational log lines (available hardware, tips, process group) left out."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _lightning_engine(system: System, setting: Setting, train_ds, valid_ds, data_dir: str | Path,
                      run_dir: Path, config: TrainConfig, model_kwargs: dict, guide_kwargs: dict,
                      state: dict[str, Any] | None, resumed_from: Path | None, lock: DirectoryLock,
                      progress: bool, *, accelerator: str, devices: int, strategy: str,
                      rank: int) -> list[dict[str, float]]:
    """The engine of :func:`train_lightning` (``_train``'s signature, see ``_run_training``)."""
    import lightning
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    if config.elbo == "renyi":
        raise ValueError("the Lightning engine needs an ELBO with a differentiable loss: --elbo "
                         "trace or meanfield (renyi trains with the single-process engine only)")
    config = replace(config, device="cuda" if accelerator == "gpu" else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if os.environ.get("LOCAL_RANK", "").isdigit() \
        else rank
    device = torch.device("cpu") if accelerator == "cpu" else torch.device("cuda", local_rank)
    run = _setup_run(system, setting, train_ds, valid_ds, data_dir, config, model_kwargs,
                     guide_kwargs, state, resumed_from, device=device)
    if devices > 1:
        if not supports_subsampling(run.guide):
            raise ValueError(f"--guide {config.guide} trains on all sequences at every step and "
                             "cannot be sharded over devices; use --devices 1 or --guide autonormal")
        if run.batch_size < devices or run.n < devices:
            raise ValueError(f"the global batch ({run.batch_size} of {run.n} sequences) must hold at "
                             f"least one sequence per device ({devices})")
    if rank == 0 and not lock.held:
        lock.acquire()
    engine = {"name": "lightning", "lightning_version": lightning.__version__,
              "accelerator": accelerator, "devices": devices, "strategy": strategy}
    meta = run.meta(engine=engine)
    sampler = ShardedBatches(run.n, run.batch_size, rank, devices, config.seed, run.start, device)
    module = _lightning_module_class()(run, run_dir, sampler, meta, fresh=state is None, progress=progress)
    if run.start >= config.epochs:  # nothing to train: record the resume, as train() does
        if rank == 0:
            _RunWriter(run_dir).start(meta, run.history, fresh=False)
        return run.history
    ddp = devices > 1 or strategy == "ddp"
    # A DataLoader draws its base seed from the global generator unless given its own.
    loader = DataLoader(range(run.n), batch_sampler=sampler, collate_fn=_indices,
                        generator=torch.Generator().manual_seed(config.seed))
    try:
        with warnings.catch_warnings(), _quiet_lightning():
            for noise in (".*does not have many workers.*", ".*LeafSpec.*"):
                warnings.filterwarnings("ignore", message=noise)
            chosen = "auto"
            if ddp:
                chosen = DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else "nccl",
                                     find_unused_parameters=_has_unused_parameters(run))
            trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=chosen, num_nodes=1,
                                 max_epochs=config.epochs - run.start, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0,
                                 limit_val_batches=0, use_distributed_sampler=False,
                                 precision="32-true", default_root_dir=str(run_dir))
            trainer.fit(module, loader)
    finally:
        module.close()
    return module.history
