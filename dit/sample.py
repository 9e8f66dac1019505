"""Sample images from a DiT checkpoint: one written by train.py (EMA weights by default) or an official
DiT file (a plain state_dict such as pretrained_models/DiT-XL-2-256x256.pt from download.py).

Images go to OUTPUT/<class_name>/<index:06d>.png, written atomically at the training data's bit depth and
channel count (a 16-bit gray data set gives 16-bit gray PNGs, float data .tif files). Files that already
exist and decode completely are kept and skipped, so an interrupted run continues where it stopped. The
architecture, image size, classes, decoding rule and objective are read from the checkpoint; flags that
contradict it are an error. A ddpm checkpoint samples with ddpm or ddim; a vp, subvp, ve or flow one with
pc, euler, heun, rk45 or dpm++ (--likelihood DIR reports bits/dim of the VAE latents instead).
"""

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core import cli, images, sde_cli, training
from core.errors import UserError, run_cli
from core.files import TEMP_MARK, atomic_write, clean_temporaries
from diffusion import classifier_free_guidance, create_diffusion
from diffusion.objectives import STEPS_HELP, add_sampler_flags, choose_sampler, saved_keys
from download import official_checkpoint
from utils import (
    accelerator_for,
    add_architecture_flags,
    architecture,
    build_dit,
    checkpoint_mismatch,
    class_counts,
    data_rule,
    images_from_latents,
    latent_size,
    load_checkpoint,
    load_vae,
    other_model,
    state_dict_facts,
    vae_downsample,
    variant_name,
)

MAX_STEPS = 1000  # the diffusion schedule of every DiT


def step_count(text):
    """argparse type: a number of respaced steps, 1 to MAX_STEPS."""
    value = cli.positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_STEPS}, got {value}")
    return value


def build_parser(ddp=False):
    """Flags of sample.py, or of sample_ddp.py (other defaults, FID sample counts, .npz always)."""
    parser = cli.Parser(description=__doc__)
    add = parser.add_argument
    add_architecture_flags(parser, None)
    add("--checkpoint", "--ckpt", help="checkpoint .pt (default: the official DiT-XL/2 file, downloaded)")
    add("--image_size", type=cli.positive_int, help="image side in pixels (default: from the checkpoint)")
    add("--num_classes", type=cli.positive_int, help="number of classes (default: from the checkpoint)")
    add("--vae", help="'ema', 'mse' or a local diffusers folder (default: the training VAE, else ema)")
    cfg, npz = (1.5, " (default: <output-dir>.npz)") if ddp else (4.0, "")
    add("--cfg_scale", "--guidance_scale", type=cli.finite_float, default=cfg, help="CFG scale; 1 = none")
    add("--cfg_channels", type=cli.positive_int, help="guide only the first N latent channels (default: all)")
    add("--num_inference_steps", "--num_sampling_steps", type=step_count, help=STEPS_HELP)
    add("--eta", type=cli.nonnegative_float, default=0.0, help="DDIM noise; 0 (the default) is deterministic")
    add_sampler_flags(parser)
    add("--class_labels", nargs="+", help="class indices or names, spread evenly (default: all classes)")
    if ddp:
        add("--num_fid_samples", type=cli.positive_int, default=50000, help="exact total number of images")
        add("--batch_size", "--per_proc_batch_size", type=cli.positive_int, default=32, help="per process")
        add("--output_dir", help="output folder (default: SAMPLE_DIR/<model>-<ckpt>-size-S-cfg-C-seed-N)")
        add("--sample_dir", default="samples", help="parent of the default output folder and .npz")
    else:
        add("--num_samples", type=cli.positive_int, default=8, help="total number of images")
        add("--batch_size", type=cli.positive_int, default=8, help="images per batch")
        add("--output_dir", default="samples", help="output folder")
    add("--npz", help=f"also write an .npz for the ADM evaluator (arr_0 uint8 NxHxWx3, arr_1 labels){npz}")
    add("--seed", "--global_seed", type=int, default=0, help="random seed")
    add("--weights", choices=["ema", "model"], default="ema", help="which weights of a train.py checkpoint")
    add("--mixed_precision", "--precision", type=cli.mixed_precision, default="no", help="no, fp16 or bf16")
    add("--overwrite", action="store_true", help="regenerate images that already exist")
    return parser


