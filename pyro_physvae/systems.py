"""The registry of physical systems: what the CLI, the trainer and the evaluation need to
know of each, and how a system defined outside this package joins them.

A system is a :class:`System`: its model and amortized guide classes plus optional hooks
(data generation, a reader for its own file layout, evaluation metrics and figures). The four
systems of the paper are built in; any other is registered from user code with
:func:`register_system`, from a file or module with :func:`load_plugin` (the CLI's
``physvae --plugin PATH_OR_MODULE``), from an installed package through the entry-point
group ``pyro_physvae.systems``, or named directly as ``module:attribute``. A run directory
records where its system came from (``System.source``), so that ``evaluate``, ``diagnose`` and
``nuts`` reload it in a later process.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from pyro.nn import PyroModule

from pyro_physvae.arguments import check_keyword_arguments
from pyro_physvae.data.io import (
    dataset_source,
    load_split,
    require_attribute,
    require_dimension,
    to_tensor,
)
from pyro_physvae.data.lazy import LazyRows, is_lazy, lazy_rows, open_lazy_dataset
from pyro_physvae.settings import Setting
from pyro_physvae.validation import check_sequences

#: Entry-point group through which installed packages offer systems: ``name = "module:attr"``,
#: where the attribute is a :class:`System` or a function without arguments that returns one.
ENTRY_POINT_GROUP = "pyro_physvae.systems"


@dataclass(frozen=True)
class System:
    """One physical system of the zoo.

    Attributes:
        name: registry key, also the ``system`` attribute of its data sets.
        model_cls, guide_cls: the model (``model_cls(setting, **model_kwargs)``, a
            :class:`~pyro_physvae.base.PhysVAEModel`) and its amortized guide
            (``guide_cls(model, **guide_kwargs)``).
        generate: ``generate(seed=..., **sizes) -> {split: Dataset}`` for ``physvae
            generate`` (sizes ``n_train``, ``n_valid``, ``n_test``, ``n_steps``); ``None``:
            the system has no generator.
        model_kwargs_from_data: model size arguments read off a data set; default: the
            length ``n_steps`` of its ``time`` dimension and its ``dt`` attribute, for a model
            that takes them.
        reg_weights: default regularizer weights ``(alpha, beta, gamma)`` for phys+nn+reg in
            the reference's units; default: the model class's ``reg_weights``.
        train_defaults: the ``TrainConfig`` fields that differ from its defaults for this
            system: the reference epochs and batch size, and any measured exception.
        true_observations: ``true_observations(ds, n_steps) -> Tensor (N, *event)``, the
            noise-free truth of a synthetic data set's sequences over ``n_steps`` time steps
            (possibly past the observed window), for extrapolation checks.
        read_split: ``read_split(data_dir, split) -> Dataset`` for a system whose data come
            in their own layout (read in place, where ``<split>.nc`` does not exist).
        covariates: per-sequence variables of the data (e.g. walking speed) whose
            correlation with each latent the evaluation reports.
        augment: ``augment(x_train, generator) -> x`` draws a randomly transformed copy of
            the training observations for each epoch (e.g. flipped and rotated images).
        evaluator: replaces the generic evaluation of :func:`pyro_physvae.evaluate.evaluate`
            for data that need their own (e.g. images, streamed in chunks):
            ``evaluator(run, guide, ds, x, out_dir, *, split, num_samples, iwae_particles,
            seed, refine_steps) -> metrics``.
        plot_reconstructions: ``plot_reconstructions(ds, x, draws, path) -> path``, the
            reconstruction figure (default: each channel of the observation over time).
        extra_metrics: ``extra_metrics(model, draws, ds) -> dict`` added to the metrics
            (e.g. the energy drift of a learnt Hamiltonian); ``draws`` holds the posterior
            draws ``(S, N, ...)`` of every latent site (the evaluation streams over chunks of
            sequences and keeps no draws of the curves).
        counterfactual_truth: ``counterfactual_truth(ds, name, factor) -> Tensor (N,
            *event)``: the noise-free truth of the data set's sequences with the physics
            parameter ``name`` multiplied by ``factor``, for ``physvae counterfactual``.
        test_sizes: small data sizes and model/guide arguments (``{"data": {...}, "model":
            {...}, "guide": {...}}``) with which the conformance tests and smoke runs train
            the system in seconds.
        source: where the system came from (``{"kind": "builtin"}``, or the module and file
            that registered it); recorded in run directories to reload the system.
    """

    name: str
    model_cls: Callable[..., PyroModule]
    guide_cls: Callable[..., PyroModule]
    generate: Callable[..., dict[str, xr.Dataset]] | None = None
    model_kwargs_from_data: Callable[[xr.Dataset], dict[str, Any]] | None = None
    reg_weights: tuple[float, float, float] | None = None
    train_defaults: Mapping[str, Any] = field(default_factory=lambda: {"epochs": 1000, "batch_size": 100})
    true_observations: Callable[[xr.Dataset, int], torch.Tensor] | None = None
    read_split: Callable[[str | os.PathLike, str], xr.Dataset] | None = None
    covariates: tuple[str, ...] = ()
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    evaluator: Callable[..., dict[str, Any]] | None = None
    plot_reconstructions: Callable[..., Path] | None = None
    extra_metrics: Callable[..., dict[str, Any]] | None = None
    counterfactual_truth: Callable[[xr.Dataset, str, float], torch.Tensor] | None = None
    test_sizes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: Mapping[str, str] = field(default_factory=lambda: {"kind": "builtin"})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or ":" in self.name or "/" in self.name:
            raise ValueError(f"a system name must be a non-empty string without ':' or '/', "
                             f"got {self.name!r}")
        for attr in ("model_cls", "guide_cls"):
            if not callable(getattr(self, attr)):
                raise TypeError(f"System {self.name!r}: {attr} must be a class, got "
                                f"{getattr(self, attr)!r}")
        if self.reg_weights is None:
            object.__setattr__(self, "reg_weights",
                               tuple(getattr(self.model_cls, "reg_weights", (0.0, 0.0, 0.0))))
        if len(self.reg_weights) != 3:
            raise ValueError(f"System {self.name!r}: reg_weights must be (alpha, beta, gamma), "
                             f"got {self.reg_weights}")
        if self.model_kwargs_from_data is None:
            object.__setattr__(self, "model_kwargs_from_data", self._time_grid_from_data)

    def build(self, setting: str | Setting, model_kwargs: dict | None = None,
              guide_kwargs: dict | None = None) -> tuple[PyroModule, PyroModule]:
        """A model of ``setting`` and its amortized guide, the keyword arguments checked."""
        model_kwargs, guide_kwargs = dict(model_kwargs or {}), dict(guide_kwargs or {})
        check_keyword_arguments(self.model_cls, model_kwargs, bound=("setting",))
        check_keyword_arguments(self.guide_cls, guide_kwargs, bound=("model",))
        model = self.model_cls(Setting.parse(setting), **model_kwargs)
        return model, self.guide_cls(model, **guide_kwargs)

    def load_split(self, data_dir: str | os.PathLike, split: str, *, lazy: bool = False) -> xr.Dataset:
        """The split ``<data_dir>/<split>.nc``, or read in place by :attr:`read_split`;
        ``lazy``: the observations of a netCDF split stay in the file
        (:func:`~pyro_physvae.data.lazy.open_lazy_dataset`); a split read by
        :attr:`read_split` is read into memory all the same."""
        return load_split(data_dir, split, system=self.name, reader=self.read_split,
                          open_file=open_lazy_dataset if lazy else None)

    def observations(self, ds: xr.Dataset, device: torch.device | str = "cpu") -> torch.Tensor | LazyRows:
        """The observation tensor ``(N, *event)`` of a data set in torch's default dtype, the
        first argument of model and guide; for a data set opened lazily, its
        :class:`~pyro_physvae.data.lazy.LazyRows`, which read rows of that tensor on demand.

        Raises:
            ValueError: the data set has no ``x``, its rank is not the model's
                (``1 + model_cls.x_event_dim``), or its values are not finite once cast
                (e.g. float64 values beyond float32's range); the message names the file.
        """
        where = dataset_source(ds)
        if "x" not in ds:
            raise ValueError(f"{where} has no observation variable 'x' (variables: {list(ds.data_vars)})")
        event_dim = getattr(self.model_cls, "x_event_dim", None)
        if isinstance(event_dim, int) and ds["x"].ndim != 1 + event_dim:
            dims = getattr(self.model_cls, "observation_dims", None) or ("...",) * event_dim
            raise ValueError(f"'x' of {where} has the dimensions {ds['x'].dims}; {self.name} data "
                             f"have (sequence, {', '.join(dims)})")
        if is_lazy(ds):
            return lazy_rows(ds, device)  # its values were checked when it was opened
        x = to_tensor(ds["x"], device, name=f"'x' of {where}")
        check_sequences(x, f"'x' of {where}", rank=x.ndim)
        return x

    def check_data_fits(self, ds: xr.Dataset, model_kwargs: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` where the sizes that :attr:`model_kwargs_from_data` reads
        off ``ds`` (e.g. ``n_steps``, ``dt``) differ from those a trained model was built
        with (``model_kwargs``, as a run records them): such data do not fit the model."""
        found = self.model_kwargs_from_data(ds)
        differ = []
        for key, value in found.items():
            if key not in model_kwargs:
                continue
            trained = model_kwargs[key]
            numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (value, trained))
            same = math.isclose(value, trained, rel_tol=1e-9) if numeric else value == trained
            if not same:
                differ.append(f"{key}={value} (the model's: {trained})")
        if differ:
            raise ValueError(f"{dataset_source(ds)} does not fit the {self.name} model: the "
                             f"data have {', '.join(differ)}")

    def _time_grid_from_data(self, ds: xr.Dataset) -> dict[str, Any]:
        """``n_steps`` (the size of the ``time`` dimension) and ``dt`` (the data set's
        attribute, a finite positive number), each where the data have it and the model
        takes it."""
        found: dict[str, Any] = {}
        if "time" in ds.sizes:
            found["n_steps"] = int(ds.sizes["time"])
        if "dt" in ds.attrs:
            found["dt"] = require_attribute(ds, "dt", "the time step")
        params = inspect.signature(self.model_cls).parameters
        return {k: v for k, v in found.items() if k in params}


