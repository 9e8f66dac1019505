"""The DDPM diffusion process: linear beta schedule, forward noising, the training loss, and DDPM and DDIM
sampling with classifier-free guidance (one batched forward pass for both branches) and classifier
guidance; and sampling of the continuous-time objectives of core/sde.py with the same output types."""

import time

import torch
from tqdm import tqdm

from core import guidance
from core.guidance import log_prob_gradient
from core.training import timing_line
from utils import pick_device, to_uint8, to_unit


def sampling_dtype(device):
    """Autocast dtype of sampling: bf16 where the GPU has it, else fp16; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Diffusion:
    """Linear-schedule Gaussian diffusion: noising for training, DDPM or DDIM sampling with CFG."""

    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=64, device=None):
        # diffusers is imported on first use: it adds seconds to start-up, and input errors should be instant.
        from diffusers import DDPMScheduler

        self.noise_steps, self.img_size = noise_steps, img_size
        self.device = pick_device(device)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=noise_steps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="linear",
            # Each step clips the predicted x0 to [-1, 1], the data range: guided steps can overshoot it.
            clip_sample=True,
        )

    @classmethod
    def from_config(cls, config, device=None):
        """The diffusion a training config describes."""
        return cls(
            config["noise_steps"], config["beta_start"], config["beta_end"], config["image_size"], device
        )

    def sample_timesteps(self, n, generator=None):
        """Uniform training timesteps: (n,)."""
        return torch.randint(0, self.noise_steps, (n,), generator=generator, device=self.device)

    def noise_images(self, x, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return self.scheduler.add_noise(x, noise, t)

    def make_sampler(self, sampler="ddpm", steps=None):
        """A fresh diffusers scheduler for ancestral DDPM or DDIM, set to `steps` denoising steps."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}: use 'ddpm' or 'ddim'")
        scheduler_cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
        scheduler = scheduler_cls.from_config(self.scheduler.config)
        # DDPM defaults to every training step; 50 is a common DDIM quality/speed trade (Song et al. 2021).
        scheduler.set_timesteps(steps or (self.noise_steps if sampler == "ddpm" else 50))
        return scheduler

    @staticmethod
    def guided_noise(model, x, t, labels, cfg_scale):
        """Noise prediction with classifier-free guidance; both halves share one forward pass."""
        # Scale 1 is the conditional model alone and 0 the unconditional one: no doubled batch needed.
        if labels is None or cfg_scale == 1:
            return model(x, t, labels)
        if cfg_scale == 0:
            return model(x, t, None)
        null = model.null_labels(x.shape[0], x.device)
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        # Classifier-free guidance (Ho & Salimans 2022): extrapolate from the unconditional prediction.
        return eps_uncond + cfg_scale * (eps_cond - eps_uncond)

    @staticmethod
    def posterior_variance(scheduler, t):
        """Sigma of the DDPM step from t to the scheduler's previous timestep: the variance of its noise."""
        # The same beta-tilde as diffusers' "fixed_small" variance, for strided steps too; 0 at the last step.
        prev = int(scheduler.previous_timestep(t))
        alpha_bar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else torch.ones(())
        return guidance.posterior_variance(scheduler.alphas_cumprod[t], alpha_bar_prev)

    def guided_step(self, scheduler, eps, t, x, grad, scale, generator=None, **extra):
        """One DDPM or DDIM step with classifier guidance by grad = grad_x log p(y | x_t); grad None: none.

        DDPM shifts the mean by scale * Sigma * grad (Dhariwal & Nichol 2021, Algorithm 1); DDIM corrects
        the noise as ADM's condition_score does: eps - sqrt(1 - alpha_bar_t) * scale * grad.
        """
        from diffusers import DDIMScheduler

        ddim = isinstance(scheduler, DDIMScheduler)
        if grad is not None and ddim:
            eps = guidance.condition_eps(eps, scheduler.alphas_cumprod[t], grad, scale)
        x_prev = scheduler.step(eps, t, x, generator=generator, **extra).prev_sample
        if grad is not None and not ddim:  # mean + sigma z + shift: the shifted mean, with the same noise
            x_prev = guidance.shift_mean(x_prev, self.posterior_variance(scheduler, t), grad, scale)
        return x_prev

    @torch.no_grad()
    def sample(
        self,
        model,
        n,
        labels=None,
        cfg_scale=3,
        log_time=True,
        sampler="ddpm",
        steps=None,
        eta=0.0,
        generator=None,
        output_type="uint8",
        classifier=None,
        classifier_scale=1.0,
    ):
        """Generate n images (n, C, H, W); labels=None samples unconditionally.

        output_type "uint8" gives 0..255; "float" gives float32 in [0, 1], for writing more than 8 bits.
        A classifier (core.guidance.EncoderClassifier of this schedule) guides toward the labels, also for an
        unconditional model; classifier_scale 0 is no classifier guidance at all.
        """
        from diffusers.utils.torch_utils import randn_tensor

        guided = classifier is not None and classifier_scale != 0
        # An unconditional model takes labels only for its classifier (which, at scale 0, ignores them).
        if labels is not None and ((model.num_classes is None and classifier is None) or len(labels) != n):
            raise ValueError("labels need a conditional model or a classifier, and one label per image")
        if guided and labels is None:
            raise ValueError("classifier guidance needs the labels to guide toward")
        model_labels = labels if model.num_classes is not None else None
        scheduler = self.make_sampler(sampler, steps)
        device = next(model.parameters()).device
        dtype = sampling_dtype(device)
        # Eval mode for sampling, then the caller's mode back: mid-training previews must not stay in eval.
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        x = randn_tensor((n, model.c_in, self.img_size, self.img_size), generator=generator, device=device)
        # DDIM re-derives the noise from the clipped x0, as guided-diffusion does: guided samples stay clean.
        extra = {"eta": eta, "use_clipped_model_output": True} if sampler == "ddim" else {}
        for t in tqdm(scheduler.timesteps, desc=f"{sampler} sampling", leave=False, disable=not log_time):
            t_batch = t.to(device).expand(n)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                # The networks run under autocast; the scheduler step gets eps and the gradient in float32.
                eps = self.guided_noise(model, x, t_batch, model_labels, cfg_scale).float()
                grad = log_prob_gradient(classifier, x, t_batch, labels) if guided else None
            x = self.guided_step(scheduler, eps, t, x, grad, classifier_scale, generator, **extra)
        samples = (to_unit(x) if output_type == "float" else to_uint8(x)).cpu()
        model.train(was_training)
        if log_time:
            print(timing_line(n, len(scheduler.timesteps), 1, time.perf_counter() - start))
        return samples


@torch.no_grad()
def sample_objective(model, objective, n, labels=None, cfg_scale=3.0, generator=None, **sampler):
    """n images (n, C, H, W) as float32 in [0, 1] from a continuous-time model, and the NFE per image.

    sampler holds core.sde_sampling.sample's keywords (method, steps, snr, corrector_steps, ...).
    """
    from core import sde_sampling

    device = next(model.parameters()).device
    dtype = sampling_dtype(device)
    was_training = model.training
    model.eval()
    # Guidance needs a conditional model; an unconditional one ignores the scale, as Diffusion.sample does.
    null = model.null_labels(n, device) if labels is not None else None
    scale = cfg_scale if labels is not None else 1.0
    shape = (n, model.c_in, model.img_size, model.img_size)
    # Autocast covers the network only: the solvers' arithmetic on x stays in float32.
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        x, nfe = sde_sampling.sample(
            model, objective, shape, y=labels, null_y=null, cfg_scale=scale, generator=generator, **sampler
        )
    model.train(was_training)
    return to_unit(x.float()).cpu(), nfe
