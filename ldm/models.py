"""Model pieces of the class-conditional LDM: UNet presets, class token, frozen VAE codec, EMA,
guided sampling (classifier-free, and classifier guidance by a latent classifier) and the checkpoint
formats (see the checkpoint contract in the README)."""

import copy
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from huggingface_hub.utils import logging as hub_logging

from core import guidance
from core.errors import UserError
from core.files import load_weights_only
from core.images import EIGHT_BIT

# The checkpoint layout of the README's contract; checkpoints of older versions load too (tests/fixtures).
FORMAT_VERSION = 1
# The seed's VAE: Stable Diffusion's autoencoder with a fine-tuned decoder (8x downsampling, 4 channels).
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"

# Named UNet sizes; `heads` is the number of attention heads per block (diffusers calls it
# attention_head_dim for this model), `context` the width of the class token. tiny is for tests and
# CPU benchmarks; small to large grow widths, heads and token together.
UNET_PRESETS = {
    "tiny": dict(channels=(32, 64), layers=1, heads=4, context=64, groups=8),
    "small": dict(channels=(64, 128, 256), layers=2, heads=4, context=256, groups=32),
    "base": dict(channels=(128, 256, 512, 512), layers=2, heads=8, context=512, groups=32),
    "large": dict(channels=(192, 384, 768, 768), layers=2, heads=12, context=768, groups=32),
}

# The diffusion settings train.py offers: what the UNet predicts and how the noise grows over time.
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")

# The model_type of train_classifier.py's latent classifiers, and the training-schedule settings that
# such a classifier must share with its LDM (they fix alpha_bar_t).
CLASSIFIER_TYPE = "ldm-classifier"
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "rescale_betas_zero_snr")

# Inference schedulers, each built from the training schedule's config: the multistep solvers
# (DPM-Solver++, UniPC) reach in 20-30 steps what DDIM needs about 50 for.
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def unet_settings(
    preset,
    block_out_channels=None,
    layers_per_block=None,
    attention_heads=None,
    cross_attention_dim=None,
    norm_num_groups=None,
):
    """Preset values overridden by any explicitly given ones."""
    # None means "not given": only the flags a user typed replace the preset's values.
    settings = dict(UNET_PRESETS[preset])
    overrides = dict(
        channels=block_out_channels,
        layers=layers_per_block,
        heads=attention_heads,
        context=cross_attention_dim,
        groups=norm_num_groups,
    )
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["channels"] = tuple(settings["channels"])
    return settings


def build_unet(settings, latent_channels, latent_size):
    """UNet2DConditionModel with cross-attention in every level but the deepest, as in Stable Diffusion."""
    # Stable Diffusion's layout: cross-attention at every resolution but the lowest, where the
    # (cross-attention) mid-block attends anyway.
    levels = len(settings["channels"])
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    # Checked here, so that a bad combination is one error line and not a shape error inside diffusers.
    for width in settings["channels"]:
        if width % settings["groups"] or width % settings["heads"]:
            raise UserError(
                f"block width {width} must be divisible by --norm_num_groups {settings['groups']} "
                f"and --attention_heads {settings['heads']}"
            )
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=settings["channels"],
        layers_per_block=settings["layers"],
        attention_head_dim=settings["heads"],
        cross_attention_dim=settings["context"],
        norm_num_groups=settings["groups"],
    )


class ClassEmbedder(nn.Module):
    """One learned cross-attention token per class; row `num_classes` is the null class for guidance."""

    def __init__(self, num_classes, dim):
        super().__init__()
        # The class token takes the place of the text tokens of Stable Diffusion's cross-attention.
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding(labels)[:, None, :]  # (N, 1, D)

    def null_labels(self, labels):
        """Labels of the same shape, all set to the null class."""
        return torch.full_like(labels, self.num_classes)


