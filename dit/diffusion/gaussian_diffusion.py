"""Schedule, forward process, hybrid training loss and DDPM / DDIM samplers."""

import math

import torch
from tqdm.auto import tqdm


def linear_betas(num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """Linear beta schedule of the published models (scaled so other step counts keep its shape)."""
    # improved-diffusion's "linear" schedule (Nichol & Dhariwal 2021), as in the published DiT.
    scale = 1000 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps, count):
    """`count` evenly spaced steps out of `num_timesteps`, always including the first and the last."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot take {count} sampling steps out of {num_timesteps}")
    if count == 1:
        # The published code takes step 0 here, which would treat pure noise as an almost clean input.
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (count - 1)  # >= 1, so the rounded steps are distinct
    # The published code sums the stride in a loop: the same steps for 10/20/25/50/100/250/500/1000 of 1000,
    # but its rounding error moves a step by one for some counts (e.g. 21).
    return [round(i * stride) for i in range(count)]


def mean_flat(x):
    """Mean over every dimension but the batch."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp()
    )


def discretized_gaussian_log_likelihood(x, mean, log_scale, bin_width=2 / 255):
    """Log-probability of x under a Gaussian integrated over the 8-bit bins of [-1, 1]."""
    # Exact CDF where the published code has a tanh approximation: the t = 0 loss differs slightly.
    inv_std = (-log_scale).exp()
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + bin_width / 2))
    cdf_minus = torch.special.ndtr(inv_std * (x - mean - bin_width / 2))
    log_probs = torch.where(
        x < -0.999,
        cdf_plus.clamp(min=1e-12).log(),
        torch.where(
            x > 0.999, (1 - cdf_minus).clamp(min=1e-12).log(), (cdf_plus - cdf_minus).clamp(min=1e-12).log()
        ),
    )
    return log_probs


class GaussianDiffusion:
    """Diffusion over a (possibly respaced) set of steps; the model sees the original step indices."""

    def __init__(self, betas, timestep_map=None):
        betas = betas.double()
        self.num_timesteps = len(betas)
        self.timestep_map = (
            torch.arange(len(betas)) if timestep_map is None else torch.as_tensor(timestep_map)
        )
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log borrows the t = 1 value to stay finite. A one-step
        # schedule has no t = 1: it borrows beta, the other end of the learned range (only its mean is used).
        clipped_variance = torch.cat(
            [posterior_variance[1:2] if len(betas) > 1 else betas, posterior_variance[1:]]
        )
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": clipped_variance.log(),
            "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
            "log_betas": betas.log(),
        }
        # Computed in float64, used in float32.
        self.tables = {name: value.float() for name, value in tables.items()}

    @classmethod
    def respaced(cls, base_betas, use_timesteps):
        """Keep only `use_timesteps` of a base schedule, with betas that preserve its alphas_cumprod."""
        # As improved-diffusion's SpacedDiffusion: these betas give back the kept steps' noise levels exactly.
        alphas_cumprod = torch.cumprod(1 - base_betas.double(), dim=0)[list(use_timesteps)]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return cls(1 - alphas_cumprod / prev, timestep_map=list(use_timesteps))

    def at(self, name, t, x):
        """Table values at steps t, shaped to broadcast against x."""
        values = self.tables[name].to(t.device)[t]
        return values.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    def call_model(self, model, x, t, y):
        """Run the model with the original step indices of the (respaced) steps t."""
        return model(x, self.timestep_map.to(t.device)[t], y)

    def q_sample(self, x_start, t, noise):
        """Sample x_t ~ q(x_t | x_0)."""
        return (
            self.at("sqrt_alphas_cumprod", t, x_start) * x_start
            + self.at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior(self, x_start, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self.at("posterior_mean_coef1", t, x_t) * x_start + self.at("posterior_mean_coef2", t, x_t) * x_t
        )
        return mean, self.at("posterior_log_variance_clipped", t, x_t)

    def p_mean_variance(self, model_output, x_t, t):
        """Mean, log-variance and x_0 estimate of p(x_{t-1} | x_t) from the model's (eps, v) output."""
        eps, v = model_output.float().chunk(2, dim=1)
        x_t = x_t.float()
        # Learned range (Nichol & Dhariwal 2021): v, nominally in [-1, 1] but not clamped (as published),
        # interpolates the log-variance between the posterior variance (v = -1) and beta (v = 1).
        frac = (v + 1) / 2
        log_variance = frac * self.at("log_betas", t, x_t) + (1 - frac) * self.at(
            "posterior_log_variance_clipped", t, x_t
        )
        # x_0 is not clipped: latents are unbounded (the published sampler has clip_denoised=False).
        pred_xstart = (
            self.at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self.at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )
        mean, _ = self.q_posterior(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def vb_terms(self, model_output, x_start, x_t, t):
        """Variational-bound term per sample, in bits: KL for t > 0, decoder NLL at t = 0."""
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2
        )
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2), kl)

    def training_losses(self, model, x_start, t, y, noise):
        """Hybrid loss: MSE on the noise plus the variational bound, which trains only the variance."""
        x_t = self.q_sample(x_start, t, noise)
        output = self.call_model(model, x_t, t, y).float()
        eps, v = output.chunk(2, dim=1)
        mse = mean_flat((noise - eps) ** 2)
        # The mean is detached so the bound only shapes the variance; the MSE term trains the mean.
        vb = self.vb_terms(torch.cat([eps.detach(), v], dim=1), x_start, x_t, t)
        # Scaling by T / 1000 keeps the bound's weight when the schedule has other than 1000 steps: T * vb
        # estimates the whole bound, times the hybrid loss's lambda = 0.001. At 1000 steps it is DiT's loss.
        vb = vb * self.num_timesteps / 1000
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def sample_loop(self, model, noise, y, sampler="ddpm", eta=0.0, generator=None, progress=False):
        """Denoise `noise` (N, C, H, W) to x_0 with ancestral DDPM steps or DDIM steps."""
        step = self.ddpm_step if sampler == "ddpm" else self.ddim_step
        x = noise
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_mean_variance(self.call_model(model, x, t, y), x, t)
            x = step(out, x, t, eta, generator)
        return x

    def ddpm_step(self, out, x, t, eta, generator):
        """x_{t-1} ~ p(x_{t-1} | x_t) with the learned variance."""
        if t[0] == 0:
            return out["mean"]
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return out["mean"] + (0.5 * out["log_variance"]).exp() * noise

    def ddim_step(self, out, x, t, eta, generator):
        """One DDIM update; eta = 0 is deterministic."""
        abar = self.at("alphas_cumprod", t, x)
        abar_prev = self.at("alphas_cumprod_prev", t, x)
        # DDIM (Song et al. 2021, eq. 12), sigma scaled by eta; the learned variance is unused.
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x_prev = out["pred_xstart"] * abar_prev.sqrt() + (1 - abar_prev - sigma**2).sqrt() * out["eps"]
        if t[0] == 0 or eta == 0:
            return x_prev
        return x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device)
