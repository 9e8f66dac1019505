"""Train or sample the class-conditional DDPM on one process or many (DDP).

Modes: `train` and `sample` run as one process (`python ddpm_conditional_ddp.py --mode ...`); `train_ddp` and
`sample_ddp` run one process per GPU under torchrun (NCCL on GPUs, gloo on CPUs), on one node or several.
Sampling reads the architecture, schedule and class names from the checkpoint; a bare state_dict needs the
architecture flags it was trained with.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flat imports from any working directory

from ddpm_conditional import ARCH_KEYS, Diffusion, add_train_args, model_config, train  # noqa: E402
from modules import build_model  # noqa: E402
from utils import (  # noqa: E402
    DistContext,
    UserError,
    add_flag,
    data_layout,
    explicit_flags,
    is_full_checkpoint,
    load_checkpoint,
    make_uint8_grid,
    open_image,
    print_timing,
    run_cli,
    save_image,
)

MODES = ("train", "train_ddp", "sample", "sample_ddp")
GRID_MAX_ROWS = 10


def add_sample_args(parser):
    """Sampling flags (modes sample and sample_ddp)."""
    add_flag(
        parser, "ckpt", default=None, help="checkpoint to sample from: ckpt.pt, ema_ckpt.pt or a state_dict"
    )
    add_flag(parser, "use_ema", action="store_true", help="sample with the EMA weights of a full checkpoint")
    add_flag(parser, "num_samples", type=int, default=8, help="total images to write, balanced over classes")
    add_flag(
        parser,
        "class_labels",
        nargs="+",
        default=None,
        help="classes to generate, as indices or folder names (default: all classes)",
    )
    add_flag(
        parser, "cfg_scale", type=float, default=3.0, help="guidance: 0 unconditional, 1 conditional, >1 CFG"
    )
    add_flag(
        parser, "output_dir", default="samples", help="images go to <output-dir>/<class_name>/<index>.png"
    )
    add_flag(parser, "sampler", default="ddpm", choices=("ddpm", "ddim"), help="ancestral DDPM or DDIM")
    add_flag(
        parser, "steps", type=int, default=None, help="denoising steps (default: 1000 for ddpm, 50 for ddim)"
    )
    add_flag(parser, "eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    add_flag(
        parser,
        "npz",
        action="store_true",
        help="also write <output-dir>.npz (arr_0 uint8 N x H x W x 3, arr_1 labels)",
    )
    add_flag(
        parser, "grid_path", default=None, help="also write a PNG grid of the images, one column per class"
    )


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=f"Data layout: {data_layout()}",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flag(
        parser, "mode", default="train", choices=MODES, help="what to run (the _ddp modes need torchrun)"
    )
    add_train_args(parser.add_argument_group("training"), conditional=True)
    add_sample_args(parser.add_argument_group("sampling"))
    parser.set_defaults(batch_size=8)  # per process, as in the original examples
    return parser


# ----------------------------------------------------------------------------- model


def load_sampling_model(args, explicit):
    """The UNet to sample from, its class names and its training config."""
    if args.ckpt is None:
        raise UserError("pass --ckpt with a checkpoint, e.g. ./models/DDPM_conditional/ema_ckpt.pt")
    ckpt = load_checkpoint(args.ckpt)
    if is_full_checkpoint(ckpt):
        return model_from_full_checkpoint(ckpt, args, explicit)
    return model_from_state_dict(ckpt, args)


def model_from_full_checkpoint(ckpt, args, explicit):
    """Rebuild the UNet from the config a training run stored."""
    config = ckpt["config"]
    for key in ARCH_KEYS:
        if key in explicit and getattr(args, key) != config.get(key):
            raise UserError(f"{args.ckpt} was trained with {key}={config.get(key)}, not {getattr(args, key)}")
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["ema"] if args.use_ema and "ema" in ckpt else ckpt["model"])
    num_classes = model.num_classes or 0
    return model, ckpt["class_names"] or [str(i) for i in range(num_classes)], config


def model_from_state_dict(state_dict, args):
    """Build the UNet from the architecture flags and load a bare state_dict into it."""
    if args.use_ema:
        raise UserError(f"{args.ckpt} is a bare state_dict without EMA weights: drop --use-ema")
    if args.num_classes is None and "label_emb.weight" in state_dict:
        raise UserError(
            f"{args.ckpt} is a bare class-conditional state_dict: pass --num-classes and --image-size"
        )
    config = {**vars(args), "channels": args.channels or 3}
    try:
        model = build_model(model_config(config))
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(
            f"{args.ckpt} does not fit a UNet built from the flags ({first_line}): pass the --image-size, "
            "--num-classes, --channels, --base-channels, --time-dim and --attn-resolutions used in training"
        ) from None
    return model, [str(i) for i in range(args.num_classes or 0)], config


def parse_class_labels(tokens, class_names):
    """Class indices from tokens that are indices or folder names, without repeats."""
    if tokens is None:
        return list(range(len(class_names)))
    labels = []
    for token in tokens:
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


def plan_outputs(args, class_names, conditional):
    """(label, path) of every requested image, in a fixed order so reruns find the same files."""
    out = Path(args.output_dir)
    if not conditional:
        if args.class_labels:
            raise UserError(f"{args.ckpt} is an unconditional model: drop --class-labels")
        return [(None, out / f"{i:06d}.png") for i in range(args.num_samples)]
    labels = parse_class_labels(args.class_labels, class_names)
    k = len(labels)
    return [
        (labels[i % k], out / class_names[labels[i % k]] / f"{i // k:06d}.png")
        for i in range(args.num_samples)
    ]


def check_sample_args(args, noise_steps):
    for key in ("num_samples", "batch_size"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.steps is not None and not 1 <= args.steps <= noise_steps:
        raise UserError(f"--steps must be between 1 and {noise_steps}, got {args.steps}")
    if args.cfg_scale < 0 or args.eta < 0:
        raise UserError("--cfg-scale and --eta must not be negative")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise UserError(f"--output-dir {args.output_dir} is a file: choose a folder")


def generate(plan, model, diffusion, args, ctx):
    """Sample this rank's share of the missing images; returns (written, batches run, skipped)."""
    todo = [(i, label, path) for i, (label, path) in enumerate(plan) if args.overwrite or not path.exists()]
    ctx.barrier()  # every rank must see the same missing files before any rank writes new ones
    mine = todo[ctx.rank :: ctx.world_size]
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    for batch in batches:
        # Noise depends on the images' indices, not on the rank that draws them.
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + batch[0][0])
        labels = None if batch[0][1] is None else torch.tensor([b[1] for b in batch], device=ctx.device)
        images = diffusion.sample(
            model,
            len(batch),
            labels,
            args.cfg_scale,
            log_time=False,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            generator=gen,
        )
        for (_, _, path), image in zip(batch, images, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(image, path)
    return len(mine), len(batches), len(plan) - len(todo)


def write_extras(plan, args):
    """The optional .npz of all requested images and the PNG grid (rank 0, after every rank finished)."""
    if not (args.npz or args.grid_path):
        return
    images = np.stack([np.asarray(open_image(path)) for _, path in plan])
    images = images[..., None] if images.ndim == 3 else images  # (N, H, W, C)
    labels = np.array([-1 if label is None else label for label, _ in plan], dtype=np.int64)
    if args.npz:
        npz_path = Path(args.output_dir).with_suffix(".npz")
        # The ADM evaluator's Inception takes 3 channels: grayscale (1) is repeated, RGB (3) kept.
        rgb = np.repeat(images, 3 // images.shape[-1], axis=-1)
        np.savez(npz_path, arr_0=rgb, arr_1=labels)
        print(f"wrote {npz_path} ({rgb.shape})")
    if args.grid_path:
        columns = len({label for label, _ in plan}) if plan[0][0] is not None else 8
        shown = torch.from_numpy(images[: columns * GRID_MAX_ROWS]).permute(0, 3, 1, 2)
        Path(args.grid_path).parent.mkdir(parents=True, exist_ok=True)
        save_image(make_uint8_grid(shown, nrow=columns), args.grid_path)
        print(f"wrote grid {args.grid_path}")


def sample(args, explicit, distributed):
    """Write --num-samples images as PNG, skipping those already there, split over the processes."""
    model, class_names, config = load_sampling_model(args, explicit)
    check_sample_args(args, config["noise_steps"])
    plan = plan_outputs(args, class_names, model.num_classes is not None)
    ctx = DistContext(distributed, args.device)
    model = model.to(ctx.device).eval()
    diffusion = Diffusion.from_config(config, ctx.device)
    steps = len(diffusion.make_sampler(args.sampler, args.steps).timesteps)
    start = time.perf_counter()
    written, batches, skipped = generate(plan, model, diffusion, args, ctx)
    total = int(ctx.all_reduce_sum(torch.tensor([written], device=ctx.device)).item())
    ctx.barrier()
    seconds = time.perf_counter() - start
    if ctx.is_main:
        print(f"{args.sampler} with cfg_scale {args.cfg_scale} on {ctx.world_size} process(es), {ctx.device}")
        print_timing(total, steps, seconds, batches)
        print(f"{len(plan)} images in {args.output_dir} ({total} new, {skipped} already there)")
        write_extras(plan, args)
    ctx.close()


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    if not args.mode.endswith("_ddp") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--mode {args.mode} runs one process: use --mode {args.mode}_ddp under torchrun")
    if args.mode.startswith("train"):
        train(args, explicit, distributed=args.mode == "train_ddp")
    else:
        sample(args, explicit, distributed=args.mode == "sample_ddp")


if __name__ == "__main__":
    run_cli(main)
