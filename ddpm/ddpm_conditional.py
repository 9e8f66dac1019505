"""Class-conditional pixel-space DDPM with classifier-free guidance.

Run `python ddpm_conditional.py` to train with the values in build_parser(); command-line flags override
them. The pieces live in modules named after what they hold: diffusion.py (the Diffusion class, kept
importable from here as in the original: `from ddpm_conditional import Diffusion`), flags.py (the training
flags), run_config.py (configuration, run folders, data) and trainer.py (the training loop that ddpm.py
and ddpm_conditional_ddp.py share).
"""

import sys

from core import cli
from core.errors import run_cli
from diffusion import Diffusion
from flags import parse_flags, train_parser
from trainer import train

__all__ = ["Diffusion", "build_parser", "launch"]


def build_parser():
    """The training flags; edit the defaults below or override them with flags."""
    parser = train_parser(conditional=True, description=__doc__)
    parser.set_defaults(
        run_name="DDPM_conditional",
        epochs=300,
        batch_size=14,
        image_size=64,
        num_classes=10,
        dataset_path="/path/to/dataset",
        device="auto",  # the original used "cuda"; auto picks the GPU when there is one
        lr=3e-4,
    )
    return parser


def launch(argv=None):
    """Train the class-conditional DDPM."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    train(parse_flags(parser, argv), cli.explicit_flags(parser, argv))


if __name__ == "__main__":
    run_cli(launch)
