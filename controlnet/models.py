"""ControlNet on a trained LDM UNet: rebuilding the LDM from its checkpoint, the controlled UNet, sampling."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from core import guidance
from core.errors import UserError
from core.images import EIGHT_BIT
from utils import load_checkpoint

# Keys ldm/train.py writes and the ControlNet cannot do without; checked up front so an old or
# foreign checkpoint fails with one clear line instead of a KeyError.
LDM_KEYS = ("unet_config", "unet", "class_embedder", "class_names", "scheduler_config", "config")
# Widths of ControlNet's mask encoder; one stride-2 stage per factor 2 of the VAE's downsampling.
CONDITIONING_WIDTHS = (16, 32, 96, 256)
# Every sampler is built from the LDM's own training schedule (make_scheduler), so any of them
# can sample a model trained with DDPM noise.
SCHEDULERS = {
    "unipc": (UniPCMultistepScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
}


class ClassEmbedder(nn.Module):
    """The LDM's class token: row num_classes is the learned null class."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        # One token per image: the UNet's cross-attention attends over a length-1 sequence.
        return self.embedding(labels)[:, None, :]  # (N, 1, D)


@dataclass
class Ldm:
    """What the ControlNet needs from an LDM checkpoint."""

    unet: UNet2DConditionModel
    class_embedder: ClassEmbedder
    class_names: list
    scheduler_config: dict
    config: dict
    unet_config: dict
    intensity: dict  # the decoding rule of the LDM's training images

    @property
    def null_label(self):
        return len(self.class_names)


def load_weights(module, state, source):
    """load_state_dict with a user-level error when the weights do not fit the architecture."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        # torch lists every mismatched key; its first detail line is enough to say which part is off.
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise UserError(f"{source}: weights do not fit the stored architecture ({first[:150]})") from None


def load_ldm(path):
    """Rebuild the LDM's UNet and class embedder (EMA weights when present) from its checkpoint."""
    ckpt = load_checkpoint(path, "ldm", "--ldm_checkpoint")
    missing = [key for key in LDM_KEYS if key not in ckpt]
    if missing:
        raise UserError(f"--ldm_checkpoint {path} lacks {missing}; re-save it with the current ldm/train.py")
    unet = UNet2DConditionModel.from_config(ckpt["unet_config"])
    # Prefer the EMA weights: they are what the LDM samples with, so the ControlNet learns to steer those.
    load_weights(unet, ckpt.get("ema_unet") or ckpt["unet"], f"--ldm_checkpoint {path}")
    embedder_state = ckpt.get("ema_class_embedder") or ckpt["class_embedder"]
    # The row count fixes the class count (the last row is the null class): no extra config key needed.
    rows, dim = embedder_state["embedding.weight"].shape
    embedder = ClassEmbedder(rows - 1, dim)
    load_weights(embedder, embedder_state, f"--ldm_checkpoint {path}")
    return Ldm(
        unet,
        embedder,
        list(ckpt["class_names"]),
        dict(ckpt["scheduler_config"]),
        dict(ckpt["config"]),
        dict(ckpt["unet_config"]),
        dict(ckpt.get("intensity") or EIGHT_BIT),  # LDM checkpoints older than the rule held 8-bit data
    )


def build_controlnet(unet, mask_channels, vae_downsample):
    """ControlNet copying the UNet's encoder; its outputs are zero-initialised, so it starts as a no-op."""
    # The mask encoder must bring a full-size mask down to latent size: one stage at full resolution,
    # then one stride-2 stage per halving done by the VAE.
    stages = int(math.log2(vae_downsample)) + 1
    if 2 ** (stages - 1) != vae_downsample:
        raise UserError(f"VAE downsampling factor {vae_downsample} is not a power of two")
    # VAEs downsampling more than 8x repeat the last width for their extra stages.
    widths = (CONDITIONING_WIDTHS + (CONDITIONING_WIDTHS[-1],) * stages)[:stages]
    # from_unet copies the UNet's encoder weights and zero-initialises the output convolutions
    # (Zhang et al. 2023, "zero convolutions"), so training starts from the unchanged LDM.
    return ControlNetModel.from_unet(
        unet, conditioning_channels=mask_channels, conditioning_embedding_out_channels=widths
    )


