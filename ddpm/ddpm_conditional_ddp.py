"""Train or sample the class-conditional DDPM on one process or many (DDP).

Modes: `train` and `sample` run as one process (`python ddpm_conditional_ddp.py --mode ...`); `train_ddp` and
`sample_ddp` run one process per GPU under torchrun (NCCL on GPUs, gloo on CPUs), on one node or several.
Sampling reads the architecture, schedule, class names and intensity rule from the checkpoint and uses its EMA
weights; a bare state_dict needs the architecture flags it was trained with. Samples are written at the
training data's depth: 8-bit PNG, 16-bit PNG for deeper integer data, TIFF for float data.
"""

import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from core import cli, datasets, images, training
from core.files import clean_temporaries
from diffusion import Diffusion
from flags import add_train_args, parse_flags
from modules import build_model
from run_config import ARCH_KEYS, model_config
from trainer import train
from utils import (
    UserError,
    add_flag,
    intensity_of,
    is_full_checkpoint,
    load_checkpoint,
    make_accelerator,
    run_cli,
    save_grid,
)

# The seed's four modes; the _ddp ones are the spellings for a launcher, with the same code behind them.
MODES = ("train", "train_ddp", "sample", "sample_ddp")
GRID_MAX_ROWS = 10
USE_EMA_HELP = "EMA weights (unset: EMA for a training checkpoint); --use-ema false: the raw weights"


def add_sample_args(parser):
    """Sampling flags (modes sample and sample_ddp), checked as they are parsed."""
    # --use-ema takes an optional value (the seed writes it bare); --no-ema is the short form of false.
    flag = partial(add_flag, parser)
    flag("ckpt", help="checkpoint to sample from: ckpt.pt, ema_ckpt.pt or a bare state_dict")
    flag("use_ema", nargs="?", const=True, type=cli.boolean, metavar="BOOL", help=USE_EMA_HELP)
    flag("no_ema", dest="use_ema", action="store_const", const=False, help="the raw weights of a checkpoint")
    flag("num_samples", type=cli.positive_int, default=8, help="total images to write, balanced over classes")
    flag("class_labels", nargs="+", help="classes to generate, as indices or folder names (unset: all)")
    flag("cfg_scale", type=cli.nonnegative_float, default=3.0, help="CFG scale (0: unconditional, 1: no CFG)")
    flag("output_dir", default="samples", help="writes <output-dir>/<class_name>/<index>.png")
    flag("sampler", default="ddpm", choices=("ddpm", "ddim"), help="ancestral DDPM or DDIM")
    flag("steps", type=cli.positive_int, help="denoising steps (unset: 1000 for ddpm, 50 for ddim)")
    flag("eta", type=cli.nonnegative_float, default=0.0, help="DDIM noise (0: deterministic)")
    flag("npz", action="store_true", help="also <output-dir>.npz: arr_0 uint8 N x H x W x 3, arr_1 labels")
    flag("grid_path", help="also an image grid of the samples, one column per class (outside --output-dir)")


def build_parser():
    parser = cli.Parser(description=__doc__, epilog=datasets.CLASS_LAYOUT)
    add_flag(parser, "mode", default="train", choices=MODES, help="what to run (_ddp: one process per GPU)")
    add_train_args(parser.add_argument_group("training"), conditional=True)
    add_sample_args(parser.add_argument_group("sampling"))
    parser.set_defaults(batch_size=8)  # per process, as in the original examples
    return parser


# ----------------------------------------------------------------------------- model


def load_sampling_model(args, explicit):
    """The UNet to sample from, with its class names, training config, intensity rule and which weights."""
    if args.ckpt is None:
        raise UserError("pass --ckpt with a checkpoint, e.g. ./models/DDPM_conditional/ema_ckpt.pt")
    ckpt = load_checkpoint(args.ckpt)
    # Files of this project carry the architecture; a bare state_dict (the original's ckpt.pt) does not.
    if is_full_checkpoint(ckpt):
        return model_from_full_checkpoint(ckpt, args, explicit)
    return model_from_state_dict(ckpt, args)


def flag_intensity(args):
    """The intensity rule stated by --bit-depth / --intensity-range, or None."""
    if args.bit_depth is not None:
        return {"kind": "integer", "bit_depth": args.bit_depth}
    return images.float_rule(args.intensity_range) if args.intensity_range is not None else None


def pick_weights(ckpt, args):
    """EMA weights unless raw ones are asked for: (state_dict, description)."""
    if "ema" in ckpt:  # ckpt.pt and its periodic / best / final copies hold both
        return (ckpt["model"], "raw weights") if args.use_ema is False else (ckpt["ema"], "EMA weights")
    if args.use_ema is False:  # ema_ckpt.pt
        raise UserError(f"{args.ckpt} holds only EMA weights: sample ckpt.pt for the raw ones")
    return ckpt["model"], "EMA weights"


