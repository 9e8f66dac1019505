"""Continuous-time diffusion: score_sde's VP, sub-VP and VE SDEs, the rectified-flow interpolant, and
the training objective built from a plain config dict (stored in checkpoints).

The classes keep score_sde's sde_lib method names, semantics and default constants so that results
can be compared with it. Time t is a tensor of shape (batch,) in [0, T] with T = 1, broadcast over
the image dims. Networks keep the DDPM convention: their time input is t * 999 (the UNet and the
DiT embed integer-like timesteps in [0, 1000)), and they predict the noise eps for the SDEs
(score = -eps / std) and the velocity noise - x0 for the flow.
"""

import math

import torch

from .errors import UserError
from .guidance import guided

TIME_SCALE = 999  # continuous t in [0, 1] -> the network's DDPM timestep input in [0, 999]


def randn(shape, generator=None, device=None, dtype=torch.float32):
    """Gaussian noise drawn on the generator's own device and moved to device: a CPU generator then
    seeds CUDA runs too, with the same numbers on any device."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def rand(shape, generator=None, device=None, dtype=torch.float32):
    """Uniform [0, 1) numbers, drawn like randn()."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where, dtype=dtype).to(device)


def _expand(values, x):
    """Per-sample values (batch,) shaped to broadcast over x (batch, ...)."""
    return values.reshape(-1, *([1] * (x.dim() - 1)))


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class SDE:
    """A forward SDE dx = f(x, t) dt + g(t) dw on t in [0, T], discretised into N steps."""

    prior_std = 1.0

    def __init__(self, N):
        self._N = _positive_int("N", N)

    @property
    def T(self):
        return 1.0

    @property
    def N(self):
        return self._N

    def with_steps(self, N):
        """The same SDE discretised into N steps (samplers take their step count from N)."""
        return type(self)(**{**self.config(), "N": N})

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):
        """A sample of the prior p_T."""
        return randn(shape, generator, device, dtype) * self.prior_std

    def prior_logp(self, z):
        """log p_T(z) of the Gaussian prior, summed over each sample's dims: (batch,)."""
        dims = z[0].numel()
        squares = z.flatten(1).pow(2).sum(1) / (2 * self.prior_std**2)
        return -0.5 * dims * math.log(2 * math.pi * self.prior_std**2) - squares

    def discretize(self, x, t):
        """One Euler-Maruyama step of size 1 / N: x_{i+1} = x_i + f + G z."""
        dt = 1.0 / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn, probability_flow=False):
        """The reverse-time SDE (or probability-flow ODE) driven by score_fn(x, t)."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """Reverse-time SDE of a forward SDE: dx = [f - g^2 score] dt + g dw, or its probability-flow ODE."""

    def __init__(self, forward, score_fn, probability_flow=False):
        self.forward, self.score_fn, self.probability_flow = forward, score_fn, probability_flow
        # The ODE has the same marginals with half the score term and no noise.
        self.score_weight = 0.5 if probability_flow else 1.0

    @property
    def T(self):
        return self.forward.T

    @property
    def N(self):
        return self.forward.N

    def _reversed(self, x, t, drift, diffusion):
        drift = drift - _expand(diffusion**2, x) * self.score_fn(x, t) * self.score_weight
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def sde(self, x, t):
        """Drift and diffusion of the reverse-time process (time runs from T down to 0)."""
        return self._reversed(x, t, *self.forward.sde(x, t))

    def discretize(self, x, t):
        """The reverse of the forward discretisation: x_{i-1} = x_i - f + G z."""
        return self._reversed(x, t, *self.forward.discretize(x, t))


class VPSDE(SDE):
    """Variance-preserving SDE (the continuous DDPM): dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw."""

    def __init__(self, beta_min=0.1, beta_max=20.0, N=1000):
        super().__init__(N)
        self.beta_0, self.beta_1 = _number("beta_min", beta_min), _number("beta_max", beta_max)
        if not 0 < self.beta_0 <= self.beta_1:
            raise UserError(f"need 0 < beta_min <= beta_max, got beta_min {beta_min}, beta_max {beta_max}")
        # The DDPM betas of N steps, the discretisation score_sde's VP sampler and corrector use.
        self.discrete_betas = torch.linspace(self.beta_0 / N, self.beta_1 / N, N)
        self.alphas = 1.0 - self.discrete_betas

    def config(self):
        return {"beta_min": self.beta_0, "beta_max": self.beta_1, "N": self.N}

    def beta(self, t):
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def log_mean_coeff(self, t):
        """log of the mean's scale: -(integral of beta from 0 to t) / 2."""
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def time_of_log_mean_coeff(self, log_coeff):
        """The t at which log_mean_coeff(t) equals log_coeff (< 0): the quadratic's positive root."""
        a, b = 0.25 * (self.beta_1 - self.beta_0), 0.5 * self.beta_0
        return -2 * log_coeff / (b + torch.sqrt(b**2 - 4 * a * log_coeff))

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * _expand(beta, x) * x, torch.sqrt(beta)

    def marginal_prob(self, x, t):
        """Mean and std of p_t(x_t | x_0 = x)."""
        log_coeff = self.log_mean_coeff(t)
        return _expand(torch.exp(log_coeff), x) * x, torch.sqrt(-torch.expm1(2 * log_coeff))

    def timestep(self, t):
        """Index of t in the N-step discretisation, as score_sde rounds it (down)."""
        return (t * (self.N - 1) / self.T).long()

    def discretize(self, x, t):
        """The DDPM step: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z."""
        i = self.timestep(t)
        beta = self.discrete_betas.to(t)[i]
        alpha = self.alphas.to(t)[i]
        return _expand(torch.sqrt(alpha), x) * x - x, torch.sqrt(beta)

    def time_for_alpha_bar(self, alpha_bar):
        """The t whose marginal p_t(x_t | x_0) = N(sqrt(alpha_bar) x_0, 1 - alpha_bar) (DDPM's alpha-bar)."""
        return self.time_of_log_mean_coeff(0.5 * torch.log(alpha_bar))

    def vp_scale(self, t):
        """sqrt(mean coefficient^2 + std^2): 1 for the VP-SDE."""
        return torch.ones_like(t)


