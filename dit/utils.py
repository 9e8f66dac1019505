"""Pieces shared by train.py, sample.py and sample_ddp.py: model flags, VAE, checkpoints, images."""

import argparse
import contextlib

import torch

from core import checkpoints, images, training
from core.cli import positive_int
from core.errors import UserError
from models import VARIANTS, DiT, variant_config

# The two fine-tuned Stable Diffusion VAEs of the published DiT's --vae ema|mse.
VAE_HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
ARCHITECTURE_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")


def add_architecture_flags(parser, default_model):
    """Flags that pick the DiT variant, optionally shrunk for quick experiments."""
    shown = "" if default_model else " (default: from the checkpoint)"
    add = parser.add_argument
    add("--model", default=default_model, help=f"DiT variant: DiT-{{S,B,L,XL}}/{{2,4,8}}{shown}")
    add("--depth", type=positive_int, help="override the variant's number of blocks")
    add("--hidden_size", type=positive_int, help="override the variant's hidden size")
    add("--num_heads", type=positive_int, help="override the variant's attention heads")


@contextlib.contextmanager
def accelerator_for(mixed_precision):
    """The run's Accelerator; its process group is shut down however the run ends."""
    accelerator = training.make_accelerator(mixed_precision)
    try:
        yield accelerator
    finally:
        accelerator.end_training()


def load_vae(spec, device):
    """Frozen diffusers AutoencoderKL from 'ema', 'mse', a hub id or a local folder."""
    from diffusers import AutoencoderKL

    source = VAE_HUB_IDS.get(spec, spec)
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the VAE '{source}' ({type(err).__name__}; offline or not a diffusers folder): "
            "save it where you have internet (AutoencoderKL.from_pretrained(...).save_pretrained(DIR)) "
            "and pass --vae DIR"
        ) from None
    return vae.to(device).eval().requires_grad_(False)


def vae_downsample(vae):
    """Spatial downsampling factor of a diffusers AutoencoderKL (8 for the Stable Diffusion VAEs)."""
    # Every encoder level but the last halves the size; read, not assumed 8, for VAEs of another depth.
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_size(image_size, downsample, patch_size):
    """Latent side length for an image size, or a user error if the model cannot take that size."""
    # The latent side must also split into whole patches: multiples of 16 px for the SD VAE with DiT-*/2.
    if image_size <= 0 or image_size % (downsample * patch_size):
        raise UserError(
            f"--image-size {image_size} is not a multiple of {downsample * patch_size} "
            f"(VAE downsampling {downsample} x patch size {patch_size}); choose e.g. "
            f"{max(1, round(image_size / (downsample * patch_size))) * downsample * patch_size}"
        )
    return image_size // downsample


def architecture(name, overrides):
    """Depth, hidden size, heads and patch of a named variant, with optional overrides."""
    try:
        config = variant_config(name)
    except (KeyError, ValueError):
        raise UserError(
            f"unknown --model '{name}'; use DiT-S/2 ... DiT-XL/8 (sizes S B L XL, patches 2 4 8)"
        ) from None
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config


def build_dit(config, **kwargs):
    """DiT from a checkpoint config dict; configs written before learn_sigma and pos_embed existed (and the
    official models) are the published learned-variance, sin-cos table layout."""
    arch = {k: config[k] for k in ARCHITECTURE_KEYS}
    return DiT(
        input_size=config["input_size"],
        in_channels=config["in_channels"],
        num_classes=config["num_classes"],
        learn_sigma=config.get("learn_sigma", True),
        pos_embed=config.get("pos_embed", "sincos"),
        **arch,
        **kwargs,
    )


def load_checkpoint(path, what="checkpoint"):
    """weights_only load; files of the original DiT train.py also hold an argparse.Namespace."""
    # Allow-listing the one class keeps weights_only=True; the list is process-wide, so it outlives this call.
    torch.serialization.add_safe_globals([argparse.Namespace])
    return checkpoints.load(path, what)


# model_type of the checkpoints the project's other trainers write, and what each file is.
OTHER_MODELS = {
    "ldm": "an LDM checkpoint (written by ldm/train.py: a diffusers UNet and class embedder)",
    "controlnet": "a ControlNet checkpoint (written by controlnet/train.py)",
    "vae": "a VAE checkpoint (written by ldm/train_vae.py)",
    "ldm-classifier": "an LDM classifier checkpoint (written by ldm/train_classifier.py)",
}


