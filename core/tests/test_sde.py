"""The continuous-time layer against closed forms: SDE marginals, samplers and likelihood on Gaussian data."""

import math

import pytest
import torch

from core.errors import UserError
from core.sde import TIME_SCALE, VESDE, VPSDE, Objective, RectifiedFlow, _expand, subVPSDE
from core.sde_sampling import bits_per_dim, dequantize, sample

MU, S = 0.3, 0.5  # data N(MU, S^2) per pixel
SHAPE = (2000, 1, 2, 2)


class GaussianModel:
    """The exact network (eps, or velocity for flow) for data N(mean, S^2) per pixel (a mean per class)."""

    def __init__(self, objective, class_means=None, s=S):
        self.objective, self.class_means, self.s = objective, class_means, s
        self.batches = []

    def __call__(self, x, t_model, y=None):
        self.batches.append(x.shape[0])
        self.last_input = x, t_model
        t = t_model / TIME_SCALE
        mu = MU if y is None else _expand(self.class_means[y], x)
        a, b = (_expand(v, x) for v in self.objective.process.marginal_prob(torch.ones_like(t), t))
        variance = a**2 * self.s**2 + b**2
        if self.objective.is_flow:  # E[noise - x0 | x_t]
            return (b - a * self.s**2) / variance * (x - a * mu) - mu
        return b / variance * (x - a * mu)  # E[noise | x_t]


def objective(name, **config):
    return Objective.from_config({"objective": name, **config})


def gaussian_data(shape=SHAPE, seed=0, mu=MU, s=S):
    return mu + s * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_forward_sde_marginals_match_the_closed_form(sde):
    generator = torch.Generator().manual_seed(1)
    x = gaussian_data((4000, 1, 2, 2))
    steps, checks = 1000, {500: 0.5, 1000: 1.0}
    for i in range(1, steps + 1):
        t = torch.full((x.shape[0],), (i - 1) / steps)
        drift, diffusion = sde.sde(x, t)
        x = x + drift / steps + _expand(diffusion, x) * torch.randn(x.shape, generator=generator) / steps**0.5
        if i in checks:
            t = torch.full((1,), checks[i])
            mean_coeff, std = (v.item() for v in sde.marginal_prob(torch.ones(1), t))
            want_std = math.sqrt(mean_coeff**2 * S**2 + std**2)
            assert abs(x.mean().item() - mean_coeff * MU) < 0.05 * want_std
            assert x.std().item() == pytest.approx(want_std, rel=0.03)