def _pendulum() -> System:
    from pyro_physvae.data import pendulum as data
    from pyro_physvae.guides.pendulum import PendulumGuide
    from pyro_physvae.models.pendulum import PendulumModel

    def generate(seed: int = 0, **sizes: int) -> dict[str, xr.Dataset]:
        return data.generate(data.PendulumDataConfig(**sizes), seed=seed)

    def model_kwargs(ds: xr.Dataset) -> dict[str, Any]:
        return {"n_steps": require_dimension(ds, "time"), "dt": require_attribute(ds, "dt", "the time step")}

    def counterfactual_truth(ds: xr.Dataset, name: str, factor: float) -> torch.Tensor:
        """The true forced damped pendulum of each sequence, angles ``(N, T)`` [rad] (float64),
        with its true parameter ``name`` (e.g. ``omega``) multiplied by ``factor``."""
        missing = [v for v in data.PARAMS if v not in ds]
        if missing:
            raise ValueError(f"the data set lacks the true parameters {missing} needed for the truth")
        if name not in data.PARAMS[1:]:
            raise ValueError(f"the pendulum's truth has no parameter {name!r} to scale; it has "
                             f"{list(data.PARAMS[1:])}")
        params = {v: torch.tensor(ds[v].values, dtype=torch.float64) for v in data.PARAMS}
        params[name] = params[name] * factor
        t = torch.tensor(ds["time"].values, dtype=torch.float64)
        return data.forced_damped_pendulum(*(params[v] for v in data.PARAMS), t)

    return System(
        name="pendulum",
        model_cls=PendulumModel,
        guide_cls=PendulumGuide,
        train_defaults={"epochs": 5000, "batch_size": 200},
        test_sizes={"data": {"n_train": 32, "n_valid": 16, "n_test": 8, "n_steps": 12},
                    "model": {"hidden_aux1": (16,), "hidden_aux2": (16,)},
                    "guide": {"hidden_feat": (16,), "feat_dim": 16, "hidden_aux": (16,),
                              "hidden_unmixer": (16,), "hidden_phys": (16,)}},
        generate=generate,
        model_kwargs_from_data=model_kwargs,
        counterfactual_truth=counterfactual_truth,
    )


