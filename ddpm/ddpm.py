"""Unconditional pixel-space DDPM.

Run `python ddpm.py` to train with the values in launch(); command-line flags override them. The training
loop, checkpoints and outputs are those of ddpm_conditional.py, without class labels.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flat imports from any working directory

from ddpm_conditional import Diffusion, build_parser, parse_flags, train  # noqa: E402
from modules import UNet  # noqa: E402
from utils import explicit_flags, run_cli  # noqa: E402

__all__ = ["Diffusion", "UNet", "launch"]


def launch(argv=None):
    """Train the unconditional DDPM; edit the values below or override them with flags."""
    parser = build_parser(conditional=False, description=__doc__)
    parser.set_defaults(
        run_name="DDPM_Uncondtional",  # spelled as in the original, so existing run folders are found
        epochs=500,
        batch_size=12,
        image_size=64,
        dataset_path="/path/to/dataset",
        device="auto",  # the original used "cuda"; auto picks the GPU when there is one
        lr=3e-4,
    )
    argv = sys.argv[1:] if argv is None else argv
    train(parse_flags(parser, argv), explicit_flags(parser, argv))


if __name__ == "__main__":
    run_cli(launch)