class subVPSDE(VPSDE):
    """sub-VP SDE: the VP drift with diffusion beta(t) (1 - exp(-2 integral of beta)); its variance stays
    below the VP's, which gives better likelihoods."""

    def sde(self, x, t):
        beta = self.beta(t)
        discount = -torch.expm1(4 * self.log_mean_coeff(t))
        return -0.5 * _expand(beta, x) * x, torch.sqrt(beta * discount)

    def marginal_prob(self, x, t):
        log_coeff = self.log_mean_coeff(t)
        return _expand(torch.exp(log_coeff), x) * x, -torch.expm1(2 * log_coeff)

    def discretize(self, x, t):
        # score_sde has no closed-form step for the sub-VP SDE: plain Euler-Maruyama.
        return SDE.discretize(self, x, t)

    def time_for_alpha_bar(self, alpha_bar):
        """The t at which the sub-VP marginal, rescaled to unit total variance, has DDPM's alpha_bar."""
        # Equal signal-to-noise: m^2 / (1 - m^2)^2 = alpha_bar / (1 - alpha_bar); solve for m^2 in (0, 1).
        snr = alpha_bar / (1 - alpha_bar)
        mean_sq = (2 * snr + 1 - torch.sqrt(4 * snr + 1)) / (2 * snr)
        return self.time_of_log_mean_coeff(0.5 * torch.log(mean_sq))

    def vp_scale(self, t):
        mean, std = self.marginal_prob(torch.ones_like(t), t)
        return torch.sqrt(mean**2 + std**2)