class ClassConditionalUNet(nn.Module):
    """The trainable denoiser: UNet conditioned on a class token through cross-attention."""

    def __init__(self, unet, class_embedder):
        super().__init__()
        self.unet = unet
        self.class_embedder = class_embedder

    def forward(self, latents, timesteps, labels):
        # The token takes the latents' dtype, so a UNet run in half precision gets a half-precision context.
        context = self.class_embedder(labels).to(latents.dtype)  # (N, 1, D)
        return self.unet(latents, timesteps, encoder_hidden_states=context).sample  # (N, C, h, w)


class EMA:
    """Exponential moving average of a module's weights, with the usual warm-up of the decay."""

    def __init__(self, model, decay):
        # A full copy of the plain module, outside DDP and the optimizer, updated after each step.
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        # Warm-up (1 + n) / (10 + n): early averages forget the random initial weights quickly.
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        # Parameters only: the UNet's GroupNorm and LayerNorm keep no running statistics to average.
        for ema_param, param in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_param.lerp_(param.detach().float(), 1.0 - decay)

    def state_dict(self):
        # Only the counters: the averaged weights are saved as ema_unet / ema_class_embedder.
        return {"decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.decay, self.num_updates = state["decay"], state["num_updates"]


def looks_like_path(name):
    """True when the value is meant as a local folder rather than a hub id like org/name."""
    # A hub id is exactly org/name; one part, three parts, ./, ~ or an absolute path means a folder.
    return os.path.isabs(name) or name.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


def load_vae(name_or_path):
    """Frozen AutoencoderKL from a local folder or a hub id; fails fast with the flag to use."""
    # A folder that exists is always local; a value that looks like a path but is missing fails here,
    # instead of being sent to the hub as a repository name.
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        source = str(local)
    elif looks_like_path(name_or_path):
        raise UserError(
            f"--vae_pretrained {name_or_path}: no such folder; give a folder written by "
            "save_pretrained (e.g. by train_vae.py) or a hub id"
        )
    else:
        source = name_or_path
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # the failure is reported below as one line, not as hub retries
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
            vae = AutoencoderKL.from_pretrained(source)
    except Exception as error:  # hub, file-system and format errors all mean "not available"
        raise UserError(
            f"cannot load VAE '{name_or_path}' ({type(error).__name__}); on an offline machine pass "
            "--vae_pretrained /path/to/local/vae_folder (a save_pretrained folder, e.g. from train_vae.py)"
        ) from None
    finally:
        hub_logging.set_verbosity(verbosity)
    return vae.eval().requires_grad_(False)


class LatentCodec:
    """Frozen VAE mapping images in [-1, 1] (1 or 3 channels) to scaled latents and back."""

    def __init__(self, vae, image_channels):
        self.vae = vae
        self.image_channels = image_channels
        # The latents the UNet sees are (z - shift) * scale: near unit variance, as latent diffusion wants.
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.latent_channels = vae.config.latent_channels
        # Every encoder level but the last halves the resolution: four levels give SD's 8x.
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def _to_vae(self, images):
        """Grayscale data is repeated to the VAE's three input channels."""
        if images.shape[1] != self.vae.config.in_channels:
            images = images.repeat(1, self.vae.config.in_channels // images.shape[1], 1, 1)
        return images.to(self.vae.dtype)

    @torch.no_grad()
    def moments(self, images):
        """Mean and std of the latent distribution, already scaled: two (N, c, h, w) tensors."""
        dist = self.vae.encode(self._to_vae(images)).latent_dist
        return (dist.mean - self.shift) * self.scale, dist.std * self.scale

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents (N, c, h, w) -> images in [-1, 1] with the data's channel count."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scale + self.shift).sample.float()
        if self.image_channels == 1:
            images = images.mean(dim=1, keepdim=True)  # back to the data's single channel
        return images.clamp(-1, 1)

    def config(self):
        """The latent facts stored in checkpoints."""
        return dict(
            latent_scale=self.scale,
            latent_shift=self.shift,
            latent_channels=self.latent_channels,
            vae_downsample=self.downsample,
        )


def sample_latent(mean, std):
    """One draw from the diagonal Gaussian latent distribution (global RNG, so resume is exact)."""
    return mean + std * torch.randn_like(std)


def make_sampler(name, scheduler_config):
    """Inference scheduler of the given kind, built from the training noise schedule."""
    # from_config carries over T, the betas and the prediction type, so sampling inverts the trained process.
    cls, extra = SAMPLERS[name]
    return cls.from_config(scheduler_config, **extra)


def guided_prediction(model, latents, t, labels, cfg_scale):
    """Classifier-free guided model output; cond and null halves share one batch, skipped when unused."""
    # The schedulers step with one timestep for the whole batch: give the model one per sample.
    timesteps = t.expand(latents.shape[0]) if t.dim() == 0 else t
    null = model.class_embedder.null_labels(labels)
    return guidance.guided(model, latents, timesteps, labels, null, cfg_scale)


def classifier_guided(output, classifier, scheduler, latents, t, labels, scale):
    """The model output corrected by grad log p(labels | latents, t) of a latent classifier.

    ADM's condition_score on the noise estimate (converted for v-prediction): it applies to every
    scheduler here, since each one steps from the noise (or velocity) estimate at x_t."""
    grad = guidance.log_prob_gradient(classifier, latents, t.expand(latents.shape[0]), labels)
    alpha_bar = scheduler.alphas_cumprod[int(t)].to(latents.device)
    return guidance.condition_output(output, alpha_bar, grad, scale, scheduler.config.prediction_type)


@torch.no_grad()
def denoise(model, scheduler, noise, labels, cfg_scale, num_steps, classifier=None, classifier_scale=0.0):
    """Reverse diffusion from noise (N, c, h, w) for labels (N,) -> clean scaled latents; a latent
    classifier (train_classifier.py) adds classifier guidance at classifier_scale (0: none at all)."""
    scheduler.set_timesteps(num_steps, device=noise.device)
    # init_noise_sigma is 1 for these samplers; multiplied anyway so a sigma-scaled scheduler starts right.
    latents = noise * scheduler.init_noise_sigma
    guided_by_classifier = classifier is not None and classifier_scale != 0
    # The scheduler steps in fp32 whatever the model's precision: its update mixes large and small terms.
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        output = guided_prediction(model, model_input, t, labels, cfg_scale).float()
        if guided_by_classifier:
            output = classifier_guided(
                output, classifier, scheduler, model_input, t, labels, classifier_scale
            )
        latents = scheduler.step(output, t, latents).prev_sample
    return latents


def noise_for(seed, label, indices, shape):
    """Starting noise of samples `indices` of one class: reproducible, different per class and index."""
    # A generator per sample: image i of class c is the same whatever the batch size, process count
    # or order of generation.
    draws = []
    for index in indices:
        generator = torch.Generator().manual_seed(hash_seed(seed, label, index))
        draws.append(torch.randn(shape, generator=generator))
    return torch.stack(draws)  # (len(indices), c, h, w)


def hash_seed(*parts):
    """Combine integers into one 63-bit seed (stable across runs, unlike hash())."""
    # FNV-1a-style mixing with the 64-bit FNV prime, reduced below 2**63 for torch's manual_seed.
    value = 1469598103934665603
    for part in parts:
        value = ((value ^ (int(part) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return value


def default_noise_scheduler(num_train_timesteps, beta_schedule, prediction_type):
    """Training noise schedule (Stable Diffusion's scaled-linear betas by default)."""
    # SD's beta range (0.00085 to 0.012); clip_sample off, since latents are not bounded to [-1, 1].
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def plain(value):
    """Config objects made JSON-plain (dicts, lists, scalars) for weights_only checkpoints."""
    # Keys starting with '_' are diffusers' private bookkeeping, not settings of the model.
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def load_classifier_checkpoint(path, flag="--classifier"):
    """Read a latent classifier of train_classifier.py, with one clear line for any other file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{flag} {path}: file not found; pass a checkpoint written by ldm/train_classifier.py"
        )
    ckpt = load_weights_only(path, what=flag)
    kind = ckpt.get("model_type") if isinstance(ckpt, dict) else None
    if kind == CLASSIFIER_TYPE:
        return ckpt
    # The DDPM's classifier (ddpm/train_classifier.py) has a "format" instead: it sees pixels, not latents.
    if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("ddpm-classifier"):
        found = "a DDPM pixel-space classifier"
    else:
        found = f"a {kind} checkpoint" if kind else "no model_type"
    raise UserError(
        f"{flag} {path} is not an LDM latent classifier ({found}); train one on this LDM's latents with "
        "ldm/train_classifier.py --ldm_checkpoint"
    )


def ldm_facts(ckpt):
    """What a latent classifier must share with its LDM: the latents, their noise and the classes."""
    config, schedule = ckpt["config"], ckpt["scheduler_config"]
    facts = {key: config[key] for key in ("latent_channels", "latent_size", "latent_scale", "latent_shift")}
    # The schedule settings that fix alpha_bar_t; the prediction type does not matter to a classifier.
    facts.update({key: schedule.get(key) for key in SCHEDULE_KEYS})
    facts["class_names"] = list(ckpt["class_names"])
    return facts


def check_classifier_fits(classifier_ckpt, ldm_ckpt, path, flag="--classifier"):
    """A UserError naming the first difference unless the classifier was trained for this LDM's latents."""
    trained, wanted = classifier_ckpt["ldm"], ldm_facts(ldm_ckpt)
    for key, value in wanted.items():
        if trained.get(key) != value:
            raise UserError(
                f"{flag} {path} was trained with {key}={trained.get(key)}, but the LDM has {key}={value}: "
                "train a classifier with --ldm_checkpoint of this LDM"
            )


def classifier_from_checkpoint(ckpt, use_ema=True):
    """The latent classifier of a train_classifier.py checkpoint, frozen, with EMA weights unless asked."""
    model = guidance.EncoderClassifier(**ckpt["classifier_config"])
    model.load_state_dict(ckpt["ema_classifier"] if use_ema else ckpt["classifier"])
    return model.eval().requires_grad_(False)


def load_checkpoint(path, flag="--checkpoint"):
    """Read an LDM checkpoint, failing with one clear line when it is missing or of another model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found; pass an LDM checkpoint such as checkpoint_best.pt")
    ckpt = load_weights_only(path, what=flag)  # weights_only: a pickle can run no code
    # ControlNet and DiT checkpoints are dicts too: the model_type tells them apart.
    if not isinstance(ckpt, dict) or ckpt.get("model_type") != "ldm":
        kind = ckpt.get("model_type") if isinstance(ckpt, dict) else None
        found = f"a {kind} checkpoint" if kind else "no model_type"
        raise UserError(
            f"{flag} {path} is not an LDM checkpoint ({found}); pass a checkpoint written by ldm/train.py"
        )
    return ckpt


def intensity_of(ckpt):
    """The decoding rule of the checkpoint's data (8-bit for checkpoints written before it was stored)."""
    return ckpt.get("intensity") or EIGHT_BIT


def model_from_checkpoint(ckpt, use_ema=True):
    """Rebuild the class-conditional UNet from a checkpoint, with EMA weights when present and asked."""
    # The stored diffusers config rebuilds the UNet exactly; no preset or flag is consulted.
    unet = UNet2DConditionModel.from_config(ckpt["unet_config"])
    embedder = ClassEmbedder(len(ckpt["class_names"]), unet.config.cross_attention_dim)
    ema = use_ema and ckpt.get("ema_unet") is not None
    unet.load_state_dict(ckpt["ema_unet"] if ema else ckpt["unet"])
    embedder.load_state_dict(ckpt["ema_class_embedder"] if ema else ckpt["class_embedder"])
    return ClassConditionalUNet(unet, embedder).eval().requires_grad_(False)