def test_flow_marginal_is_the_linear_interpolant():
    x0, noise = gaussian_data(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.full((SHAPE[0],), 0.3)
    mean, std = RectifiedFlow().marginal_prob(x0, t)
    torch.testing.assert_close(mean + _expand(std, x0) * noise, 0.7 * x0 + 0.3 * noise)
    assert RectifiedFlow().velocity_target(x0, noise).equal(noise - x0)


@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_discretize_matches_the_sde_for_small_steps(sde):
    x = gaussian_data((8, 1, 2, 2))
    # Just above grid points, so that rounding t down lands on the intended index.
    t = (torch.tensor([10, 250, 500, 998.0]) + 1e-3) / (sde.N - 1)
    drift, diffusion = sde.sde(x[:4], t)
    f, G = sde.discretize(x[:4], t)
    torch.testing.assert_close(f, drift / sde.N, rtol=0.01, atol=1e-6)
    torch.testing.assert_close(G, diffusion / sde.N**0.5, rtol=0.01, atol=1e-6)


def test_reverse_sde_and_probability_flow():
    sde, x, t = VPSDE(), gaussian_data((3, 1, 2, 2)), torch.tensor([0.1, 0.5, 0.9])
    score = lambda x, t: -x  # noqa: E731
    drift, diffusion = sde.sde(x, t)
    reverse, flow = sde.reverse(score).sde(x, t), sde.reverse(score, probability_flow=True).sde(x, t)
    torch.testing.assert_close(reverse[0], drift + _expand(diffusion**2, x) * x)
    torch.testing.assert_close(flow[0], drift + 0.5 * _expand(diffusion**2, x) * x)
    assert reverse[1].equal(diffusion) and not flow[1].any()
    f, G = sde.discretize(x, t)
    torch.testing.assert_close(sde.reverse(score).discretize(x, t)[0], f + _expand(G**2, x) * x)


@pytest.mark.parametrize("process", [VPSDE(), VESDE(), RectifiedFlow()], ids=["vp", "ve", "flow"])
def test_prior_logp_is_the_gaussian_log_density(process):
    z = process.prior_sampling((5, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    want = torch.distributions.Normal(0.0, process.prior_std).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(process.prior_logp(z), want)
    assert z.std().item() == pytest.approx(process.prior_std, rel=0.3)


def test_default_constants_are_score_sde_s():
    assert VPSDE().config() == {"beta_min": 0.1, "beta_max": 20.0, "N": 1000}
    assert subVPSDE().config() == {"beta_min": 0.1, "beta_max": 20.0, "N": 1000}
    assert VESDE().config() == {"sigma_min": 0.01, "sigma_max": 50.0, "N": 1000}
    assert VPSDE().T == VESDE().T == RectifiedFlow().T == 1
    assert objective("ve").eps == 1e-5 and not objective("vp").likelihood_weighting


SAMPLERS = [
    ("vp", "euler", 200, {}),
    ("vp", "heun", 40, {}),
    ("vp", "rk45", None, {}),
    ("vp", "pc", 400, {}),
    ("vp", "pc", 400, {"corrector_steps": 0}),
    ("vp", "pc", 400, {"predictor": "euler_maruyama", "corrector_steps": 0}),
    ("vp", "dpm++", 20, {}),
    ("subvp", "heun", 40, {}),
    ("subvp", "rk45", None, {}),
    ("subvp", "pc", 400, {}),
    ("subvp", "dpm++", 20, {}),
    ("ve", "euler", 2000, {}),
    ("ve", "heun", 40, {}),
    ("ve", "rk45", None, {}),
    ("ve", "pc", 400, {}),
    ("ve", "pc", 400, {"corrector_steps": 0}),
    ("flow", "euler", 50, {}),
    ("flow", "heun", 10, {}),
    ("flow", "rk45", None, {}),
]


@pytest.mark.parametrize("name, method, steps, options", SAMPLERS, ids=lambda v: str(v) if v else "")
def test_exact_model_maps_the_prior_to_the_data(name, method, steps, options):
    model = GaussianModel(objective(name))
    generator = torch.Generator().manual_seed(0)
    x, nfe = sample(model, model.objective, SHAPE, steps, method, generator=generator, **options)
    assert x.shape == SHAPE and nfe == len(model.batches)
    assert x.mean().item() == pytest.approx(MU, abs=0.03)
    assert x.std().item() == pytest.approx(S, rel=0.05)


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_pc_takes_its_last_step_without_noise(predictor):
    model = GaussianModel(objective("vp"))
    x, _ = sample(model, model.objective, (4, 1, 2, 2), 30, "pc", predictor=predictor)
    last, t_model = model.last_input
    t = t_model / TIME_SCALE
    # score_sde's sampling eps for the VP family: 1e-3, not the training eps 1e-5.
    assert model.objective.sampling_eps == 1e-3 and t.allclose(torch.full((4,), 1e-3))
    reverse = model.objective.process.with_steps(30).reverse(model.objective.score_fn(model))
    if predictor == "reverse_diffusion":
        want = last - reverse.discretize(last, t)[0]
    else:
        want = last - reverse.sde(last, t)[0] / 30
    torch.testing.assert_close(x, want)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "flow"])
def test_bits_per_dim_of_gaussian_data_equals_the_closed_form(name):
    model, x = GaussianModel(objective(name)), gaussian_data((4, 1, 3, 3), seed=5)
    bpd = bits_per_dim(model, x, model.objective, bit_depth=1, generator=torch.Generator().manual_seed(0))
    nats = -torch.distributions.Normal(MU, S).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(bpd, nats / math.log(2), rtol=0.02, atol=0)


def test_bits_per_dim_offset_and_gaussian_probes():
    model, x = GaussianModel(objective("vp"), s=1.0), gaussian_data((2, 1, 2, 2), mu=0.0, s=1.0)
    one = bits_per_dim(model, x, model.objective, bit_depth=1, generator=torch.Generator().manual_seed(0))
    eight = bits_per_dim(model, x, model.objective, bit_depth=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eight - one, torch.full((2,), 7.0))
    probes = {"hutchinson": "gaussian", "generator": torch.Generator().manual_seed(1)}
    torch.testing.assert_close(
        bits_per_dim(model, x, model.objective, bit_depth=1, **probes), one, rtol=0.02, atol=0
    )


def test_dequantize_stays_in_each_level_s_bin():
    levels = torch.arange(16.0).reshape(1, 1, 4, 4)
    x = levels / 15 * 2 - 1
    spread = dequantize(x, bit_depth=4, generator=torch.Generator().manual_seed(0))
    assert torch.floor((spread + 1) / 2 * 16).equal(levels)


LOSSES = [("vp", {}), ("subvp", {}), ("ve", {}), ("flow", {}), ("vp", {"likelihood_weighting": True})]


@pytest.mark.parametrize("name, config", LOSSES, ids=["vp", "subvp", "ve", "flow", "vp-likelihood"])
def test_loss_is_lowest_for_the_exact_model(name, config):
    exact, x0 = GaussianModel(objective(name, **config)), gaussian_data((4096, 1, 2, 2))

    def loss(model):
        return exact.objective.loss(model, x0, generator=torch.Generator().manual_seed(7))

    best = loss(exact)
    assert best.dim() == 0 and torch.isfinite(best)
    for perturbed in (lambda x, t, y: exact(x, t) + 0.05, lambda x, t, y: 0.9 * exact(x, t)):
        assert best < loss(perturbed)


def test_likelihood_weighting_is_g_squared_over_std_squared():
    # For the VE-SDE g(t)^2 / std(t)^2 = 2 log(sigma_max / sigma_min) at every t.
    x0, model = gaussian_data((64, 1, 2, 2)), lambda x, t, y: 0.5 * x

    def loss(**config):
        return objective("ve", **config).loss(model, x0, generator=torch.Generator().manual_seed(7))

    weight = 2 * math.log(50 / 0.01)
    torch.testing.assert_close(loss(likelihood_weighting=True), weight * loss())


def test_loss_backpropagates_into_the_network():
    network = torch.nn.Conv2d(1, 1, 1)
    loss = objective("flow").loss(lambda x, t, y: network(x), gaussian_data((8, 1, 2, 2)))
    loss.backward()
    assert network.weight.grad is not None and network.weight.grad.abs().sum() > 0


def test_config_round_trip_through_a_weights_only_checkpoint(tmp_path):
    configs = [
        {"objective": "vp", "beta_min": 0.2, "beta_max": 10, "N": 500, "likelihood_weighting": True},
        {"objective": "subvp"},
        {"objective": "ve", "sigma_min": 0.02, "sigma_max": 80, "eps": 1e-4},
        {"objective": "flow", "eps": 1e-3, "sigma_min": None},
    ]
    for config in configs:
        built = Objective.from_config(config)
        torch.save({"objective": built.to_config()}, tmp_path / "ckpt.pt")
        stored = torch.load(tmp_path / "ckpt.pt", weights_only=True)["objective"]
        assert Objective.from_config(stored).to_config() == stored == built.to_config()
        assert all(stored[key] == value for key, value in config.items() if value is not None)


BAD_CONFIGS = [
    ({"objective": "ddim"}, "unknown objective 'ddim'"),
    ({}, "unknown objective None"),
    ({"objective": "vp", "beta_mn": 0.1}, "unknown key 'beta_mn'"),
    ({"objective": "vp", "sigma_max": 50}, "sigma_max does not apply to the vp objective"),
    ({"objective": "vp", "beta_min": 0}, "need 0 < beta_min <= beta_max"),
    ({"objective": "subvp", "beta_min": 5, "beta_max": 1}, "need 0 < beta_min <= beta_max"),
    ({"objective": "ve", "sigma_min": 50, "sigma_max": 1}, "need 0 < sigma_min < sigma_max"),
    ({"objective": "ve", "sigma_max": float("nan")}, "sigma_max must be a finite number"),
    ({"objective": "vp", "N": 0}, "N must be a whole number >= 1"),
    ({"objective": "vp", "eps": 0}, "eps must lie in (0, 1)"),
    ({"objective": "flow", "likelihood_weighting": True}, "not to flow"),
    ({"objective": "vp", "likelihood_weighting": "yes"}, "likelihood_weighting must be true or false"),
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS)
def test_bad_config_is_a_user_error(config, message):
    with pytest.raises(UserError) as error:
        Objective.from_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


REFUSED = [
    ("flow", "pc", {}, "the flow objective has no SDE for the pc sampler"),
    ("flow", "dpm++", {}, "the flow objective has no SDE for the dpm++ sampler"),
    ("ve", "dpm++", {}, "the dpm++ sampler applies to vp and subvp, not ve"),
    ("vp", "ddim", {}, "unknown sampler 'ddim'"),
    ("vp", "pc", {"snr": 0}, "snr must be a number > 0"),
    ("vp", "pc", {"snr": -0.1}, "snr must be a number > 0"),
    ("vp", "pc", {"corrector_steps": -1}, "corrector_steps must be a whole number >= 0"),
    ("vp", "pc", {"predictor": "ancestral"}, "unknown predictor 'ancestral'"),
    ("subvp", "pc", {"steps": 20}, "the pc sampler on subvp needs steps > beta_max = 20, got 20"),
    ("vp", "euler", {"steps": 0}, "steps must be a whole number >= 1"),
    ("vp", "rk45", {"rtol": 0}, "rtol must be a number > 0"),
    ("vp", "dpm++", {"steps": 1001}, "dpm++ takes at most N = 1000 steps"),
    ("vp", "heun", {"cfg_scale": 3.0}, "cfg_scale 3.0 needs the labels y and null labels null_y"),
]


@pytest.mark.parametrize("name, method, options, message", REFUSED)
def test_refused_sampler_settings_are_user_errors(name, method, options, message):
    model = GaussianModel(objective(name))
    options = {"steps": 2, **options}
    with pytest.raises(UserError) as error:
        sample(model, model.objective, (2, 1, 2, 2), method=method, **options)
    assert message in str(error.value) and not model.batches


def test_unknown_hutchinson_estimator_is_a_user_error():
    model = GaussianModel(objective("vp"))
    with pytest.raises(UserError, match="unknown Hutchinson estimator 'normal'"):
        bits_per_dim(model, gaussian_data((1, 1, 2, 2)), model.objective, hutchinson="normal")


NFE = [
    ("vp", "pc", 21, {"corrector_steps": 2}, 63),
    ("ve", "pc", 6, {"corrector_steps": 0}, 6),
    ("ve", "euler", 7, {}, 7),
    ("flow", "heun", 7, {}, 14),
    ("vp", "dpm++", 5, {}, 5),
]


@pytest.mark.parametrize("name, method, steps, options, want", NFE)
def test_nfe_is_one_per_network_batch_also_under_guidance(name, method, steps, options, want):
    labels, null = torch.tensor([0, 1, 0]), torch.tensor([2, 2, 2])
    for scale in (1.0, 4.0):
        model = GaussianModel(objective(name), class_means=torch.tensor([-0.5, 0.5, 0.0]))
        guidance = {"y": labels, "null_y": null, "cfg_scale": scale}
        _, nfe = sample(model, model.objective, (3, 1, 2, 2), steps, method, **guidance, **options)
        assert nfe == want == len(model.batches)
        assert set(model.batches) == {3 if scale == 1 else 6}


class TinyNetwork(torch.nn.Module):
    """A real module with the UNet's call signature: model(x, t, y)."""

    def __init__(self):
        super().__init__()
        self.conv, self.label = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Embedding(3, 1)

    def forward(self, x, t, y=None):
        shift = 0 if y is None else self.label(y)[:, :, None, None]
        return torch.tanh(self.conv(x) + _expand(t / 1000, x) + shift)


@pytest.mark.parametrize("name, method", [(n, m) for n, m, _, _ in SAMPLERS if m != "rk45"] + [("vp", "ode")])
def test_each_sampler_runs_a_tiny_guided_network(name, method):
    torch.manual_seed(0)
    labels = torch.tensor([0, 1])
    options = {"y": labels, "null_y": torch.full_like(labels, 2), "cfg_scale": 2.0, "rtol": 1e-3}
    x, nfe = sample(TinyNetwork(), objective(name), (2, 1, 4, 4), 25, method, **options)
    assert x.shape == (2, 1, 4, 4) and torch.isfinite(x).all() and nfe > 0


def test_rk45_nfe_is_the_solver_s_count():
    model = GaussianModel(objective("flow"))
    _, nfe = sample(model, model.objective, (3, 1, 2, 2), None, "rk45", rtol=1e-3, atol=1e-3)
    assert nfe == len(model.batches) > 0


@pytest.mark.parametrize("method", ["pc", "heun", "dpm++"])
def test_cfg_scale_one_is_the_conditional_model_and_zero_the_unconditional(method):
    means = torch.tensor([-0.5, 0.5, 0.0])
    labels, null = torch.tensor([0, 1, 0, 1]), torch.full((4,), 2)

    def run(y, **guidance):
        model = GaussianModel(objective("vp"), class_means=means)
        options = {"y": y, "generator": torch.Generator().manual_seed(3), **guidance}
        return sample(model, model.objective, (4, 1, 2, 2), 30, method, **options)[0]

    conditional, unconditional = run(labels), run(null)
    assert run(labels, null_y=null, cfg_scale=1.0).equal(conditional)
    torch.testing.assert_close(run(labels, null_y=null, cfg_scale=0.0), unconditional)
    assert not torch.allclose(run(labels, null_y=null, cfg_scale=3.0), conditional)


def test_guided_exact_model_moves_each_class_to_its_mean():
    means = torch.tensor([-0.5, 0.5, 0.0])
    model = GaussianModel(objective("flow"), class_means=means)
    labels = torch.arange(2).repeat(500)
    x, _ = sample(
        model, model.objective, (1000, 1, 2, 2), 20, "heun", y=labels, null_y=torch.full_like(labels, 2)
    )
    assert x[labels == 0].mean().item() == pytest.approx(-0.5, abs=0.05)
    assert x[labels == 1].mean().item() == pytest.approx(0.5, abs=0.05)


def test_objective_of_a_run_config():
    from core.sde import objective_of
    from core.sde_sampling import resolve_sampler

    # Checkpoints from before the continuous objectives have no "objective" key: they are DDPM runs.
    assert (
        objective_of({}) is None
        and objective_of({"objective": "ddpm", "likelihood_weighting": False}) is None
    )
    with pytest.raises(UserError, match="beta_max applies to --objective vp"):
        objective_of({"objective": "ddpm", "beta_max": 10.0})
    vp = objective_of({"objective": "vp", "beta_max": 10.0, "sigma_min": None, "likelihood_weighting": True})
    assert vp.process.beta_1 == 10.0 and vp.likelihood_weighting
    assert objective_of(vp.to_config()).to_config() == vp.to_config()
    flow = objective_of({"objective": "flow", "likelihood_weighting": False})
    assert resolve_sampler(flow) == ("euler", 100) and resolve_sampler(vp) == ("pc", 1000)
    assert resolve_sampler(vp, "rk45") == ("rk45", None) and resolve_sampler(vp, "dpm++", 7) == ("dpm++", 7)


def test_a_cpu_generator_seeds_samples_on_any_device():
    # The sampled numbers depend on the generator alone, not on the device they are moved to.
    from core.sde import rand, randn

    a = randn((2, 3), torch.Generator().manual_seed(1), device="cpu")
    b = randn((2, 3), torch.Generator().manual_seed(1), device="meta")
    assert b.device.type == "meta" and a.shape == b.shape
    assert torch.equal(
        rand(4, torch.Generator().manual_seed(2)), torch.rand(4, generator=torch.Generator().manual_seed(2))
    )


def test_samplers_stop_at_score_sde_s_sampling_eps():
    eps = {name: objective(name).sampling_eps for name in ("vp", "subvp", "ve", "flow")}
    assert eps == {"vp": 1e-3, "subvp": 1e-3, "ve": 1e-5, "flow": 1e-5}