def checkpoint_weights(ckpt, path, weights):
    """(state_dict, saved config) of a train.py checkpoint, an original DiT train.py file or a state_dict."""
    what = other_model(ckpt)
    if what:
        raise UserError(
            f"--ckpt {path} is {what}, not a DiT checkpoint: pass one from dit/train.py "
            "(RESULTS/NNN-<model>/checkpoints) or an official DiT file"
        )
    if isinstance(ckpt, dict) and weights in ckpt and isinstance(ckpt[weights], dict):
        saved = ckpt.get("config")
        if saved is None and "args" in ckpt:  # facebookresearch/DiT train.py: args is a Namespace
            saved = {k: getattr(ckpt["args"], k, None) for k in ("model", "vae")}
        return ckpt[weights], saved or {}
    if isinstance(ckpt, dict) and "pos_embed" in ckpt:
        return ckpt, {}
    raise UserError(f"{path} holds no DiT weights (expected a train.py checkpoint or a DiT state_dict)")


def resolve_config(args, facts, saved, vae):
    """Model config from the flags, falling back to the checkpoint; contradictions are user errors."""
    name = args.model or saved.get("model") or variant_name(facts)
    if name is None:
        raise UserError(
            f"the checkpoint's shapes ({facts}) match no DiT variant; pass --model and --num-heads"
        )
    # A checkpoint's own size overrides apply only to its own variant; another --model is compared as named.
    saved_arch = saved if name == saved.get("model") else {}
    flags = {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads")}
    arch = architecture(name, {k: flags[k] if flags[k] is not None else saved_arch.get(k) for k in flags})
    # A RoPE model has no table to read its size from, and samples at any size that fits the patches.
    image_size = args.image_size or facts["image_size"] or saved["image_size"]
    return dict(
        model=name,
        **arch,
        **saved_keys(saved),
        image_size=image_size,
        num_classes=args.num_classes or facts["num_classes"],
        in_channels=vae.config.latent_channels,
        input_size=latent_size(image_size, vae_downsample(vae), arch["patch_size"]),
        latent_scale=float(vae.config.scaling_factor),
        class_names=saved.get("class_names", []),
    )


def load_model(args, device):
    """DiT (strictly loaded), its config (with the data's decoding rule and channels, and the sampling plan
    of choose_sampler() under "sampling") and the VAE."""
    path = args.checkpoint
    ckpt = load_checkpoint(path)
    state, saved = checkpoint_weights(ckpt, path, args.weights)
    plan = choose_sampler(args, saved, path)  # a sampler that does not apply fails before the VAE loads
    vae = load_vae(args.vae or saved.get("vae") or "ema", device)
    facts = state_dict_facts(state, vae_downsample(vae))
    config = resolve_config(args, facts, saved, vae)
    config["intensity"], config["channels"] = data_rule(ckpt)
    config["sampling"] = plan
    problem = checkpoint_mismatch(facts, config)
    if problem:
        raise UserError(f"{path} does not fit the chosen model: {problem}")
    model = build_dit(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(
            f"{path} does not load into {config['model']}: {str(err).splitlines()[1].strip()}"
        ) from None
    return model.to(device).eval(), config, vae, path


def official_path(args):
    """Official DiT-XL/2 file for --image-size (256 or 512), downloaded if missing."""
    if args.model not in (None, "DiT-XL/2"):
        raise UserError(f"--ckpt is required for {args.model}: official weights exist only for DiT-XL/2")
    return official_checkpoint(args.image_size or 256)


def class_folder(config, label):
    """Output folder name of a class: its training name, else its index."""
    names = config["class_names"]
    return names[label] if label < len(names) else str(label)


def parse_labels(tokens, config):
    """Class indices from indices or class names, checked against the model."""
    if tokens is None:
        return list(range(config["num_classes"]))
    labels = []
    for token in tokens:
        if token in config["class_names"]:
            labels.append(config["class_names"].index(token))
        elif token.lstrip("-").isdigit() and 0 <= int(token) < config["num_classes"]:
            labels.append(int(token))
        else:
            known = f" or a name in {config['class_names']}" if config["class_names"] else ""
            raise UserError(
                f"--class-labels {token}: not a class index 0..{config['num_classes'] - 1}{known}"
            )
    return list(dict.fromkeys(labels))


def output_rule(config):
    """The rule samples are written and read back with: the data's, but colour is 8-bit (PIL writes no
    deeper colour PNG), so 16-bit gray data gives 16-bit gray PNGs and colour data 8-bit RGB ones."""
    return images.EIGHT_BIT if config["channels"] == 3 else config["intensity"]


def sampling_plan(labels, total, config, output_dir):
    """(label, output path) of every image, the total spread as evenly as possible over the labels."""
    suffix = images.suffix(output_rule(config))
    plan = []
    for label, count in zip(labels, class_counts(total, len(labels)), strict=True):
        folder = os.path.join(output_dir, class_folder(config, label))
        plan += [(label, os.path.join(folder, f"{i:06d}{suffix}")) for i in range(count)]
    return plan


def clean_stale_temporaries(plan, output_dir, npz_path):
    """Remove what a killed run left half written: temporaries in the output folders and of this .npz."""
    for folder in {output_dir, *(os.path.dirname(path) for _, path in plan)}:
        clean_temporaries(folder)
    if npz_path and os.path.isdir(os.path.dirname(os.path.abspath(npz_path))):
        # The .npz folder may be shared with other runs writing theirs now: remove only this file's.
        npz = Path(npz_path).absolute()
        for stale in npz.parent.iterdir():
            if stale.name.startswith(f".{npz.name}{TEMP_MARK}"):
                stale.unlink(missing_ok=True)


def sample_batch(model, vae, diffusion, config, args, labels, seed, accelerator):
    """(images (N, channels, H, W) in [0, 1], NFE) of one batch; its noise depends only on the seed."""
    device, plan = accelerator.device, config["sampling"]
    generator = torch.Generator(device).manual_seed(seed)
    size = config["input_size"]
    shape = (len(labels), config["in_channels"], size, size)
    y = torch.tensor(labels, device=device)
    # One guidance wrapper for every sampler: both halves run as one batch, so they count as one NFE.
    model_fn = classifier_free_guidance(model, args.cfg_scale, model.null_class, args.cfg_channels)
    with accelerator.autocast():
        if plan["objective"] is None:
            noise = torch.randn(shape, generator=generator, device=device)
            latents = diffusion.sample_loop(model_fn, noise, y, plan["method"], args.eta, generator)
            nfe = plan["steps"]
        else:
            latents, nfe = sde_cli.sample_with_plan(
                model_fn, plan, shape, y=y, generator=generator, device=device
            )
    return images_from_latents(vae, latents.float(), config["latent_scale"], config["channels"]), nfe


def objective_name(sampler):
    return "ddpm" if sampler["objective"] is None else sampler["objective"].name


def print_summary(sampler, args, count, batch_count, nfe_total, seconds, world):
    """The sampler line with its NFE, and the timing line."""
    # rk45 picks its own steps, so its NFE is an average over the batches (and stands in for steps).
    nfe = round(nfe_total / batch_count) if batch_count else 0
    shown = sampler["steps"] or "adaptive"
    print(f"{sampler['method']}, {shown} steps, NFE {nfe} per batch, cfg {args.cfg_scale}")
    # ms/step is per batch of one process: the processes run their batches side by side.
    steps, batches = sampler["steps"] or nfe, math.ceil(batch_count / world)
    print(training.timing_line(count, steps, batches, seconds, "Timing"))


def default_output_dir(args, config, ckpt_path):
    """SAMPLE_DIR/<model>-<ckpt>-size-<S>-cfg-<scale>-seed-<seed>, as the original sample_ddp.py names it."""
    stem = os.path.splitext(os.path.basename(ckpt_path))[0]
    model = config["model"].replace("/", "-")
    name = f"{model}-{stem}-size-{config['image_size']}-cfg-{args.cfg_scale}-seed-{args.seed}"
    return os.path.join(getattr(args, "sample_dir", "samples"), name)


def write_npz(plan, path, intensity, channels, class_names):
    """All planned images as arr_0 (N, H, W, 3) uint8 RGB, as the ADM evaluator expects, their labels as
    arr_1 and class_names[label] the name of each label."""
    first = images.to_uint8_rgb(images.load(plan[0][1], intensity, channels)[None])
    arr = np.empty((len(plan), *first.shape[1:]), dtype=np.uint8)  # filled in place: 50K images are GBs
    for i, (_, image_path) in enumerate(plan):
        arr[i] = images.to_uint8_rgb(images.load(image_path, intensity, channels)[None])[0]
    labels = np.array([label for label, _ in plan])

    def write(tmp):
        with open(tmp, "wb") as file:  # a file object, so numpy adds no second .npz suffix
            np.savez(file, arr_0=arr, arr_1=labels, class_names=np.array(class_names, dtype=str))

    atomic_write(path, write)
    return arr.shape


def check_outputs(args, config, output_dir, npz_path):
    """Reject guidance settings that do not fit the model and output paths that cannot be written."""
    if args.cfg_channels is not None and args.cfg_channels > config["in_channels"]:
        raise UserError(
            f"--cfg-channels {args.cfg_channels}: the latents have {config['in_channels']} channels"
        )
    if not args.output_dir and hasattr(args, "sample_dir"):  # the default output folder goes under it
        cli.ensure_writable_dir(args.sample_dir, "--sample-dir")
    cli.check_creatable_dir(output_dir, "--output-dir")  # "under the file ..." names the culprit
    cli.ensure_writable_dir(output_dir, "--output-dir")
    if npz_path:
        cli.ensure_writable_file(npz_path, "--npz")


def main(ddp=False):
    args = build_parser(ddp).parse_args()
    with accelerator_for(args.mixed_precision) as accelerator:
        sample(args, ddp, accelerator)


def sample(args, ddp, accelerator):
    torch.set_grad_enabled(False)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.checkpoint is None:
        with accelerator.main_process_first():  # the official file is downloaded once, by the main process
            args.checkpoint = official_path(args)
    model, config, vae, ckpt_path = load_model(args, accelerator.device)
    sampler = config["sampling"]
    if args.likelihood:
        # Imported here: the data set code brings in torchvision, seconds that plain sampling never needs.
        from likelihood import report_likelihood

        return report_likelihood(args, model, vae, config, sampler["objective"], accelerator)
    output_dir = args.output_dir or default_output_dir(args, config, ckpt_path)
    npz_path = args.npz or (f"{output_dir.rstrip('/')}.npz" if ddp else None)
    check_outputs(args, config, output_dir, npz_path)
    total = args.num_fid_samples if ddp else args.num_samples
    plan = sampling_plan(parse_labels(args.class_labels, config), total, config, output_dir)
    rule = output_rule(config)
    if accelerator.is_main_process:
        clean_stale_temporaries(plan, output_dir, npz_path)
    accelerator.wait_for_everyone()  # no process writes before the stale files are gone

    # Batch j goes to process j % world and its noise depends only on the seed and j, so the images do
    # not depend on the number of processes. A file counts as done only if it decodes completely: a
    # truncated one from a killed run is made again.
    diffusion = create_diffusion(sampler["steps"]) if sampler["objective"] is None else None
    batches = [plan[i : i + args.batch_size] for i in range(0, len(plan), args.batch_size)]
    mine = [(j, b) for j, b in enumerate(batches) if j % world == rank]
    todo = [(j, b) for j, b in mine if args.overwrite or not all(images.is_readable_image(p) for _, p in b)]
    (done,) = training.sum_across(accelerator, len(mine) - len(todo))
    if accelerator.is_main_process:
        print(
            f"Sampling {len(plan)} images of {config['model']} ({ckpt_path}) into {output_dir}: "
            f"{objective_name(sampler)} objective, cfg {args.cfg_scale}, "
            f"{world} process(es) on {accelerator.device}; {config['channels']}-channel "
            f"{images.describe(rule)}; {int(done)} of {len(batches)} batches already done"
        )
    timer, generated, nfe = training.Timer(accelerator.device), 0, 0
    for j, batch in tqdm(todo, disable=not accelerator.is_main_process, desc="batches", file=sys.stdout):
        labels = [label for label, _ in batch]
        samples, batch_nfe = sample_batch(
            model, vae, diffusion, config, args, labels, args.seed * 1_000_003 + j, accelerator
        )
        nfe += batch_nfe
        for (_, path), sample_image in zip(batch, samples, strict=True):
            if args.overwrite or not images.is_readable_image(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                images.save(sample_image, path, rule)
        generated += len(batch)
    seconds = timer.elapsed()
    count, batch_count, nfe_total = training.sum_across(accelerator, generated, len(todo), nfe)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print_summary(sampler, args, int(count), batch_count, nfe_total, seconds, world)
        if npz_path:
            class_names = [class_folder(config, label) for label in range(config["num_classes"])]
            shape = write_npz(plan, npz_path, rule, config["channels"], class_names)
            print(f"Wrote {npz_path} with arr_0 of shape {shape}")


if __name__ == "__main__":
    run_cli(main)