def other_model(ckpt):
    """What a checkpoint of another model of this project is, as a phrase, or None."""
    if not isinstance(ckpt, dict):
        return None
    if ckpt.get("model_type") in OTHER_MODELS:
        return OTHER_MODELS[ckpt["model_type"]]
    if "unet_config" in ckpt:  # LDM and ControlNet files written before model_type existed
        return "an LDM or ControlNet checkpoint (it holds a diffusers UNet config)"
    if str(ckpt.get("format", "")).startswith("ddpm"):
        return "a DDPM checkpoint (written by ddpm/)"
    return None


def data_rule(ckpt):
    """(intensity rule, channels) a checkpoint was trained with; older and official files: 8-bit RGB."""
    saved = ckpt if isinstance(ckpt, dict) else {}
    channels = saved.get("channels") or (1 if saved.get("config", {}).get("image_mode") == "L" else 3)
    return saved.get("intensity", images.EIGHT_BIT), channels


def state_dict_facts(state_dict, downsample):
    """Architecture facts readable from a DiT state_dict's shapes (the head count is not among them; a RoPE
    model has no table, so no image size either: None)."""
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        table = state_dict.get("pos_embed")
        tokens = None if table is None else table.shape[1]
        classes = state_dict["y_embedder.embedding_table.weight"].shape[0] - 1  # minus the null-class row
    except (KeyError, AttributeError, IndexError, TypeError):
        raise UserError(
            "the checkpoint is not a DiT state_dict (no x_embedder / pos_embed / y_embedder)"
        ) from None
    patch = proj.shape[-1]
    return dict(
        patch_size=patch,
        depth=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
        hidden_size=proj.shape[0],
        in_channels=proj.shape[1],
        num_classes=classes,
        image_size=None if tokens is None else int(tokens**0.5) * patch * downsample,
    )


def variant_name(facts):
    """Registry name of the variant with these shapes, or None."""
    for name in VARIANTS:
        config = variant_config(name)
        # These three tell the 12 variants apart; the head count, which shapes do not show, is not needed.
        if all(config[k] == facts[k] for k in ("depth", "hidden_size", "patch_size")):
            return name
    return None


# What a checkpoint's shape fact is called and which flag asks for it, in the order they are checked.
MISMATCH_CHECKS = {
    "patch_size": ("patch size", "--model"), "depth": ("depth (number of blocks)", "--model / --depth"),
    "hidden_size": ("hidden size", "--model / --hidden-size"),
    "num_classes": ("number of classes", "--num-classes"), "image_size": ("image size", "--image-size"),
    "in_channels": ("number of latent channels", "--vae"),
}  # fmt: skip


def checkpoint_mismatch(facts, config):
    """Say how a checkpoint's shapes differ from the model the flags ask for, or return None."""
    for key, (what, flag) in MISMATCH_CHECKS.items():
        if facts[key] is not None and facts[key] != config[key]:
            return f"its {what} is {facts[key]} but {flag} asks for {config[key]}"
    return None


def encode(vae, pixels, scale):
    """Scaled mean and std of the VAE posterior for images in [-1, 1]."""
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    # Mean and std, not a sample: cached latents still get a fresh posterior draw per step, as the published
    # train.py's latent_dist.sample(). scale: the VAE's scaling_factor, 0.18215 for SD.
    return posterior.mean.float() * scale, posterior.std.float() * scale


def images_from_latents(vae, latents, scale, channels):
    """Decode latents to images (N, channels, H, W) in [0, 1]; gray data was fed to the VAE as R = G = B."""
    with torch.no_grad():
        images = vae.decode(latents.to(vae.dtype) / scale).sample
    images = (images.float().clamp(-1, 1) + 1) / 2  # (N, 3, H, W)
    return images.mean(1, keepdim=True) if channels == 1 else images


def class_counts(total, num_classes):
    """Spread `total` samples as evenly as possible over classes: the first total % C get one more."""
    return [total // num_classes + (c < total % num_classes) for c in range(num_classes)]
