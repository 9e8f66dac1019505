"""Train or sample the class-conditional DDPM on one process or many (DDP).

Modes: `train` and `sample` run as one process (`python ddpm_conditional_ddp.py --mode ...`); `train_ddp` and
`sample_ddp` run one process per GPU under torchrun (NCCL on GPUs, gloo on CPUs), on one node or several.
Sampling reads the architecture, schedule, class names and intensity rule from the checkpoint and uses its EMA
weights; a bare state_dict needs the architecture flags it was trained with. Samples are written at the
training data's depth: 8-bit PNG, 16-bit PNG for deeper integer data, TIFF for float data. --classifier adds
classifier guidance by a classifier of train_classifier.py, for conditional and unconditional models alike.
"""

import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

import likelihood
from classifier import CLASSIFIER_FORMAT, check_fits, load_classifier
from core import cli, datasets, images, sde_cli, training
from core.files import clean_temporaries
from diffusion import Diffusion, sample_objective
from flags import add_config_flag, add_train_args, parse_flags
from modules import build_model
from run_config import ARCH_KEYS, model_config, saved_config
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
STEPS_HELP = "sampling steps (unset: ddpm 1000, ddim 50, pc 1000, euler 100, heun 50, dpm++ 20; rk45 adapts)"
LIKELIHOOD_HELP = "instead of sampling: bits/dim of the images in this folder (vp / subvp / ve / flow)"
CLASSIFIER_HELP = "classifier guidance by this train_classifier.py checkpoint (ddpm and ddim samplers)"
SCALE_HELP = "classifier guidance scale S: DDPM mean + S Sigma grad log p(y|x_t) (0: unguided)"


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
    flag("steps", type=cli.positive_int, help=STEPS_HELP)
    flag("eta", type=cli.nonnegative_float, default=0.0, help="DDIM noise (0: deterministic)")
    flag("classifier", metavar="PATH", help=CLASSIFIER_HELP)
    flag("classifier_scale", type=cli.nonnegative_float, default=1.0, metavar="S", help=SCALE_HELP)
    sde_cli.add_sampler_flags(parser, LIKELIHOOD_HELP, dashed=True)  # --sampler, pc / ODE, --likelihood
    flag("npz", action="store_true", help="also <output-dir>.npz: arr_0 uint8 N x H x W x 3, arr_1 labels")
    flag("grid_path", help="also an image grid of the samples, one column per class (outside --output-dir)")


def build_parser():
    parser = cli.Parser(description=__doc__, epilog=datasets.CLASS_LAYOUT)
    add_flag(parser, "mode", default="train", choices=MODES, help="what to run (_ddp: one process per GPU)")
    add_config_flag(parser)
    add_train_args(parser.add_argument_group("training"), conditional=True)
    add_sample_args(parser.add_argument_group("sampling"))
    parser.set_defaults(batch_size=8)  # per process, as in the original examples
    return parser


# ----------------------------------------------------------------------------- model


def load_sampling_model(args, explicit):
    """The UNet to sample from, with its class names, training config, intensity rule, which weights and
    the sampling plan; the sampler settings are checked before the model is built."""
    if args.ckpt is None:
        raise UserError("pass --ckpt with a checkpoint, e.g. ./models/DDPM_conditional/ema_ckpt.pt")
    ckpt = load_checkpoint(args.ckpt)
    if ckpt.get("format") == CLASSIFIER_FORMAT:
        raise UserError(f"{args.ckpt} is a classifier: pass it as --classifier, and the DDPM as --ckpt")
    # Files of this project carry the architecture; a bare state_dict (the original's ckpt.pt) does not.
    full = is_full_checkpoint(ckpt)
    plan = sampling_plan(args, saved_config(ckpt) if full else vars(args))
    built = model_from_full_checkpoint(ckpt, args, explicit) if full else model_from_state_dict(ckpt, args)
    return (*built, plan)


def sampling_plan(args, config):
    """The objective (None: discrete DDPM), sampler and steps a run uses; a setting that does not apply to
    the checkpoint's objective is a UserError."""
    plan = sde_cli.sampling_plan(config, args, args.steps, args.ckpt)
    if plan["objective"] is None and args.steps is not None and args.steps > config["noise_steps"]:
        raise UserError(f"--steps must be between 1 and {config['noise_steps']}, got {args.steps}")
    return plan


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
    config = saved_config(ckpt)
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


def load_guide(args, explicit, model, config, class_names, objective):
    """The classifier of --classifier (None without one) and the class names the samples are labelled with:
    the DDPM's, or for an unconditional DDPM the classifier's."""
    if args.classifier is None:
        if "classifier_scale" in explicit:
            raise UserError(
                "--classifier-scale needs --classifier PATH (a checkpoint of train_classifier.py)"
            )
        return None, class_names
    if args.likelihood:
        raise UserError("--likelihood computes bits/dim without guidance: drop --classifier")
    if objective is not None:
        raise UserError(
            f"{args.ckpt} is a {objective.name}-objective model: classifier guidance is for the discrete "
            "DDPM (samplers ddpm and ddim)"
        )
    classifier, ckpt = load_classifier(args.classifier)
    conditional = model.num_classes is not None
    check_fits(ckpt, config, class_names, conditional, args.classifier)
    return classifier, class_names if conditional else ckpt["class_names"]


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


