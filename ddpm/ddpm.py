"""Unconditional pixel-space DDPM.

Run `python ddpm.py` to train with the values in build_parser(); command-line flags override them.
The training loop (trainer.py), checkpoints and outputs are those of ddpm_conditional.py, without class
labels.
"""

from core.errors import run_cli
from diffusion import Diffusion
from flags import train_parser
from modules import UNet
from trainer import launch_training

__all__ = ["Diffusion", "UNet", "launch"]


def build_parser():
    """The training flags without class labels; edit the original's values below or override them."""
    parser = train_parser(conditional=False, description=__doc__)
    # run_name is spelled as in the original, so that existing run folders are found.
    parser.set_defaults(run_name="DDPM_Uncondtional", epochs=500, batch_size=12, image_size=64, lr=3e-4)
    # The original had device "cuda"; "auto" takes the GPU when there is one.
    parser.set_defaults(dataset_path="/path/to/dataset", device="auto")
    return parser


def launch(argv=None):
    """Train the unconditional DDPM."""
    launch_training(build_parser(), argv)


if __name__ == "__main__":
    run_cli(launch)
