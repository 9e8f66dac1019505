"""Samplers and likelihood for the continuous-time objectives of sde.py.

sample() draws from the prior and integrates back to t = objective.sampling_eps with one of (NFE in brackets):
  pc      score_sde's predictor-corrector: a reverse-diffusion (or Euler-Maruyama) predictor and
          corrector_steps Langevin corrector steps at signal-to-noise ratio snr per step, the last
          step without noise, on the SDE discretised into `steps` steps [steps * (corrector_steps + 1)]
  euler   the probability-flow ODE (the velocity field for flow), fixed steps [steps]
  heun    the same with Heun's second-order steps [2 * steps]
  rk45    the same with scipy's adaptive RK45 (rtol, atol); steps is ignored [as the solver counts]
  ode     score_sde's name for rk45
  dpm++   DPM-Solver++ (2M) through diffusers' DPMSolverMultistepScheduler, vp and subvp only [steps]
NFE counts network evaluations; under classifier-free guidance the conditional and null halves run
as one batch and count as one evaluation.

bits_per_dim() integrates the probability-flow ODE from eps to T with the Hutchinson trace
estimator, as score_sde reports likelihoods.
"""

import functools
import math

import torch

from .errors import UserError
from .sde import VPSDE, _expand, rand, randn

METHODS = ("pc", "euler", "heun", "rk45", "ode", "dpm++")
PREDICTORS = ("reverse_diffusion", "euler_maruyama")
ODE_METHODS = ("euler", "heun", "rk45")
# Steps when none are asked for: score_sde's 1000 for PC, few for the ODE solvers (rk45 adapts its own).
DEFAULT_STEPS = {"pc": 1000, "euler": 100, "heun": 50, "rk45": None, "ode": None, "dpm++": 20}


def resolve_sampler(objective, method=None, steps=None):
    """(method, steps) with the defaults filled in: pc for the SDEs, euler for flow (which has no SDE)."""
    method = method or ("euler" if objective.is_flow else "pc")
    return method, steps if steps is not None else DEFAULT_STEPS.get(method)


def _device_of(model):
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if parameters else None
    return first.device if first is not None else torch.device("cpu")


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{name} must be a number > 0, got {value!r}")