def generate(plan, draw, args, accelerator, intensity):
    """Sample this rank's share of the missing images; returns (written, batches run, skipped, NFE)."""
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
    nfe = 0
    for batch in batches:
        # Noise depends on the images' indices, not on the rank that draws them.
        # A CPU generator draws the same noise on any device and for any number of processes.
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + batch[0][0])
        labels = (
            None if batch[0][1] is None else torch.tensor([b[1] for b in batch], device=accelerator.device)
        )
        samples, batch_nfe = draw(len(batch), labels, gen)
        nfe += batch_nfe
        # Each file is written atomically as soon as its batch is done: a killed job keeps what it finished.
        for (_, _, path), sample_01 in zip(batch, samples, strict=True):
            images.save(sample_01, path, intensity)
    return len(mine), len(batches), len(plan) - len(todo), nfe


def sampler_for(model, config, sampler, args, device, classifier=None):
    """draw(n, labels, generator) -> (images in [0, 1], NFE) for the plan of sampling_plan()."""
    if sampler["objective"] is not None:
        options = {k: v for k, v in sampler.items() if k != "objective"}
        return lambda n, labels, generator: sample_objective(
            model, sampler["objective"], n, labels, args.cfg_scale, generator, **options
        )
    diffusion = Diffusion.from_config(config, device)
    method = sampler["method"]
    # The scheduler's own step count (e.g. 50 for DDIM when unset); guidance's two halves are one batch.
    steps = len(diffusion.make_sampler(method, sampler["steps"]).timesteps)

    def draw(n, labels, generator):
        out = diffusion.sample(
            model, n, labels, args.cfg_scale, log_time=False, sampler=method, steps=sampler["steps"],
            eta=args.eta, generator=generator, output_type="float", classifier=classifier,
            classifier_scale=args.classifier_scale,
        )  # fmt: skip
        return out, steps

    return draw


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
    model, class_names, config, intensity, weights, sampler = load_sampling_model(args, explicit)
    classifier, class_names = load_guide(args, explicit, model, config, class_names, sampler["objective"])
    if args.likelihood:
        return likelihood.report(args, model, class_names, intensity, sampler["objective"])
    # An unconditional DDPM guided by a classifier writes class folders, as a conditional one does.
    labelled = model.num_classes is not None or classifier is not None
    plan = plan_outputs(args, class_names, labelled, images.suffix(intensity))
    prepare_outputs(args, plan)
    # Every check is done: only now start the process group (one process under python, several under
    # torchrun or accelerate launch); sampling needs no mixed precision from it.
    accelerator = make_accelerator(args.device)
    try:
        sample_on(
            accelerator, plan, (model, classifier), config, sampler, args, class_names, intensity, weights
        )
    finally:
        accelerator.end_training()


def sample_on(accelerator, plan, models, config, sampler, args, class_names, intensity, weights):
    """The sampling of sample() once the process group runs: images, then the summary, .npz and grid.

    models: the DDPM and the guiding classifier (or None)."""
    model, classifier = (m if m is None else m.to(accelerator.device).eval() for m in models)
    draw = sampler_for(model, config, sampler, args, accelerator.device, classifier)
    start = time.perf_counter()
    written, batches, skipped, nfe = generate(plan, draw, args, accelerator, intensity)
    # The sum is collective, so it also waits for every rank's last file before the .npz reads them.
    total, nfe_total, batches_total = training.sum_across(accelerator, written, nfe, batches)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        # NFE: network evaluations per batch (rk45 chooses its own, so it is an average over batches).
        nfe_per_batch = round(nfe_total / batches_total) if batches_total else 0
        # Classifier-free guidance needs class labels: an unconditional model has none to guide with.
        guides = [f"cfg_scale {args.cfg_scale}"] if model.num_classes is not None else ["unconditional"]
        guides += [f"classifier_scale {args.classifier_scale}"] if classifier is not None else []
        guidance = ", ".join(guides)
        print(
            f"{sampler['method']}, NFE {nfe_per_batch} per batch, {guidance}, the {weights} "
            f"of {args.ckpt} on {accelerator.num_processes} process(es), {accelerator.device}; "
            f"writing {images.describe(intensity)}"
        )
        print(training.timing_line(int(total), nfe_per_batch, batches, seconds))
        print(f"{len(plan)} images in {args.output_dir} ({int(total)} new, {skipped} already there)")
        write_extras(plan, args, class_names, intensity, model.c_in)


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
