"""Shared fixtures: fixed seeds, a clean Pyro parameter store, tiny models and a tiny data set.

Everything here is kept small on purpose: the whole suite must run in well under a minute and a
half on a busy two-core machine.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

from pyro_physvae.data.io import SPLITS, save_dataset
from pyro_physvae.guides.pendulum import PendulumGuide
from pyro_physvae.models.pendulum import PendulumModel
from pyro_physvae.settings import SETTINGS
from pyro_physvae.systems import SYSTEMS, System, get_system, load_plugin

#: Sizes of the tiny generated data set used by the training tests.
TINY_SIZES = {"n_train": 64, "n_valid": 32, "n_test": 16, "n_steps": 20}
#: Small networks: the behaviour under test does not depend on the widths.
SMALL_MODEL = {"hidden_aux1": (16,), "hidden_aux2": (16,)}
SMALL_GUIDE = {"hidden_feat": (16,), "feat_dim": 16, "hidden_aux": (16,), "hidden_unmixer": (16,),
               "hidden_phys": (16,)}


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """One intra-op thread: on a loaded two-core machine, two OpenMP threads make small
    torch operations tens of times slower (threads wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from the same seed and an empty parameter store."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


@pytest.fixture(params=SETTINGS)
def setting(request) -> str:
    """Each of the four model settings."""
    return request.param


def make_pair(setting: str, n_steps: int = 12, dt: float = 0.1, **model_kwargs):
    """A small pendulum model and its amortized guide."""
    model = PendulumModel(setting, n_steps=n_steps, dt=dt, **{**SMALL_MODEL, **model_kwargs})
    guide = PendulumGuide(model, **SMALL_GUIDE)
    return model, guide


@pytest.fixture
def pair_factory():
    """``pair_factory(setting, n_steps=..., dt=...) -> (model, guide)``."""
    return make_pair


def pendulum_like_data(n: int, n_steps: int, dt: float, seed: int = 0) -> torch.Tensor:
    """Smooth angle sequences ``(n, n_steps)`` that look like pendulum swings."""
    g = torch.Generator().manual_seed(seed)
    theta0 = (torch.rand(n, generator=g) - 0.5) * 2.0
    omega = 1.0 + 2.0 * torch.rand(n, generator=g)
    t = torch.arange(n_steps) * dt
    return theta0[:, None] * torch.cos(omega[:, None] * t) + 0.01 * torch.randn(n, n_steps, generator=g)


@pytest.fixture
def small_data() -> torch.Tensor:
    """Eight sequences of twelve steps, matching :func:`make_pair`'s defaults."""
    return pendulum_like_data(8, 12, 0.1)


@pytest.fixture(scope="session")
def tiny_datasets():
    """The three splits of a tiny generated pendulum data set (20 steps)."""
    return get_system("pendulum").generate(seed=0, **TINY_SIZES)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, tiny_datasets) -> Path:
    """A data directory with ``train.nc``, ``valid.nc`` and ``test.nc``. Read-only for tests."""
    path = tmp_path_factory.mktemp("tiny_data")
    for split in SPLITS:
        save_dataset(tiny_datasets[split], path / f"{split}.nc")
    return path


#: The example plugin's system, defined outside the package (see examples/lotka_volterra).
LOTKA_VOLTERRA = Path(__file__).parents[1] / "examples" / "lotka_volterra" / "lotka_volterra_guide.py"
#: The four built-in systems and the plugin's: what every system must pass.
ALL_SYSTEMS = (*SYSTEMS, "lotka-volterra")


def system_named(name: str) -> System:
    """A built-in system, or the example plugin's (registered by loading its file)."""
    if name == "lotka-volterra":
        load_plugin(LOTKA_VOLTERRA)
    return get_system(name)


@pytest.fixture(scope="module", params=ALL_SYSTEMS)
def system(request) -> System:
    """Each of the five systems in turn (modules that need one system define their own)."""
    return system_named(request.param)