def _advdif() -> System:
    from pyro_physvae.data import advdif as data
    from pyro_physvae.guides.advdif import AdvDifGuide
    from pyro_physvae.models.advdif import AdvDifModel

    def generate(seed: int = 0, **sizes: int) -> dict[str, xr.Dataset]:
        return data.generate(data.AdvDifDataConfig(**sizes), seed=seed)

    def model_kwargs(ds: xr.Dataset) -> dict[str, Any]:
        return {"n_grid": require_dimension(ds, "space"),
                "dx": require_attribute(ds, "dx", "the grid spacing"),
                "n_steps": require_dimension(ds, "time"), "dt": require_attribute(ds, "dt", "the time step")}

    def counterfactual_truth(ds: xr.Dataset, name: str, factor: float) -> torch.Tensor:
        """The true advection-diffusion fields ``(N, X, T)`` (float64) of each sequence over
        its observed window, with its true parameter ``name`` multiplied by ``factor``."""
        if name not in data.PARAMS:
            raise ValueError(f"the advection-diffusion truth has no parameter {name!r} to scale; "
                             f"it has {list(data.PARAMS)}")
        if name not in ds:
            raise ValueError(f"the data set lacks the true parameter {name!r}")
        return data.true_fields(ds.assign({name: ds[name] * factor}), int(ds.sizes["time"]))

    def plot_reconstructions(ds: xr.Dataset, x: torch.Tensor, draws: Mapping[str, torch.Tensor],
                             path: Path) -> Path:
        """Fields ``(N, X, T)`` as space-time images (the figure module is imported only now,
        so that building the system does not load matplotlib)."""
        from pyro_physvae.figures import plot_field_reconstructions

        return plot_field_reconstructions(ds, x, draws, path)

    return System(
        name="advdif",
        model_cls=AdvDifModel,
        guide_cls=AdvDifGuide,
        # Cosine learning-rate decay: over five training seeds it ended every run at a test
        # MSE of at most 4.4e-6, where the reference's constant rate left one at 1.5e-4
        # (benchmarks/RESULTS.md, "Learning-rate decay").
        train_defaults={"epochs": 20000, "batch_size": 200, "lr_schedule": "cosine"},
        test_sizes={"data": {"n_train": 32, "n_valid": 16, "n_test": 8, "n_grid": 8, "n_steps": 10},
                    "model": {"hidden_aux1": (16,)},
                    "guide": {"hidden_feat": (16,), "feat_dim": 16, "hidden_aux": (8,),
                              "hidden_unmixer": (16,), "hidden_phys": (8,)}},
        generate=generate,
        model_kwargs_from_data=model_kwargs,
        true_observations=data.true_fields,
        plot_reconstructions=plot_reconstructions,
        counterfactual_truth=counterfactual_truth,
    )


