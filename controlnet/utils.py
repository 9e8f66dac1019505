"""Small helpers of the ControlNet scripts: the intensity flags and project checkpoints of a known type."""

from pathlib import Path

from core import checkpoints, cli
from core.errors import UserError

# Help texts too long to share a line with their flag; PRECISION_HELP serves train.py and inference.py.
RANGE_HELP = "float ('F') images: LOW .. HIGH map to black .. white (default: 0 1)"
PRECISION_HELP = "no, fp16 or bf16 (also fp32, auto); on CPU fp32 with a warning"


def add_intensity_flags(parser):
    """--bit_depth and --intensity_range: override the scan's rule for the data set's pixel values."""
    add = parser.add_argument
    add("--bit_depth", type=cli.bit_depth, help="integer images hold 0 .. 2^N - 1 (default: scanned)")
    add("--intensity_range", nargs=2, type=cli.finite_float, metavar=("LOW", "HIGH"), help=RANGE_HELP)


def check_intensity_flags(parser, args):
    """Parse-time check of --intensity_range (low below high)."""
    if args.intensity_range and not args.intensity_range[0] < args.intensity_range[1]:
        low, high = args.intensity_range
        parser.error(f"--intensity_range needs LOW < HIGH, got {low:g} {high:g}")


def load_checkpoint(path, expected_type, flag):
    """Load a project checkpoint (weights only) and check its model_type, with user-level errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist; give the path of a .pt checkpoint file")
    ckpt = checkpoints.load(path, flag)
    found = ckpt.get("model_type") if isinstance(ckpt, dict) else None
    if found != expected_type:
        writer = "ldm/train.py" if expected_type == "ldm" else "controlnet/train.py"
        raise UserError(
            f"{flag} {path} is a {found or 'non-project'} checkpoint, not of type '{expected_type}'; "
            f"pass a checkpoint written by {writer}"
        )
    return ckpt