class VESDE(SDE):
    """Variance-exploding SDE (NCSN / SMLD): dx = sqrt(d sigma(t)^2 / dt) dw, sigma geometric in t."""

    def __init__(self, sigma_min=0.01, sigma_max=50.0, N=1000):
        super().__init__(N)
        self.sigma_min, self.sigma_max = _number("sigma_min", sigma_min), _number("sigma_max", sigma_max)
        if not 0 < self.sigma_min < self.sigma_max:
            raise UserError(
                f"need 0 < sigma_min < sigma_max, got sigma_min {sigma_min}, sigma_max {sigma_max}"
            )
        log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
        self.discrete_sigmas = torch.exp(torch.linspace(log_min, log_max, N))

    @property
    def prior_std(self):
        return self.sigma_max

    def config(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N}

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        rate = math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        return torch.zeros_like(x), self.sigma(t) * rate

    def marginal_prob(self, x, t):
        # As in score_sde, std is sigma(t) itself (the SDE adds sigma(t)^2 - sigma_min^2).
        return x, self.sigma(t)

    def discretize(self, x, t):
        """The SMLD step from sigma_{i-1} to sigma_i: G = sqrt(sigma_i^2 - sigma_{i-1}^2), sigma_{-1} = 0."""
        i = (t * (self.N - 1) / self.T).long()
        sigmas = self.discrete_sigmas.to(t)
        previous = torch.where(i == 0, torch.zeros_like(t), sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigmas[i] ** 2 - previous**2)


class RectifiedFlow:
    """The linear interpolant x_t = (1 - t) x0 + t noise on t in [0, 1], prior N(0, I), velocity noise - x0.

    It has the SDEs' T, marginal_prob, prior_sampling and prior_logp, so that the ODE samplers and the
    likelihood treat every objective alike; it has no SDE, so no PC or DPM-Solver sampling.
    """

    prior_std = 1.0
    prior_sampling = SDE.prior_sampling
    prior_logp = SDE.prior_logp

    @property
    def T(self):
        return 1.0

    def config(self):
        return {}

    def marginal_prob(self, x, t):
        """Mean and std of x_t given x_0 = x."""
        return _expand(1 - t, x) * x, t

    def velocity_target(self, x0, noise):
        return noise - x0


PROCESSES = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE, "flow": RectifiedFlow}
PARAMETERS = {
    "vp": ("beta_min", "beta_max", "N"),
    "subvp": ("beta_min", "beta_max", "N"),
    "ve": ("sigma_min", "sigma_max", "N"),
    "flow": (),
}
COMMON_KEYS = ("objective", "eps", "likelihood_weighting")
# "ddpm" is each folder's own discrete 1000-step DDPM (not in this module), the default everywhere.
OBJECTIVES = ("ddpm", *PROCESSES)
ALL_KEYS = COMMON_KEYS + ("beta_min", "beta_max", "sigma_min", "sigma_max", "N")


