"""Train a time-conditioned classifier of noisy images x_t ~ q(x_t | x_0) for classifier guidance.

The noise schedule, image size and channel count come from --diffusion-checkpoint, the DDPM it will guide
(conditional or unconditional); the data are class folders, the same ones as the DDPM's when it is
conditional. The network is the UNet's encoder with attention pooling, as in ADM. Training runs on the DDPM
trainer's loop: one process or many (torchrun / accelerate launch), EMA, resume, signals, and the DDPM's
file names under <workdir>/models/<run-name>/ (ckpt.pt, ema_ckpt.pt, ckpt_best.pt on held-out
cross-entropy, ...). TensorBoard gets the held-out accuracy at fixed noise levels. Guide sampling with
`ddpm_conditional_ddp.py --mode sample --classifier <run>/ema_ckpt.pt --classifier-scale S`.
"""

import math
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from classifier import CLASSIFIER_FORMAT, DIFFUSION_KEYS
from core import cli, datasets
from core.guidance import EncoderClassifier
from flags import add_config_flag, add_train_args, parse_flags
from run_config import load_data, prepare_outputs, resolve_config, saved_config, scan_images, validate
from trainer import Trainer, run_training
from utils import CHECKPOINT_FORMAT, UserError, add_flag, intensity_of, load_checkpoint, run_cli

# Settings that fix the network or the noise it was trained on: a resumed run takes them from its checkpoint.
ARCH_KEYS = (*DIFFUSION_KEYS, "base_channels", "time_dim", "depth", "attn_resolutions", "num_classes")
# Held-out accuracy is reported at these fractions of the schedule: t = 0 (clean) up to T - 1 (pure noise).
EVAL_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
DIFFUSION_HELP = "the DDPM checkpoint to guide (ckpt.pt or ema_ckpt.pt): its schedule, image size, channels"


def build_parser():
    parser = cli.Parser(description=__doc__, epilog=datasets.CLASS_LAYOUT)
    add_config_flag(parser)
    add_flag(parser, "diffusion_checkpoint", help=DIFFUSION_HELP)
    add_train_args(parser, conditional=True, diffusion=False)
    add_flag(
        parser, "depth", type=cli.positive_int, default=2, help="UNet levels per resolution of the encoder"
    )
    # No sample grids and no label dropout: the loop's settings for them are off.
    parser.set_defaults(run_name="classifier", preview_steps=0, cfg_dropout=0.0)
    return parser


# Training-config keys that are EncoderClassifier arguments of the same name.
CLASSIFIER_KEYS = ("base_channels", "time_dim", "depth", "attn_resolutions", "num_classes")


def classifier_config(config):
    """EncoderClassifier constructor arguments for a training config."""
    return {
        "c_in": config["channels"],
        "img_size": config["image_size"],
        **{k: config[k] for k in CLASSIFIER_KEYS},
    }


def eval_timesteps(noise_steps):
    return sorted({round(f * (noise_steps - 1)) for f in EVAL_FRACTIONS})