def _whole(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def check_sampler(
    objective,
    method,
    steps,
    predictor="reverse_diffusion",
    snr=0.16,
    corrector_steps=1,
    rtol=1e-5,
    atol=1e-5,
    cfg_scale=1.0,
    y=None,
    null_y=None,
):
    """Raise a UserError for a sampler setting that does not apply (call it before loading models)."""
    if method not in METHODS:
        raise UserError(f"unknown sampler {method!r}: choose one of {', '.join(METHODS)}")
    if objective.is_flow and method in ("pc", "dpm++"):
        raise UserError(f"the flow objective has no SDE for the {method} sampler: use euler, heun or rk45")
    if objective.name == "ve" and method == "dpm++":
        raise UserError("the dpm++ sampler applies to vp and subvp, not ve: use pc, euler, heun or rk45")
    if method not in ("rk45", "ode"):
        _whole("steps", steps, 1)
    if method == "pc":
        if predictor not in PREDICTORS:
            raise UserError(f"unknown predictor {predictor!r}: choose one of {', '.join(PREDICTORS)}")
        _positive("snr", snr)
        _whole("corrector_steps", corrector_steps, 0)
        beta_max = getattr(objective.process, "beta_1", 0)
        if steps <= beta_max:
            # The N-step DDPM betas are beta(t) / N: at or above 1 they leave no signal (NaN samples).
            raise UserError(
                f"the pc sampler on {objective.name} needs steps > beta_max = {beta_max:g}, got {steps}"
            )
    if method == "dpm++" and steps > objective.process.N:
        raise UserError(f"dpm++ takes at most N = {objective.process.N} steps, got {steps}")
    _positive("rtol", rtol)
    _positive("atol", atol)
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise UserError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if cfg_scale != 1 and (y is None or null_y is None):
        raise UserError(f"cfg_scale {cfg_scale} needs the labels y and null labels null_y")


@torch.no_grad()
def sample(
    model,
    objective,
    shape,
    steps,
    method="pc",
    y=None,
    null_y=None,
    cfg_scale=1.0,
    predictor="reverse_diffusion",
    snr=0.16,
    corrector_steps=1,
    rtol=1e-5,
    atol=1e-5,
    generator=None,
    device=None,
):
    """Samples of shape (batch, C, H, W) from model(x, t * 999, y) under objective: returns (x, nfe).

    y and null_y are (batch,) labels for class-conditional models (null_y is the null class that
    classifier-free guidance contrasts with); generator seeds the prior and the sampler's noise.
    """
    check_sampler(objective, method, steps, predictor, snr, corrector_steps, rtol, atol, cfg_scale, y, null_y)
    device = torch.device(device) if device is not None else _device_of(model)
    x = objective.prior_sampling(shape, generator=generator, device=device)
    guidance = {"y": y, "null_y": null_y, "cfg_scale": cfg_scale}
    if method == "pc":
        return _pc(model, objective, x, steps, predictor, snr, corrector_steps, generator, guidance)
    if method == "dpm++":
        return _dpm_solver(model, objective, x, steps, guidance)
    drift = functools.partial(objective.ode_drift, model, **guidance)
    if method in ("rk45", "ode"):
        return _rk45(drift, x, objective.T, objective.sampling_eps, rtol, atol)
    return _fixed_step_ode(drift, x, objective.T, objective.sampling_eps, steps, heun=method == "heun")


def _batch_time(t, x):
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


def _noise(x, generator):
    return randn(x.shape, generator, x.device, x.dtype)


def _pc(model, objective, x, steps, predictor, snr, corrector_steps, generator, guidance):
    """score_sde's PC sampler: at each of steps times from T to eps, the corrector and then the predictor."""
    sde = objective.process.with_steps(steps)
    score_fn = objective.score_fn(model, **guidance)
    reverse = sde.reverse(score_fn)
    predict = _reverse_diffusion if predictor == "reverse_diffusion" else _euler_maruyama
    x_mean = x
    for t in torch.linspace(sde.T, objective.sampling_eps, steps, device=x.device, dtype=x.dtype):
        t = _batch_time(t, x)
        for _ in range(corrector_steps):
            x, x_mean = _langevin(sde, score_fn, x, t, snr, generator)
        x, x_mean = predict(reverse, x, t, generator)
    return x_mean, steps * (corrector_steps + 1)


def _reverse_diffusion(reverse, x, t, generator):
    """x_{i-1} = x_i - f + G z, f and G from the forward discretisation (ancestral sampling for VP)."""
    f, G = reverse.discretize(x, t)
    x_mean = x - f
    return x_mean + _expand(G, x) * _noise(x, generator), x_mean


def _euler_maruyama(reverse, x, t, generator):
    """One Euler-Maruyama step of size 1 / N backwards in time."""
    dt = -1.0 / reverse.N
    drift, diffusion = reverse.sde(x, t)
    x_mean = x + drift * dt
    return x_mean + _expand(diffusion, x) * math.sqrt(-dt) * _noise(x, generator), x_mean


def _langevin(sde, score_fn, x, t, snr, generator):
    """One Langevin step whose size sets the noise-to-gradient norm ratio to snr (score_sde's rule)."""
    grad = score_fn(x, t)
    noise = _noise(x, generator)
    alpha = sde.alphas.to(t)[sde.timestep(t)] if isinstance(sde, VPSDE) else torch.ones_like(t)
    # score_sde uses one step size for the batch, from the batch's mean norms.
    grad_norm = grad.flatten(1).norm(dim=1).mean()
    noise_norm = noise.flatten(1).norm(dim=1).mean()
    step = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    x_mean = x + _expand(step, x) * grad
    return x_mean + _expand(torch.sqrt(2 * step), x) * noise, x_mean


def _fixed_step_ode(drift, x, t_start, t_end, steps, heun=False):
    """Euler or Heun steps on a uniform time grid from t_start to t_end."""
    times = torch.linspace(t_start, t_end, steps + 1, device=x.device, dtype=x.dtype)
    for t_now, t_next in zip(times[:-1], times[1:], strict=True):
        h = t_next - t_now
        slope = drift(x, _batch_time(t_now, x))
        if heun:
            x_euler = x + h * slope
            slope = 0.5 * (slope + drift(x_euler, _batch_time(t_next, x)))
        x = x + h * slope
    return x, steps * (2 if heun else 1)


def _solve_ivp(function, x, t_span, rtol, atol):
    """scipy's RK45 on the flattened state in float64; function(x, t) maps tensors to a tensor like x."""
    from scipy.integrate import solve_ivp

    def numpy_function(t, state):
        state = torch.from_numpy(state).to(device=x.device, dtype=x.dtype).reshape(x.shape)
        return function(state, float(t)).detach().cpu().double().numpy().ravel()

    initial = x.detach().cpu().double().numpy().ravel()
    solution = solve_ivp(numpy_function, t_span, initial, rtol=rtol, atol=atol, method="RK45")
    if not solution.success:
        raise RuntimeError(f"the RK45 solver failed: {solution.message}")
    final = torch.from_numpy(solution.y[:, -1]).to(device=x.device, dtype=x.dtype).reshape(x.shape)
    return final, int(solution.nfev)


def _rk45(drift, x, t_start, t_end, rtol, atol):
    return _solve_ivp(lambda x, t: drift(x, _batch_time(t, x)), x, (t_start, t_end), rtol, atol)


def _dpm_solver(model, objective, x, steps, guidance):
    """DPM-Solver++ (2M) on the DDPM discretisation of the VP-SDE (beta_i = beta(i / (N - 1)) / N).

    Each scheduler timestep i is evaluated at the continuous t whose marginal matches the scheduler's
    alpha_bar_i; for sub-VP the state is the scheduler's unit-variance one, rescaled for the network.
    """
    from diffusers import DPMSolverMultistepScheduler

    sde = objective.process
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=sde.N,
        beta_start=sde.beta_0 / sde.N,
        beta_end=sde.beta_1 / sde.N,
        beta_schedule="linear",
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
    )
    scheduler.set_timesteps(steps, device=x.device)
    alpha_bars = scheduler.alphas_cumprod.double()
    for timestep in scheduler.timesteps:
        t = sde.time_for_alpha_bar(alpha_bars[int(timestep)]).clamp(objective.sampling_eps, sde.T)
        t = _batch_time(t, x)
        eps = objective.prediction(model, x * _expand(sde.vp_scale(t), x), t, **guidance)
        x = scheduler.step(eps, timestep, x).prev_sample
    return x, steps


