"""The training flags of ddpm.py, ddpm_conditional.py and ddpm_conditional_ddp.py, checked as they are parsed
(both spellings of every multi-word flag, the shared vocabulary with the original names as aliases)."""

from functools import partial

from core import cli, datasets, inception, sde_cli
from utils import add_flag

# Help texts too long to share a line with their flag.
FLOAT_HELP = "float ('F') images: the values that map to black and white (unset: 0 1)"
MP_HELP = "no, fp16 (with a grad scaler), bf16, auto (bf16 where the GPU has it); fp32 = no; CPU: fp32"
SAVE_HELP = "every this many epochs: save checkpoints, held-out loss and a sample grid"
VAL_HELP = "fraction of images held out to choose ckpt_best.pt (0 disables)"
ATTN = " (unset: the levels below full size, up to 32)"
GC = "recompute activations in the backward pass to save GPU memory"


def add_train_args(parser, conditional=True, diffusion=True):
    """Training flags, checked as they are parsed; both spellings of every multi-word flag are accepted.

    diffusion=False leaves out what a noisy-image classifier takes from its DDPM checkpoint instead (size,
    channels, schedule, objective) and what only a DDPM has (sample grids, label dropout).
    """
    # The first name is the shared vocabulary's, the others the original scripts'; dest keeps the original
    # names, which are the config keys of every checkpoint written so far.
    flag = partial(add_flag, parser)
    flag("run_name", default="DDPM_conditional", help="name of the models/, results/ and runs/ subfolders")
    flag("data_root", "dataset-path", help="training images (layout below)")
    flag("workdir", default=".", help="folder that holds models/, results/ and runs/")
    flag("num_epochs", "epochs", type=cli.positive_int, default=300, help="passes over the data")
    flag("batch_size", type=cli.positive_int, default=14, help="images per step on each process")
    if diffusion:
        add_shape_args(parser)
    flag("bit_depth", type=cli.bit_depth, metavar="N", help="integer images: divide by 2^N - 1 (unset: scan)")
    flag("intensity_range", type=cli.finite_float, nargs=2, metavar=("LOW", "HIGH"), help=FLOAT_HELP)
    flag("learning_rate", "lr", type=cli.positive_float, default=3e-4, help="AdamW learning rate")
    flag("lr_warmup_steps", type=cli.nonnegative_int, default=500, help="linear learning-rate warm-up steps")
    flag("weight_decay", type=cli.nonnegative_float, default=0.0, help="AdamW weight decay")
    flag("grad_clip", type=cli.nonnegative_float, default=1.0, help="max gradient norm (0 disables clipping)")
    flag("device", default="auto", help="auto (GPU if available), cpu, cuda or cuda:N")
    flag("mixed_precision", "precision", type=cli.mixed_precision, default="auto", help=MP_HELP)
    flag("seed", type=int, default=42, help="random seed")
    flag("num_workers", type=cli.nonnegative_int, default=4, help="data-loading workers per process")
    flag("save_every", "save-interval", type=cli.positive_int, default=10, help=SAVE_HELP)
    flag("checkpoints_total_limit", type=cli.positive_int, help="keep only the newest N periodic checkpoints")
    flag("val_fraction", "val-split", type=cli.fraction, default=0.05, help=VAL_HELP)
    flag("resume", nargs="?", const="auto", help="continue from a path; no value: models/<run-name>/ckpt.pt")
    flag("overwrite", action="store_true", help="train: start over an existing run; sample: redo images")
    flag("max_steps", type=cli.positive_int, help="stop after this many optimizer steps in total")
    flag("max_minutes", type=cli.positive_float, help="stop training after this many minutes")
    if diffusion:
        add_schedule_args(parser)
    flag("base_channels", type=cli.positive_int, default=64, help="UNet width (first level channels, even)")
    flag("time_dim", type=cli.positive_int, default=256, help="size of the time (and class) embedding")
    flag("attn_resolutions", type=cli.positive_int, nargs="+", help="feature-map sides with attention" + ATTN)
    flag("ema_decay", type=cli.fraction, default=0.995, help="EMA decay, in [0, 1)")
    flag("ema_warmup_steps", type=cli.nonnegative_int, default=2000, help="steps in which the EMA copies")
    if diffusion:
        flag(
            "preview_steps",
            type=cli.nonnegative_int,
            default=50,
            help="DDIM steps of the EMA grids (0: none)",
        )
    flag("hflip", action="store_true", help="random horizontal flips (off: they harm e.g. digits, text)")
    flag("compile", action="store_true", help="torch.compile the UNet")
    flag("gradient_checkpointing", "grad_checkpointing", action="store_true", help=GC)
    if conditional and diffusion:
        flag("num_classes", type=cli.positive_int, help="number of classes (unset: count the class folders)")
        flag("cfg_dropout", type=cli.fraction, default=0.1, help="chance of the null label, for guidance")
    if diffusion:  # in-training FID / KID of the EMA samples (core/inception.py)
        inception.add_eval_flags(parser, unit="epochs", dashed=True)
    parser.set_defaults(conditional=conditional)


def add_shape_args(parser):
    """The image side and channel count of a DDPM."""
    flag = partial(add_flag, parser)
    flag("image_size", type=cli.positive_int, default=64, help="square image side (multiple of 8, >= 16)")
    flag("channels", type=int, choices=(1, 3), help="model channels (unset: 1 if all images are gray)")


def add_schedule_args(parser):
    """The noise schedule and objective of a DDPM."""
    flag = partial(add_flag, parser)
    flag("noise_steps", type=cli.positive_int, default=1000, help="diffusion timesteps T")
    flag("beta_start", type=cli.positive_float, default=1e-4, help="first beta of the linear schedule")
    flag("beta_end", type=cli.positive_float, default=0.02, help="last beta (0 < beta-start < beta-end < 1)")
    sde_cli.add_objective_flags(parser, dashed=True)  # --objective and its constants (core/sde_cli.py)


def add_config_flag(parser):
    add_flag(parser, "config", metavar="FILE", help=cli.CONFIG_HELP + " (presets: configs/*.yaml)")


def train_parser(conditional, description):
    """Argument parser of the training scripts, before their own defaults."""
    layout = (
        datasets.CLASS_LAYOUT if conditional else "data layout: any folder of images, sub-folders included"
    )
    parser = cli.Parser(description=description, epilog=layout)
    add_config_flag(parser)
    add_train_args(parser, conditional)
    return parser


def parse_flags(parser, argv):
    """Parse argv, also checking the values that only make sense together (one 'error:' line, exit 2)."""
    args = parser.parse_args(argv)
    # A classifier's parser has no schedule flags: it takes them from its DDPM checkpoint.
    if hasattr(args, "beta_start") and not 0 < args.beta_start < args.beta_end < 1:
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
