"""Unconditional pixel-space DDPM.

Run `python ddpm.py` to train with the values in build_parser(); command-line flags override them.
The training loop (trainer.py), checkpoints and outputs are those of ddpm_conditional.py, without class
labels.
"""

import sys

from core.cli import explicit_flags
from core.errors import run_cli
from diffusion import Diffusion
from flags import parse_flags, train_parser
from modules import UNet
from trainer import train

__all__ = ["Diffusion", "UNet", "launch"]


def build_parser():
    """The training flags without class labels; edit the defaults below or override them with flags."""
    parser = train_parser(conditional=False, description=__doc__)
    parser.set_defaults(
        run_name="DDPM_Uncondtional",  # spelled as in the original, so existing run folders are found
        epochs=500,
        batch_size=12,
        image_size=64,
        dataset_path="/path/to/dataset",
        device="auto",  # the original used "cuda"; auto picks the GPU when there is one
        lr=3e-4,
    )
    return parser


def launch(argv=None):
    """Train the unconditional DDPM."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    train(parse_flags(parser, argv), explicit_flags(parser, argv))


if __name__ == "__main__":
    run_cli(launch)