def _locomotion() -> System:
    from pyro_physvae.data import locomotion as data
    from pyro_physvae.guides.locomotion import LocomotionGuide
    from pyro_physvae.models.locomotion import LocomotionModel

    def generate(seed: int = 0, **sizes: int) -> dict[str, xr.Dataset]:
        return data.generate(data.GaitDataConfig(**sizes), seed=seed)

    def model_kwargs(ds: xr.Dataset) -> dict[str, Any]:
        return {"n_joints": require_dimension(ds, "joint"), "n_steps": require_dimension(ds, "time"),
                "dt": require_attribute(ds, "dt", "the time step")}

    def energy_metrics(model: LocomotionModel, draws: Mapping[str, torch.Tensor],
                       ds: xr.Dataset) -> dict[str, Any]:
        """``{"energy": ...}``: the conservation of the learnt energy along the physics-only
        trajectories of the posterior-mean latents ``y0``, ``z_P`` (draws ``(S, N, dim)``),
        with the model's own solver and step (``model.energy_drift``): the relative drift over
        the window by its median, mean and maximum over sequences, and the absolute drift
        (energy units); nothing for a model without physics."""
        if not model.setting.has_physics:
            return {}
        z = draws["z_P"].mean(0) if "z_P" in draws else None
        result = model.energy_drift(draws["y0"].mean(0), z)
        rel = result["relative"]
        return {"energy": {
            "solver": model.method, "step": model.dt / model.substeps,
            "relative_drift_median": float(rel.median()), "relative_drift_mean": float(rel.mean()),
            "relative_drift_max": float(rel.max()),
            "absolute_drift_median": float(result["drift"].median()),
            "energy0_std": float(result["energy"][:, 0].std())}}

    def plot_reconstructions(ds: xr.Dataset, x: torch.Tensor, draws: Mapping[str, torch.Tensor],
                             path: Path) -> Path:
        """Each joint angle over the gait cycle; the channels are the recordings' sagittal
        joint angles (see the data's README)."""
        from pyro_physvae.figures import plot_channel_reconstructions

        joints = ("hip flexion-extension", "knee flexion-extension", "ankle flexion-extension")
        return plot_channel_reconstructions(ds, x, draws, path, channel_names=joints,
                                            time_coord="cycle_percent", time_label="gait cycle [%]",
                                            ylabel="joint angle [rad]")

    return System(
        name="locomotion",
        model_cls=LocomotionModel,
        guide_cls=LocomotionGuide,
        train_defaults={"epochs": 3000, "batch_size": 100},
        test_sizes={"data": {"n_train": 32, "n_valid": 16, "n_test": 8, "n_steps": 21},
                    "model": {"hidden_energy": (16,), "hidden_aux2": (16,), "dim_z_aux2": 3},
                    "guide": {"hidden_feat": (16,), "feat_dim": 16, "hidden_heads": (8,)}},
        generate=generate,
        model_kwargs_from_data=model_kwargs,
        read_split=data.read_split,
        covariates=("speed", "cadence", "stride", "step_width"),
        plot_reconstructions=plot_reconstructions,
        extra_metrics=energy_metrics,
    )