class ClassifierTrainer(Trainer):
    """The DDPM trainer's loop with a cross-entropy loss on images noised by the DDPM's schedule."""

    checkpoint_format, network_name = CLASSIFIER_FORMAT, "classifier"

    def __init__(self, *args, **kwargs):
        self.accuracy = {}  # {timestep: held-out accuracy} of the last evaluation (rank 0)
        super().__init__(*args, **kwargs)

    def build_network(self):
        return EncoderClassifier(**classifier_config(self.config))

    def compute_loss(self, x, y):
        t = self.diffusion.sample_timesteps(x.shape[0], self.generator)
        noise = torch.randn(x.shape, generator=self.generator, device=self.device)
        with self.accelerator.autocast():
            logits = self.net(self.diffusion.noise_images(x, t, noise), t)
        return F.cross_entropy(logits.float(), y)

    def classify(self, x, t, gen):
        """EMA logits of x noised to timesteps t with noise from gen."""
        noise = torch.randn(x.shape, generator=gen).to(self.device)
        with self.accelerator.autocast():
            return self.ema_model(self.diffusion.noise_images(x, t, noise), t).float()

    @torch.no_grad()
    def heldout_loss(self):
        """Held-out cross-entropy at random timesteps (it chooses ckpt_best.pt); also sets self.accuracy,
        the held-out accuracy at each of eval_timesteps()."""
        self.accuracy = {}
        if len(self.val_set) == 0:
            return math.inf
        # Reseeded each time, as the DDPM's held-out loss: every evaluation sees the same noise.
        gen = torch.Generator().manual_seed(self.config["seed"])
        levels = eval_timesteps(self.diffusion.noise_steps)
        total, hits = 0.0, [0] * len(levels)
        for x, y in DataLoader(self.val_set, batch_size=self.config["batch_size"]):
            x, y = x.to(self.device), y.to(self.device)
            t = torch.randint(0, self.diffusion.noise_steps, (len(y),), generator=gen).to(self.device)
            total += F.cross_entropy(self.classify(x, t, gen), y, reduction="sum").item()
            for i, level in enumerate(levels):
                predicted = self.classify(x, torch.full_like(t, level), gen).argmax(1)
                hits[i] += (predicted == y).sum().item()
        self.accuracy = {level: hit / len(self.val_set) for level, hit in zip(levels, hits, strict=True)}
        return total / len(self.val_set)

    def state_dict(self):
        # Keys as strings: the file stays plain for weights_only loads and readable as JSON.
        accuracy = {str(t): acc for t, acc in self.accuracy.items()}
        return {**super().state_dict(), "heldout_accuracy": accuracy}

    def log_save(self, name, val_loss):
        for t, acc in self.accuracy.items():
            self.writer.add_scalar(f"val/accuracy_t{t:04d}", acc, self.global_step)
        super().log_save(name, val_loss)
        if self.accuracy:
            tqdm.write(
                "held-out accuracy by timestep: "
                + ", ".join(f"t={t} {a:.1%}" for t, a in self.accuracy.items())
            )


def adopt_diffusion(config, fresh):
    """Take the schedule, size, channels, classes and intensity rule of --diffusion-checkpoint into config;
    on resume, a typed --diffusion-checkpoint must describe the same noise as the one trained with."""
    path = config["diffusion_checkpoint"]
    if path is None:
        raise UserError("pass --diffusion-checkpoint with the DDPM to guide: the classifier learns its noise")
    ckpt = load_checkpoint(path, "--diffusion-checkpoint")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"--diffusion-checkpoint {path} is not a DDPM checkpoint written by training (a bare state_dict "
            "or a classifier has no noise schedule): pass models/<run>/ckpt.pt or ema_ckpt.pt"
        )
    diffusion = saved_config(ckpt)
    if diffusion["objective"] != "ddpm":
        raise UserError(
            f"--diffusion-checkpoint {path} is a {diffusion['objective']}-objective model: classifier "
            "guidance here is for the discrete DDPM (--objective ddpm)"
        )
    for key in DIFFUSION_KEYS:
        if not fresh and config[key] != diffusion[key]:
            raise UserError(f"this run was trained with {key}={config[key]}, but {path} has {diffusion[key]}")
        config[key] = diffusion[key]
    config["diffusion_classes"] = list(ckpt["class_names"])
    config["diffusion_intensity"] = dict(intensity_of(ckpt))


def train(args, explicit=frozenset()):
    """Train a classifier from parsed flags; `explicit` flags (typed by the user) win over a resumed one."""
    config, ckpt = resolve_config(args, explicit, CLASSIFIER_FORMAT, ARCH_KEYS)
    if ckpt is None or "diffusion_checkpoint" in explicit:
        adopt_diffusion(config, fresh=ckpt is None)
    validate(config, fresh=ckpt is None)
    files, labels, class_names = load_data(config, ckpt)
    # A conditional DDPM's label i is its i-th class folder; the classifier's must be the same class.
    if config["diffusion_classes"] and config["diffusion_classes"] != class_names:
        raise UserError(
            f"the class folders of {config['dataset_path']} are {class_names}, but the diffusion model's "
            f"classes are {config['diffusion_classes']}: train on the class folders of the DDPM"
        )
    prepare_outputs(config, ("models", "runs"))
    scan_images(config, files, ckpt)
    if config["intensity"] != config["diffusion_intensity"]:
        raise UserError(
            f"{config['dataset_path']} does not scan as the images of the diffusion model: state the DDPM's "
            "rule with --bit-depth / --intensity-range"
        )
    return run_training(ClassifierTrainer, config, ckpt, files, labels, class_names)


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    train(parse_flags(parser, argv), cli.explicit_flags(parser, argv))


if __name__ == "__main__":
    run_cli(main)
