"""The pendulum Phys-VAE model and its amortized guide as Pyro programs."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_physvae.models.pendulum import OMEGA, X_LNVAR, PendulumModel, pendulum_rhs
from pyro_physvae.ode import integrate
from pyro_physvae.regularizers import PhysVAELoss, phys_vae_regularizers
from pyro_physvae.settings import Setting
from pyro_physvae.systems import get_system

N, T, DT = 8, 12, 0.1

MODEL_SITES = {
    "nn-only": {"init", "z_A1", "z_A2", "x_mean", "x"},
    "phys-only": {"init", "omega", "x_P", "x_mean", "x"},
    "phys+nn": {"init", "z_A1", "z_A2", "omega", "x_P", "x_PA", "x_PB", "x_mean", "x"},
    "phys+nn+reg": {"init", "z_A1", "z_A2", "omega", "x_P", "x_PA", "x_PB", "x_mean", "x"},
}
GUIDE_SITES = {
    "nn-only": {"z_A1", "z_A2"},
    "phys-only": {"omega"},
    "phys+nn": {"z_A1", "z_A2", "unmixed", "omega"},
    "phys+nn+reg": {"z_A1", "z_A2", "unmixed", "omega"},
}
DETERMINISTIC = {"init", "x_P", "x_PA", "x_PB", "x_mean"}


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def sample_sites(trace) -> dict:
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and name != "data"}


def frictionless(omega: torch.Tensor):
    """Pendulum right-hand side written out independently of the library."""
    def rhs(t, y):
        return torch.stack((y[..., 1], -(omega**2) * torch.sin(y[..., 0])), -1)
    return rhs


def traces(model, guide, x, k):
    sub = torch.arange(k)
    guide_tr = poutine.trace(guide).get_trace(x, subsample=sub)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, subsample=sub)
    return guide_tr, model_tr


def test_sites_shapes_and_plate_scale(setting, pair_factory, small_data):
    model, guide = pair_factory(setting, n_steps=T, dt=DT)
    k = 3
    guide_tr, model_tr = traces(model, guide, small_data, k)
    msites, gsites = sample_sites(model_tr), sample_sites(guide_tr)
    assert set(msites) == MODEL_SITES[setting]
    assert set(gsites) == GUIDE_SITES[setting]

    s = Setting.parse(setting)
    d1 = model.dim_z_aux1
    assert d1 == (1 if s.has_physics else 2)
    expected_shapes = {"init": (k,), "omega": (k,), "z_A1": (k, d1), "z_A2": (k, 2), "x_P": (k, T),
                       "x_PA": (k, T), "x_PB": (k, T), "x_mean": (k, T), "x": (k, T), "unmixed": (k, T)}
    for name, site in {**msites, **gsites}.items():
        assert tuple(site["value"].shape) == expected_shapes[name], name
        # Every site lives in the subsampled data plate, scaled by N / k.
        frames = [f for f in site["cond_indep_stack"] if f.name == "data"]
        assert len(frames) == 1 and frames[0].full_size == N and frames[0].size == k and frames[0].dim == -1
        assert site["scale"] == pytest.approx(N / k), name
    for name in DETERMINISTIC & set(msites):
        assert msites[name]["infer"].get("_deterministic"), name
    assert msites["x"]["is_observed"]
    torch.testing.assert_close(msites["x"]["value"], small_data[:k])
    torch.testing.assert_close(msites["init"]["value"], small_data[:k, 0])
    # The model reuses the guide's latents (replay).
    for name in ("omega", "z_A1", "z_A2"):
        if name in gsites:
            assert torch.equal(msites[name]["value"], gsites[name]["value"])
    # The likelihood is a Normal around x_mean with the model's fixed noise.
    fn = msites["x"]["fn"]
    torch.testing.assert_close(fn.base_dist.loc, msites["x_mean"]["value"])
    sigma = float(torch.exp(torch.tensor(0.5 * X_LNVAR)))
    torch.testing.assert_close(fn.base_dist.scale, torch.full((k, T), sigma))
    resid = small_data[:k] - msites["x_mean"]["value"]
    log_norm = torch.log(torch.tensor(sigma * (2 * torch.pi) ** 0.5))
    expected_lp = (-0.5 * (resid / sigma) ** 2 - log_norm).sum(-1)
    torch.testing.assert_close(fn.log_prob(small_data[:k]), expected_lp, rtol=1e-4, atol=1e-2)


def test_subsample_selects_rows(pair_factory, small_data):
    model, guide = pair_factory("phys+nn", n_steps=T, dt=DT)
    sub = torch.tensor([5, 1])
    guide_tr = poutine.trace(guide).get_trace(small_data, subsample=sub)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(small_data, subsample=sub)
    torch.testing.assert_close(model_tr.nodes["x"]["value"], small_data[sub])
    torch.testing.assert_close(model_tr.nodes["init"]["value"], small_data[sub, 0])
    assert model_tr.nodes["x"]["scale"] == pytest.approx(N / 2)


def test_phys_only_mean_is_the_frictionless_pendulum(pair_factory, small_data):
    model, guide = pair_factory("phys-only", n_steps=T, dt=DT)
    # Omega values below, inside and above the feasible range: the model clamps them.
    omega = torch.tensor([0.05, 1.0, 2.5, 9.0, 0.392, 3.53, 1.7, 0.8])
    cond = poutine.condition(model, data={"omega": omega})
    tr = poutine.trace(cond).get_trace(small_data)
    init = small_data[:, 0]
    clamped = omega.clamp(OMEGA.low, OMEGA.high)
    y0 = torch.stack((init, torch.zeros_like(init)), -1)
    expected = integrate(frictionless(clamped), y0, torch.arange(T) * DT, method="euler")[..., 0]
    torch.testing.assert_close(tr.nodes["x_mean"]["value"], expected)
    torch.testing.assert_close(tr.nodes["x_P"]["value"], expected)
    torch.testing.assert_close(model.physics_only(init, omega), expected)
    # Unclamped, the out-of-range rows differ.
    assert not torch.allclose(model.physics_only(init, omega, clamp=False)[0], expected[0])


def test_phys_only_replayed_on_guide_draws(pair_factory, small_data):
    model, guide = pair_factory("phys-only", n_steps=T, dt=DT)
    guide_tr, model_tr = traces(model, guide, small_data, N)
    omega = guide_tr.nodes["omega"]["value"]
    y0 = torch.stack((small_data[:, 0], torch.zeros(N)), -1)
    expected = integrate(lambda t, y: pendulum_rhs(y, OMEGA.clamp(omega)), y0, model.t)[..., 0]
    torch.testing.assert_close(model_tr.nodes["x_mean"]["value"], expected)


def test_initial_velocity_is_zero_and_first_sample_is_init(setting, pair_factory, small_data):
    model, guide = pair_factory(setting, n_steps=T, dt=DT)
    randomise(model, seed=3)
    _, model_tr = traces(model, guide, small_data, N)
    s = Setting.parse(setting)
    if s.has_physics:
        torch.testing.assert_close(model_tr.nodes["x_P"]["value"][:, 0], small_data[:, 0])
    if s.has_physics and s.has_nn:
        torch.testing.assert_close(model_tr.nodes["x_PA"]["value"][:, 0], small_data[:, 0])


@pytest.mark.parametrize("inputs,time_input", [(("angle", "velocity"), True), (("velocity",), True),
                                               (("angle", "velocity"), False)])
@pytest.mark.parametrize("setting_name", ["phys+nn", "nn-only"])
def test_decode_matches_naive_right_hand_side(setting_name, inputs, time_input):
    model = PendulumModel(setting_name, n_steps=T, dt=DT, hidden_aux1=(7, 5), hidden_aux2=(6,),
                          method="rk4", substeps=2, aux1_state_inputs=inputs, time_input=time_input)
    randomise(model, seed=4, std=0.5)
    B = 5
    g = torch.Generator().manual_seed(5)
    init = torch.rand(B, generator=g) * 2 - 1
    z1 = torch.randn(B, model.dim_z_aux1, generator=g)
    z2 = torch.randn(B, model.dim_z_aux2, generator=g)
    has_phys = setting_name != "nn-only"
    omega = (0.5 + 2.5 * torch.rand(B, generator=g)) if has_phys else None
    out = model.decode(init, omega, z1, z2)

    def naive(t, y):
        state = y if len(inputs) == 2 else y[..., 1:]  # (angle, velocity) or velocity
        net_in = (state, t.expand(B, 1), z1) if time_input else (state, z1)
        accel = model.aux1(torch.cat(net_in, -1))[..., 0]
        if has_phys:
            base = pendulum_rhs(y, omega)
        else:
            base = torch.stack((y[..., 1], torch.zeros_like(y[..., 0])), -1)
        return base + torch.stack((torch.zeros_like(accel), accel), -1)

    y0 = torch.stack((init, torch.zeros(B)), -1)
    x_a = integrate(naive, y0, model.t, method="rk4", substeps=2)[..., 0]
    if has_phys:
        x_p = integrate(lambda t, y: pendulum_rhs(y, omega), y0, model.t, method="rk4", substeps=2)[..., 0]
        residual = model.aux2(torch.cat((omega[:, None], z1, z2), -1))
        assert set(out) == {"x_P", "x_PA", "x_PB", "x_mean"}
        torch.testing.assert_close(out["x_P"], x_p)
        torch.testing.assert_close(out["x_PA"], x_a)
        torch.testing.assert_close(out["x_PB"], x_p + residual)
        torch.testing.assert_close(out["x_mean"], x_a + residual)
        # The randomised in-ODE net really changes the trajectory.
        assert (out["x_PA"] - out["x_P"]).abs().max() > 1e-3
    else:
        residual = model.aux2(torch.cat((z1, z2), -1))
        assert set(out) == {"x_mean"}
        torch.testing.assert_close(out["x_mean"], x_a + residual)
    assert residual.abs().max() > 1e-3


@pytest.mark.parametrize("setting_name", ["phys+nn", "nn-only", "phys-only"])
def test_decode_broadcasts_latents_of_different_batch_shapes(setting_name):
    model = PendulumModel(setting_name, n_steps=T, dt=DT, hidden_aux1=(7, 5), hidden_aux2=(6,))
    randomise(model, seed=6, std=0.5)
    g = torch.Generator().manual_seed(6)
    init = torch.rand(4, generator=g) - 0.5
    omega = 0.5 + 2.5 * torch.rand(3, 4, generator=g)  # 3 draws of 4 sequences
    z1 = torch.randn(4, model.dim_z_aux1, generator=g)  # shared by the draws
    z2 = torch.randn(3, 4, model.dim_z_aux2, generator=g)
    has_nn = setting_name != "phys-only"
    out = model.decode(init, omega, z1 if has_nn else None, z2 if has_nn else None)
    for i in range(3):
        one = model.decode(init, omega[i], z1 if has_nn else None, z2[i] if has_nn else None)
        for key, value in one.items():
            assert out[key].shape == (3, 4, T)
            torch.testing.assert_close(out[key][i], value)


def test_predictive_guide_then_model(setting, pair_factory, small_data):
    model, guide = pair_factory(setting, n_steps=T, dt=DT)
    post = Predictive(guide, num_samples=4, parallel=True)(small_data)
    s = Setting.parse(setting)
    if s.has_physics:
        assert post["omega"].shape == (4, N)
    if s.has_nn:
        assert post["z_A1"].shape == (4, N, model.dim_z_aux1)
    init = small_data[:, 0]
    pred = Predictive(model, posterior_samples=post, parallel=True,
                      return_sites=["x", "x_mean", "x_P", "omega"] if s.has_physics else ["x", "x_mean"])
    out = pred(None, init=init)
    assert out["x"].shape == (4, N, T)
    assert out["x_mean"].shape == (4, N, T)
    # Noise around the mean is at the model's noise level, exp(-4.5) ~ 0.011.
    resid_std = float((out["x"] - out["x_mean"]).std())
    assert 0.005 < resid_std < 0.02
    if s.has_physics:
        assert out["omega"].shape == (4, N)
        torch.testing.assert_close(out["omega"], post["omega"])
        # Each posterior draw's physics curve comes from that draw's omega.
        torch.testing.assert_close(out["x_P"], model.physics_only(init, post["omega"]))
        assert not torch.allclose(out["x_P"][0], out["x_P"][1])


def test_prior_predictive(setting, pair_factory, small_data):
    model, _ = pair_factory(setting, n_steps=T, dt=DT)
    out = Predictive(model, num_samples=6, parallel=True)(None, init=small_data[:, 0])
    assert out["x"].shape == (6, N, T)
    assert torch.isfinite(out["x"]).all()
    torch.testing.assert_close(out["init"], small_data[:, 0].expand(6, N))
    if Setting.parse(setting).has_physics:
        omega = out["omega"]
        assert omega.shape == (6, N)
        # Prior draws are wide (they leave the range) but the physics sees clamped values.
        torch.testing.assert_close(out["x_P"], model.physics_only(small_data[:, 0], omega))
    # Sequential (non-vectorised) prediction works too.
    seq = Predictive(model, num_samples=2)(None, init=small_data[:, 0])
    assert seq["x"].shape == (2, N, T)


def test_omega_prior_override(pair_factory, small_data):
    model, _ = pair_factory("phys-only", n_steps=T, dt=DT)
    tr = poutine.trace(model).get_trace(small_data, omega_prior=dist.Delta(torch.tensor(2.0)))
    torch.testing.assert_close(tr.nodes["omega"]["value"], torch.full((N,), 2.0))


def test_simulate_augmentation(pair_factory, small_data):
    model, _ = pair_factory("phys+nn+reg", n_steps=T, dt=DT)
    init = small_data[:, 0]
    truth, x_sim = model.simulate_augmentation(init)
    omega = truth["omega"]
    assert set(truth) == {"omega"} and omega.shape == (N,)
    assert (omega >= OMEGA.low).all() and (omega <= OMEGA.high).all()
    assert x_sim.shape == (N, T)
    torch.testing.assert_close(x_sim, model.physics_only(init, omega))


def test_gradients_reach_all_networks(pair_factory, small_data):
    model, guide = pair_factory("phys+nn+reg", n_steps=T, dt=DT)
    loss = PhysVAELoss(Trace_ELBO(), phys_vae_regularizers(1.0, 1.0, 1.0))
    value = loss.loss_and_grads(model, guide, small_data)
    assert torch.isfinite(torch.tensor(value))

    def grad_norm(p: torch.Tensor) -> float:
        return 0.0 if p.grad is None else float(p.grad.abs().sum())

    checked = {
        "guide.aux1 features": guide.aux1[0].linears[0].weight,
        "guide.aux2 features": guide.aux2[0].linears[0].weight,
        "guide.aux1 head": guide.aux1[1].loc.linears[-1].weight,
        "guide.phys_features": guide.phys_features.linears[0].weight,
        "guide.omega_head": guide.omega_head.loc.linears[-1].weight,
        "guide.unmixer (last layer)": guide.unmixer.linears[-1].weight,
        "model.aux1 (last layer)": model.aux1.linears[-1].weight,
        "model.aux2 (last layer)": model.aux2.linears[-1].weight,
    }
    for name, p in checked.items():
        assert grad_norm(p) > 0, name
    # Zero-initialised last layers block the gradient to earlier layers at the start.
    assert grad_norm(model.aux1.linears[0].weight) == 0
    assert set(loss.last_terms) == {"ppc", "augment", "unmix"}


def test_gradient_reaches_in_ode_net_first_layer_after_perturbation(pair_factory, small_data):
    model, guide = pair_factory("phys+nn", n_steps=T, dt=DT)
    randomise(model.aux1, seed=6)
    Trace_ELBO().loss_and_grads(model, guide, small_data)
    assert model.aux1.linears[0].weight.grad.abs().sum() > 0
    assert model.aux1.linears[-1].weight.grad.abs().sum() > 0


def test_learn_noise_registers_a_parameter(small_data):
    model = PendulumModel("phys-only", n_steps=T, dt=DT, learn_noise=True, x_lnvar=-4.0)
    assert float(model.noise_scale().detach()) == pytest.approx(float(torch.exp(torch.tensor(-2.0))))
    with poutine.trace(param_only=True) as tr:
        poutine.trace(model).get_trace(small_data)
    assert any(name.endswith("x_lnvar") for name in tr.trace.nodes)
    fixed = PendulumModel("phys-only", n_steps=T, dt=DT)
    assert "x_lnvar" in dict(fixed.named_buffers())


def test_input_errors(pair_factory, small_data):
    model, guide = pair_factory("phys+nn", n_steps=T, dt=DT)
    with pytest.raises(ValueError, match="time steps"):
        model(small_data[:, :-1])
    with pytest.raises(ValueError, match="give the observations x or the initial states"):
        model()
    with pytest.raises(ValueError, match=r"init must have 1 dimension\(s\)"):
        model(None, init=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="init has 3 entries"):
        model(small_data, init=torch.zeros(3))
    bad = small_data.clone()
    bad[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*\[2\]"):
        model(bad)
    with pytest.raises(ValueError, match="needs the observations"):
        guide(None)


def test_constructor_errors():
    with pytest.raises(ValueError, match="n_steps"):
        PendulumModel("phys-only", n_steps=1)
    with pytest.raises(ValueError, match="dt must be positive"):
        PendulumModel("phys-only", dt=0.0)
    with pytest.raises(ValueError, match="unknown setting"):
        PendulumModel("physics")
    with pytest.raises(ValueError, match="unknown ODE solver"):
        PendulumModel("phys-only", method="magic")
    system = get_system("pendulum")
    with pytest.raises(ValueError, match=r"PendulumModel has no argument\(s\) \['dim_z_aux'\]"):
        system.build("phys+nn", {"dim_z_aux": 2})
    with pytest.raises(ValueError, match=r"PendulumGuide has no argument\(s\) \['hiden_feat'\]"):
        system.build("phys+nn", guide_kwargs={"hiden_feat": (8,)})
    for inputs in (("position",), (), ("velocity", "velocity")):
        with pytest.raises(ValueError, match="aux1_state_inputs"):
            PendulumModel("phys+nn", aux1_state_inputs=inputs)


def test_velocity_only_in_ode_net_ignores_the_angle():
    model = PendulumModel("phys+nn", n_steps=T, dt=DT, aux1_state_inputs=("velocity",))
    randomise(model, seed=2)
    assert model.aux1.linears[0].in_features == 1 + 1 + model.dim_z_aux1  # velocity, t, z_A1
    net = model._in_ode_net(torch.randn(3, model.dim_z_aux1))
    y = torch.randn(3, 6)  # theta_P, theta_PA, dtheta_P, dtheta_PA, t, 1
    moved_angles = y + torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    moved_velocity = y + torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    moved_time = y + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.0])
    torch.testing.assert_close(net(moved_angles), net(y))
    assert (net(moved_velocity) - net(y)).abs().max() > 1e-4
    assert (net(moved_time) - net(y)).abs().max() > 1e-4
    # The net adds to d(dtheta_PA)/dt alone.
    assert net(y)[:, [0, 1, 2, 4, 5]].abs().max() == 0


def test_latent_sites_and_parameters():
    assert PendulumModel("nn-only", n_steps=T).latent_sites == ("z_A1", "z_A2")
    assert PendulumModel("phys-only", n_steps=T).latent_sites == ("omega",)
    m = PendulumModel("phys+nn", n_steps=T)
    assert m.latent_sites == ("omega", "z_A1", "z_A2")
    assert m.physics_parameters == (OMEGA,)
    assert not hasattr(PendulumModel("phys-only", n_steps=T), "aux1")


def test_pyro_sample_in_model_is_reproducible(pair_factory, small_data):
    model, _ = pair_factory("phys+nn", n_steps=T, dt=DT)
    pyro.set_rng_seed(11)
    a = model(None, init=small_data[:, 0])
    pyro.set_rng_seed(11)
    b = model(None, init=small_data[:, 0])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "elbo",
    [TraceMeanField_ELBO(num_particles=3, vectorize_particles=True), RenyiELBO(num_particles=2),
     Trace_ELBO(num_particles=2)],
    ids=["meanfield-vec3", "renyi", "trace-seq2"],
)
def test_regularized_loss_with_particles_on_the_pendulum(elbo, pair_factory, small_data):
    model, guide = pair_factory("phys+nn+reg", n_steps=T, dt=DT)
    randomise(model.aux2, seed=7, std=0.1)
    loss = PhysVAELoss(elbo, phys_vae_regularizers(1.0, 1.0, 1.0))
    value = loss.loss_and_grads(model, guide, small_data, subsample=torch.arange(4))
    assert torch.isfinite(torch.tensor(value))
    assert set(loss.last_terms) == {"ppc", "augment", "unmix"}
    assert loss.last_terms["ppc"] > 0
    assert model.aux2.linears[-1].weight.grad.abs().sum() > 0