def _galaxy() -> System:
    from pyro_physvae.data import galaxy as data
    from pyro_physvae.guides.galaxy import GalaxyGuide
    from pyro_physvae.models.galaxy import GalaxyModel

    def generate(seed: int = 0, **sizes: int) -> dict[str, xr.Dataset]:
        if "n_steps" in sizes:
            raise ValueError("galaxy images have no time axis: n_steps does not apply")
        return data.generate(data.GalaxyDataConfig(**sizes), seed=seed)

    def model_kwargs(ds: xr.Dataset) -> dict[str, Any]:
        rows, cols = require_dimension(ds, "row"), require_dimension(ds, "col")
        if rows != cols:
            raise ValueError(f"the images of {dataset_source(ds)} are {rows} x {cols}; the galaxy "
                             "model takes square images")
        return {"image_size": rows}

    # The image evaluation is imported when used, so that building the system does not load
    # matplotlib.
    def evaluator(*args: Any, **kwargs: Any) -> dict[str, Any]:
        """:func:`pyro_physvae.images.evaluate_images`: streamed summaries, image figures,
        traversals and the rotation check."""
        from pyro_physvae.images import evaluate_images

        return evaluate_images(*args, **kwargs)

    def plot_reconstructions(ds: xr.Dataset, x: torch.Tensor, draws: Mapping[str, torch.Tensor],
                             path: Path) -> Path:
        """Data, reconstruction, physics-only image and error of the first images."""
        from pyro_physvae.images import plot_image_reconstructions

        return plot_image_reconstructions(ds, x, draws, path)

    return System(
        name="galaxy",
        model_cls=GalaxyModel,
        guide_cls=GalaxyGuide,
        train_defaults={"epochs": 10000, "batch_size": 200},
        test_sizes={"data": {"n_train": 16, "n_valid": 8, "n_test": 8, "image_size": 16},
                    "model": {"unet_width": 4, "unet_depth": 2, "neural_channels": (8, 4),
                              "neural_hidden": (8,), "nn_channels": (8, 4), "nn_hidden": (8,)},
                    "guide": {"channels": (4, 8), "feat_dim": 16, "hidden_aux": (8,),
                              "hidden_phys": (8,), "hidden_unmixer": (4,)}},
        generate=generate,
        model_kwargs_from_data=model_kwargs,
        augment=data.augment_images,
        evaluator=evaluator,
        plot_reconstructions=plot_reconstructions,
    )