def model_from_full_checkpoint(ckpt, args, explicit):
    """Rebuild the UNet from the config a training run stored."""
    config = ckpt["config"]
    # Architecture flags are optional here, but one that contradicts the checkpoint is a mistake to report.
    for key in ARCH_KEYS:
        if key in explicit and getattr(args, key) != config.get(key):
            raise UserError(f"{args.ckpt} was trained with {key}={config.get(key)}, not {getattr(args, key)}")
    # Samples are written under the training data's rule; another stated rule would mis-scale them.
    intensity = intensity_of(ckpt)
    stated = flag_intensity(args)
    if stated is not None and stated != intensity:
        raise UserError(
            f"{args.ckpt} was trained on {images.describe(intensity)}: drop --bit-depth / --intensity-range"
        )
    model = build_model(ckpt["model_config"])
    weights, which = pick_weights(ckpt, args)
    model.load_state_dict(weights)
    class_names = ckpt["class_names"] or [str(i) for i in range(model.num_classes or 0)]
    return model, class_names, config, intensity, which


def model_from_state_dict(state_dict, args):
    """Build the UNet from the architecture flags and load a bare state_dict into it."""
    if args.use_ema:
        raise UserError(f"{args.ckpt} is a bare state_dict without EMA weights: drop --use-ema")
    if args.num_classes is None and "label_emb.weight" in state_dict:
        raise UserError(
            f"{args.ckpt} is a bare class-conditional state_dict: pass --num-classes and --image-size"
        )
    # The flags stand in for the missing config; the original models were RGB unless told otherwise.
    config = {**vars(args), "channels": args.channels or 3}
    try:
        model = build_model(model_config(config))
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as err:
        # load_state_dict lists every mismatching tensor; the first line is enough to point at the flag.
        first_line = str(err).strip().splitlines()[0]
        raise UserError(
            f"{args.ckpt} does not fit a UNet built from the flags ({first_line}): pass the --image-size, "
            "--num-classes, --channels, --base-channels, --time-dim and --attn-resolutions used in training"
        ) from None
    class_names = [str(i) for i in range(args.num_classes or 0)]
    return model, class_names, config, flag_intensity(args) or images.EIGHT_BIT, "the bare state_dict"


def parse_class_labels(tokens, class_names):
    """Class indices from tokens that are indices or folder names, without repeats."""
    if tokens is None:
        return list(range(len(class_names)))
    labels = []
    for token in tokens:
        # A token that looks like a number is an index, even where a class folder has a numeric name.
        if token.lstrip("-").isdigit():
            index = int(token)
            if not 0 <= index < len(class_names):
                raise UserError(
                    f"class index {index} is out of range: the model has classes 0..{len(class_names) - 1}"
                )
        elif token in class_names:
            index = class_names.index(token)
        else:
            raise UserError(f"class {token!r} is not in the checkpoint's classes {class_names}")
        labels += [] if index in labels else [index]
    return labels


# ----------------------------------------------------------------------------- sampling


def plan_outputs(args, class_names, conditional, suffix):
    """(label, path) of every requested image, in a fixed order so reruns find the same files."""
    out = Path(args.output_dir)
    # Unconditional models write one flat folder, as evaluation tools expect for unlabelled samples.
    if not conditional:
        if args.class_labels:
            raise UserError(f"{args.ckpt} is an unconditional model: drop --class-labels")
        return [(None, out / f"{i:06d}{suffix}") for i in range(args.num_samples)]
    labels = parse_class_labels(args.class_labels, class_names)
    # Round-robin over the classes: any --num-samples stays balanced, each class numbered from 000000.
    k = len(labels)
    return [
        (labels[i % k], out / class_names[labels[i % k]] / f"{i // k:06d}{suffix}")
        for i in range(args.num_samples)
    ]


def npz_path(args):
    """<output-dir>.npz, beside the sample folder."""
    out = Path(args.output_dir).resolve()
    return out.with_name(out.name + ".npz")


def check_sample_args(args, noise_steps):
    """Checks that need the checkpoint (single values are checked at parsing)."""
    if args.steps is not None and args.steps > noise_steps:
        raise UserError(f"--steps must be between 1 and {noise_steps}, got {args.steps}")


def prepare_outputs(args, plan):
    """Prove every output location writable before sampling, and remove a killed run's temporaries."""
    # All checks come before the first denoising step, so a bad path costs no sampling time.
    cli.ensure_writable_dir(args.output_dir, "--output-dir")
    for folder in sorted({path.parent for _, path in plan}):
        clean_temporaries(cli.ensure_writable_dir(folder, "--output-dir"))
    if args.npz:
        cli.ensure_writable_file(npz_path(args), "--npz file")
    if args.grid_path:
        grid = Path(args.grid_path).resolve()
        if Path(args.output_dir).resolve() in grid.parents:
            raise UserError(
                f"--grid-path {args.grid_path} is inside --output-dir, where evaluation would count it as a "
                "sample: write it elsewhere"
            )
        if grid.suffix.lower() not in images.IMAGE_EXTENSIONS:
            raise UserError(f"--grid-path {args.grid_path} needs an image suffix, e.g. .png")
        cli.ensure_writable_file(grid, "--grid-path")