def dequantize(x, bit_depth=8, generator=None):
    """Uniform dequantisation of integer data scaled to [-1, 1]: spreads each level over its bin."""
    levels = 2**bit_depth
    integers = torch.round((x + 1) / 2 * (levels - 1))
    uniform = rand(x.shape, generator, x.device, x.dtype)
    return (integers + uniform) / levels * 2 - 1


def _probes(x, hutchinson, generator):
    if hutchinson == "rademacher":
        return (rand(x.shape, generator, x.device) < 0.5).to(x.dtype) * 2 - 1
    if hutchinson == "gaussian":
        return _noise(x, generator)
    raise UserError(f"unknown Hutchinson estimator {hutchinson!r}: choose rademacher or gaussian")


def bits_per_dim(
    model, x, objective, y=None, bit_depth=8, hutchinson="rademacher", rtol=1e-5, atol=1e-5, generator=None
):
    """Per-image bits/dim (batch,) of x (dequantised data in [-1, 1]) through the probability-flow ODE.

    log p(x) = log p_T(x_T) + integral from eps to T of div(dx/dt), the divergence from the Hutchinson
    estimator with one fixed probe per image. The offset bit_depth - 1 turns the density on [-1, 1]
    into bits per integer level (score_sde adds 7 for 8-bit data).
    """
    _whole("bit_depth", bit_depth, 1)
    _positive("rtol", rtol)
    _positive("atol", atol)
    probes = _probes(x, hutchinson, generator)
    batch = x.shape[0]

    def augmented(state, t):
        with torch.enable_grad():
            sample = state[:-batch].reshape(x.shape).requires_grad_(True)
            drift = objective.ode_drift(model, sample, _batch_time(t, sample), y)
            (jvp,) = torch.autograd.grad((drift * probes).sum(), sample)
        divergence = (jvp * probes).flatten(1).sum(1)
        return torch.cat([drift.detach().flatten(), divergence])

    initial = torch.cat([x.flatten(), torch.zeros(batch, device=x.device, dtype=x.dtype)])
    final, _ = _solve_ivp(augmented, initial, (objective.eps, objective.T), rtol, atol)
    z, delta_logp = final[:-batch].reshape(x.shape), final[-batch:]
    nats = -(objective.prior_logp(z) + delta_logp)
    return nats / math.log(2) / x[0].numel() + (bit_depth - 1)