_BUILTINS: dict[str, Callable[[], System]] = {"pendulum": _pendulum, "advdif": _advdif,
                                              "locomotion": _locomotion, "galaxy": _galaxy}
#: The systems that come with the package.
SYSTEMS: tuple[str, ...] = tuple(_BUILTINS)
_REGISTRY: dict[str, System] = {}


def register_system(system: System, *, replace_existing: bool = False) -> System:
    """Add ``system`` to the registry under ``system.name`` and return it.

    Call it at the top level of the module that defines the system (typically its guide
    file, which imports the model). Unless the system says otherwise, its ``source`` is that
    module (name and file), which a run directory records to reload it later.

    Raises:
        ValueError: the name is taken (by a built-in system, or by a system from another
            module unless ``replace_existing``).
    """
    if not isinstance(system, System):
        raise TypeError(f"register_system takes a System, got {type(system).__name__}")
    if system.name in _BUILTINS:
        raise ValueError(f"{system.name!r} is a built-in system; choose another name")
    if system.source.get("kind") == "builtin":
        system = replace(system, source=_caller_source())
    old = _REGISTRY.get(system.name)
    same_source = old is not None and describe_source(old.source) == describe_source(system.source)
    if old is not None and not replace_existing and not same_source:
        raise ValueError(f"a system named {system.name!r} is already registered (from "
                         f"{describe_source(old.source)}); pass replace_existing=True to replace it")
    _REGISTRY[system.name] = system
    return system


def unregister_system(name: str) -> None:
    """Remove a registered (not built-in) system; nothing happens if there is none."""
    _REGISTRY.pop(name, None)


def _caller_source() -> dict[str, str]:
    """The module that called :func:`register_system`: its name and file."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    if frame is None:
        return {"kind": "module"}
    source = {"kind": "module", "module": str(frame.f_globals.get("__name__"))}
    path = frame.f_globals.get("__file__")
    if path:
        source["path"] = str(Path(path).resolve())
    return source


def describe_source(source: Mapping[str, str]) -> str:
    """Where a system came from, in a few words: its file, reference, module or kind."""
    return source.get("path") or source.get("value") or source.get("module") or source.get("kind", "?")


def registered_systems() -> tuple[str, ...]:
    """Names of the systems available now: built in, registered, or offered by an installed
    package's entry point."""
    names = list(_BUILTINS) + [n for n in _REGISTRY if n not in _BUILTINS]
    names += [ep.name for ep in _entry_points() if ep.name not in names]
    return tuple(names)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def get_system(name: str, *, source: Mapping[str, str] | None = None) -> System:
    """The system called ``name``.

    Looked up among the built-in and registered systems, then the entry points of installed
    packages; ``name`` may also be ``"module:attribute"`` (a :class:`System` or a function
    returning one). ``source`` (as recorded in a run directory) says where to load a system
    that is not registered in this process.

    Raises:
        ValueError: no such system, naming the choices.
    """
    if not isinstance(name, str):
        raise TypeError(f"a system name must be a string, got {type(name).__name__}")
    if name in _BUILTINS:
        return _BUILTINS[name]()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _from_reference(name)
    for ep in _entry_points():
        if ep.name == name:
            system = _from_reference(ep.value, {"kind": "entry_point", "value": ep.value})
            if system.name != name:
                raise ValueError(f"entry point {name!r} ({ep.value}) gave a system named {system.name!r}")
            return system
    if source is not None and source.get("kind") != "builtin":
        _load_source(source)
        if name in _REGISTRY:
            return _REGISTRY[name]
        raise ValueError(f"system {name!r} was recorded as coming from {describe_source(source)}, "
                         "which did not register it")
    raise ValueError(f"unknown system {name!r}; choose one of: {', '.join(registered_systems())} "
                     "(load another with --plugin PATH_OR_MODULE, or name it as module:attribute)")


