"""Synthetic data sets from any ODE, for systems defined outside this package.

:func:`ode_dataset` draws per-sequence parameters and initial states uniformly from given
ranges, integrates ``dy/dt = rhs(t, y, params)`` in float64 with
:func:`pyro_physvae.ode.integrate` (fixed-step RK4 with sub-steps by default), observes some
state components with Gaussian noise and returns the three splits as ``xarray.Dataset`` objects
in the project's conventions (see :mod:`pyro_physvae.data`): ``x (sequence, *event)``
float32 with time last, a ``time`` coordinate in seconds, the true parameters as variables
over ``sequence``, the initial state as ``initial_state (sequence, state)``, and attributes
``system``, ``split``, ``seed``, ``dt``, ``noise_std`` and what :func:`simulate_dataset` needs
to re-simulate the sequences (``parameters``, ``observe``, ``method``, ``substeps``).

:func:`simulate_dataset` re-runs a data set's sequences without noise, with some parameters
scaled or replaced (counterfactual truths) and over any number of steps (extrapolation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from pyro_physvae.data.io import SPLITS
from pyro_physvae.ode import check_method, integrate
from pyro_physvae.validation import check_positive_int

#: ``rhs(t, y, params)``: scalar time [s], state ``(..., D)``, ``{name: (...)}``; returns ``(..., D)``.
ParametricRHS = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]
Ranges = Mapping[str, tuple[float, float]]


def ode_dataset(
    rhs: ParametricRHS,
    parameters: Ranges,
    initial_state: Ranges,
    *,
    n_steps: int,
    dt: float,
    noise_std: float = 0.0,
    n_train: int = 1000,
    n_valid: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    system: str = "",
    observe: Sequence[str] | None = None,
    dims: Sequence[str] | None = None,
    coords: Mapping[str, Sequence] | None = None,
    units: Mapping[str, str] | None = None,
    method: str = "rk4",
    substeps: int = 10,
) -> dict[str, xr.Dataset]:
    """The splits ``train``, ``valid``, ``test`` of noisy observations of an ODE.

    Args:
        rhs: the true right-hand side ``rhs(t, y, params)``; ``y (..., D)`` float64, each
            ``params[name]`` of shape ``(...)``; it must broadcast over leading dimensions.
        parameters: ``{name: (low, high)}``, each drawn uniformly per sequence (``low ==
            high``: a constant); stored as variables ``name (sequence,)``.
        initial_state: ``{state name: (low, high)}`` in the order of the state vector,
            drawn uniformly per sequence; stored as ``initial_state (sequence, state)``.
        n_steps: observed time steps T; dt: their interval [s].
        noise_std: standard deviation of the Gaussian observation noise (>= 0).
        n_train, n_valid, n_test: sequences per split.
        seed: seed of the one generator that draws all splits in turn (reproducible).
        system: the ``system`` attribute (the registry name of the system).
        observe: the observed state names (default: all), in this order.
        dims: names of the observation dimensions, time last; default ``("time",)`` for one
            observed component, else ``("component", "time")``. With ``("time",)`` exactly one
            component is observed and ``x`` is ``(sequence, time)``; otherwise ``x`` is
            ``(sequence, observed, time)``.
        coords: ``{dims[0]: labels}``, the coordinate of the observed components
            (default: their state names).
        units: ``{variable: unit}`` attributes (``x``, parameters, ...).
        method, substeps: the solver (:data:`pyro_physvae.ode.METHODS`) and its steps per
            ``dt``; the defaults make the truth accurate to about 1e-8 for rates of order 1.

    Returns:
        ``{split: Dataset}``.

    Raises:
        ValueError: naming the invalid argument, or the split and first sequences whose
            solution is not finite.
    """
    state = _check_ranges(initial_state, "initial_state")
    _check_ranges(parameters, "parameters")
    observe = tuple(state if observe is None else observe)
    event_dims = _check_grid(n_steps, dt, noise_std, observe, state, dims, method, substeps)
    event_coords = _event_coords(event_dims, observe, state, coords)
    sizes = {s: check_positive_int(n, f"n_{s}") for s, n in zip(SPLITS, (n_train, n_valid, n_test),
                                                              strict=True)}
    attrs = {"system": str(system), "seed": int(seed), "dt": float(dt), "noise_std": float(noise_std),
             "parameters": " ".join(parameters), "observe": " ".join(observe),
             "method": method, "substeps": int(substeps)}
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for split, n in sizes.items():
        params = {k: _uniform(r, n, g) for k, r in parameters.items()}
        y0 = torch.stack([_uniform(r, n, g) for r in initial_state.values()], -1)
        clean = _observe(_solve(rhs, y0, params, n_steps, dt, method, substeps, split), state, observe)
        noisy = clean + noise_std * torch.randn(clean.shape, generator=g, dtype=torch.float64)
        ds = _to_dataset(noisy if len(event_dims) > 1 else noisy[:, 0], params, y0, state, dt,
                         event_dims, event_coords, dict(units or {}))
        ds.attrs.update(attrs, split=split)
        out[split] = ds
    return out


def simulate_dataset(
    ds: xr.Dataset,
    rhs: ParametricRHS,
    *,
    n_steps: int | None = None,
    factors: Mapping[str, float] | None = None,
    values: Mapping[str, float] | None = None,
) -> Tensor:
    """The noise-free truth of the sequences of a data set made by :func:`ode_dataset`.

    Args:
        ds: the data set (its true parameters, ``initial_state`` and attributes are read).
        rhs: the true right-hand side the data set was made with.
        n_steps: time steps to simulate (default: the data set's; more extrapolates).
        factors: ``{parameter: factor}``, each true parameter multiplied by its factor.
        values: ``{parameter: value}``, each true parameter replaced by one value.

    Returns:
        float64 ``(N, *event, n_steps)``, the shape of ``ds["x"]`` with ``n_steps`` steps.
    """
    names = ds.attrs.get("parameters", "").split()
    if "initial_state" not in ds or not names:
        raise ValueError("the data set lacks its true parameters or initial_state: it was not "
                         "made by ode_dataset, so its truth is unknown")
    changed = {**(factors or {}), **(values or {})}
    unknown = sorted(set(changed) - set(names))
    if unknown:
        raise ValueError(f"{unknown} are not parameters of this data set (it has {names})")
    params = {k: torch.as_tensor(ds[k].values, dtype=torch.float64) for k in names}
    params.update({k: params[k] * float(f) for k, f in (factors or {}).items()})
    params.update({k: torch.full_like(params[k], float(v)) for k, v in (values or {}).items()})
    n_steps = int(ds.sizes["time"]) if n_steps is None else check_positive_int(n_steps, "n_steps")
    y0 = torch.as_tensor(ds["initial_state"].values, dtype=torch.float64)
    state = tuple(str(s) for s in ds["state"].values)
    ys = _solve(rhs, y0, params, n_steps, float(ds.attrs["dt"]), str(ds.attrs["method"]),
                int(ds.attrs["substeps"]), str(ds.attrs.get("split", "")))
    clean = _observe(ys, state, tuple(ds.attrs["observe"].split()))
    return clean if ds["x"].ndim > 2 else clean[:, 0]


def _check_ranges(ranges: Ranges, what: str) -> tuple[str, ...]:
    """The names of ``{name: (low, high)}``, each range finite with ``low <= high``."""
    if not ranges:
        raise ValueError(f"{what} must name at least one entry with its (low, high) range")
    for name, r in ranges.items():
        if len(r) != 2 or not all(math.isfinite(float(v)) for v in r) or not r[0] <= r[1]:
            raise ValueError(f"{what}: the range of {name!r} must be finite (low, high) with "
                             f"low <= high, got {r}")
    return tuple(ranges)


def _check_grid(n_steps: int, dt: float, noise_std: float, observe: tuple[str, ...],
                state: tuple[str, ...], dims: Sequence[str] | None, method: str,
                substeps: int) -> tuple[str, ...]:
    """Validate the grid, noise, observation and solver arguments; return the event dims."""
    check_positive_int(n_steps, "n_steps")
    check_positive_int(substeps, "substeps")
    check_method(method)
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be positive and finite, got {dt}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be >= 0 and finite, got {noise_std}")
    missing = [k for k in observe if k not in state]
    if missing or not observe or len(set(observe)) != len(observe):
        raise ValueError(f"observe must name distinct state components among {list(state)}, "
                         f"got {list(observe)}")
    dims = tuple(dims) if dims is not None else (("time",) if len(observe) == 1 else ("component", "time"))
    if len(dims) not in (1, 2) or dims[-1] != "time" or (len(dims) == 1 and len(observe) != 1):
        raise ValueError(f"dims must be ('time',) for one observed component or (name, 'time') "
                         f"for several, got {dims} for {len(observe)} observed")
    return dims


def _uniform(low_high: tuple[float, float], n: int, g: torch.Generator) -> Tensor:
    low, high = (float(v) for v in low_high)
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def _solve(rhs: ParametricRHS, y0: Tensor, params: Mapping[str, Tensor], n_steps: int, dt: float,
           method: str, substeps: int, split: str) -> Tensor:
    """The trajectories ``(N, T, D)`` from ``y0 (N, D)``, checked to be finite."""
    t = torch.arange(n_steps, dtype=torch.float64) * dt
    rate = rhs(t[0], y0, params)
    if tuple(rate.shape) != tuple(y0.shape):
        raise ValueError(f"rhs returned shape {tuple(rate.shape)} for states of shape {tuple(y0.shape)}: "
                         "it must return dy/dt of the state's shape (each parameter is (N,))")
    ys = integrate(lambda tt, y: rhs(tt, y, params), y0, t, method=method, substeps=substeps,
                   check_finite=False, uniform=True)
    bad = (~torch.isfinite(ys)).flatten(1).any(1).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        drawn = ", ".join(f"{k}={float(v[i]):.4g}" for k, v in params.items())
        raise ValueError(f"the {split} solution is not finite for {len(bad)} sequence(s), first "
                         f"sequence {i} ({drawn}, initial state {y0[i].tolist()}): narrow the "
                         f"ranges, shorten dt or add substeps (now {substeps})")
    return ys


def _observe(ys: Tensor, state: tuple[str, ...], observe: tuple[str, ...]) -> Tensor:
    """The observed components of trajectories ``(N, T, D)`` as ``(N, len(observe), T)``."""
    return ys[..., [state.index(k) for k in observe]].transpose(-1, -2).contiguous()


def _event_coords(dims: tuple[str, ...], observe: tuple[str, ...], state: tuple[str, ...],
                  coords: Mapping[str, Sequence] | None) -> dict[str, list]:
    """The coordinate of the observed-component dimension (for two event dims): ``coords``'
    entry or the observed state names."""
    if len(dims) == 1:
        return {}
    values = list((coords or {}).get(dims[0], observe))
    if len(values) != len(observe):
        raise ValueError(f"coords[{dims[0]!r}] has {len(values)} entries for {len(observe)} "
                         "observed components")
    if dims[0] == "state" and tuple(observe) != state:
        raise ValueError("the dimension 'state' is the full state of initial_state; name the "
                         "observed components' dimension otherwise (dims=(name, 'time'))")
    return {dims[0]: values}


def _to_dataset(x: Tensor, params: Mapping[str, Tensor], y0: Tensor, state: tuple[str, ...],
                dt: float, dims: tuple[str, ...], event_coords: dict, units: dict[str, str]) -> xr.Dataset:
    """Wrap observations ``x (N, *event)``, parameters ``(N,)`` and ``y0 (N, D)``."""
    n, n_steps = x.shape[0], x.shape[-1]
    data = {"x": (("sequence", *dims), x.numpy().astype(np.float32), {"units": units.get("x", "")}),
            "initial_state": (("sequence", "state"), y0.numpy(), {"units": units.get("initial_state", "")})}
    data.update({k: (("sequence",), v.numpy(), {"units": units.get(k, "")}) for k, v in params.items()})
    all_coords = {"sequence": np.arange(n), "state": list(state), **event_coords,
                  "time": ("time", np.arange(n_steps) * dt, {"units": "s"})}
    return xr.Dataset(data, all_coords)
