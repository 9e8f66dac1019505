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

LDM_KEYS = ("unet_config", "unet", "class_embedder", "class_names", "scheduler_config", "config")
# Widths of ControlNet's mask encoder; one stride-2 stage per factor 2 of the VAE's downsampling.
CONDITIONING_WIDTHS = (16, 32, 96, 256)
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
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise UserError(f"{source}: weights do not fit the stored architecture ({first[:150]})") from None


def load_ldm(path):
    """Rebuild the LDM's UNet and class embedder (EMA weights when present) from its checkpoint."""
    ckpt = load_checkpoint(path, "ldm", "--ldm_checkpoint")
    missing = [key for key in LDM_KEYS if key not in ckpt]
    if missing:
        raise UserError(f"--ldm_checkpoint {path} lacks {missing}; re-save it with the current ldm/train.py")
    unet = UNet2DConditionModel.from_config(ckpt["unet_config"])
    load_weights(unet, ckpt.get("ema_unet") or ckpt["unet"], f"--ldm_checkpoint {path}")
    embedder_state = ckpt.get("ema_class_embedder") or ckpt["class_embedder"]
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
    stages = int(math.log2(vae_downsample)) + 1
    if 2 ** (stages - 1) != vae_downsample:
        raise UserError(f"VAE downsampling factor {vae_downsample} is not a power of two")
    widths = (CONDITIONING_WIDTHS + (CONDITIONING_WIDTHS[-1],) * stages)[:stages]
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
    subfolder = "vae" if (Path(source) / "vae" / "config.json").is_file() else None
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the VAE '{source}' ({str(err).splitlines()[0][:120]}); pass a local diffusers "
            f"AutoencoderKL folder with --vae_pretrained"
        ) from None
    return vae.requires_grad_(False).eval()


def encode(vae, pixels, cfg):
    """(N, C, H, W) in [-1, 1] -> latents as the LDM made them: (posterior mean - shift) * scale."""
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels  # the VAE takes RGB
    mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean.float()
    return (mean - cfg["latent_shift"]) * cfg["latent_scale"]  # (N, c, h, w)


def decode(vae, latents, cfg):
    """Latents -> (N, C, H, W) in [-1, 1]; 1-channel data averages the VAE's RGB output."""
    images = vae.decode((latents / cfg["latent_scale"] + cfg["latent_shift"]).to(vae.dtype)).sample.float()
    return images.mean(1, keepdim=True) if cfg["image_channels"] == 1 else images


def make_scheduler(name, scheduler_config):
    """A sampling scheduler of the given kind with the LDM's training noise schedule."""
    cls, extra = SCHEDULERS[name]
    return cls.from_config(scheduler_config, **extra)


def guided_prediction(model, latents, t, tokens, null_tokens, conditioning, cfg_scale, control_scale):
    """Classifier-free guidance: both halves in one batch; a single half where the other has weight 0."""
    if null_tokens is None or cfg_scale == 1:
        return model(latents, t, tokens, conditioning, control_scale)
    if cfg_scale == 0:
        return model(latents, t, null_tokens, conditioning, control_scale)
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
    if ckpt["unet_config"] != ldm.unet_config:
        raise UserError(
            "--ldm_checkpoint has another UNet architecture than the one this ControlNet was trained on"
        )
    controlnet = ControlNetModel.from_config(ckpt["controlnet_config"])
    load_weights(controlnet, (use_ema and ckpt.get("ema_controlnet")) or ckpt["controlnet"], "--checkpoint")
    if ckpt.get("unet") is not None:
        load_weights(ldm.unet, (use_ema and ckpt.get("ema_unet")) or ckpt["unet"], "--checkpoint")
    return ControlledUNet(controlnet, ldm.unet).requires_grad_(False).eval()