def _from_reference(reference: str, source: Mapping[str, str] | None = None) -> System:
    """The system of ``"module:attribute"``: a System or a function that returns one."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'module:attribute', got {reference!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load the system {reference!r}: {e}") from e
    system = obj() if callable(obj) and not isinstance(obj, System) else obj
    if not isinstance(system, System):
        raise ValueError(f"{reference} is not a System nor a function returning one "
                         f"(got {type(system).__name__})")
    if system.name in _BUILTINS:
        return get_system(system.name)
    system = replace(system, source=dict(source or {"kind": "reference", "value": reference}))
    return register_system(system, replace_existing=True)


def load_plugin(spec: str | os.PathLike) -> tuple[str, ...]:
    """Import a module that registers systems; return the names of the systems it defines
    (registered by this import or an earlier one of the same file).

    ``spec`` is a Python file (its directory is put on ``sys.path`` first, so that it can
    import the files beside it, and it is imported under its file name) or an importable
    module name.

    Raises:
        FileNotFoundError: no such file; ValueError: the module cannot be imported.
    """
    text = os.fspath(spec)
    path = Path(text)
    if text.endswith(".py") or os.sep in text or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"plugin file not found: {path}")
        module = _import_file(path.resolve())
    else:
        try:
            module = importlib.import_module(text)
        except ImportError as e:
            raise ValueError(f"cannot import the plugin module {text!r}: {e}") from e
        except Exception as e:  # the plugin's own code failed (a syntax error, an exception)
            raise ValueError(f"cannot import the plugin module {text!r}: {type(e).__name__}: {e}") from e
    mine = {module.__name__, str(Path(getattr(module, "__file__", "") or "").resolve())}
    return tuple(n for n, s in _REGISTRY.items() if s.source.get("module") in mine
                 or s.source.get("path") in mine)


def _import_file(path: Path):
    """Import ``path`` as the module named after its file, its directory on ``sys.path``."""
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = sys.modules.get(path.stem)
    if module is not None:
        if Path(getattr(module, "__file__", "") or "").resolve() == path:
            return module
        raise ValueError(f"cannot load the plugin {path}: a different module named {path.stem!r} "
                         f"is already imported ({getattr(module, '__file__', None)})")
    try:
        return importlib.import_module(path.stem)
    except ImportError as e:
        raise ValueError(f"cannot import the plugin {path}: {e}") from e
    except Exception as e:  # the plugin's own code failed (a syntax error, an exception)
        sys.modules.pop(path.stem, None)
        raise ValueError(f"cannot import the plugin {path}: {type(e).__name__}: {e}") from e


def _load_source(source: Mapping[str, str]) -> None:
    """Import what ``source`` names: a reference, a file (if it exists) or a module."""
    if source.get("kind") in ("reference", "entry_point") and source.get("value"):
        _from_reference(source["value"], source)
        return
    path = source.get("path")
    if path and Path(path).is_file():
        _import_file(Path(path))
        return
    module = source.get("module")
    if module and module != "__main__":
        try:
            importlib.import_module(module)
            return
        except ImportError as e:
            raise ValueError(f"cannot import {module!r}, which defined this run's system: {e}") from e
    raise ValueError(f"the system's source is gone: {describe_source(source)}; load it with --plugin")