def generate(plan, model, diffusion, args, accelerator, intensity):
    """Sample this rank's share of the missing images; returns (written, batches run, skipped)."""
    # A file that does not decode (a run killed mid-write by an older version) is redone.
    # Decided before any rank writes, so all ranks agree on the list they split.
    todo = [
        (i, label, path)
        for i, (label, path) in enumerate(plan)
        if args.overwrite or not images.is_readable_image(path)
    ]
    accelerator.wait_for_everyone()  # every rank must see the same missing files before any rank writes
    # Strided shares: ranks differ by at most one image, and every rank knows the others' shares.
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    for batch in batches:
        # Noise depends on the images' indices, not on the rank that draws them.
        # A CPU generator draws the same noise on any device and for any number of processes.
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + batch[0][0])
        labels = (
            None if batch[0][1] is None else torch.tensor([b[1] for b in batch], device=accelerator.device)
        )
        samples = diffusion.sample(
            model,
            len(batch),
            labels,
            args.cfg_scale,
            log_time=False,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            generator=gen,
            output_type="float",
        )
        # Each file is written atomically as soon as its batch is done: a killed job keeps what it finished.
        for (_, _, path), sample_01 in zip(batch, samples, strict=True):
            images.save(sample_01, path, intensity)
    return len(mine), len(batches), len(plan) - len(todo)


def write_extras(plan, args, class_names, intensity, channels):
    """The optional .npz of all requested images and the grid (rank 0, after every rank finished)."""
    if not (args.npz or args.grid_path):
        return
    # Read back from disk, so images skipped as already there are included too.
    samples = torch.stack([images.load(path, intensity, channels) for _, path in plan])  # (N, C, H, W)
    labels = np.array([-1 if label is None else label for label, _ in plan], dtype=np.int64)
    if args.npz:
        # The ADM evaluator's Inception takes 3 channels of uint8; evaluation maps labels by class_names.
        rgb = images.to_uint8_rgb(samples)
        np.savez(npz_path(args), arr_0=rgb, arr_1=labels, class_names=np.array(class_names, dtype=str))
        print(f"wrote {npz_path(args)} ({rgb.shape})")
    if args.grid_path:  # one column per class, capped at GRID_MAX_ROWS rows to stay viewable
        columns = len({label for label, _ in plan}) if plan[0][0] is not None else 8
        save_grid(samples[: columns * GRID_MAX_ROWS], columns, args.grid_path, intensity)
        print(f"wrote grid {args.grid_path}")


def sample(args, explicit):
    """Write --num-samples images, skipping those already there, split over the processes."""
    model, class_names, config, intensity, weights = load_sampling_model(args, explicit)
    check_sample_args(args, config["noise_steps"])
    plan = plan_outputs(args, class_names, model.num_classes is not None, images.suffix(intensity))
    prepare_outputs(args, plan)
    # Every check is done: only now start the process group (one process under python, several under
    # torchrun or accelerate launch); sampling needs no mixed precision from it.
    accelerator = make_accelerator(args.device)
    model = model.to(accelerator.device).eval()
    diffusion = Diffusion.from_config(config, accelerator.device)
    steps = len(diffusion.make_sampler(args.sampler, args.steps).timesteps)
    start = time.perf_counter()
    written, batches, skipped = generate(plan, model, diffusion, args, accelerator, intensity)
    # The sum is collective, so it also waits for every rank's last file before the .npz reads them.
    (total,) = training.sum_across(accelerator, written)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        print(
            f"{args.sampler} with cfg_scale {args.cfg_scale} and the {weights} of {args.ckpt} on "
            f"{accelerator.num_processes} process(es), {accelerator.device}; "
            f"writing {images.describe(intensity)}"
        )
        print(training.timing_line(int(total), steps, batches, seconds))
        print(f"{len(plan)} images in {args.output_dir} ({int(total)} new, {skipped} already there)")
        write_extras(plan, args, class_names, intensity, model.c_in)
    accelerator.end_training()


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_flags(parser, argv)
    explicit = cli.explicit_flags(parser, argv)
    # Both kinds of modes run the same code; a plain mode under a launcher is refused because several
    # processes would then be what the user did not ask for.
    if not args.mode.endswith("_ddp") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--mode {args.mode} runs one process: use --mode {args.mode}_ddp under torchrun")
    if args.mode.startswith("train"):
        train(args, explicit)
    else:
        sample(args, explicit)


if __name__ == "__main__":
    run_cli(main)
