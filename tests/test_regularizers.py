"""The Phys-VAE regularizers on hand-computed cases, and PhysVAELoss around Pyro's ELBOs."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_physvae.regularizers import (
    REGULARIZER_SITE,
    ComponentCall,
    PhysicsAugmentation,
    PhysVAELoss,
    PosteriorPredictiveCheck,
    Unmixing,
    phys_vae_regularizers,
    squared_distance,
)

N, T = 4, 3


# --------------------------------------------------------------------------------------
# The regularizers as functions of recorded sites
# --------------------------------------------------------------------------------------
def const(value: float, batch: int = 2) -> torch.Tensor:
    return torch.full((batch, T), float(value))


def test_squared_distance():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    torch.testing.assert_close(squared_distance(a, b), torch.tensor([5.0, 25.0]))
    torch.testing.assert_close(squared_distance(a, b, event_dim=2), torch.tensor(30.0))
    torch.testing.assert_close(squared_distance(a, b, event_dim=0), (a - b) ** 2)


def test_posterior_predictive_check_hand_computed():
    sites = {"x_P": const(0), "x_PA": const(1), "x_PB": const(2), "x_mean": const(4)}
    r = PosteriorPredictiveCheck(weight=1.0)(None, None, sites)
    # 0.25 * T * (1 + 4 + 9 + 4)
    torch.testing.assert_close(r, torch.full((2,), 0.25 * T * 18))
    # Per data point: different rows give different values.
    sites["x_mean"] = torch.stack((torch.full((T,), 4.0), torch.full((T,), 1.0)))
    r = PosteriorPredictiveCheck(weight=1.0)(None, None, sites)
    torch.testing.assert_close(r, torch.tensor([0.25 * T * 18, 0.25 * T * (1 + 4 + 0 + 1)]))


def test_posterior_predictive_check_without_in_ode_net():
    sites = {"x_P": const(1), "x_PB": const(3), "x_mean": const(3)}
    r = PosteriorPredictiveCheck(weight=0.5)(None, None, sites)
    torch.testing.assert_close(r, torch.full((2,), 4.0 * T))


def test_posterior_predictive_check_with_sample_dims():
    sites = {"x_P": torch.zeros(5, 2, T), "x_PB": torch.ones(5, 2, T), "x_mean": torch.ones(5, 2, T)}
    r = PosteriorPredictiveCheck(weight=1.0)(None, None, sites)
    assert r.shape == (5, 2)
    torch.testing.assert_close(r, torch.full((5, 2), float(T)))


def test_unmixing_hand_computed_and_stop_gradient():
    x_p = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    unmixed = torch.tensor([[1.0, 1.0, 0.0]], requires_grad=True)
    r = Unmixing(weight=1.0)(None, None, {"unmixed": unmixed, "x_P": x_p})
    torch.testing.assert_close(r, torch.tensor([5.0]))
    r.sum().backward()
    torch.testing.assert_close(unmixed.grad, 2 * (unmixed - x_p).detach())
    assert x_p.grad is None  # stop-gradient on the physics output


class FakeAugModel:
    """Returns fixed 'true' parameters and a simulated signal."""

    def __init__(self) -> None:
        self.calls = 0

    def simulate_augmentation(self, init):
        self.calls += 1
        truth = {"a": torch.full(init.shape, 2.0), "b": init * 10}
        return truth, torch.stack((init, init), -1)


class FakeAugGuide:
    def __init__(self) -> None:
        self.w = torch.tensor(3.0, requires_grad=True)

    def physics_mean(self, x):
        return {"a": self.w * x[..., 0], "b": x[..., 1]}


def test_physics_augmentation_hand_computed():
    model, guide = FakeAugModel(), FakeAugGuide()
    init = torch.tensor([1.0, -1.0, 0.0])
    r = PhysicsAugmentation(weight=1.0)(model, guide, {"init": init})
    # a: (3*init - 2)^2 = [1, 25, 4]; b: (init - 10 init)^2 = [81, 81, 0]
    torch.testing.assert_close(r, torch.tensor([82.0, 106.0, 4.0]))
    assert model.calls == 1
    r.sum().backward()
    # d/dw sum (w*init - 2)^2 = sum 2 (w init - 2) init = 2*(1*1 + (-5)*(-1) + 0) = 12
    torch.testing.assert_close(guide.w.grad, torch.tensor(12.0))


def test_physics_augmentation_needs_model_and_guide_methods():
    reg = PhysicsAugmentation(weight=1.0)
    sites = {"init": torch.zeros(2)}
    with pytest.raises(TypeError, match=r"physics_mean\(\)"):
        reg(FakeAugModel(), lambda *a, **k: None, sites)
    with pytest.raises(TypeError, match=r"simulate_augmentation\(\)"):
        reg(object(), FakeAugGuide(), sites)


@pytest.mark.parametrize(
    ("reg", "sites", "missing"),
    [
        (PosteriorPredictiveCheck(1.0), {"x_P": const(0), "x_mean": const(0)}, "x_PB"),
        (Unmixing(1.0), {"x_P": const(0)}, "unmixed"),
        (Unmixing(1.0), {"unmixed": const(0)}, "x_P"),
        (PhysicsAugmentation(1.0), {"x_P": const(0)}, "init"),
    ],
)
def test_missing_sites_raise(reg, sites, missing):
    with pytest.raises(ValueError, match=f"needs the sites .*'{missing}'"):
        reg(FakeAugModel(), FakeAugGuide(), sites)


def test_phys_vae_regularizers_weights_and_order():
    regs = phys_vae_regularizers(0.1, 0.2, 0.3)
    assert [(type(r), r.name, r.weight) for r in regs] == [
        (PosteriorPredictiveCheck, "ppc", 0.1),
        (PhysicsAugmentation, "augment", 0.2),
        (Unmixing, "unmix", 0.3),
    ]
    assert [r.name for r in phys_vae_regularizers(0.0, 1.0, 0.0)] == ["augment"]
    assert phys_vae_regularizers(0.0, 0.0, 0.0) == []


@pytest.mark.parametrize("weight", [-1.0, float("nan")])
def test_invalid_weight(weight):
    with pytest.raises(ValueError, match="weight >= 0"):
        PhysVAELoss(Trace_ELBO(), [Unmixing(weight)])


def test_duplicate_names():
    with pytest.raises(ValueError, match="unique"):
        PhysVAELoss(Trace_ELBO(), [Unmixing(1.0), Unmixing(2.0)])
    # Two terms of the same kind are fine under different names.
    PhysVAELoss(Trace_ELBO(), [Unmixing(1.0), Unmixing(2.0, name="unmix2")])


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_kl_weight_scales_only_the_latent_terms(elbo_cls):
    x = torch.tensor([0.3, -1.2, 2.0])
    loc, scale = torch.tensor(0.4), torch.tensor(0.7)
    drawn = []

    def model():
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide():
        with pyro.plate("data", 3):
            drawn.append(pyro.sample("z", dist.Normal(loc, scale)))

    def loss_and_draw(weight):
        pyro.set_rng_seed(0)
        value = PhysVAELoss(elbo_cls(), [], kl_weight=weight).loss(model, guide)
        return value, drawn[-1]

    base, z = loss_and_draw(1.0)
    weighted, z_again = loss_and_draw(3.0)
    assert torch.equal(z, z_again)
    if elbo_cls is TraceMeanField_ELBO:
        q = dist.Normal(loc.expand(3), scale.expand(3))
        kl = torch.distributions.kl_divergence(q, dist.Normal(0.0, 1.0)).sum()
    else:
        kl = (dist.Normal(loc, scale).log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z)).sum()
    assert weighted - base == pytest.approx(2.0 * float(kl), rel=1e-5)
    with pytest.raises(ValueError, match="kl_weight"):
        PhysVAELoss(elbo_cls(), [], kl_weight=0.0)


def test_repr_and_settings_passthrough():
    elbo = TraceMeanField_ELBO(num_particles=3, vectorize_particles=True)
    loss = PhysVAELoss(elbo, [PosteriorPredictiveCheck(0.5), Unmixing(2.0)])
    assert repr(loss) == "PhysVAELoss(TraceMeanField_ELBO, [ppc=0.5, unmix=2], kl_weight=1 + alpha)"
    assert loss.kl_weight == pytest.approx(1.5)  # the reference adds alpha to the KL weight
    assert loss.num_particles == 3 and loss.vectorize_particles
    assert isinstance(PhysVAELoss().elbo, Trace_ELBO)
    assert repr(PhysVAELoss(beta=0.0)) == "PhysVAELoss(Trace_ELBO, [ppc=default, unmix=default], " \
                                          "kl_weight=1 + alpha)"
    with pytest.raises(ValueError, match="either regularizers or alpha"):
        PhysVAELoss(Trace_ELBO(), [Unmixing(1.0)], alpha=1.0)


# --------------------------------------------------------------------------------------
# PhysVAELoss on a deterministic model/guide pair, where the ELBO is known in closed form
# --------------------------------------------------------------------------------------
X = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-0.2, 0.4, 0.0]])
MU = torch.tensor([0.3, -0.5, 1.0, 0.0])  # the guide's point mass for z
#: The toy model's noise: sigma = 2, so its likelihood weighs squared errors by 1 / (2 sigma^2).
SIGMA = 2.0
PRECISION = 0.5 / SIGMA**2


def curves(z: torch.Tensor) -> dict[str, torch.Tensor]:
    ramp = torch.arange(T, dtype=torch.float32)
    zc = z.unsqueeze(-1)
    return {"x_P": zc * ramp, "x_PA": zc * ramp + 1.0, "x_PB": zc * ramp - 0.5, "x_mean": zc + ramp}


class ToyModel:
    """z ~ N(0, 1) per datum; x ~ N(x_mean(z), SIGMA); records the Phys-VAE sites as a model
    written from scratch does, with :class:`ComponentCall`."""

    x_event_dim = 1
    reg_weights = (0.5, 2.0, 0.25)

    def noise_scale(self):
        return torch.tensor(SIGMA)

    def __call__(self, x, subsample=None):
        call = ComponentCall(self, "model")
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            call.record("init", x[idx, 0], event_dim=0)
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            c = curves(z)
            for name, value in c.items():
                call.record(name, value, event_dim=1)
            pyro.sample("x", dist.Normal(c["x_mean"], SIGMA).to_event(1), obs=x[idx])

    def simulate_augmentation(self, init):
        return {"omega": 2.0 * init}, init.unsqueeze(-1).expand(*init.shape, T)


class ToyGuide:
    """z is a point mass at MU (log q = 0); records an 'unmixed' signal."""

    def __call__(self, x, subsample=None):
        call = ComponentCall(self, "guide")
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            call.record("unmixed", x[idx] * 2.0, event_dim=1)
            pyro.sample("z", dist.Delta(MU[idx]))

    def physics_mean(self, x):
        return {"omega": x.mean(-1)}


def plain_loss(idx: torch.Tensor, kl_weight: float = 1.0) -> float:
    """-ELBO for the rows idx, scaled by N / B, in closed form (log q = 0, so the KL part
    is -log p(z))."""
    z = MU[idx]
    lp = kl_weight * dist.Normal(0.0, 1.0).log_prob(z) + \
        dist.Normal(curves(z)["x_mean"], SIGMA).log_prob(X[idx]).sum(-1)
    return float(-(N / len(idx)) * lp.sum())


def hand_regularizers(idx: torch.Tensor) -> dict[str, torch.Tensor]:
    z = MU[idx]
    c = curves(z)
    sq = lambda a, b: ((a - b) ** 2).sum(-1)  # noqa: E731
    ppc = 0.25 * (sq(c["x_PA"], c["x_P"]) + sq(c["x_PB"], c["x_P"]) + sq(c["x_mean"], c["x_PA"])
                  + sq(c["x_mean"], c["x_PB"]))
    unmix = sq(X[idx] * 2.0, c["x_P"])
    init = X[idx, 0]
    augment = (init - 2.0 * init) ** 2
    return {"ppc": ppc, "unmix": unmix, "augment": augment}


WEIGHTS = {"ppc": 0.5, "augment": 2.0, "unmix": 0.25}


def all_regs():
    return phys_vae_regularizers(WEIGHTS["ppc"], WEIGHTS["augment"], WEIGHTS["unmix"])


def penalty(idx: torch.Tensor) -> float:
    """The regularizers in ELBO units: reference weights times the likelihood precision,
    scaled by N / B."""
    regs = hand_regularizers(idx)
    return float(N / len(idx) * PRECISION * sum(WEIGHTS[k] * v.sum() for k, v in regs.items()))


def expected_total(idx: torch.Tensor, kl_weight: float = 1.0) -> float:
    return plain_loss(idx, kl_weight) + penalty(idx)


@pytest.mark.parametrize("subsample", [None, torch.tensor([0, 2])])
def test_plain_elbo_matches_closed_form(subsample):
    idx = torch.arange(N) if subsample is None else subsample
    value = Trace_ELBO().loss(ToyModel(), ToyGuide(), X, subsample=subsample)
    assert value == pytest.approx(plain_loss(idx), rel=1e-5)


@pytest.mark.parametrize("subsample", [None, torch.tensor([0, 2]), torch.tensor([3])])
def test_loss_is_elbo_plus_weighted_regularizers(subsample):
    idx = torch.arange(N) if subsample is None else subsample
    loss = PhysVAELoss(Trace_ELBO(), all_regs(), kl_weight=1.0)
    value = loss.loss(ToyModel(), ToyGuide(), X, subsample=subsample)
    assert value == pytest.approx(expected_total(idx), rel=1e-5)
    # Regularizers changed the loss by a clearly non-zero amount.
    assert abs(value - plain_loss(idx)) > 0.5
    regs = hand_regularizers(idx)
    for name, v in regs.items():
        assert loss.last_terms[name] == pytest.approx(float(v.mean()), rel=1e-5)


def test_default_weights_and_kl_weight_come_from_the_model():
    # No weights given: the model's reg_weights (which equal WEIGHTS), and the KL part
    # weighted by 1 + alpha as in the reference.
    idx = torch.tensor([0, 1, 3])
    value = PhysVAELoss(Trace_ELBO()).loss(ToyModel(), ToyGuide(), X, subsample=idx)
    assert value == pytest.approx(expected_total(idx, kl_weight=1.0 + WEIGHTS["ppc"]), rel=1e-5)


def test_factor_site_holds_the_weighted_sum():
    loss = PhysVAELoss(Trace_ELBO(), all_regs())
    idx = torch.tensor([1, 3])
    model_tr, guide_tr = loss._get_trace(ToyModel(), ToyGuide(), (X,), {"subsample": idx})
    site = model_tr.nodes[REGULARIZER_SITE]
    assert float(site["fn"].log_prob(site["value"]).sum()) == pytest.approx(-penalty(idx), rel=1e-5)
    assert REGULARIZER_SITE not in guide_tr.nodes


def test_no_regularizers_is_the_plain_elbo():
    loss = PhysVAELoss(Trace_ELBO(), [])
    assert loss.loss(ToyModel(), ToyGuide(), X) == pytest.approx(plain_loss(torch.arange(N)), rel=1e-6)


def test_models_used_alone_carry_no_regularizer_site():
    loss = PhysVAELoss(Trace_ELBO(), all_regs())
    loss.loss(ToyModel(), ToyGuide(), X)
    tr = poutine.trace(ToyModel()).get_trace(X)
    assert REGULARIZER_SITE not in tr.nodes


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(),
        TraceMeanField_ELBO(),
        RenyiELBO(alpha=0.5, num_particles=2),
        Trace_ELBO(num_particles=3, vectorize_particles=True),
        TraceMeanField_ELBO(num_particles=3, vectorize_particles=True),
        Trace_ELBO(num_particles=3),
    ],
    ids=["trace", "meanfield", "renyi", "trace-vec3", "meanfield-vec3", "trace-seq3"],
)
def test_works_with_pyro_elbos(elbo):
    idx = torch.tensor([0, 1, 3])
    loss = PhysVAELoss(elbo, all_regs(), kl_weight=1.0)
    value = loss.loss(ToyModel(), ToyGuide(), X, subsample=idx)
    # Deterministic guide: every particle gives the same value, so all ELBOs agree.
    assert value == pytest.approx(expected_total(idx), rel=1e-5)
    assert loss.loss_and_grads(ToyModel(), ToyGuide(), X, subsample=idx) == pytest.approx(
        expected_total(idx), rel=1e-5)
    if hasattr(elbo, "differentiable_loss"):  # RenyiELBO has none
        diff = loss.differentiable_loss(ToyModel(), ToyGuide(), X, subsample=idx)
        assert float(diff) == pytest.approx(expected_total(idx), rel=1e-5)


def test_missing_guide_site_inside_the_loss():
    class GuideWithoutUnmixed(ToyGuide):
        def __call__(self, x, subsample=None):
            ComponentCall(self, "guide")
            with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
                pyro.sample("z", dist.Delta(MU[idx]))

    with pytest.raises(ValueError, match="'unmixed'"):
        PhysVAELoss(Trace_ELBO(), [Unmixing(1.0)]).loss(ToyModel(), GuideWithoutUnmixed(), X)


def test_encoder_terms_are_left_out_with_a_warning_where_the_guide_has_no_encoder():
    def plain_guide(x, subsample=None):  # no Phys-VAE guide (like an AutoGuide)
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            pyro.sample("z", dist.Delta(MU[idx]))

    idx = torch.arange(N)
    loss = PhysVAELoss(Trace_ELBO(), all_regs(), kl_weight=1.0)
    with pytest.warns(UserWarning, match="acts through the amortized encoder and is left out"):
        value = loss.loss(ToyModel(), plain_guide, X)
    assert loss.skipped == {"augment", "unmix"}
    ppc_only = float(N / N * PRECISION * WEIGHTS["ppc"] * hand_regularizers(idx)["ppc"].sum())
    assert value == pytest.approx(plain_loss(idx) + ppc_only, rel=1e-5)


def test_no_phys_vae_model_in_the_trace_is_an_error():
    def bare_model(x, subsample=None):
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([len(idx), T]).to_event(1), obs=x[idx])

    with pytest.raises(ValueError, match="no Phys-VAE model call"):
        PhysVAELoss(Trace_ELBO(), all_regs(), kl_weight=1.0).loss(bare_model, ToyGuide(), X)


def test_calls_are_paired_in_order_across_scopes():
    # Two data sets sharing one model and one guide, under name scopes: each model call
    # is regularized with its own guide call and its own plate scale.
    from pyro.contrib.autoname import scope

    x_a, x_b = X[:2], X[1:]
    model, guide = ToyModel(), ToyGuide()

    def two_models(x_a, x_b):
        with scope(prefix="a"):
            model(x_a)
        with scope(prefix="b"):
            model(x_b, subsample=torch.tensor([0, 2]))

    def two_guides(x_a, x_b):
        with scope(prefix="a"):
            guide(x_a)
        with scope(prefix="b"):
            guide(x_b, subsample=torch.tensor([0, 2]))

    loss = PhysVAELoss(Trace_ELBO(), [PosteriorPredictiveCheck(0.5), Unmixing(0.25)], kl_weight=1.0)
    model_tr, _ = loss._get_trace(two_models, two_guides, (x_a, x_b), {})
    site = model_tr.nodes[REGULARIZER_SITE]
    sq = lambda a, b: ((a - b) ** 2).sum(-1)  # noqa: E731

    def hand(x, z, scale):
        c = curves(z)
        ppc = 0.25 * (sq(c["x_PA"], c["x_P"]) + sq(c["x_PB"], c["x_P"]) + sq(c["x_mean"], c["x_PA"])
                      + sq(c["x_mean"], c["x_PB"]))
        return scale * PRECISION * (0.5 * ppc + 0.25 * sq(x * 2.0, c["x_P"])).sum()

    # ToyGuide's MU is indexed by the rows of each data set.
    rows_b = torch.tensor([0, 2])
    expected = hand(x_a, MU[:2], 1.0) + hand(x_b[rows_b], MU[rows_b], 3 / 2)
    assert float(site["fn"].log_prob(site["value"]).sum()) == pytest.approx(-float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="paired in order"):
        loss.loss(two_models, lambda x_a, x_b: guide(x_a), x_a, x_b)


# --------------------------------------------------------------------------------------
# Optimisation: the penalty reaches the gradients, with pyro's SVI and pyro.optim.Adam
# --------------------------------------------------------------------------------------
class ShiftModel:
    """x_PB = x_P + c with a learnt shift c, unit noise precision (sigma^2 = 1/2)."""

    x_event_dim = 1

    def noise_scale(self):
        return torch.tensor(0.5**0.5)

    def __call__(self, x, subsample=None):
        c = pyro.param("c", torch.tensor(0.0))
        call = ComponentCall(self, "model")
        with pyro.plate("data", x.shape[0], subsample=subsample):
            x_p = torch.zeros_like(x)
            x_pb = x_p + c
            call.record("x_P", x_p, event_dim=1)
            call.record("x_PB", x_pb, event_dim=1)
            call.record("x_mean", x_pb, event_dim=1)
            pyro.sample("x", dist.Normal(x_pb, 0.5**0.5).to_event(1), obs=x)


def empty_guide(x, subsample=None):
    pass


@pytest.mark.parametrize(("weight", "optimum"), [(0.0, 1.0), (0.5, 2 / 3), (1.5, 0.4)])
def test_svi_with_adam_reaches_the_regularized_optimum(weight, optimum):
    # Per datum: T (c - 1)^2 + weight T c^2 (precision 1), minimised at c = 1 / (1 + weight).
    x = torch.ones(6, T)
    loss = PhysVAELoss(Trace_ELBO(), [PosteriorPredictiveCheck(weight)])
    svi = SVI(ShiftModel(), empty_guide, Adam({"lr": 0.05}), loss=loss)
    for _ in range(300):
        svi.step(x)
    assert float(pyro.param("c").detach()) == pytest.approx(optimum, abs=0.02)


def test_loss_and_grads_gradient_matches_closed_form():
    x = torch.ones(6, T)
    w = 0.5
    loss = PhysVAELoss(Trace_ELBO(), [PosteriorPredictiveCheck(w)])
    pyro.param("c", torch.tensor(0.2))
    with poutine.trace(param_only=True) as tr:
        loss.loss_and_grads(ShiftModel(), empty_guide, x)
    c = tr.trace.nodes["c"]["value"].unconstrained()
    # d/dc sum_n [T (c - 1)^2 + w T c^2] = 6 T (2 (c - 1) + 2 w c)
    expected = 6 * T * (2 * (0.2 - 1.0) + 2 * w * 0.2)
    assert math.isclose(float(c.grad), expected, rel_tol=1e-5)


# --------------------------------------------------------------------------------------
# Composition: a hierarchical program around a real Phys-VAE model and encoder
# --------------------------------------------------------------------------------------
def test_regularizers_act_inside_a_hierarchical_program():
    from pyro.infer.autoguide import AutoNormal

    from pyro_physvae.guides import PendulumGuide
    from pyro_physvae.models import PendulumModel

    pendulum = PendulumModel("phys+nn+reg", n_steps=8, dt=0.1, hidden_aux1=(8,), hidden_aux2=(8,))
    encoder = PendulumGuide(pendulum, hidden_feat=(8,), feat_dim=8, hidden_aux=(8,), hidden_unmixer=(8,),
                            hidden_phys=(8,))
    x = 0.5 * torch.cos(torch.linspace(0, 2, 8)).expand(6, 8) + 0.01 * torch.randn(6, 8)

    def population(x, subsample=None):
        mu = pyro.sample("mu", dist.Normal(2.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        return pendulum(x, subsample=subsample, priors={"omega": dist.Normal(mu, sigma)})

    globals_guide = AutoNormal(poutine.block(population, expose=["mu", "sigma"]))

    def guide(x, subsample=None):
        globals_guide(x, subsample=subsample)
        encoder(x, subsample=subsample)

    alpha, gamma = 0.3, 0.7
    loss = PhysVAELoss(Trace_ELBO(), alpha=alpha, beta=0.0, gamma=gamma)
    idx = torch.tensor([0, 2, 5])
    model_tr, guide_tr = loss._get_trace(population, guide, (x,), {"subsample": idx})
    c = {k: model_tr.nodes[k]["value"] for k in ("x_P", "x_PA", "x_PB", "x_mean")}
    sq = lambda a, b: ((a - b) ** 2).sum(-1)  # noqa: E731
    ppc = 0.25 * (sq(c["x_PA"], c["x_P"]) + sq(c["x_PB"], c["x_P"]) + sq(c["x_mean"], c["x_PA"])
                  + sq(c["x_mean"], c["x_PB"]))
    unmix = sq(guide_tr.nodes["unmixed"]["value"], c["x_P"])
    precision = 0.5 / float(pendulum.noise_scale()) ** 2
    expected = (6 / 3) * precision * (alpha * ppc + gamma * unmix).sum().detach()
    site = model_tr.nodes[REGULARIZER_SITE]
    got = float(site["fn"].log_prob(site["value"]).sum().detach())
    assert got == pytest.approx(-float(expected), rel=1e-4)
    assert float(expected) > 0
    # The model's default weights, R_DA,2 included, also run; SVI steps change the encoder.
    loss = PhysVAELoss(TraceMeanField_ELBO())
    svi = SVI(population, guide, Adam({"lr": 1e-2}), loss=loss)
    before = [p.detach().clone() for p in encoder.parameters()]
    for _ in range(3):
        assert math.isfinite(svi.step(x, subsample=idx))
    assert set(loss.last_terms) == {"ppc", "augment", "unmix"} and not loss.skipped
    assert loss.kl_weight_for(pendulum) == pytest.approx(1.0 + pendulum.reg_weights[0])
    assert any(not torch.equal(b, p) for b, p in zip(before, encoder.parameters(), strict=True))


def test_autoguide_swap_needs_no_weights_by_hand():
    from pyro.infer.autoguide import AutoNormal

    from pyro_physvae.models import PendulumModel

    pendulum = PendulumModel("phys+nn+reg", n_steps=8, dt=0.1, hidden_aux1=(8,), hidden_aux2=(8,))
    x = 0.5 * torch.cos(torch.linspace(0, 2, 8)).expand(4, 8)
    loss = PhysVAELoss(Trace_ELBO())
    with pytest.warns(UserWarning, match="'augment' acts through the amortized encoder"):
        value = loss.loss(pendulum, AutoNormal(pendulum), x)
    assert math.isfinite(value)
    assert loss.skipped == {"augment", "unmix"} and set(loss.last_terms) == {"ppc"}