class ControlledUNet(nn.Module):
    """UNet whose skip connections receive the ControlNet's residuals (scaled by conditioning_scale)."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.controlnet = controlnet
        self.unet = unet

    def forward(self, latents, timesteps, tokens, conditioning, conditioning_scale=1.0):
        # The ControlNet sees the same noisy latents, timestep and class token as the UNet; its outputs are
        # added to the UNet's skip connections and middle block.
        down, mid = self.controlnet(
            latents,
            timesteps,
            encoder_hidden_states=tokens,
            controlnet_cond=conditioning,
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        return self.unet(
            latents,
            timesteps,
            encoder_hidden_states=tokens,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]  # (N, C, h, w)


def load_vae(source):
    """AutoencoderKL from a local folder (or its vae/ subfolder) or a hub id; fails fast when offline."""
    # A full diffusers pipeline keeps its VAE in vae/; a bare AutoencoderKL folder has config.json on top.
    subfolder = "vae" if (Path(source) / "vae" / "config.json").is_file() else None
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder)
    # What from_pretrained raises for a missing folder or an unreachable hub: both are user errors.
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the VAE '{source}' ({str(err).splitlines()[0][:120]}); pass a local diffusers "
            f"AutoencoderKL folder with --vae_pretrained"
        ) from None
    return vae.requires_grad_(False).eval()


def encode(vae, pixels, cfg):
    """(N, C, H, W) in [-1, 1] -> latents as the LDM made them: (posterior mean - shift) * scale."""
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels  # the VAE takes RGB
    # The posterior mean, not a sample: deterministic, and what the LDM trained on, so the shift and
    # scale below match its latent statistics. The VAE may sit in half precision; latents return to fp32.
    mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean.float()
    return (mean - cfg["latent_shift"]) * cfg["latent_scale"]  # (N, c, h, w)


def decode(vae, latents, cfg):
    """Latents -> (N, C, H, W) in [-1, 1]; 1-channel data averages the VAE's RGB output."""
    images = vae.decode((latents / cfg["latent_scale"] + cfg["latent_shift"]).to(vae.dtype)).sample.float()
    # The VAE decodes gray as three near-equal channels; their mean is the one channel back.
    return images.mean(1, keepdim=True) if cfg["image_channels"] == 1 else images


def make_scheduler(name, scheduler_config):
    """A sampling scheduler of the given kind with the LDM's training noise schedule."""
    cls, extra = SCHEDULERS[name]
    return cls.from_config(scheduler_config, **extra)


def guided_prediction(model, latents, t, tokens, null_tokens, conditioning, cfg_scale, control_scale):
    """Classifier-free guidance: both halves in one batch; a single half where the other has weight 0."""
    # Ho & Salimans 2022: at weight 1 the unconditional term cancels, at 0 the conditional one does,
    # so a single pass gives the same result at half the cost.
    if null_tokens is None or cfg_scale == 1:
        return model(latents, t, tokens, conditioning, control_scale)
    if cfg_scale == 0:
        return model(latents, t, null_tokens, conditioning, control_scale)
    # One doubled batch rather than two passes: same result, better use of the device.
    doubled = torch.cat([latents, latents])  # (2N, c, h, w)
    t = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t  # per-sample timesteps double too
    cond, uncond = model(
        doubled, t, torch.cat([tokens, null_tokens]), torch.cat([conditioning, conditioning]), control_scale
    ).chunk(2)
    return guidance.combine(cond, uncond, cfg_scale)


@torch.no_grad()
def sample_latents(
    model,
    scheduler,
    noise,
    conditioning,
    tokens,
    null_tokens=None,
    cfg_scale=1.0,
    control_scale=1.0,
    steps=25,
):
    """Run the reverse process from `noise` following the masks in `conditioning`."""
    scheduler.set_timesteps(steps, device=noise.device)
    # init_noise_sigma and scale_model_input are identities for these variance-preserving schedulers,
    # but they are part of the scheduler contract, so they stay.
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        pred = guided_prediction(
            model, model_input, t, tokens, null_tokens, conditioning, cfg_scale, control_scale
        )
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents


def diffusion_target(scheduler, latents, noise, timesteps):
    """Regression target for the LDM's prediction type."""
    # epsilon: the simple loss of Ho et al. 2020 (eq. 14); v: Salimans & Ho 2022; sample: x0 itself.
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise UserError(f"unsupported prediction_type '{kind}' in the LDM's scheduler_config")


def load_controlled_unet(ckpt, ldm, use_ema=True):
    """ControlNet (and, if it was trained, the UNet) from a controlnet checkpoint on top of the LDM."""
    # The residuals only fit, and only mean something for, the UNet the ControlNet was copied from.
    if ckpt["unet_config"] != ldm.unet_config:
        raise UserError(
            "--ldm_checkpoint has another UNet architecture than the one this ControlNet was trained on"
        )
    controlnet = ControlNetModel.from_config(ckpt["controlnet_config"])
    # --no_ema (use_ema=False), or a checkpoint without EMA weights, falls through to the raw weights.
    load_weights(controlnet, (use_ema and ckpt.get("ema_controlnet")) or ckpt["controlnet"], "--checkpoint")
    # A run trained with --no_freeze_unet stored its fine-tuned UNet; it replaces the LDM's weights.
    if ckpt.get("unet") is not None:
        load_weights(ldm.unet, (use_ema and ckpt.get("ema_unet")) or ckpt["unet"], "--checkpoint")
    return ControlledUNet(controlnet, ldm.unet).requires_grad_(False).eval()
