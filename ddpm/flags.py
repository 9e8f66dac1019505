"""The training flags of ddpm.py, ddpm_conditional.py and ddpm_conditional_ddp.py, checked as they are parsed
(both spellings of every multi-word flag, the shared vocabulary with the original names as aliases)."""

import argparse

from core import cli
from utils import (
    add_flag,
    data_layout,
)


def add_train_args(parser, conditional=True):
    """Training flags, checked as they are parsed; both spellings of every multi-word flag are accepted."""
    add_flag(
        parser, "run_name", default="DDPM_conditional", help="name of models/, results/ and runs/ subfolders"
    )
    add_flag(
        parser,
        "data_root",
        "dataset-path",
        dest="dataset_path",
        default=None,
        help="training images (layout in the text below)",
    )
    add_flag(parser, "workdir", default=".", help="folder that holds models/, results/ and runs/")
    add_flag(
        parser,
        "num_epochs",
        "epochs",
        dest="epochs",
        type=cli.positive_int,
        default=300,
        help="passes over the training images",
    )
    add_flag(parser, "batch_size", type=cli.positive_int, default=14, help="images per step on each process")
    add_flag(
        parser,
        "image_size",
        type=cli.positive_int,
        default=64,
        help="side of the square training images (multiple of 8, >= 16)",
    )
    add_flag(
        parser,
        "channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="image channels of the model (default: 1 if every image is grayscale, else 3)",
    )
    add_flag(
        parser,
        "bit_depth",
        type=cli.bit_depth,
        default=None,
        metavar="N",
        help="integer images: scale pixel values by 2^N - 1; unset: N found by scanning the whole data set",
    )
    add_flag(
        parser,
        "intensity_range",
        type=cli.finite_float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="float ('F') images: the values that map to black and white; unset: 0 1",
    )
    add_flag(
        parser,
        "learning_rate",
        "lr",
        dest="lr",
        type=cli.positive_float,
        default=3e-4,
        help="AdamW learning rate",
    )
    add_flag(
        parser,
        "lr_warmup_steps",
        type=cli.nonnegative_int,
        default=500,
        help="linear learning-rate warm-up steps",
    )
    add_flag(parser, "weight_decay", type=cli.nonnegative_float, default=0.0, help="AdamW weight decay")
    add_flag(
        parser,
        "grad_clip",
        type=cli.nonnegative_float,
        default=1.0,
        help="max gradient norm (0 disables clipping)",
    )
    add_flag(parser, "device", default="auto", help="auto (GPU if available), cpu, cuda or cuda:N")
    add_flag(
        parser,
        "mixed_precision",
        "precision",
        dest="precision",
        type=cli.mixed_precision,
        default="auto",
        help="no, fp16 (with a grad scaler), bf16 (fp32 = no) or auto (bf16 if the GPU has it, else fp16); "
        "CUDA only, the CPU runs fp32",
    )
    add_flag(parser, "seed", type=int, default=42, help="random seed")
    add_flag(
        parser,
        "num_workers",
        type=cli.nonnegative_int,
        default=4,
        help="data-loading worker processes per process (0: load in the main process)",
    )
    add_flag(
        parser,
        "save_every",
        "save-interval",
        dest="save_interval",
        type=cli.positive_int,
        default=10,
        help="every this many epochs: save checkpoints, evaluate held-out loss, write a sample grid",
    )
    add_flag(
        parser,
        "checkpoints_total_limit",
        type=cli.positive_int,
        default=None,
        help="keep only the newest N periodic checkpoints",
    )
    add_flag(
        parser,
        "val_fraction",
        "val-split",
        dest="val_split",
        type=cli.fraction,
        default=0.05,
        help="fraction of images held out to choose ckpt_best.pt (0 disables)",
    )
    add_flag(
        parser,
        "resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from a checkpoint: a path, or no value for <workdir>/models/<run-name>/ckpt.pt",
    )
    add_flag(
        parser,
        "overwrite",
        action="store_true",
        help="training: start a new run over an existing run folder; sampling: redo existing images",
    )
    add_flag(
        parser,
        "max_steps",
        type=cli.positive_int,
        default=None,
        help="stop after this many optimizer steps in total",
    )
    add_flag(
        parser,
        "max_minutes",
        type=cli.positive_float,
        default=None,
        help="stop training after this many minutes",
    )
    add_flag(parser, "noise_steps", type=cli.positive_int, default=1000, help="diffusion timesteps T")
    add_flag(
        parser,
        "beta_start",
        type=cli.positive_float,
        default=1e-4,
        help="first beta of the linear schedule (0 < beta-start < beta-end < 1)",
    )
    add_flag(
        parser, "beta_end", type=cli.positive_float, default=0.02, help="last beta of the linear schedule"
    )
    add_flag(
        parser,
        "base_channels",
        type=cli.positive_int,
        default=64,
        help="UNet width (channels of the first level, even)",
    )
    add_flag(
        parser, "time_dim", type=cli.positive_int, default=256, help="size of the time (and class) embedding"
    )
    add_flag(
        parser,
        "attn_resolutions",
        type=cli.positive_int,
        nargs="+",
        default=None,
        help="feature-map sides that get self-attention (default: levels below full size, up to 32)",
    )
    add_flag(parser, "ema_decay", type=cli.fraction, default=0.995, help="EMA decay, in [0, 1)")
    add_flag(
        parser,
        "ema_warmup_steps",
        type=cli.nonnegative_int,
        default=2000,
        help="steps during which the EMA copies the weights",
    )
    add_flag(
        parser,
        "preview_steps",
        type=cli.nonnegative_int,
        default=50,
        help="DDIM steps of the EMA sample grids written at each save (0: no grids)",
    )
    add_flag(
        parser,
        "hflip",
        action="store_true",
        help="random horizontal flips (off: they harm e.g. digits, text)",
    )
    add_flag(parser, "compile", action="store_true", help="torch.compile the UNet")
    add_flag(
        parser,
        "gradient_checkpointing",
        "grad_checkpointing",
        dest="grad_checkpointing",
        action="store_true",
        help="recompute activations to save GPU memory",
    )
    if conditional:
        add_flag(
            parser,
            "num_classes",
            type=cli.positive_int,
            default=None,
            help="number of classes (None: count the class folders)",
        )
        add_flag(
            parser,
            "cfg_dropout",
            type=cli.fraction,
            default=0.1,
            help="probability of replacing a label by the null class, for classifier-free guidance",
        )
    parser.set_defaults(conditional=conditional)


def train_parser(conditional, description):
    """Argument parser of the training scripts, before their own defaults."""
    layout = data_layout() if conditional else "any folder of images (sub-folders are searched)"
    parser = cli.Parser(
        description=description,
        epilog=f"Data layout: {layout}",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_args(parser, conditional)
    return parser


def parse_flags(parser, argv):
    """Parse argv, also checking the values that only make sense together (one 'error:' line, exit 2)."""
    args = parser.parse_args(argv)
    if not 0 < args.beta_start < args.beta_end < 1:
        parser.error(
            "the noise schedule needs 0 < --beta-start < --beta-end < 1, "
            f"got {args.beta_start} and {args.beta_end}"
        )
    if args.base_channels % 2:
        parser.error(f"--base-channels must be even (it sizes the time embedding), got {args.base_channels}")
    if args.intensity_range is not None and not args.intensity_range[0] < args.intensity_range[1]:
        low, high = args.intensity_range
        parser.error(f"--intensity-range needs LOW < HIGH, got {low:g} {high:g}")
    return args
