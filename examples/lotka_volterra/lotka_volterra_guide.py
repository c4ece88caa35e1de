"""The Lotka-Volterra guide and registration: ``physvae --plugin examples/lotka_volterra/
lotka_volterra_guide.py generate --system lotka-volterra --out D``, then ``train``."""

from collections.abc import Mapping
from functools import partial

import torch
from lotka_volterra_model import DT, INITIAL, NOISE_STD, TRUTH, LotkaVolterraModel, lotka_volterra
from pyro.nn import PyroModule
from torch import Tensor, nn

from pyro_physvae import Size, Widths
from pyro_physvae.base import PhysVAEGuide
from pyro_physvae.data import ode_dataset, simulate_dataset
from pyro_physvae.nets import MLP, GaussianHead
from pyro_physvae.systems import System, register_system


class LotkaVolterraGuide(PhysVAEGuide):
    """q(z_A | x) and q(a, c | x minus a learnt residual), each an MLP on the flattened x (B, 2, T)."""

    def __init__(self, model: LotkaVolterraModel, *, hidden: Widths = (128, 64),
                 feat_dim: Size = 64, hidden_heads: Widths = (32,),
                 hidden_unmixer: Widths = (128, 128)) -> None:
        super().__init__(name="lotka_volterra_guide")
        self.setting = s = model.setting
        self.x_event_dim, self.event_shape = model.x_event_dim, model.observation_shape()  # (2, T)
        size = 2 * model.n_steps

        def encoder(dim: int, positive: bool = False) -> nn.Module:  # (..., 2, T) -> loc, scale (..., dim)
            mlp = MLP(size, hidden, feat_dim, final_activation=True)
            head = GaussianHead(feat_dim, hidden_heads, dim, "elu", positive)
            return PyroModule[nn.Sequential](PyroModule[nn.Flatten](-2), mlp, head)

        self.aux_encoders = {k: f"enc_{k}" for k in model.aux_dims}
        for k, dim in model.aux_dims.items():
            setattr(self, f"enc_{k}", encoder(dim))
        if s.has_physics:
            self.physics = encoder(2, positive=True)
        if s.has_physics and s.has_nn:
            self.unmixer = MLP(size + sum(model.aux_dims.values()), hidden_unmixer, size, zero_last=True)

    def unmix(self, x: Tensor, aux_locs: Mapping[str, Tensor]) -> Tensor:
        z = torch.cat(list(aux_locs.values()), -1)
        flat = x.flatten(-2).expand(*z.shape[:-1], -1)
        return (flat - self.unmixer(torch.cat((flat, z), -1))).unflatten(-1, x.shape[-2:])

    def physics_posterior(self, signal: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        loc, scale = self.physics(signal)
        return {"a": (loc[..., 0], scale[..., 0]), "c": (loc[..., 1], scale[..., 1])}


register_system(System(
    name="lotka-volterra", model_cls=LotkaVolterraModel, guide_cls=LotkaVolterraGuide,
    generate=partial(ode_dataset, lotka_volterra, TRUTH, INITIAL, n_steps=50, dt=DT, noise_std=NOISE_STD,
                     system="lotka-volterra", dims=("species", "time")),
    train_defaults={"epochs": 1000, "batch_size": 100},
    true_observations=lambda ds, n_steps: simulate_dataset(ds, lotka_volterra, n_steps=n_steps),
    counterfactual_truth=lambda ds, name, f: simulate_dataset(ds, lotka_volterra, factors={name: f}),
    test_sizes={"data": {"n_train": 32, "n_valid": 16, "n_test": 8, "n_steps": 12},
                "model": {"hidden_aux1": (8,), "hidden_aux2": (8,)},
                "guide": {"hidden": (16,), "feat_dim": 8, "hidden_heads": (8,), "hidden_unmixer": (16,)}}))
