"""Class-conditional pixel-space DDPM with classifier-free guidance.

Run `python ddpm_conditional.py` to train with the values in build_parser(); command-line flags override
them. The pieces live in modules named after what they hold: diffusion.py (the Diffusion class, kept
importable from here as in the original: `from ddpm_conditional import Diffusion`), flags.py (the training
flags), run_config.py (configuration, run folders, data) and trainer.py (the training loop that ddpm.py
and ddpm_conditional_ddp.py share).
"""

from core.errors import run_cli
from diffusion import Diffusion
from flags import train_parser
from trainer import launch_training

__all__ = ["Diffusion", "build_parser", "launch"]


def build_parser():
    """The training flags; edit the original's values below or override them with flags."""
    parser = train_parser(conditional=True, description=__doc__)
    parser.set_defaults(run_name="DDPM_conditional", epochs=300, batch_size=14, image_size=64, num_classes=10)
    # The original had device "cuda"; "auto" takes the GPU when there is one.
    parser.set_defaults(lr=3e-4, dataset_path="/path/to/dataset", device="auto")
    return parser


def launch(argv=None):
    """Train the class-conditional DDPM."""
    launch_training(build_parser(), argv)


if __name__ == "__main__":
    run_cli(launch)