class Objective:
    """A continuous-time training objective (vp, subvp, ve or flow) and the network's view of it.

    t is drawn uniformly from [eps, T] (score_sde's eps = 1e-5 keeps the score finite near t = 0); the
    samplers stop at sampling_eps, the likelihood integrates from eps.
    """

    def __init__(self, name, process, eps=1e-5, likelihood_weighting=False):
        self.name, self.process = name, process
        self.eps = _number("eps", eps)
        if not 0 < self.eps < 1:
            raise UserError(f"eps must lie in (0, 1), got {eps!r}")
        if not isinstance(likelihood_weighting, bool):
            raise UserError(f"likelihood_weighting must be true or false, got {likelihood_weighting!r}")
        if likelihood_weighting and name == "flow":
            raise UserError("likelihood_weighting applies to the vp, subvp and ve objectives, not to flow")
        self.likelihood_weighting = likelihood_weighting

    @classmethod
    def from_config(cls, config):
        """Build from a plain dict such as {"objective": "vp", "beta_min": 0.1}; None means the default."""
        config = {key: value for key, value in dict(config).items() if value is not None}
        name = config.get("objective")
        if name not in PROCESSES:
            raise UserError(f"unknown objective {name!r}: choose one of {', '.join(PROCESSES)}")
        for key in config:
            if key not in ALL_KEYS:
                expected = ", ".join(ALL_KEYS)
                raise UserError(f"unknown key {key!r} in the objective config: expected one of {expected}")
            if key not in COMMON_KEYS + PARAMETERS[name]:
                raise UserError(f"{key} does not apply to the {name} objective")
        process = PROCESSES[name](**{key: config[key] for key in PARAMETERS[name] if key in config})
        common = {key: config[key] for key in ("eps", "likelihood_weighting") if key in config}
        return cls(name, process, **common)

    def to_config(self):
        """The plain dict from_config rebuilds this objective from (for checkpoints)."""
        return {
            "objective": self.name,
            **self.process.config(),
            "eps": self.eps,
            "likelihood_weighting": self.likelihood_weighting,
        }

    @property
    def sampling_eps(self):
        """Where the samplers stop: score_sde's 1e-3 for vp and subvp, whose score -eps / std grows as
        1 / sqrt(t) near 0 (a fixed-step solver run on to 1e-5 amplifies the network's error there); the
        training eps for ve and flow."""
        return max(self.eps, 1e-3) if self.name in ("vp", "subvp") else self.eps

    @property
    def is_flow(self):
        return self.name == "flow"

    @property
    def T(self):
        return self.process.T

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):
        return self.process.prior_sampling(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        return self.process.prior_logp(z)

    def prediction(self, model, x, t, y=None, null_y=None, cfg_scale=1.0):
        """The network's output (eps, or velocity for flow) at continuous t, guided when cfg_scale != 1."""
        t_model = t * TIME_SCALE
        if cfg_scale == 1:
            return model(x, t_model, y)
        return guided(model, x, t_model, y, null_y, cfg_scale)

    def score(self, model, x, t, y=None, null_y=None, cfg_scale=1.0):
        """grad_x log p_t(x) = -eps / std, from the noise prediction."""
        _, std = self.process.marginal_prob(x, t)
        return -self.prediction(model, x, t, y, null_y, cfg_scale) / _expand(std, x)

    def score_fn(self, model, y=None, null_y=None, cfg_scale=1.0):
        """score_fn(x, t) for ReverseSDE and the samplers."""
        return lambda x, t: self.score(model, x, t, y, null_y, cfg_scale)

    def ode_drift(self, model, x, t, y=None, null_y=None, cfg_scale=1.0):
        """dx/dt of the probability-flow ODE: the velocity for flow, f - g^2 score / 2 for the SDEs."""
        if self.is_flow:
            return self.prediction(model, x, t, y, null_y, cfg_scale)
        score_fn = self.score_fn(model, y, null_y, cfg_scale)
        return self.process.reverse(score_fn, probability_flow=True).sde(x, t)[0]

    def sample_time(self, batch, generator=None, device=None):
        """t ~ U[eps, T] for training: (batch,)."""
        u = rand(batch, generator, device)
        return u * (self.T - self.eps) + self.eps

    def loss(self, model, x0, y=None, generator=None):
        """Mean denoising score matching (eps or velocity regression) loss of one batch: a scalar."""
        t = self.sample_time(x0.shape[0], generator, x0.device).to(x0.dtype)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        mean, std = self.process.marginal_prob(x0, t)
        output = model(mean + _expand(std, x0) * noise, t * TIME_SCALE, y)
        if self.is_flow:
            return (output - self.process.velocity_target(x0, noise)).pow(2).mean()
        # Standard weighting lambda = std^2 turns |score + noise / std|^2 into |eps - noise|^2.
        per_sample = (output - noise).pow(2).flatten(1).mean(1)
        if self.likelihood_weighting:
            # lambda = g^2 makes the loss a bound on the negative log-likelihood (Song et al. 2021).
            diffusion = self.process.sde(x0, t)[1]
            per_sample = per_sample * diffusion**2 / std**2
        return per_sample.mean()


def objective_of(config):
    """The Objective a run config (flags or a checkpoint's config) names; None for the discrete DDPM.

    Configs without an "objective" key (every checkpoint written before this module) are DDPM runs.
    """
    name = config.get("objective") or "ddpm"
    if name == "ddpm":
        # A constant of the continuous objectives given to a DDPM run would silently do nothing.
        stray = [k for k in ALL_KEYS[1:] if config.get(k) not in (None, False)]
        if stray:
            raise UserError(f"{stray[0]} applies to --objective vp, subvp, ve or flow, not to ddpm")
        return None
    return Objective.from_config({key: config.get(key) for key in ALL_KEYS})
