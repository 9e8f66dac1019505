"""The DDPM's classifier for classifier guidance (Dhariwal & Nichol 2021): the network of core/guidance.py
(the UNet's encoder with ADM's attention pooling) and what sampling needs from it here: loading a
train_classifier.py checkpoint and checking that it fits a DDPM."""

from core.guidance import EncoderClassifier, log_prob_gradient
from utils import UserError, load_checkpoint

# The network and grad log p(y | x_t) are core/guidance.py's, shared with the LDM's latent classifier.
__all__ = ["CLASSIFIER_FORMAT", "DIFFUSION_KEYS", "EncoderClassifier", "log_prob_gradient", "load_classifier",
           "check_fits"]  # fmt: skip

CLASSIFIER_FORMAT = "ddpm-classifier-v1"
# What a classifier takes from its DDPM checkpoint: the images it sees and the noise they carry.
DIFFUSION_KEYS = ("image_size", "channels", "noise_steps", "beta_start", "beta_end")


def load_classifier(path):
    """The classifier of a train_classifier.py checkpoint (EMA weights) and the checkpoint."""
    ckpt = load_checkpoint(path, "--classifier")
    if ckpt.get("format") != CLASSIFIER_FORMAT:
        raise UserError(
            f"--classifier {path} is not a classifier checkpoint: pass the ema_ckpt.pt or ckpt.pt that "
            "train_classifier.py writes"
        )
    model = EncoderClassifier(**ckpt["model_config"])
    # ckpt.pt holds both weights; ema_ckpt.pt holds the EMA ones as its "model".
    model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    return model.eval().requires_grad_(False), ckpt


def check_fits(classifier_ckpt, config, class_names, conditional, path):
    """A UserError unless the classifier saw the images, noise and classes of the DDPM of config."""
    trained = classifier_ckpt["config"]
    for key in DIFFUSION_KEYS:
        if trained[key] != config.get(key):
            raise UserError(
                f"--classifier {path} was trained with {key}={trained[key]}, but the diffusion model has "
                f"{key}={config.get(key)}: train a classifier with --diffusion-checkpoint of this model"
            )
    # Labels are indices: a conditional DDPM and its classifier must mean the same class by each.
    if conditional and classifier_ckpt["class_names"] != list(class_names):
        raise UserError(
            f"--classifier {path} knows the classes {classifier_ckpt['class_names']}, but the diffusion "
            f"model has {list(class_names)}: train the classifier on the same class folders"
        )
